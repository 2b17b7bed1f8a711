"""The shapes world in one import: vocabulary, renderer, prompts and split, verifier reward.

The pieces live in small modules (vocab, render, prompts, verifier, dataset); this package
re-exports their public API, e.g.
`from lightning_grpo.worlds.shapes import ShapesVerifier, render_scenes, train_prompts`.
"""

from lightning_grpo.worlds.base import SyntheticWorld
from lightning_grpo.worlds.shapes.dataset import sample_captioned_images
from lightning_grpo.worlds.shapes.prompts import (
    HELDOUT_SPLITS,
    PHRASEBOOK,
    SPLIT,
    HELDOUT_TEMPLATES,
    TEMPLATES,
    PromptParseError,
    describe,
    heldout_prompts,
    heldout_scenes,
    heldout_split_prompts,
    heldout_splits,
    is_heldout,
    parse_prompt,
    prompts_for,
    templates_of,
    train_prompts,
    train_scenes,
    vocabulary,
    write_prompt_files,
)
from lightning_grpo.worlds.shapes.render import render_indices, render_scenes
from lightning_grpo.worlds.shapes.verifier import (
    DecodedScenes,
    SceneRules,
    ShapesVerifier,
    attribute_correctness,
    decode_scenes,
    exact_match_accuracy,
    target_indices,
)
from lightning_grpo.worlds.shapes.vocab import (
    BACKGROUND,
    COLOUR_NAMES,
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    all_scenes,
    scenes_to_indices,
)

#: The shapes world as a `lightning_grpo.worlds.base.World` (images [N, 3, H, W]).
WORLD = SyntheticWorld("shapes", PHRASEBOOK, SPLIT, words=vocabulary, parser=parse_prompt, renderer=render_scenes,
                       reward=ShapesVerifier)

__all__ = [
    "WORLD",
    "BACKGROUND",
    "COLOURS",
    "COLOUR_NAMES",
    "HELDOUT_SPLITS",
    "HELDOUT_TEMPLATES",
    "POSITIONS",
    "SHAPES",
    "TEMPLATES",
    "DecodedScenes",
    "PromptParseError",
    "Scene",
    "SceneRules",
    "ShapesVerifier",
    "all_scenes",
    "attribute_correctness",
    "decode_scenes",
    "describe",
    "exact_match_accuracy",
    "heldout_prompts",
    "heldout_scenes",
    "heldout_split_prompts",
    "heldout_splits",
    "is_heldout",
    "parse_prompt",
    "prompts_for",
    "render_indices",
    "render_scenes",
    "sample_captioned_images",
    "scenes_to_indices",
    "target_indices",
    "templates_of",
    "train_prompts",
    "train_scenes",
    "write_prompt_files",
]
