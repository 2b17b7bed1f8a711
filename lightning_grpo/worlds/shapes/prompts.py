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

from lightning_grpo.worlds.base import (
    HELDOUT_SPLITS,
    CompositionalSplit,
    Phrasebook,
    Phrasing,
    PromptParseError,
    one_value,
)
from lightning_grpo.worlds.base import write_prompt_files as _write_files
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, Scene, all_scenes
from lightning_grpo.worlds.tokenizers import words_of

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

#: Words that name the vertical / horizontal half of a position (synonyms map to the canonical word).
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}

#: The shapes world's templates and the fields a `Scene` fills them with.
PHRASEBOOK = Phrasebook(TEMPLATES, HELDOUT_TEMPLATES, lambda scene: {"colour": scene.colour, "shape": scene.shape,
                                                                      "position": scene.position})
#: The shapes world's split: (colour c, shape s, position p) held out iff (c + s + p) % 3 == 0.
SPLIT = CompositionalSplit(all_scenes)

templates_of = PHRASEBOOK.templates_of
describe = PHRASEBOOK.describe
prompts_for = PHRASEBOOK.prompts_for
is_heldout = SPLIT.is_heldout
train_scenes = SPLIT.train_scenes
heldout_scenes = SPLIT.heldout_scenes

__all__ = [
    "HELDOUT_SPLITS", "HELDOUT_TEMPLATES", "PHRASEBOOK", "SPLIT", "TEMPLATES", "Phrasing", "PromptParseError", "describe",
    "heldout_prompts", "heldout_scenes", "heldout_split_prompts", "heldout_splits", "is_heldout", "parse_prompt", "prompts_for",
    "templates_of", "train_prompts", "train_scenes", "vocabulary", "write_prompt_files",
]


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Scene:
    """The `Scene` a prompt describes.

    Case, punctuation, hyphens and word order are ignored; "upper"/"lower" read as "top"/"bottom".
    Raises `PromptParseError` (naming the prompt) when an attribute is missing or ambiguous.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = one_value(prompt, "colour", {w for w in words if w in COLOUR_NAMES}, COLOUR_NAMES)
    shape = one_value(prompt, "shape", {w for w in words if w in SHAPES}, SHAPES)
    vertical = one_value(prompt, "vertical position", {_VERTICAL[w] for w in words if w in _VERTICAL}, ("top", "bottom"))
    horizontal = one_value(
        prompt, "horizontal position", {_HORIZONTAL[w] for w in words if w in _HORIZONTAL}, ("left", "right")
    )
    return Scene(colour, shape, f"{vertical} {horizontal}")


def vocabulary() -> list[str]:
    """Every word the shapes world's prompts (and the parser's synonyms) use, reserved held-out
    phrasings included (they add no new word: the list, hence the shipped tokenizers, stay the same)."""
    return words_of(list(TEMPLATES) + list(HELDOUT_TEMPLATES) + list(COLOUR_NAMES) + list(SHAPES) + list(POSITIONS) + ["upper lower"])


def train_prompts(templates: Sequence[int] | None = None) -> list[str]:
    """RL training prompts: `train_scenes()` × templates (default all: 32 × 5 = 160 prompts)."""
    return prompts_for(train_scenes(), templates)


def heldout_prompts(templates: Sequence[int] | None = None) -> list[str]:
    """Held-out evaluation prompts of new combinations: `heldout_scenes()` × training templates
    (default all: 16 × 5 = 80); the "new_combinations" split."""
    return prompts_for(heldout_scenes(), templates)


def heldout_split_prompts(split: str) -> list[str]:
    """The prompts of one held-out split (see the module doc); a ValueError names an unknown split."""
    return SPLIT.split_prompts(PHRASEBOOK, split)


def heldout_splits() -> dict[str, list[str]]:
    """split name -> its prompts, for every split in `HELDOUT_SPLITS`."""
    return {split: heldout_split_prompts(split) for split in HELDOUT_SPLITS}


#: File names of `write_prompt_files`, keyed like its result.
PROMPT_FILES = {"train": "train.txt", "new_combinations": "heldout.txt", "new_phrasings": "heldout_phrasings.txt",
                "both": "heldout_both.txt"}


def write_prompt_files(directory: str | Path, templates: Sequence[int] | None = None) -> dict[str, Path]:
    """Write `train.txt`, `heldout.txt` (new combinations, training `templates`),
    `heldout_phrasings.txt` and `heldout_both.txt` (reserved phrasings), one prompt a line, into
    `directory`; returns their paths keyed "train", "heldout", "new_phrasings", "both".

    Plain text files are what the prompt datamodule reads, so a recipe can point at them.
    """
    paths = _write_files(directory, SPLIT.prompt_sets(PHRASEBOOK, templates), PROMPT_FILES)
    paths["heldout"] = paths.pop("new_combinations")
    return {key: paths[key] for key in ("train", "heldout", "new_phrasings", "both")}
