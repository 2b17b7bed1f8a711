"""Vectorised renderer of moving-shapes clips (and of their first frames, the image-to-video condition).

A clip is one object of the image world (same palette, same shapes, drawn by the same
anti-aliased `lightning_grpo.worlds.shapes.render.rasterize`) whose centre moves linearly in time from a
start point by `TRAVEL` along its direction (geometry in `lightning_grpo.worlds.moving_shapes.vocab`).
Rendering is two steps, so tests and callers can build any clip, good or deliberately bad:

1. `sample_tracks` draws each clip's start and radius (the jitter) and lays out its centres
   over the frames: a `MotionTracks` record;
2. `render_tracks` rasterises every frame of every track in one batched call.

Output layout: Tensor[N, F, 3, H, W] in [0, 1] (the policy contract's video layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_grpo.worlds.moving_shapes.vocab import (
    DEFAULT_FRAMES,
    MOTION_RADIUS,
    MOTION_RADIUS_JITTER,
    START_JITTER,
    TRAVEL,
    MotionScene,
    direction_vectors,
    motion_scenes_to_indices,
)
from lightning_grpo.worlds.base import jitter_generator
from lightning_grpo.worlds.shapes.render import rasterize


@dataclass(frozen=True)
class MotionTracks:
    """Where each clip's object is in each frame, in fractions of the image side.

    Attributes:
        colour: LongTensor[N] palette indices; shape: LongTensor[N] shape indices.
        centres: Tensor[N, F, 2] (x, y) centre of the object in every frame.
        radius: Tensor[N] half the object's bounding-box side (or Tensor[N, F], one per frame,
            for hand-made clips whose object grows or shrinks).
    """

    colour: Tensor
    shape: Tensor
    centres: Tensor
    radius: Tensor

    @property
    def frames(self) -> int:
        return self.centres.shape[1]


def frame_times(frames: int, device: torch.device | str | None = None) -> Tensor:
    """t_f = f / (F − 1) for f = 0 … F − 1, as Tensor[F] (the clip's normalised time)."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    return torch.arange(frames, device=device, dtype=torch.float32) / (frames - 1)


def sample_tracks(indices: Tensor, frames: int = DEFAULT_FRAMES, jitter: bool = True, seed: int | None = 0,
                  generator: torch.Generator | None = None) -> MotionTracks:
    """Tracks of the clips given by (colour, shape, direction) indices [N, 3].

    centre_f = start + t_f · TRAVEL · u_direction, with start = (0.5, 0.5) + U(−START_JITTER,
    START_JITTER)² and the radius MOTION_RADIUS × U(1 ± MOTION_RADIUS_JITTER) when `jitter`
    (drawn on CPU from one generator: the same clips on every device), else start (0.5, 0.5) and
    radius MOTION_RADIUS.
    """
    if indices.ndim != 2 or indices.shape[1] != 3:
        raise ValueError(f"indices must be [N, 3] (colour, shape, direction), got {tuple(indices.shape)}")
    n = indices.shape[0]
    gen = jitter_generator(seed, generator)
    if jitter:
        start = 0.5 + START_JITTER * (2 * torch.rand(n, 2, generator=gen) - 1)  # [N, 2]
        radius = MOTION_RADIUS * (1 + MOTION_RADIUS_JITTER * (2 * torch.rand(n, generator=gen) - 1))  # [N]
    else:
        start, radius = torch.full((n, 2), 0.5), torch.full((n,), MOTION_RADIUS)
    step = TRAVEL * direction_vectors()[indices[:, 2].cpu()]  # [N, 2] displacement over the clip
    centres = start.unsqueeze(1) + frame_times(frames).view(1, -1, 1) * step.unsqueeze(1)  # [N, F, 2]
    device = indices.device
    return MotionTracks(indices[:, 0], indices[:, 1], centres.to(device), radius.to(device))


def render_tracks(tracks: MotionTracks, size: int = 32) -> Tensor:
    """Every frame of every track: Tensor[N, F, 3, size, size] in [0, 1]."""
    if size < 8:
        raise ValueError(f"image size must be at least 8 pixels, got {size}")
    n, frames = tracks.centres.shape[:2]
    repeat = lambda x: x.repeat_interleave(frames)  # noqa: E731  per clip -> per frame
    radius = tracks.radius.expand(frames, n).T if tracks.radius.ndim == 1 else tracks.radius  # [N, F]
    pixels = rasterize(repeat(tracks.colour), repeat(tracks.shape), tracks.centres.reshape(-1, 2) * size,
                       radius.reshape(-1) * size, size)  # [N·F, 3, size, size]
    return pixels.view(n, frames, 3, size, size)


def render_motion_indices(indices: Tensor, frames: int = DEFAULT_FRAMES, size: int = 32, jitter: bool = True,
                          seed: int | None = 0, generator: torch.Generator | None = None) -> Tensor:
    """Clips of the (colour, shape, direction) indices [N, 3]: Tensor[N, F, 3, size, size] in [0, 1].

    Args:
        frames: F frames per clip (≥ 2; 4k + 1 such as 5, 9, 17 suits HunyuanVideo's VAE).
        size: frame side in pixels (32 is the tested size).
        jitter: random start point and radius per clip (see `sample_tracks`).
        seed / generator: the jitter's randomness; same seed, same clips.
    """
    return render_tracks(sample_tracks(indices, frames, jitter, seed, generator), size)


def render_motion_scenes(scenes: list[MotionScene], frames: int = DEFAULT_FRAMES, size: int = 32,
                         jitter: bool = True, seed: int | None = 0, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    """Render `MotionScene`s to Tensor[N, F, 3, size, size]; see `render_motion_indices`."""
    return render_motion_indices(motion_scenes_to_indices(scenes, device), frames, size, jitter, seed, generator)


def render_first_frames(scenes: list[MotionScene], size: int = 32, jitter: bool = True, seed: int | None = 0,
                        generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """The first frame of each scene's clip (the shape at its start): Tensor[N, 3, size, size].

    Equal to `render_motion_scenes(scenes, frames, size, jitter, seed)[:, 0]` for any frame count
    (the start and radius are drawn before, and independently of, the frame layout), so a clip
    generated from this image-to-video condition can be checked against it.
    """
    tracks = sample_tracks(motion_scenes_to_indices(scenes, device), 2, jitter, seed, generator)
    return render_tracks(tracks, size)[:, 0]
