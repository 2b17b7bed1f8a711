"""The official scorers' image transforms, reproduced on batched float tensors.

Each reward's official code resizes a PIL image or a tensor with its own rule; the rules differ
in which side is fitted, how the crop offset is rounded and whether the result is clamped, and
for non-square images (848×480 video frames) the differences are large. These functions repeat
the geometry exactly and the resampling as torch's antialiased kernels do (what torchvision's
tensor `resize` calls). They are hand-written because the library transforms work one PIL image
at a time on the CPU, while rewards score a batch of float tensors on the GPU. Where the official
path resizes a uint8 PIL image, the result differs from ours by PIL's 8-bit rounding (tests state
the tolerance, docs/rewards.md the size).

    mode        geometry                                                    official user
    "shortest"  shortest side -> size, centre crop                          open_clip default, CLIP, PickScore
    "longest"   longest side -> size, zero pad to size×size                 HPS-v2 (`ResizeMaxSize`), open_clip "longest"
    "squash"    both sides -> size, aspect ratio not kept                   open_clip "squash" (DFN5B ViT-H-14-378)
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

ResizeMode = Literal["shortest", "longest", "squash"]
CropRounding = Literal["round", "floor"]
RESIZE_MODES = ("shortest", "longest", "squash")


def quantize_uint8(images: Tensor) -> Tensor:
    """[0, 1] floats on the uint8 grid: round(clamp(x)·255)/255, what saving the image as PNG (or
    diffusers' `VaeImageProcessor.postprocess(..., "pil")`) and reading it back gives."""
    return (images.clamp(0.0, 1.0) * 255.0).round() / 255.0


def _sides(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize(images: Tensor, height: int, width: int, interpolation: str) -> Tensor:
    """torchvision `resize` of a float tensor: torch interpolation with antialias on."""
    if (height, width) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=(height, width), mode=interpolation, align_corners=False, antialias=True)


def shortest_side_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Resized (h, w) before the centre crop.

    Square target (int): torchvision `Resize(int)` and transformers' `shortest_edge`: the short
    side becomes `size`, the long side int(size·long/short) (truncated). Non-square target: open_clip
    `ResizeKeepRatio(longest=0)`: both sides divided by min(h/th, w/tw), rounded.
    """
    if isinstance(size, int):
        if height <= width:
            return size, int(size * width / height)
        return int(size * height / width), size
    target_h, target_w = size
    ratio = min(height / target_h, width / target_w)
    return round(height / ratio), round(width / ratio)


def resize_shortest_crop(
    images: Tensor,
    size: int | tuple[int, int],
    interpolation: str = "bicubic",
    crop: CropRounding = "round",
    clamp: bool = True,
    crop_size: int | tuple[int, int] | None = None,
) -> Tensor:
    """Resize the shortest side, centre crop: [N, C, H, W] -> [N, C, h, w].

    size: the resize target (see `shortest_side_size`); crop_size: the crop (default `size`).
    crop: "round" offsets int(round((H − h)/2)) as torchvision `CenterCrop` (open_clip); "floor"
        (H − h)//2 as transformers' image processors (PickScore's CLIPImageProcessor).
    clamp: clip to [0, 1] after resizing (bicubic overshoots), as resizing a uint8 image does.
    """
    out_h, out_w = _sides(size if crop_size is None else crop_size)
    new_h, new_w = shortest_side_size(*images.shape[-2:], size)
    images = _resize(images, new_h, new_w, interpolation)
    if crop == "round":
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    elif crop == "floor":
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    else:
        raise ValueError(f"crop must be 'round' or 'floor', got {crop!r}")
    if top < 0 or left < 0:
        raise ValueError(f"crop {(out_h, out_w)} is larger than the resized image {(new_h, new_w)}")
    images = images[..., top : top + out_h, left : left + out_w]
    return images.clamp(0.0, 1.0) if clamp else images


def resize_longest_pad(
    images: Tensor, size: int | tuple[int, int], interpolation: str = "bicubic", fill: float = 0.0, clamp: bool = False
) -> Tensor:
    """Resize the longest side to fit `size`, pad the rest with `fill`: [N, C, H, W] -> [N, C, h, w].

    HPS-v2 (tgxs002/HPSv2 hpsv2/src/open_clip/transform.py `ResizeMaxSize`): scale = size/max(H, W),
    new sides round(side·scale), padding (left, top) = (pad_w//2, pad_h//2) and the remainder right
    and bottom, fill 0 in [0, 1] units (black, before normalisation), applied to the float tensor
    after `ToTensor`, so nothing is clamped (`clamp=False`). open_clip's "longest" mode
    (`ResizeKeepRatio(longest=1)` + `CenterCropOrPad`) has the same geometry on a uint8 image.
    One deliberate difference: HPS-v2 skips the pad when the image's longest side already equals
    `size` (a non-square input then reaches the model); here every output is `size`.
    """
    out_h, out_w = _sides(size)
    height, width = images.shape[-2:]
    ratio = max(height / out_h, width / out_w)
    new_h, new_w = min(out_h, round(height / ratio)), min(out_w, round(width / ratio))
    images = _resize(images, new_h, new_w, interpolation)
    if clamp:
        images = images.clamp(0.0, 1.0)
    pad_h, pad_w = out_h - new_h, out_w - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images


def resize_squash(images: Tensor, size: int | tuple[int, int], interpolation: str = "bicubic", clamp: bool = True) -> Tensor:
    """Resize both sides to `size` (aspect ratio not kept): open_clip `resize_mode="squash"`."""
    out = _resize(images, *_sides(size), interpolation)
    return out.clamp(0.0, 1.0) if clamp else out


def resize_by_mode(
    images: Tensor, mode: ResizeMode, size: int | tuple[int, int], interpolation: str = "bicubic", clamp: bool = True, fill: float = 0.0
) -> Tensor:
    """open_clip's eval geometry for `resize_mode` (open_clip transform.py `image_transform`)."""
    if mode == "shortest":
        return resize_shortest_crop(images, size, interpolation, crop="round", clamp=clamp)
    if mode == "longest":
        return resize_longest_pad(images, size, interpolation, fill=fill, clamp=clamp)
    if mode == "squash":
        return resize_squash(images, size, interpolation, clamp=clamp)
    raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
