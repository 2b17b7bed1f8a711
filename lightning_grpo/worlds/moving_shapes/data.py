"""Moving-shapes data for the trainer: first frames for image-to-video, and the datamodule that serves them.

- Text-to-video needs nothing new: `PromptDataModule` reads `configs/prompts/motion_train.txt`
  (and the held-out files) like the image demo's prompts.
- Image-to-video: every prompt's first frame shows its shape, in its colour, at the clip's start
  (`lightning_grpo.worlds.moving_shapes.render.render_first_frames`), drawn from a generator seeded by
  `stable_hash(f"{seed}/{prompt}")`: a prompt always gets the same frame, in every process, batch
  and run, so held-out evaluations before and after training condition on identical frames.
  `MotionFirstFrames` is that source as a module called with (prompts, size) — the contract of
  `GRPOModule(first_frames=...)` and `HeldOutEvaluation(first_frames=...)`;
  `MotionFirstFrameDataModule` puts the frames into the batches themselves (key ``"images"``,
  Tensor[P, 3, H, W], which `rollout.py` hands to `policy.encode_prompts(prompts, images)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_grpo.datamodules.prompts import PromptDataModule
from lightning_grpo.datamodules.sources import BadRecordReporter, Record
from lightning_grpo.datamodules.streaming import PromptStream, StreamConfig, stable_hash
from lightning_grpo.first_frames import FirstFrames
from lightning_grpo.worlds.moving_shapes.prompts import parse_motion_prompt
from lightning_grpo.worlds.moving_shapes.render import MotionTracks, render_tracks, sample_tracks
from lightning_grpo.worlds.moving_shapes.vocab import motion_scenes_to_indices
from lightning_grpo.worlds.base import PromptParseError


def first_frames_for_prompts(prompts: list[str], size: int = 32, seed: int = 0, jitter: bool = True) -> Tensor:
    """The first frame of each prompt's clip, Tensor[P, 3, size, size] in [0, 1] (module doc);
    a prompt that names no motion scene raises `PromptParseError` naming it."""
    tracks = []
    for prompt in prompts:
        indices = motion_scenes_to_indices([parse_motion_prompt(prompt)])
        generator = torch.Generator().manual_seed(stable_hash(f"{seed}/{prompt}") % (1 << 63))
        tracks.append(sample_tracks(indices, frames=2, jitter=jitter, generator=generator))
    if not tracks:
        return torch.zeros(0, 3, size, size)
    merged = MotionTracks(*(torch.cat([getattr(t, name) for t in tracks]) for name in ("colour", "shape", "centres", "radius")))
    return render_tracks(merged, size)[:, 0]


class MotionFirstFrames(FirstFrames):
    """First frames of moving-shapes prompts, called as ``frames(prompts, size)`` -> Tensor[P, 3, H, W]
    (a `lightning_grpo.first_frames.FirstFrames` source: `GRPOModule(first_frames=...)` accepts it).

    Args:
        seed: seed mixed into every prompt's frame (the same seed, the same frames).
        jitter: random start and size per prompt (False: every shape starts centred at the base size).
    """

    def __init__(self, seed: int = 0, jitter: bool = True) -> None:
        super().__init__()
        self.seed, self.jitter = int(seed), bool(jitter)

    def forward(self, prompts: list[str], size: tuple[int, int] | int = (32, 32)) -> Tensor:
        height, width = (size, size) if isinstance(size, int) else size
        if height != width:
            raise ValueError(f"moving-shapes frames are square; asked for {height}x{width}")
        return first_frames_for_prompts(list(prompts), int(height), self.seed, self.jitter)


class MotionFirstFrameStream(PromptStream):
    """A `PromptStream` whose batches also hold each prompt's first frame (``"images"`` [P, 3, H, W]).

    A prompt that names no motion scene (no colour, shape or direction) is reported with its
    ``path:line`` and left out of the batch (``on_bad_line="skip"``), or raises (``"error"``).
    """

    def __init__(self, config: StreamConfig, size: int, seed: int, jitter: bool) -> None:
        super().__init__(config)
        self.size, self.seed, self.jitter = size, seed, jitter

    def make_batch(self, records: list[Record], reporter: BadRecordReporter) -> dict[str, Any]:
        kept = []
        for record in records:
            try:
                parse_motion_prompt(record.prompt)
            except PromptParseError as error:
                reporter.bad(record.path, record.line, str(error))
                continue
            kept.append(record)
        batch = super().make_batch(kept, reporter)
        batch["images"] = first_frames_for_prompts(batch["prompts"], self.size, self.seed, self.jitter)  # [P, 3, H, W]
        return batch


class MotionFirstFrameDataModule(PromptDataModule):
    """Moving-shapes prompts with their first frames, for image-to-video GRPO (module doc).

    A batch is ``{"prompts": list[str], "images": Tensor[P, 3, H, W]}``, streamed, sharded and
    resumable exactly like `PromptDataModule` (whose arguments it takes).

    Args:
        train_files: prompt files, e.g. ``configs/prompts/motion_train.txt``.
        image_size: side of the first frames in pixels (the video policy's frame size).
        frame_seed: seed of the frames (see `MotionFirstFrames`).
        jitter: random start point and size per prompt.
        **kwargs: every other argument of `PromptDataModule` (val_files, batch_size, ...).
    """

    def __init__(self, train_files: str | list[str], image_size: int = 32, frame_seed: int = 0, jitter: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(train_files, **kwargs)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        self.image_size, self.frame_seed, self.jitter = int(image_size), int(frame_seed), bool(jitter)

    def make_stream(self, config: StreamConfig) -> MotionFirstFrameStream:
        return MotionFirstFrameStream(config, self.image_size, self.frame_seed, self.jitter)
