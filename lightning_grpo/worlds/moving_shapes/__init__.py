"""The moving-shapes world in one import: vocabulary, renderer, prompts and split, captioned clips
(and, from `lightning_grpo.worlds.moving_shapes.verifier`, the pixel verifiers).

Clips of one coloured shape of the image world (`lightning_grpo.worlds.shapes`) moving in a named
direction: "a red circle moving to the right". The pieces live in small modules (vocab, render,
prompts, dataset, verifier, data); this package re-exports the public API of the first four and
`WORLD`, e.g. `from lightning_grpo.worlds.moving_shapes import render_motion_scenes, train_motion_prompts`.
"""

from lightning_grpo.worlds.base import SyntheticWorld
from lightning_grpo.worlds.moving_shapes.dataset import noisy_motion_captions, sample_captioned_clips
from lightning_grpo.worlds.moving_shapes.prompts import (
    HELDOUT_MOTION_TEMPLATES,
    HELDOUT_SPLITS,
    MOTION_PHRASEBOOK,
    MOTION_PHRASES,
    MOTION_SPLIT,
    MOTION_TEMPLATES,
    PROMPT_FILES,
    describe_motion,
    heldout_motion_scenes,
    is_heldout_motion,
    motion_heldout_split_prompts,
    motion_heldout_splits,
    motion_prompts_for,
    motion_templates_of,
    motion_words,
    parse_motion_prompt,
    train_motion_prompts,
    train_motion_scenes,
    write_motion_prompt_files,
)
from lightning_grpo.worlds.moving_shapes.render import (
    MotionTracks,
    frame_times,
    render_first_frames,
    render_motion_indices,
    render_motion_scenes,
    render_tracks,
    sample_tracks,
)
from lightning_grpo.worlds.moving_shapes.vocab import (
    DEFAULT_FRAMES,
    DIRECTION_VECTORS,
    DIRECTIONS,
    TRAVEL,
    MotionScene,
    all_motion_scenes,
    direction_vectors,
    motion_scenes_to_indices,
)

from lightning_grpo.worlds.moving_shapes.verifier import MovingShapesVerifier  # noqa: E402  (after the pieces it reads)

#: The moving-shapes world as a `lightning_grpo.worlds.base.World` (clips [N, F, 3, H, W]).
WORLD = SyntheticWorld("moving_shapes", MOTION_PHRASEBOOK, MOTION_SPLIT, words=motion_words, parser=parse_motion_prompt,
                       renderer=render_motion_scenes, reward=MovingShapesVerifier)

__all__ = [
    "WORLD",
    "DEFAULT_FRAMES", "DIRECTIONS", "DIRECTION_VECTORS", "HELDOUT_MOTION_TEMPLATES", "HELDOUT_SPLITS",
    "MOTION_PHRASES", "MOTION_TEMPLATES", "PROMPT_FILES", "TRAVEL", "MotionScene", "MotionTracks",
    "all_motion_scenes", "describe_motion", "direction_vectors", "frame_times", "heldout_motion_scenes",
    "is_heldout_motion", "motion_heldout_split_prompts", "motion_heldout_splits", "motion_prompts_for",
    "motion_scenes_to_indices", "motion_templates_of", "motion_words", "noisy_motion_captions",
    "parse_motion_prompt", "render_first_frames", "render_motion_indices", "render_motion_scenes",
    "render_tracks", "sample_captioned_clips", "sample_tracks", "train_motion_prompts", "train_motion_scenes",
    "write_motion_prompt_files",
]
