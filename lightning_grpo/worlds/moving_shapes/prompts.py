"""Prompt templates, the prompt parser, and the train / held-out split of the moving-shapes world.

Templates: paraphrases of "a red circle moving to the right" (`MOTION_TEMPLATES`), the only
phrasings training uses (RL prompts and the toy video pipelines' pretraining captions).
`HELDOUT_MOTION_TEMPLATES` are reserved paraphrases no training sees, built only from words the
training templates also use (so the toy text encoders' vocabulary has every word, and the
pretrained denoiser has read each, only never in these sentences), in new word orders; the same
fairness rule as the image world's (`lightning_grpo.worlds.shapes.prompts`). The parser does not depend on
the templates: it finds exactly one colour, one shape and one direction word anywhere in the
prompt ("upwards", "rightwards", ... read as "up", "right", ...).

Split (compositional generalisation), the image world's rule with the direction in place of the
position: (colour c, shape s, direction d), by index, is held out iff (c + s + d) % 3 == 0: 16 of
the 48 combinations; every single value and every pair of values is still trained (4 × 3 × 4 has
the same structure as the image world's 4 × 3 × 4).

Held-out splits (`HELDOUT_SPLITS`, reported separately): "new_combinations" = held-out triples in
training phrasings (16 × 5 = 80 prompts), "new_phrasings" = training triples in reserved phrasings
(32 × 3 = 96), "both" = held-out triples in reserved phrasings (16 × 3 = 48).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from lightning_grpo.worlds.base import HELDOUT_SPLITS, CompositionalSplit, Phrasebook, one_value, write_prompt_files
from lightning_grpo.worlds.moving_shapes.vocab import DIRECTIONS, MotionScene, all_motion_scenes
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, SHAPES
from lightning_grpo.worlds.tokenizers import words_of

#: How each direction is written in a sentence ("moving {motion}").
MOTION_PHRASES: dict[str, str] = {"right": "to the right", "left": "to the left", "up": "up", "down": "down"}

#: Paraphrase templates; index 0 is the canonical one ("a red circle moving to the right").
MOTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} moving {motion}",
    "a {colour} {shape} that moves {motion}",
    "a {shape} coloured {colour} moving {motion}",
    "{colour} {shape} sliding {motion} across the frame",
    "a video of a {colour} {shape} going {motion}",
)

#: Reserved paraphrases, never used in training; every word also occurs in `MOTION_TEMPLATES`
#: (or in `MOTION_PHRASES`), in other sentences.
HELDOUT_MOTION_TEMPLATES: tuple[str, ...] = (
    "moving {motion}: a {colour} {shape}",
    "a video of a {shape} coloured {colour} that moves {motion}",
    "the {colour} {shape} moves {motion} across the frame",
)

#: Words that name a direction (synonyms map to the canonical name).
_DIRECTION_WORDS = {
    "right": "right", "rightwards": "right", "left": "left", "leftwards": "left",
    "up": "up", "upwards": "up", "down": "down", "downwards": "down",
}

#: The moving-shapes templates, filled from a `MotionScene` (the direction written as its phrase).
MOTION_PHRASEBOOK = Phrasebook(
    MOTION_TEMPLATES, HELDOUT_MOTION_TEMPLATES,
    lambda scene: {"colour": scene.colour, "shape": scene.shape, "motion": MOTION_PHRASES[scene.direction]}, kind="motion ")
#: The image world's split rule with the direction in place of the position: (c + s + d) % 3 == 0 held out.
MOTION_SPLIT = CompositionalSplit(all_motion_scenes)

motion_templates_of, describe_motion = MOTION_PHRASEBOOK.templates_of, MOTION_PHRASEBOOK.describe
motion_prompts_for = MOTION_PHRASEBOOK.prompts_for
is_heldout_motion, train_motion_scenes, heldout_motion_scenes = (
    MOTION_SPLIT.is_heldout, MOTION_SPLIT.train_scenes, MOTION_SPLIT.heldout_scenes)

__all__ = [
    "HELDOUT_MOTION_TEMPLATES", "HELDOUT_SPLITS", "MOTION_PHRASEBOOK", "MOTION_PHRASES", "MOTION_SPLIT", "MOTION_TEMPLATES",
    "PROMPT_FILES", "describe_motion", "heldout_motion_scenes", "is_heldout_motion", "motion_heldout_split_prompts",
    "motion_heldout_splits", "motion_prompts_for", "motion_templates_of", "motion_words", "parse_motion_prompt",
    "train_motion_prompts", "train_motion_scenes", "write_motion_prompt_files",
]


@lru_cache(maxsize=4096)
def parse_motion_prompt(prompt: str) -> MotionScene:
    """The `MotionScene` a prompt describes.

    Case, punctuation and word order are ignored; "upwards", "leftwards", ... read as "up", "left", ....
    Raises `PromptParseError` (naming the prompt) when an attribute is missing or ambiguous.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    colour = one_value(prompt, "colour", {w for w in words if w in COLOUR_NAMES}, COLOUR_NAMES)
    shape = one_value(prompt, "shape", {w for w in words if w in SHAPES}, SHAPES)
    direction = one_value(prompt, "direction", {_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS}, DIRECTIONS)
    return MotionScene(colour, shape, direction)


def train_motion_prompts(templates: Sequence[int] | None = None) -> list[str]:
    """RL training prompts: `train_motion_scenes()` × templates (default all: 32 × 5 = 160)."""
    return motion_prompts_for(train_motion_scenes(), templates)


def motion_heldout_split_prompts(split: str, templates: Sequence[int] | None = None) -> list[str]:
    """The prompts of one held-out split (module doc); `templates` selects training templates of
    "new_combinations". A ValueError names an unknown split."""
    return MOTION_SPLIT.split_prompts(MOTION_PHRASEBOOK, split, templates)


def motion_heldout_splits() -> dict[str, list[str]]:
    """split name -> its prompts, for every split in `HELDOUT_SPLITS`."""
    return {split: motion_heldout_split_prompts(split) for split in HELDOUT_SPLITS}


def motion_words() -> list[str]:
    """Every word the moving-shapes prompts and the parser's synonyms use (reserved phrasings add
    none): what a toy video pipeline's tokenizers need as whole-word tokens."""
    sentences = [t.format(colour="", shape="", motion="") for t in (*MOTION_TEMPLATES, *HELDOUT_MOTION_TEMPLATES)]
    return words_of([*sentences, *MOTION_PHRASES.values(), *_DIRECTION_WORDS, *COLOUR_NAMES, *SHAPES])


#: File names of `write_motion_prompt_files`, keyed like its result.
PROMPT_FILES = {"train": "motion_train.txt", "new_combinations": "motion_heldout.txt",
                "new_phrasings": "motion_heldout_phrasings.txt", "both": "motion_heldout_both.txt"}


def write_motion_prompt_files(directory: str | Path, templates: Sequence[int] | None = None) -> dict[str, Path]:
    """Write the training prompts and the three held-out splits, one prompt a line, into
    `directory` (names in `PROMPT_FILES`); returns their paths keyed like `PROMPT_FILES`."""
    return write_prompt_files(directory, MOTION_SPLIT.prompt_sets(MOTION_PHRASEBOOK, templates), PROMPT_FILES)
