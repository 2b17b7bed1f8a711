"""open_clip rewards on a local model folder (open_clip's `local-dir:` format, as the toy CLIP ships)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_grpo.rewards import ClipScore
from lightning_grpo.rewards._open_clip import resolve_architecture
from tests.rewards.conftest import TINY_OPEN_CLIP_CFG


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """open_clip_config.json (with a 20-token context and its own mean/std) + seeded weights."""
    import open_clip

    out = tmp_path / "clip"
    out.mkdir()
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["text_cfg"]["context_length"] = 20
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def test_resolve_architecture(folder: Path) -> None:
    assert resolve_architecture(folder) == f"local-dir:{folder}"
    assert resolve_architecture(folder / "open_clip_config.json") == f"local-dir:{folder}"
    assert resolve_architecture("local-dir:/anywhere") == "local-dir:/anywhere"
    assert resolve_architecture("ViT-H-14") == "ViT-H-14"  # a registered name is passed on
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json"):
        resolve_architecture(folder)


def test_clip_score_from_a_folder_uses_its_config_tokenizer_and_preprocessing(folder: Path) -> None:
    import open_clip

    reward = ClipScore(folder / "open_clip_model.safetensors", architecture=str(folder))
    assert reward.image_size == 32 and reward.resize_mode == "shortest" and reward.image_mean == (0.5, 0.5, 0.5) and reward.image_std == (0.25, 0.25, 0.25)
    assert reward.tokenizer.context_length == 20
    # by hand, from open_clip's own loader of the same folder (it reads the weights itself)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    images, prompts = torch.rand(3, 3, 32, 32), ["a red circle", "a blue square", "a dog"]
    with torch.no_grad():
        expected = (
            F.normalize(model.encode_image((images - 0.5) / 0.25), dim=-1)
            * F.normalize(model.encode_text(open_clip.tokenize(prompts, context_length=20)), dim=-1)
        ).sum(-1)
    torch.testing.assert_close(reward(images, prompts), expected, atol=1e-5, rtol=1e-5)


def test_fp16_weights_load_into_the_fp32_model(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = folder / "open_clip_model.safetensors"
    half = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(half, str(folder / "half.safetensors"))
    reward = ClipScore(folder / "half.safetensors", architecture=str(folder))
    assert reward.dtype == torch.float32
    torch.testing.assert_close(reward.model.logit_scale, half["logit_scale"].float())
