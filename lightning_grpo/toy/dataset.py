"""Captioned shapes-world images, for pretraining the toy pipelines and for evaluation batches.

Every sample draws a scene from a pool and a template, and renders the scene with jitter, so one
caption maps to many slightly different images (what a text-to-image model should learn).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_grpo.toy.prompts import TEMPLATES, describe
from lightning_grpo.toy.render import render_scenes
from lightning_grpo.toy.vocab import Scene, all_scenes


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
            `lightning_grpo.toy.prompts.train_scenes()` to keep held-out combinations unseen).
        size: image side in pixels.
        seed: one seed fixes scenes, templates and jitter: same seed, same batch.
        jitter: randomise object size and position within its quadrant.
        templates: template indices to draw captions from (default: all of `TEMPLATES`).
    """
    pool = list(all_scenes() if scenes is None else scenes)
    chosen = list(range(len(TEMPLATES)) if templates is None else templates)
    if not pool or not chosen:
        raise ValueError("sample_captioned_images needs a non-empty scene pool and template list")
    gen = torch.Generator().manual_seed(int(seed))
    scene_ids = torch.randint(len(pool), (n,), generator=gen).tolist()
    template_ids = torch.randint(len(chosen), (n,), generator=gen).tolist()
    picked = [pool[i] for i in scene_ids]
    prompts = [describe(scene, chosen[t]) for scene, t in zip(picked, template_ids)]
    return render_scenes(picked, size=size, jitter=jitter, generator=gen), prompts
