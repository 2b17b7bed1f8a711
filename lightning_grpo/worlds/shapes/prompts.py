"""Prompt templates, the prompt parser, and the train / held-out split of the shapes world.

Templates: a few paraphrases of one sentence (`TEMPLATES`), so a policy cannot rely on one word
order; these are the only phrasings training ever uses (RL prompts and the toy pipelines'
pretraining captions). `HELDOUT_TEMPLATES` are reserved paraphrases that no training sees: built
only from words that the training templates also use (so the toy text encoders' vocabulary covers
them, and the pretrained denoiser has read every word, only never in these sentences), in new
word orders. The parser does not depend on the templates: it finds exactly one colour word, one shape
word, and one vertical (top/upper, bottom/lower) plus one horizontal (left/right) word anywhere in
the prompt, so it also reads hand-written prompts such as "upper-left: RED square!".

Split (compositional generalisation): a combination (colour c, shape s, position p), by index, is
held out iff (c + s + p) % 3 == 0. With 4 colours × 3 shapes × 4 positions that holds out 16 of
48 combinations (33%). Because s takes each residue mod 3 exactly once, every (colour, position)
pair keeps exactly 2 of its 3 shapes in training, and every (colour, shape) and (shape, position)
pair keeps at least 2 of its 4 positions / colours; so every single attribute value and every
pair of values is seen in RL training, and only the held-out triples are new.

Held-out splits (`HELDOUT_SPLITS`, reported separately): "new_combinations" = held-out triples in
training phrasings (16 × 5 = 80 prompts), "new_phrasings" = training triples in reserved phrasings
(32 × 3 = 96), "both" = held-out triples in reserved phrasings (16 × 3 = 48).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, SHAPES, Scene, all_scenes

#: Paraphrase templates; index 0 is the canonical one ("a red circle at the top left").
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} at the {position}",
    "a {colour} {shape} in the {position} corner",
    "{position}: a {colour} {shape}",
    "there is a {colour} {shape} in the {position} of the image",
    "a {shape} coloured {colour} at the {position}",
)

#: Reserved paraphrases, never used in training (RL prompts or pretraining captions); every word
#: also occurs in `TEMPLATES`, in other sentences.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "at the {position} there is a {colour} {shape}",
    "the {colour} {shape} is in the {position}",
    "{position}: the {shape} coloured {colour}",
)

Phrasing = Literal["train", "heldout"]
#: The held-out evaluation splits, in report order.
HELDOUT_SPLITS: tuple[str, ...] = ("new_combinations", "new_phrasings", "both")

#: Words that name the vertical / horizontal half of a position (synonyms map to the canonical word).
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_SPLIT_MODULUS = 3


class PromptParseError(ValueError):
    """A prompt does not name exactly one colour, one shape and one position; the message names it."""


def templates_of(phrasing: Phrasing) -> tuple[str, ...]:
    """`TEMPLATES` for "train", `HELDOUT_TEMPLATES` for "heldout"; a ValueError names anything else."""
    if phrasing == "train":
        return TEMPLATES
    if phrasing == "heldout":
        return HELDOUT_TEMPLATES
    raise ValueError(f"phrasing must be 'train' or 'heldout', got {phrasing!r}")


def describe(scene: Scene, template: int = 0, phrasing: Phrasing = "train") -> str:
    """The prompt for `scene` written with template `template` of `templates_of(phrasing)`."""
    templates = templates_of(phrasing)
    if not 0 <= template < len(templates):
        raise IndexError(f"template {template} out of range; there are {len(templates)} {phrasing} templates")
    return templates[template].format(colour=scene.colour, shape=scene.shape, position=scene.position)


def _one(prompt: str, kind: str, found: set[str], choices: Sequence[str]) -> str:
    """The single value of one attribute found in `prompt`, or a PromptParseError naming the prompt."""
    if len(found) == 1:
        return next(iter(found))
    problem = "no" if not found else f"conflicting {sorted(found)} for the"
    raise PromptParseError(f"cannot parse prompt {prompt!r}: {problem} {kind} (expected one of {list(choices)})")


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Scene:
    """The `Scene` a prompt describes.

    Case, punctuation, hyphens and word order are ignored; "upper"/"lower" read as "top"/"bottom".
    Raises `PromptParseError` (naming the prompt) when an attribute is missing or ambiguous.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = _one(prompt, "colour", {w for w in words if w in COLOUR_NAMES}, COLOUR_NAMES)
    shape = _one(prompt, "shape", {w for w in words if w in SHAPES}, SHAPES)
    vertical = _one(prompt, "vertical position", {_VERTICAL[w] for w in words if w in _VERTICAL}, ("top", "bottom"))
    horizontal = _one(
        prompt, "horizontal position", {_HORIZONTAL[w] for w in words if w in _HORIZONTAL}, ("left", "right")
    )
    return Scene(colour, shape, f"{vertical} {horizontal}")


def is_heldout(scene: Scene) -> bool:
    """Whether the scene's combination is held out of RL training: (c + s + p) % 3 == 0 by index."""
    return sum(scene.indices) % _SPLIT_MODULUS == 0


def train_scenes() -> list[Scene]:
    """The 32 combinations RL training may use, in index order."""
    return [s for s in all_scenes() if not is_heldout(s)]


def heldout_scenes() -> list[Scene]:
    """The 16 combinations reserved for evaluation, in index order."""
    return [s for s in all_scenes() if is_heldout(s)]


def prompts_for(scenes: Sequence[Scene], templates: Sequence[int] | None = None, phrasing: Phrasing = "train") -> list[str]:
    """Every scene written with every chosen template of `phrasing` (default: all), scene-major order."""
    chosen = range(len(templates_of(phrasing))) if templates is None else templates
    return [describe(scene, t, phrasing) for scene in scenes for t in chosen]


def train_prompts(templates: Sequence[int] | None = None) -> list[str]:
    """RL training prompts: `train_scenes()` × templates (default all: 32 × 5 = 160 prompts)."""
    return prompts_for(train_scenes(), templates)


def heldout_prompts(templates: Sequence[int] | None = None) -> list[str]:
    """Held-out evaluation prompts of new combinations: `heldout_scenes()` × training templates
    (default all: 16 × 5 = 80); the "new_combinations" split."""
    return prompts_for(heldout_scenes(), templates)


def heldout_split_prompts(split: str) -> list[str]:
    """The prompts of one held-out split (see the module doc); a ValueError names an unknown split."""
    if split == "new_combinations":
        return heldout_prompts()
    if split == "new_phrasings":
        return prompts_for(train_scenes(), phrasing="heldout")
    if split == "both":
        return prompts_for(heldout_scenes(), phrasing="heldout")
    raise ValueError(f"unknown held-out split {split!r}; expected one of {list(HELDOUT_SPLITS)}")


def heldout_splits() -> dict[str, list[str]]:
    """split name -> its prompts, for every split in `HELDOUT_SPLITS`."""
    return {split: heldout_split_prompts(split) for split in HELDOUT_SPLITS}


def write_prompt_files(directory: str | Path, templates: Sequence[int] | None = None) -> dict[str, Path]:
    """Write `train.txt`, `heldout.txt` (new combinations, training `templates`),
    `heldout_phrasings.txt` and `heldout_both.txt` (reserved phrasings), one prompt a line, into
    `directory`; returns their paths keyed "train", "heldout", "new_phrasings", "both".

    Plain text files are what the prompt datamodule reads, so a recipe can point at them.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "train": ("train.txt", train_prompts(templates)),
        "heldout": ("heldout.txt", heldout_prompts(templates)),
        "new_phrasings": ("heldout_phrasings.txt", heldout_split_prompts("new_phrasings")),
        "both": ("heldout_both.txt", heldout_split_prompts("both")),
    }
    paths = {}
    for key, (name, prompts) in contents.items():
        paths[key] = out / name
        paths[key].write_text("\n".join(prompts) + "\n")
    return paths
