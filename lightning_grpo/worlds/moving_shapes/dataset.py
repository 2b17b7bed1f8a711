"""Captioned moving-shapes clips, for pretraining the toy video pipelines and for evaluation batches.

Every sample draws a scene from a pool and a training template, and renders the clip with jitter
(random start and radius), so one caption maps to many slightly different clips, exactly like
`lightning_grpo.worlds.shapes.dataset.sample_captioned_images` for the image world. `noisy_motion_captions`
re-describes captions with some attributes replaced at random (the noisy-caption pretraining that
leaves the toy pipelines imperfect, so GRPO has something to learn).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_grpo.worlds.shapes.dataset import draw_captions, noisy_descriptions
from lightning_grpo.worlds.moving_shapes.prompts import MOTION_TEMPLATES, describe_motion, parse_motion_prompt
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

    Args:
        n: number of samples.
        scenes: pool to draw from uniformly (default: all 48 combinations; pass
            `lightning_grpo.worlds.moving_shapes.prompts.train_motion_scenes()` to keep held-out combinations unseen).
        frames: F frames per clip (4k + 1 suits HunyuanVideo's VAE; default 9).
        size: frame side in pixels.
        seed: one seed fixes scenes, templates and jitter: same seed, same batch.
        jitter: random start point and radius per clip.
        templates: indices of `MOTION_TEMPLATES` to draw captions from (default: all). The first
            frames of the clips (`pixels[:, 0]`) are the image-to-video conditions.
    """
    gen = torch.Generator().manual_seed(int(seed))
    picked, chosen = draw_captions(n, all_motion_scenes() if scenes is None else scenes, len(MOTION_TEMPLATES), templates, gen)
    prompts = [describe_motion(scene, t) for scene, t in zip(picked, chosen)]
    tracks = sample_tracks(motion_scenes_to_indices(picked), frames, jitter, generator=gen)
    return render_tracks(tracks, size), prompts


def noisy_motion_captions(prompts: list[str], noise: float | tuple[float, float, float], seed: int) -> list[str]:
    """Re-describe each prompt's scene (in a random training template) with each attribute
    (colour, shape, direction) replaced by a uniformly drawn value with probability `noise` (one
    rate, or (colour, shape, direction) rates)."""
    return noisy_descriptions(
        prompts, noise, seed, parse_motion_prompt, (len(COLOUR_NAMES), len(SHAPES), len(DIRECTIONS)),
        len(MOTION_TEMPLATES), lambda indices, template: describe_motion(MotionScene.from_indices(*indices), template),
    )
