"""Procedural, vectorised renderer of one-object shapes-world scenes.

Each image is a plain black background with one filled shape (circle, square or upward
triangle) of one palette colour, centred in one image quadrant. Optional jitter moves the centre
and scales the size a little, so the pretraining data is not a single image per caption; the
object always stays inside its quadrant, so the position label stays unambiguous.

Edges are anti-aliased by supersampling (coverage of `SUPERSAMPLE`² sub-pixels), which gives a
tiny generator smooth targets to fit. Everything is batched torch: thousands of images per second
on a CPU, deterministic for a given seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_grpo.worlds.base import jitter_generator
from lightning_grpo.worlds.shapes.vocab import POSITION_CENTRES, POSITIONS, Scene, background, palette, scenes_to_indices

#: Sub-pixels per pixel side used for anti-aliasing.
SUPERSAMPLE = 4
#: Object "radius" (half the bounding-box side) as a fraction of the image side, before jitter.
RADIUS = 0.17
#: Jitter: the radius is scaled by U(1 − RADIUS_JITTER, 1 + RADIUS_JITTER).
RADIUS_JITTER = 0.15
#: Jitter: the centre moves by U(−CENTRE_JITTER, CENTRE_JITTER) × side in x and y.
#: With RADIUS_JITTER this keeps the object inside its quadrant: 0.25 − 0.04 − 0.17·1.15 > 0.
CENTRE_JITTER = 0.04
#: Upper bound on supersampled elements processed at once, to bound memory for large batches.
_CHUNK_ELEMENTS = 1 << 22


def shape_masks(shape: Tensor, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Inside-masks [N, h, w] for per-image shapes, from offsets to the centre and radii [N, 1, 1].

    circle: dx² + dy² ≤ r²; square: max(|dx|, |dy|) ≤ r; triangle (apex up, bounding box 2r × 2r):
    dy ≤ r and |dx| ≤ (dy + r) / 2, i.e. its width grows linearly from the apex to the base.
    """
    circle = dx.square() + dy.square() <= r.square()
    square = torch.maximum(dx.abs(), dy.abs()) <= r
    triangle = (dy <= r) & (dx.abs() <= (dy + r) / 2)
    kind = shape.view(-1, 1, 1)
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render_indices(indices: Tensor, size: int = 32, jitter: bool = True, seed: int | None = 0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Render scenes given by attribute indices.

    Args:
        indices: LongTensor[N, 3] of (colour, shape, position) indices (see `lightning_grpo.worlds.shapes.vocab`).
        size: image side in pixels (32 and 64 are the tested sizes; ≥ 16 is sensible).
        jitter: randomise each object's centre and size a little (within its quadrant).
        seed: seed of the jitter when no `generator` is given; same seed, same images.
        generator: a CPU torch.Generator to draw jitter from (overrides `seed`).

    Returns:
        Tensor[N, 3, size, size] float32 in [0, 1], on `indices`' device.
    """
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ValueError(f"indices must be [N, 3] (colour, shape, position), got {tuple(indices.shape)}")
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    device = indices.device
    n = indices.shape[0]
    gen = jitter_generator(seed, generator)
    if jitter:  # drawn on CPU from one generator: identical images on every device
        radius_scale = 1 + RADIUS_JITTER * (2 * torch.rand(n, generator=gen) - 1)
        offset = CENTRE_JITTER * (2 * torch.rand(n, 2, generator=gen) - 1)
    else:
        radius_scale = torch.ones(n)
        offset = torch.zeros(n, 2)
    centres = torch.tensor([POSITION_CENTRES[p] for p in POSITIONS])  # [P, 2]
    centre = (centres[indices[:, 2].cpu()] + offset).to(device) * size  # [N, 2] pixels
    radius = (RADIUS * size * radius_scale).to(device)  # [N]
    return rasterize(indices[:, 0], indices[:, 1], centre, radius, size)


def rasterize(colour: Tensor, shape: Tensor, centre: Tensor, radius: Tensor, size: int) -> Tensor:
    """Draw one anti-aliased filled shape per image on the black background.

    The drawing primitive shared by the still renderer (`render_indices`) and the moving-shapes
    world (`lightning_grpo.worlds.moving_shapes.render`, which draws every frame of a track with it).

    Args:
        colour: LongTensor[N] palette indices; shape: LongTensor[N] shape indices.
        centre: Tensor[N, 2] (x, y) of each shape's bounding-box centre, in pixels.
        radius: Tensor[N] half the bounding-box side, in pixels.
        size: image side in pixels.

    Returns:
        Tensor[N, 3, size, size] float32 in [0, 1], on `centre`'s device.
    """
    device = centre.device
    n = centre.shape[0]
    sub = SUPERSAMPLE
    coords = (torch.arange(size * sub, device=device, dtype=torch.float32) + 0.5) / sub  # sub-pixel centres
    colours = palette(device)[colour.to(device)]  # [N, 3]
    shape = shape.to(device)
    bg = background(device).view(1, 3, 1, 1)
    chunk = max(1, _CHUNK_ELEMENTS // (size * sub) ** 2)
    out = []
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        dx = coords.view(1, 1, -1) - centre[sl, 0].view(-1, 1, 1)  # [n, 1, w]
        dy = coords.view(1, -1, 1) - centre[sl, 1].view(-1, 1, 1)  # [n, h, 1]
        mask = shape_masks(shape[sl], dx, dy, radius[sl].view(-1, 1, 1))  # [n, h, w]
        coverage = F.avg_pool2d(mask.unsqueeze(1).float(), sub)  # [n, 1, size, size]
        out.append(bg * (1 - coverage) + colours[sl].view(-1, 3, 1, 1) * coverage)
    if not out:
        return torch.zeros(0, 3, size, size, device=device)
    return torch.cat(out).clamp_(0, 1)


def render_scenes(scenes: list[Scene], size: int = 32, jitter: bool = True, seed: int | None = 0,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Render a list of `Scene`s to Tensor[N, 3, size, size] in [0, 1]; see `render_indices`."""
    return render_indices(scenes_to_indices(scenes, device), size=size, jitter=jitter, seed=seed, generator=generator)
