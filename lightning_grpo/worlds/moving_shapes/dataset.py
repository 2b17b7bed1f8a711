"""Captioned moving-shapes clips, for pretraining the toy video pipelines and for evaluation batches.

Every sample draws a scene from a pool and a training template, and renders the clip with jitter
(random start and radius), so one caption maps to many slightly different clips, exactly like
`lightning_grpo.worlds.shapes.dataset.sample_captioned_images` for the image world. `noisy_motion_captions`
re-describes captions with some attributes replaced at random (the noisy-caption pretraining that
leaves the toy pipelines imperfect, so GRPO has something to learn).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_grpo.worlds.base import noisy_descriptions, sample_captioned
from lightning_grpo.worlds.moving_shapes.prompts import MOTION_PHRASEBOOK, MOTION_TEMPLATES, describe_motion, parse_motion_prompt
from lightning_grpo.worlds.moving_shapes.render import render_tracks, sample_tracks
from lightning_grpo.worlds.moving_shapes.vocab import DEFAULT_FRAMES, DIRECTIONS, MotionScene, all_motion_scenes, motion_scenes_to_indices
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, SHAPES


def sample_captioned_clips(
    n: int,
    scenes: Sequence[MotionScene] | None = None,
    frames: int = DEFAULT_FRAMES,
    size: int = 32,
    seed: int = 0,
    jitter: bool = True,
    templates: Sequence[int] | None = None,
) -> tuple[Tensor, list[str]]:
    """`n` random (clip, caption) pairs: pixels Tensor[n, F, 3, size, size] in [0, 1] and prompts.

    `scenes` is the pool (default: all 48 combinations; `train_motion_scenes()` keeps held-out
    combinations unseen), `frames` the frames per clip (4k + 1 suits HunyuanVideo's VAE), `seed`
    fixes scenes, templates and jitter (random start point and radius per clip when `jitter`),
    `templates` the indices of `MOTION_TEMPLATES` to draw captions from (default: all). The
    clips' first frames (`pixels[:, 0]`) are the image-to-video conditions.
    """
    def render(picked: list[MotionScene], generator) -> Tensor:
        return render_tracks(sample_tracks(motion_scenes_to_indices(picked), frames, jitter, generator=generator), size)

    return sample_captioned(n, all_motion_scenes() if scenes is None else scenes, MOTION_PHRASEBOOK, seed, templates, render)


def noisy_motion_captions(prompts: list[str], noise: float | tuple[float, float, float], seed: int) -> list[str]:
    """Re-describe each prompt's scene (in a random training template) with each attribute
    (colour, shape, direction) replaced by a uniformly drawn value with probability `noise` (one
    rate, or (colour, shape, direction) rates)."""
    return noisy_descriptions(
        prompts, noise, seed, parse_motion_prompt, (len(COLOUR_NAMES), len(SHAPES), len(DIRECTIONS)),
        len(MOTION_TEMPLATES), lambda indices, template: describe_motion(MotionScene.from_indices(*indices), template),
    )
