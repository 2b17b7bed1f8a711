"""JPEG (in)compressibility: score = ∓ in-memory JPEG size in KB."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from lightning_grpo.rewards import JpegCompressibility, JpegIncompressibility


def _pil_jpeg_kb(image: torch.Tensor, quality: int) -> float:
    """Independent size: PIL's encoder (libjpeg too), for an order-of-magnitude cross-check."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def test_score_is_minus_jpeg_kb_and_flat_beats_noise() -> None:
    torch.manual_seed(0)
    flat = torch.full((3, 64, 64), 0.5)
    noise = torch.rand(3, 64, 64)
    pixels = torch.stack([flat, noise])
    scores = JpegCompressibility(quality=95)(pixels, ["a", "b"])
    assert scores[0] > scores[1]  # the flat image compresses better
    for score, image in zip(scores, pixels):
        assert score.item() < 0
        assert -score.item() == pytest.approx(_pil_jpeg_kb(image, 95), rel=0.15)


def test_incompressibility_is_the_negation_and_video_is_frame_mean() -> None:
    torch.manual_seed(1)
    video = torch.rand(2, 3, 3, 32, 32)  # [B, F, C, H, W]
    comp, incomp = JpegCompressibility(), JpegIncompressibility()
    assert torch.equal(incomp(video, ["a", "b"]), -comp(video, ["a", "b"]))
    per_frame = comp(video.flatten(0, 1), ["x"] * 6).view(2, 3)
    torch.testing.assert_close(comp(video, ["a", "b"]), per_frame.mean(1))


def test_quality_is_validated() -> None:
    with pytest.raises(ValueError):
        JpegCompressibility(quality=0)
