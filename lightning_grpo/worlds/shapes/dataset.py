"""Captioned shapes-world images, for pretraining the toy pipelines and for evaluation batches.

Every sample draws a scene from a pool and a template, and renders the scene with jitter, so one
caption maps to many slightly different images (what a text-to-image model should learn).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_grpo.worlds.base import sample_captioned
from lightning_grpo.worlds.shapes.prompts import PHRASEBOOK
from lightning_grpo.worlds.shapes.render import render_scenes
from lightning_grpo.worlds.shapes.vocab import Scene, all_scenes


def sample_captioned_images(
    n: int,
    scenes: Sequence[Scene] | None = None,
    size: int = 32,
    seed: int = 0,
    jitter: bool = True,
    templates: Sequence[int] | None = None,
) -> tuple[Tensor, list[str]]:
    """`n` random (image, caption) pairs: pixels Tensor[n, 3, size, size] in [0, 1] and prompts.

    Args:
        n: number of samples.
        scenes: pool to draw from uniformly (default: all 48 combinations; pass
            `lightning_grpo.worlds.shapes.prompts.train_scenes()` to keep held-out combinations unseen).
        size: image side in pixels.
        seed: one seed fixes scenes, templates and jitter: same seed, same batch.
        jitter: randomise object size and position within its quadrant.
        templates: template indices to draw captions from (default: all of `TEMPLATES`).
    """
    return sample_captioned(n, all_scenes() if scenes is None else scenes, PHRASEBOOK, seed, templates,
                            lambda picked, generator: render_scenes(picked, size=size, jitter=jitter, generator=generator))
