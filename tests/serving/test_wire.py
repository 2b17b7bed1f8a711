"""The reward server's wire format (lightning_grpo/rewards/wire.py): lossless where it says so,
and every malformed field named."""

from __future__ import annotations

import base64

import pytest
import torch

from lightning_grpo.rewards.wire import WireFormatError, decode_pixels, decode_request, decode_scores, encode_pixels, encode_request, encode_scores


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 4, 1, 6, 6)])
def test_uint8_and_png_carry_the_8bit_grid_exactly(shape):
    torch.manual_seed(0)
    pixels = torch.rand(shape) * 1.2 - 0.1  # some values outside [0, 1]: clamped like an image file
    grid = (pixels.clamp(0, 1) * 255).round() / 255
    for encoding in ("uint8", "png"):
        assert torch.equal(decode_pixels(encode_pixels(pixels, encoding)), grid), encoding


def test_float32_is_bit_exact_and_uint8_is_one_byte_per_value():
    pixels = torch.rand(2, 3, 4, 4)
    assert torch.equal(decode_pixels(encode_pixels(pixels, "float32")), pixels)
    assert len(base64.b64decode(encode_pixels(pixels, "uint8")["data"])) == pixels.numel()


def test_request_round_trip_with_first_frames():
    pixels, images = torch.rand(2, 5, 3, 4, 4), torch.rand(2, 3, 4, 4)
    prompts, decoded, frames = decode_request(encode_request(["a", "b"], pixels, images, "float32"))
    assert prompts == ["a", "b"] and torch.equal(decoded, pixels) and torch.equal(frames, images)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.update(prompts="a"), r"prompts must be a list of strings"),
        (lambda b: b.update(prompts=["a"]), r"1 prompts for 2 samples"),
        (lambda b: b["pixels"].update(encoding="jpeg2000"), r"pixels.encoding must be one of"),
        (lambda b: b["pixels"].update(shape=[2, 3, 4]), r"pixels.shape must be 4 or 5 positive integers"),
        (lambda b: b["pixels"].update(shape=[2, 3, 4, 0]), r"pixels.shape must be 4 or 5 positive integers"),
        (lambda b: b["pixels"].update(shape=[2, 3, 4, 5]), r"pixels: 96 bytes for shape \[2, 3, 4, 5\] in uint8 \(expected 120\)"),
        (lambda b: b["pixels"].update(data="not base64!"), r"pixels is not valid base64"),
        (lambda b: b.update(pixels=[1, 2]), r"pixels: expected an object"),
        (lambda b: b.update(images={"encoding": "uint8", "shape": [1, 3, 4, 4], "data": base64.b64encode(bytes(48)).decode()}), r"images must be \[B,C,H,W\] with B = 2"),
    ],
)
def test_malformed_requests_name_the_field(mutate, match):
    body = encode_request(["a", "b"], torch.rand(2, 3, 4, 4))
    mutate(body)
    with pytest.raises(WireFormatError, match=match):
        decode_request(body)


def test_png_that_is_not_a_png_or_has_another_size_is_named():
    body = encode_pixels(torch.rand(1, 3, 4, 4), "png")
    other = encode_pixels(torch.rand(1, 3, 4, 5), "png")["data"]
    with pytest.raises(WireFormatError, match=r"pixels.data\[0\] is \[3, 4, 5\], the shape says \[3, 4, 4\]"):
        decode_pixels({**body, "data": other})
    with pytest.raises(WireFormatError, match=r"pixels.data\[0\] is not a PNG image"):
        decode_pixels({**body, "data": [base64.b64encode(b"GIF89a....").decode()]})
    with pytest.raises(WireFormatError, match=r"list of 1 base64 PNG strings"):
        decode_pixels({**body, "data": body["data"] * 2})


def test_non_finite_scores_travel_as_null_and_come_back_nan():
    values = encode_scores(torch.tensor([1.5, float("nan"), float("inf"), -2.0]))
    assert values == [1.5, None, None, -2.0]
    back = decode_scores(values, 4)
    assert back[0] == 1.5 and back[3] == -2.0 and back[1:3].isnan().all()
    with pytest.raises(WireFormatError, match=r"list of 3 numbers"):
        decode_scores(values, 3)
    with pytest.raises(WireFormatError, match=r"numbers or null"):
        decode_scores(["1.0"], 1)
