"""First frames for image-to-video made on the fly by an image policy (DanceGRPO made them with FLUX).

`GRPOModule(first_frames=...)` calls a `FirstFrames` source for every batch that brings no
``"images"`` of its own (a plain `PromptDataModule`), so an image-to-video policy trains on text
prompts alone. `GeneratedFirstFrames` samples each prompt's frame once with any image policy of
the framework (FLUX, SD, the tiny policy), deterministically (the ODE, eta = 0, from noise seeded
by prompt and seed), and caches it: in memory, and optionally as PNG files keyed by everything
that decides the frame, so a resumed or repeated run makes none again. Frames from data come
from `lightning_grpo.datamodules.ImagePromptDataModule` instead; both give the video policy
pixels ``[P, 3, H, W]`` in [0, 1] at its own resolution (scaled to cover it, center-cropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lightning_grpo.datamodules.image_prompts import fit_image
from lightning_grpo.datamodules.streaming import stable_hash
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.rollout import ode_from
from lightning_grpo.samplers.base import Sampler


def frame_size(policy: nn.Module) -> tuple[int, int]:
    """(height, width) of the frames `policy` generates: its ``height``/``width``, else its
    square ``resolution`` (the tiny policy); a ValueError names the policy when it has neither."""
    height, width = getattr(policy, "height", None), getattr(policy, "width", None)
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    side = getattr(policy, "resolution", None)
    if isinstance(side, int):
        return side, side
    raise ValueError(f"{type(policy).__name__} has no height/width or resolution: give the first frames' size explicitly")


class FirstFrames(nn.Module):
    """A source of first frames for prompts; `GRPOModule` calls it when a batch has no images."""

    def forward(self, prompts: list[str], size: tuple[int, int]) -> Tensor:
        """First frames ``[P, 3, H, W]`` in [0, 1] for the P prompts, at ``size`` = (H, W)."""
        raise NotImplementedError


class GeneratedFirstFrames(FirstFrames):
    """Each prompt's first frame sampled once by an image policy, then served from a cache.

    The frame of a prompt is the policy's deterministic ODE sample (`rollout.ode_from`, eta = 0)
    from noise drawn by a generator seeded with ``stable_hash(f"{seed}/{prompt}")``: it depends on
    the prompt and the seed alone, never on the batch it came in, the rank or the step. Frames are
    kept as 8-bit RGB (what an image file holds, and what the data source gives), so a frame read
    back from the disk cache equals the one first made. The image policy is frozen and in eval
    mode; its weights are left out of training checkpoints (the config rebuilds it).

    Args:
        policy: any image policy of the framework (decode gives ``[B, 3, H, W]``), e.g. the
            shipped toy FLUX ``lightning_grpo/worlds/shapes/pretrained/flux`` or FLUX.1-dev.
        seed: the frames' seed (part of the cache key).
        sampler: the ODE's sampler; None uses ``policy.build_sampler(num_steps)``, the family's
            own schedule (its eta is not used: the ODE step ignores it).
        num_steps: sampling steps when ``sampler`` is None (None: the family default).
        cache_dir: folder of the on-disk cache, one PNG per (prompt, seed, model, steps, size);
            None keeps the memory cache only. Shared safely by ranks (atomic writes).
        batch_size: prompts sampled at once (memory knob).
        size: (height, width) the frames are fitted to; None (default): the size the caller asks
            for, which `GRPOModule` takes from the video policy.
        memory_cache_size: frames kept in memory (least recently used go first); None keeps all.
            Bound it for large prompt sets (a 720×720 frame is 1.5 MB) together with
            ``cache_dir``, from which evicted frames are read back; without ``cache_dir`` an
            evicted frame would be sampled again.
    """

    def __init__(
        self,
        policy: PolicyAdapter,
        seed: int = 0,
        sampler: Sampler | None = None,
        num_steps: int | None = None,
        cache_dir: str | None = None,
        batch_size: int = 8,
        size: tuple[int, int] | None = None,
        memory_cache_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if memory_cache_size is not None and memory_cache_size < 1:
            raise ValueError(f"memory_cache_size must be >= 1 or None, got {memory_cache_size}")
        self.policy = policy.requires_grad_(False).eval()
        self.sampler = sampler if sampler is not None else policy.build_sampler(num_steps)
        self.seed = int(seed)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.batch_size = batch_size
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.memory_cache_size = memory_cache_size
        self.generated = 0  # frames sampled by the policy (not served from a cache) by this instance
        self._frames: OrderedDict[str, Image.Image] = OrderedDict()  # cache key -> 8-bit RGB frame, policy's resolution

    def train(self, mode: bool = True) -> GeneratedFirstFrames:
        """The image policy only samples: it stays in eval mode whatever Lightning asks."""
        super().train(mode)
        self.policy.eval()
        return self

    def cache_key(self, prompt: str) -> str:
        """Hex digest of everything that decides a frame: prompt, seed, model, steps and sigmas, resolution."""
        model = getattr(self.policy, "pretrained_model_name_or_path", None) or type(self.policy).__qualname__
        fields = {
            "prompt": prompt, "seed": self.seed, "model": str(model), "policy": type(self.policy).__qualname__,
            "steps": int(self.sampler.num_steps), "timesteps": [round(float(t), 4) for t in self.sampler.timesteps],
            "resolution": list(_native_size(self.policy)),
        }
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode("utf-8"), digest_size=16).hexdigest()

    @torch.no_grad()
    def forward(self, prompts: list[str], size: tuple[int, int] | None = None) -> Tensor:
        """First frames ``[P, 3, H, W]`` in [0, 1] on the policy's device, fitted to ``self.size``
        or else ``size``; prompts never seen are sampled (once each, in batches)."""
        target = self.size or size
        if target is None:
            raise ValueError("GeneratedFirstFrames needs a size: give size=(height, width) or call it with one")
        keys = [self.cache_key(prompt) for prompt in prompts]
        found = {key: frame for key in dict.fromkeys(keys) if (frame := self._lookup(key)) is not None}
        pending = [(key, prompt) for key, prompt in dict(zip(keys, prompts)).items() if key not in found]
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            for (key, _), frame in zip(chunk, self._sample([prompt for _, prompt in chunk])):
                found[key] = frame
                self._remember(key, frame)
                self._write(key, frame)
        frames = torch.stack([fit_image(found[key], target) for key in keys])  # [P, 3, H, W]
        return frames.to(self.policy.device)

    def _lookup(self, key: str) -> Image.Image | None:
        """The cached frame of ``key`` (memory, else disk), or None."""
        if key in self._frames:
            self._frames.move_to_end(key)
            return self._frames[key]
        frame = self._read(key)
        if frame is not None:
            self._remember(key, frame)
        return frame

    def _remember(self, key: str, frame: Image.Image) -> None:
        self._frames[key] = frame
        while self.memory_cache_size is not None and len(self._frames) > self.memory_cache_size:
            self._frames.popitem(last=False)

    def _sample(self, prompts: list[str]) -> list[Image.Image]:
        """Deterministic samples of the policy for ``prompts``, as 8-bit RGB images."""
        device = self.policy.device
        noise = torch.cat([
            self.policy.prepare_latents(1, torch.Generator(device=device).manual_seed(stable_hash(f"{self.seed}/{p}") % 2**63))
            for p in prompts
        ])  # [n, *L]
        pixels = self.policy.decode(ode_from(self.policy, self.sampler, noise, prompts))  # [n, 3, H, W] in [0, 1]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{type(self.policy).__name__} is not an image policy: it decodes to {tuple(pixels.shape)}, not [B, 3, H, W]")
        self.generated += len(prompts)
        rgb = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # [n, H, W, 3]
        return [Image.fromarray(np.ascontiguousarray(image), mode="RGB") for image in rgb]

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.png"

    def _read(self, key: str) -> Image.Image | None:
        """A frame from the disk cache; None when absent (or no disk cache)."""
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    def _write(self, key: str, frame: Image.Image) -> None:
        """Save a frame to the disk cache atomically (a rank reading it never sees half a file)."""
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
        os.close(handle)
        frame.save(temporary, format="PNG")
        os.replace(temporary, path)


def batch_first_frames(batch: dict, source: FirstFrames | None, policy: nn.Module, device: torch.device) -> Tensor | None:
    """A training or evaluation batch's first frames [P, 3, H, W]: its own `"images"`, else made
    by `source` (`GRPOModule(first_frames=...)`) at the policy's resolution (None without either:
    text-to-X, or a batch without prompts)."""
    images = batch.get("images")
    if images is not None or source is None or not batch["prompts"]:
        return images
    return source(list(batch["prompts"]), frame_size(policy)).to(device)


def _native_size(policy: nn.Module) -> tuple[int, int]:
    """The image policy's resolution for the cache key; (0, 0) when it does not say."""
    try:
        return frame_size(policy)
    except ValueError:
        return (0, 0)


__all__ = ["FirstFrames", "GeneratedFirstFrames", "frame_size"]
