"""Shared plumbing of the model-backed rewards: frozen models, path checks, strict loading, and
tensor-only image preprocessing (no PIL round trip, no files written).

Why tensors: the known failure of earlier DanceGRPO-style code is scoring images that were first
written as JPEG/MP4, so compression artefacts leaked into the reward. Everything here stays on
the reward's device, batched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grpo.rewards.base import Reward


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's state dict does not match the architecture it is loaded into."""


class FrozenModelReward(Reward):
    """A reward backed by frozen networks: always in eval mode, never requiring grad.

    Lightning calls `.train()` on the whole LightningModule at the start of fitting; a reward
    model switched into train mode would score with dropout on. `train()` is therefore a no-op
    here: the reward's submodules stay in eval mode whatever the parent does.
    """

    def train(self, mode: bool = True) -> FrozenModelReward:  # noqa: ARG002 - mode ignored on purpose
        return super().train(False)

    def freeze(self) -> None:
        """Eval mode and `requires_grad=False` on every parameter (call after building models)."""
        self.requires_grad_(False)
        super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the reward's parameters (moved by Lightning's `.to()` with the module)."""
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the reward's parameters (e.g. bf16 after `.to(torch.bfloat16)`)."""
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32


def require_path(path: str | Path, reward_name: str, *, directory: bool = False) -> Path:
    """`path` as a Path, or FileNotFoundError naming the reward and the path."""
    resolved = Path(path).expanduser()
    ok = resolved.is_dir() if directory else resolved.is_file()
    if not ok:
        kind = "folder" if directory else "file"
        raise FileNotFoundError(f"reward {reward_name!r}: checkpoint {kind} not found: {resolved}")
    return resolved


def load_checkpoint_file(path: Path) -> Mapping[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a torch pickle loaded with `weights_only=True`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Removes `prefix` (e.g. DDP's `module.`) from the keys that carry it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], reward_name: str) -> None:
    """Loads `state_dict` into `module`, or raises CheckpointMismatchError listing the bad keys.

    Missing keys, unexpected keys and shape mismatches are all reported at once (first few of
    each), naming the reward: loading with `strict=False` would silently score with random weights.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            if keys
        ]
        raise CheckpointMismatchError(
            f"reward {reward_name!r}: checkpoint does not match {type(module).__name__}: " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)


def flatten_frames(pixels: Tensor) -> tuple[Tensor, int]:
    """[B,C,H,W] -> ([B,C,H,W], 1); [B,F,C,H,W] -> ([B*F,C,H,W], F) so image rewards score frames."""
    if pixels.ndim == 5:
        b, f = pixels.shape[:2]
        return pixels.reshape(b * f, *pixels.shape[2:]), f
    return pixels, 1


def mean_over_frames(scores: Tensor, frames: int) -> Tensor:
    """[B*F] per-frame scores -> [B] per-video mean (identity when frames == 1)."""
    return scores.reshape(-1, frames).mean(dim=1)


def repeat_prompts(prompts: Sequence[str], frames: int) -> list[str]:
    """Each prompt repeated for each of its sample's frames (matches `flatten_frames` order)."""
    return [p for p in prompts for _ in range(frames)]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, with the model's own statistics."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def to_rgb(images: Tensor) -> Tensor:
    """Grey [N,1,H,W] -> RGB by repetition; RGB unchanged; anything else is an error."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]}")
    return images


def cosine_diagonal(image_features: Tensor, text_features: Tensor) -> Tensor:
    """cos(img_i, txt_i) for each pair i: diag(norm(I) · norm(T)ᵀ), computed without the B×B matrix."""
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    return (image_features * text_features).sum(dim=-1)
