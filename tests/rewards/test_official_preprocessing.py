"""Our tensor preprocessing against each official scorer's transform on the same uint8 image,
square and non-square (video frame sizes 848×480, 480×848, 640×400, and an upscaled 300×200).

References: HPS-v2's eval transform (hpsv2/src/open_clip/transform.py: ToTensor, ResizeMaxSize,
Normalize) rebuilt from torchvision ops; open_clip's own `image_transform` for each resize_mode;
transformers' PIL-backed `CLIPImageProcessorPil` (the path PickScore's snippet ran on).

Tolerances, in uint8 levels of the resized image (1 level = 1/255 before normalisation):
- HPS: 1e-4 levels (both resize the same float tensor with the same antialiased bicubic kernel);
- open_clip and CLIPImageProcessor resize the uint8 PIL image: at most 1 level on any pixel and
  under 0.3 levels on average with `quantize=True` (PIL's fixed-point bicubic rounds ~15% of the
  pixels the other way).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_grpo.rewards import ClipScore, HPSReward, PickScore
from lightning_grpo.rewards._common import normalize
from lightning_grpo.rewards._open_clip import preprocess_config
from lightning_grpo.rewards._preprocess import (
    quantize_uint8,
    resize_by_mode,
    resize_longest_pad,
    resize_shortest_crop,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZES = [(480, 848), (848, 480), (400, 640), (512, 512), (200, 300)]  # (H, W)
LEVEL = 1 / 255


def uint8_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[1, 3, H, W] uint8: smooth structure plus noise, so every resize rule leaves a trace."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=g), size=(height, width), mode="bilinear")
    return ((0.8 * smooth + 0.2 * torch.rand(1, 3, height, width, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image[0].permute(1, 2, 0).numpy())


def official_hps_transform(pil, size: int) -> torch.Tensor:
    """HPS-v2 `preprocess_val` (resize_longest_max=True): ToTensor, then on the float tensor
    `ResizeMaxSize`: scale = size / max(H, W), sides round(side·scale), bicubic, pad (w//2, h//2,
    rest) with 0; then Normalize. Unnormalised output, [3, size, size]."""
    import torchvision.transforms.functional as TF

    tensor = TF.to_tensor(pil)
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    new = [round(height * scale), round(width * scale)]
    tensor = TF.resize(tensor, new, TF.InterpolationMode.BICUBIC)
    pad_h, pad_w = size - new[0], size - new[1]
    return TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


def assert_within_one_level(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    diff = (ours - reference).abs() / LEVEL
    assert diff.max().item() <= 1.0 + 1e-3, diff.max().item()
    assert diff.mean().item() < 0.3, diff.mean().item()


@pytest.mark.parametrize("height, width", SIZES)
def test_hps_equals_the_hpsv2_transform(height, width):
    image = uint8_image(height, width)
    reference = official_hps_transform(to_pil(image), 224)
    ours = resize_longest_pad(quantize_uint8(image.float() / 255), 224)[0]
    assert (ours - reference).abs().max().item() < 1e-4 * LEVEL
    if height != width:  # the shortest-side + crop rule we had is far from it
        old = resize_shortest_crop(image.float() / 255, 224)[0]
        assert (old - reference).abs().mean() > 20 * LEVEL


def test_hps_keeps_the_bicubic_overshoot():
    # a black/white step, upscaled 100×150 -> 149×224: bicubic rings past [0, 1] on both sides;
    # HPS-v2 resizes the float tensor and never clamps
    image = torch.zeros(1, 3, 100, 150, dtype=torch.uint8)
    image[..., 75:] = 255
    reference = official_hps_transform(to_pil(image), 224)
    ours = resize_longest_pad(image.float() / 255, 224)[0]
    assert reference.min() < -0.01 and reference.max() > 1.01
    assert (ours - reference).abs().max().item() < 1e-4 * LEVEL


@pytest.mark.parametrize("height, width", SIZES)
@pytest.mark.parametrize("mode, size", [("shortest", 224), ("longest", 224), ("squash", 378)])
def test_open_clip_modes_equal_open_clip_image_transform(height, width, mode, size):
    import open_clip

    image = uint8_image(height, width, seed=1)
    transform = open_clip.image_transform(size, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3, resize_mode=mode, interpolation="bicubic")
    reference = transform(to_pil(image))
    ours = quantize_uint8(resize_by_mode(quantize_uint8(image.float() / 255), mode, size))[0]
    assert_within_one_level(ours, reference)


@pytest.mark.parametrize("height, width", SIZES)
def test_pickscore_geometry_equals_clip_image_processor(height, width):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = uint8_image(height, width, seed=2)
    processor = CLIPImageProcessorPil(do_normalize=False)
    reference = torch.from_numpy(np.asarray(processor(images=to_pil(image), return_tensors="np")["pixel_values"][0]))
    x = quantize_uint8(image.float() / 255)
    ours = quantize_uint8(resize_shortest_crop(x, 224, crop="floor"))[0]
    assert_within_one_level(ours, reference)
    if (height, width) == (480, 848):  # resized to 224×395: offset 85 (floored), torchvision rounds to 86
        rounded = quantize_uint8(resize_shortest_crop(x, 224, crop="round"))[0]
        assert (rounded - reference).abs().max() > 10 * LEVEL


def test_quantize_is_the_png_round_trip():
    x = torch.tensor([0.0, 0.2, 0.50196, 1.2, -0.1, 0.998])
    expected = torch.tensor([0, 51, 128, 255, 0, 254]) / 255
    torch.testing.assert_close(quantize_uint8(x), expected.float())


# ----------------------------------------------------------------------- through the rewards
def test_hps_reward_preprocess_is_the_hpsv2_transform(hps_checkpoint: Path, tiny_open_clip_name: str):
    reward = HPSReward(hps_checkpoint, tiny_open_clip_name, quantize=True)  # tiny model: 32 px
    for height, width in [(48, 85), (85, 48), (40, 40)]:
        image = uint8_image(height, width, seed=3)
        reference = normalize(official_hps_transform(to_pil(image), 32)[None], MEAN, STD)
        torch.testing.assert_close(reward.preprocess(image.float() / 255), reference, atol=1e-5, rtol=0)
    # without quantize the float image is used as it is
    x = torch.rand(1, 3, 48, 85)
    unquantized = HPSReward(hps_checkpoint, tiny_open_clip_name).preprocess(x)
    torch.testing.assert_close(unquantized, normalize(resize_longest_pad(x, 32), MEAN, STD))


def test_dfn5b_registry_entry_gives_squash(tiny_open_clip_model):
    cfg = preprocess_config(tiny_open_clip_model, "ViT-H-14-378-quickgelu", "dfn5b")
    assert cfg["resize_mode"] == "squash" and cfg["interpolation"] == "bicubic"
    assert preprocess_config(tiny_open_clip_model, "ViT-H-14-378-quickgelu", None)["resize_mode"] == "shortest"
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        preprocess_config(tiny_open_clip_model, "ViT-H-14-378-quickgelu", "nope")


@pytest.mark.parametrize("mode", ["squash", "longest", "shortest"])
def test_clip_score_uses_the_folder_resize_mode(tmp_path: Path, tiny_open_clip_model, mode):
    """A local open_clip folder whose preprocess_cfg names a resize_mode: our preprocessing equals
    open_clip's own transform for that model (`image_transform_v2` of its preprocess_cfg)."""
    import json

    from open_clip.transform import PreprocessCfg, image_transform_v2
    from safetensors.torch import save_file

    from tests.rewards.conftest import TINY_OPEN_CLIP_CFG

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_OPEN_CLIP_CFG,
        "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": mode},
    }))
    save_file({k: v.contiguous() for k, v in tiny_open_clip_model.state_dict().items()}, folder / "open_clip_model.safetensors")
    reward = ClipScore(folder / "open_clip_model.safetensors", architecture=str(folder), quantize=True)
    assert reward.resize_mode == mode
    transform = image_transform_v2(PreprocessCfg(**reward.model.visual.preprocess_cfg), is_train=False)
    image = uint8_image(48, 85, seed=4)
    ours = reward.preprocess(image.float() / 255)[0]
    reference = transform(to_pil(image))
    std = torch.tensor(STD).view(3, 1, 1)
    assert_within_one_level(ours * std, reference * std)  # compare in [0, 1] units
    forced = ClipScore(folder / "open_clip_model.safetensors", architecture=str(folder), resize_mode="longest")
    assert forced.resize_mode == "longest"


def test_clip_score_refuses_unknown_resize_mode(hps_checkpoint: Path, tiny_open_clip_name: str):
    with pytest.raises(ValueError, match="resize_mode"):
        ClipScore(hps_checkpoint, tiny_open_clip_name, pretrained_tag=None, resize_mode="crop")


def test_pickscore_reward_preprocess_equals_its_processor(pickscore_dirs):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model_dir, processor_dir = pickscore_dirs
    reward = PickScore(model_dir, processor_dir, quantize=True)
    reference_processor = CLIPImageProcessorPil.from_pretrained(processor_dir)
    std = torch.tensor(reference_processor.image_std).view(1, 3, 1, 1)
    for height, width in [(48, 85), (85, 48), (33, 33)]:
        image = uint8_image(height, width, seed=5)
        reference = torch.from_numpy(np.asarray(reference_processor(images=to_pil(image), return_tensors="np")["pixel_values"]))
        assert_within_one_level(reward.preprocess(image.float() / 255) * std, reference * std)


def test_building_open_clip_rewards_does_not_say_random(hps_checkpoint: Path, tiny_open_clip_name: str, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        HPSReward(hps_checkpoint, tiny_open_clip_name)
        ClipScore(hps_checkpoint, tiny_open_clip_name, pretrained_tag=None)
    assert "initialized randomly" not in caplog.text
    import open_clip  # the message exists: open_clip does print it when building the empty model

    with caplog.at_level(logging.WARNING):
        open_clip.create_model(tiny_open_clip_name, pretrained=None)
    assert "initialized randomly" in caplog.text
