"""Weight-free JPEG (in)compressibility rewards (DDPO's smoke-test rewards).

    compressibility(x)   = − size_KB(JPEG(x))
    incompressibility(x) = + size_KB(JPEG(x))

with size_KB = bytes / 1000 of the in-memory JPEG encoding (nothing is written to disk). A policy
trained on `JpegCompressibility` learns flat, simple images; on `JpegIncompressibility`, busy ones.
No weights, no downloads: the reward to use when testing the training loop end to end.
Video samples score the mean over their frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grpo.rewards._common import flatten_frames, mean_over_frames, to_rgb
from lightning_grpo.rewards.base import Reward


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """In-memory JPEG size in KB (1 KB = 1000 bytes) of each image.

    Args:
        images: [N, C, H, W] float in [0, 1], any device (encoded on CPU as uint8).
        quality: JPEG quality 1..100 (DDPO uses 95).
    Returns:
        [N] float32 on CPU.
    """
    from torchvision.io import encode_jpeg

    uint8 = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # [N, C, H, W]
    encoded = encode_jpeg(list(to_rgb(uint8)), quality=quality)
    return torch.tensor([len(e) / 1000.0 for e in encoded], dtype=torch.float32)


class JpegCompressibility(Reward):
    """Score = − JPEG size in KB (higher for more compressible images).

    Args:
        quality: JPEG quality used for the encoding (1..100).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage.
    """

    default_name = "jpeg_compressibility"
    sign: float = -1.0

    def __init__(self, quality: int = 95, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__(name, weight)
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        frames, per_sample = flatten_frames(pixels)  # [B*F, C, H, W]
        sizes = jpeg_size_kb(frames, self.quality).to(pixels.device)
        return self.sign * mean_over_frames(sizes, per_sample)


class JpegIncompressibility(JpegCompressibility):
    """Score = + JPEG size in KB (higher for less compressible images). Same arguments."""

    default_name = "jpeg_incompressibility"
    sign = 1.0
