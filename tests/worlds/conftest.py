"""Shared helpers for the shapes-world tests: a generator-like degradation of clean renders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor


def degrade(pixels: Tensor, blur_sigma: float, noise_std: float, seed: int = 0) -> Tensor:
    """Gaussian blur (σ in pixels, replicate padding) plus Gaussian noise, clamped to [0, 1].

    Mimics the soft edges and grain of a tiny generator's output. Deliberately implemented
    independently of the verifier's own blur (depthwise convolution, not banded matmuls).
    """
    out = pixels
    if blur_sigma > 0:
        half = math.ceil(3 * blur_sigma)
        taps = torch.arange(-half, half + 1, dtype=torch.float32)
        kernel = torch.exp(-taps.square() / (2 * blur_sigma**2))
        kernel = (kernel / kernel.sum()).to(pixels)
        channels = pixels.shape[1]
        row = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)  # [C, 1, 1, k] depthwise
        col = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)  # [C, 1, k, 1]
        out = F.conv2d(F.pad(out, (half, half, 0, 0), mode="replicate"), row, groups=channels)
        out = F.conv2d(F.pad(out, (0, 0, half, half), mode="replicate"), col, groups=channels)
    if noise_std > 0:
        gen = torch.Generator().manual_seed(seed)
        out = out + noise_std * torch.randn(out.shape, generator=gen).to(out)
    return out.clamp(0, 1)


@pytest.fixture
def degrade_fn():
    """The `degrade` helper, as a fixture so test modules need no import path tricks."""
    return degrade
