"""The wire format of the reward server: samples to JSON and back, in a compact encoding.

One request scores a batch (`lightning-grpo serve-reward`, `RemoteReward`):

    {"prompts": [str] * B,
     "pixels": {"encoding": "uint8" | "png" | "float32", "shape": [B, (F,) C, H, W], "data": ...},
     "images": same as "pixels" with [B, C, H, W], or null (first frames, image-to-video)}

and is answered by `{"name": str, "version": str, "scores": [float | null] * B}` (null: a
non-finite score, which JSON cannot carry; the client reads it back as NaN).

Encodings of pixels in [0, 1]:
- "uint8" (default): round(clamp(x)·255) as raw bytes, base64: 1 byte per value, exactly what
  a reward that scores an 8-bit image sees (the JPEG rewards, and every model-backed reward
  with `quantize=True`, score the same input locally and remotely).
- "png": the same uint8 values, each image/frame a lossless PNG (base64 strings): smaller for
  flat images, costs encoding time; 1 or 3 channels.
- "float32": the float values as they are, 4 bytes each: bit-exact scores for rewards that
  score floats (HPS, CLIP, PickScore without `quantize`), 4× the uint8 size.

Why JSON with base64 and not multipart binary: LitServe decodes JSON requests natively and the
format stays readable with curl; base64 costs 4/3 of the raw size, which is small next to a
reward model's forward.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_png, encode_png  # at import: a server's first request should not pay for it

Encoding = Literal["uint8", "png", "float32"]
ENCODINGS: tuple[str, ...] = ("uint8", "png", "float32")


class WireFormatError(ValueError):
    """A request or response does not follow the wire format; the message names the field."""


def to_uint8(pixels: Tensor) -> Tensor:
    """round(clamp(x, 0, 1)·255) as uint8 on the CPU: the 8-bit grid every image file uses."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def encode_pixels(pixels: Tensor, encoding: Encoding = "uint8") -> dict[str, Any]:
    """A [B, C, H, W] or [B, F, C, H, W] tensor in [0, 1] as a JSON-able dict (see module doc)."""
    if encoding not in ENCODINGS:
        raise WireFormatError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if pixels.ndim not in (4, 5):
        raise WireFormatError(f"pixels must be [B,C,H,W] or [B,F,C,H,W], got {tuple(pixels.shape)}")
    shape = list(pixels.shape)
    if encoding == "float32":
        array = pixels.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False)
        data: Any = base64.b64encode(array.tobytes()).decode("ascii")
    elif encoding == "uint8":
        data = base64.b64encode(to_uint8(pixels).contiguous().numpy().tobytes()).decode("ascii")
    else:
        channels = shape[-3]
        if channels not in (1, 3):
            raise WireFormatError(f"png encoding takes 1 or 3 channels, got {channels}")
        frames = to_uint8(pixels).reshape(-1, *shape[-3:])  # [B·F, C, H, W]
        data = [base64.b64encode(encode_png(frame).numpy().tobytes()).decode("ascii") for frame in frames]
    return {"encoding": encoding, "shape": shape, "data": data}


def decode_pixels(payload: Any, field: str = "pixels") -> Tensor:
    """The float32 tensor in [0, 1] (on the CPU) of an `encode_pixels` dict; `WireFormatError`
    naming `field` for anything malformed (unknown encoding, bad shape, wrong byte count)."""
    if not isinstance(payload, dict):
        raise WireFormatError(f"{field}: expected an object with encoding, shape and data, got {type(payload).__name__}")
    encoding, shape, data = payload.get("encoding"), payload.get("shape"), payload.get("data")
    if encoding not in ENCODINGS:
        raise WireFormatError(f"{field}.encoding must be one of {ENCODINGS}, got {encoding!r}")
    if not (isinstance(shape, list) and len(shape) in (4, 5) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise WireFormatError(f"{field}.shape must be 4 or 5 positive integers ([B,C,H,W] or [B,F,C,H,W]), got {shape!r}")
    count = math.prod(shape)
    if encoding == "png":
        return _decode_png(data, shape, field)
    if not isinstance(data, str):
        raise WireFormatError(f"{field}.data must be a base64 string for encoding {encoding!r}")
    raw = _b64(data, field)
    itemsize = 4 if encoding == "float32" else 1
    if len(raw) != count * itemsize:
        raise WireFormatError(f"{field}: {len(raw)} bytes for shape {shape} in {encoding} (expected {count * itemsize})")
    if encoding == "float32":
        values = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32)).reshape(shape)
        return values
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).reshape(shape).float() / 255.0


def _decode_png(data: Any, shape: Sequence[int], field: str) -> Tensor:
    frames = math.prod(shape[:-3])
    if not (isinstance(data, list) and len(data) == frames and all(isinstance(d, str) for d in data)):
        raise WireFormatError(f"{field}.data must be a list of {frames} base64 PNG strings for shape {list(shape)}")
    mode = ImageReadMode.GRAY if shape[-3] == 1 else ImageReadMode.RGB
    decoded = []
    for k, item in enumerate(data):
        raw = torch.frombuffer(bytearray(_b64(item, f"{field}.data[{k}]")), dtype=torch.uint8)
        try:
            image = decode_png(raw, mode=mode)
        except RuntimeError as err:
            raise WireFormatError(f"{field}.data[{k}] is not a PNG image: {err}") from err
        if list(image.shape) != list(shape[-3:]):
            raise WireFormatError(f"{field}.data[{k}] is {list(image.shape)}, the shape says {list(shape[-3:])}")
        decoded.append(image)
    return torch.stack(decoded).reshape(list(shape)).float() / 255.0


def _b64(data: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as err:
        raise WireFormatError(f"{field} is not valid base64: {err}") from err


def encode_request(prompts: Sequence[str], pixels: Tensor, images: Tensor | None = None, encoding: Encoding = "uint8") -> dict[str, Any]:
    """The JSON body of one scoring request."""
    return {
        "prompts": list(prompts),
        "pixels": encode_pixels(pixels, encoding),
        "images": None if images is None else encode_pixels(images, encoding),
    }


def decode_request(body: Any) -> tuple[list[str], Tensor, Tensor | None]:
    """(prompts, pixels [B, ...] float in [0, 1], first frames [B, C, H, W] or None) of a request
    body, validated: `WireFormatError` names the first bad field."""
    if not isinstance(body, dict):
        raise WireFormatError(f"the request body must be a JSON object, got {type(body).__name__}")
    prompts = body.get("prompts")
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise WireFormatError("prompts must be a list of strings")
    pixels = decode_pixels(body.get("pixels"), "pixels")
    if len(prompts) != pixels.shape[0]:
        raise WireFormatError(f"{len(prompts)} prompts for {pixels.shape[0]} samples")
    images = body.get("images")
    if images is not None:
        images = decode_pixels(images, "images")
        if images.ndim != 4 or images.shape[0] != pixels.shape[0]:
            raise WireFormatError(f"images must be [B,C,H,W] with B = {pixels.shape[0]}, got {list(images.shape)}")
    return prompts, pixels, images


def encode_scores(scores: Tensor) -> list[float | None]:
    """Scores [B] as JSON numbers, None for NaN/inf (JSON has no non-finite numbers)."""
    return [value if math.isfinite(value) else None for value in scores.detach().float().cpu().tolist()]


def decode_scores(values: Any, expected: int) -> Tensor:
    """Tensor[B] float32 of a response's scores (None -> NaN); `WireFormatError` otherwise."""
    if not (isinstance(values, list) and len(values) == expected):
        raise WireFormatError(f"scores must be a list of {expected} numbers, got {values!r:.200}")
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        raise WireFormatError(f"scores must be numbers or null, got {values!r:.200}")
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
