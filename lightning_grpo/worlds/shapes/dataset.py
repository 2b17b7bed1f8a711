"""Captioned shapes-world images, for pretraining the toy pipelines and for evaluation batches.

Every sample draws a scene from a pool and a template, and renders the scene with jitter, so one
caption maps to many slightly different images (what a text-to-image model should learn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe
from lightning_grpo.worlds.shapes.render import render_scenes
from lightning_grpo.worlds.shapes.vocab import Scene, all_scenes

T = TypeVar("T")


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
    gen = torch.Generator().manual_seed(int(seed))
    picked, chosen = draw_captions(n, all_scenes() if scenes is None else scenes, len(TEMPLATES), templates, gen)
    prompts = [describe(scene, t) for scene, t in zip(picked, chosen)]
    return render_scenes(picked, size=size, jitter=jitter, generator=gen), prompts


def draw_captions(
    n: int, scenes: Sequence[T], num_templates: int, templates: Sequence[int] | None, generator: torch.Generator
) -> tuple[list[T], list[int]]:
    """`n` scenes drawn uniformly from `scenes` and, for each, a template index drawn uniformly from
    `templates` (default: all `num_templates`), in that order from `generator`; shared by the image
    and the moving-shapes worlds' captioned samplers."""
    pool = list(scenes)
    chosen = list(range(num_templates) if templates is None else templates)
    if not pool or not chosen:
        raise ValueError("a captioned sampler needs a non-empty scene pool and template list")
    scene_ids = torch.randint(len(pool), (n,), generator=generator).tolist()
    template_ids = torch.randint(len(chosen), (n,), generator=generator).tolist()
    return [pool[i] for i in scene_ids], [chosen[t] for t in template_ids]


def caption_noise_rates(noise: float | Sequence[float], attributes: int) -> Tensor:
    """Per-attribute replacement probabilities Tensor[attributes] from one rate or one per attribute;
    a ValueError names a rate outside [0, 1] or a list of the wrong length."""
    rates = [noise] * attributes if isinstance(noise, (int, float)) else list(noise)
    if len(rates) != attributes:
        raise ValueError(f"caption noise (caption_noise) needs one rate or {attributes} (one per attribute), got {noise!r}")
    if not all(0 <= r <= 1 for r in rates):
        raise ValueError(f"caption noise (caption_noise) must be in [0, 1], got {noise!r}")
    return torch.tensor(rates, dtype=torch.float32)


def noisy_descriptions(
    prompts: Sequence[str],
    noise: float | Sequence[float],
    seed: int,
    parse: Callable[[str], Any],
    sizes: Sequence[int],
    num_templates: int,
    redescribe: Callable[[tuple[int, ...], int], str],
) -> list[str]:
    """Re-describe each prompt's scene with each attribute replaced by a uniformly drawn value w.p.
    `noise`, in a random template: the noisy-caption pretraining of both worlds (image and motion).

    Args:
        prompts: captions to perturb; `parse(prompt).indices` gives their attribute indices.
        noise: replacement probability of every attribute, in [0, 1], or one per attribute (in
            `sizes` order: a world whose model should be taught one attribute cleanly).
        seed: one seed fixes every draw (same seed, same captions).
        sizes: number of values of each attribute (e.g. colours, shapes, positions).
        num_templates: training templates to draw from.
        redescribe: (attribute indices, template) -> caption.
    """
    rates = caption_noise_rates(noise, len(sizes))
    generator = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        scene = parse(prompt)
        replace = (torch.rand(len(sizes), generator=generator) < rates).tolist()  # the same draws for any rates
        drawn = [int(torch.randint(k, (1,), generator=generator)) for k in sizes]
        indices = tuple(d if r else i for i, d, r in zip(scene.indices, drawn, replace))
        template = int(torch.randint(num_templates, (1,), generator=generator))
        out.append(redescribe(indices, template))
    return out
