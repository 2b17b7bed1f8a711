"""PickScore on a tiny transformers CLIPModel + handmade CLIP tokenizer, all saved locally."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lightning_grpo.rewards import PickScore
from lightning_grpo.rewards._common import CheckpointMismatchError

PROMPTS = ["a red cat", "a dog", "cat dog red"]


def official_pickscore(model_dir: Path, processor_dir: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The official recipe through the HF processor and the full CLIPModel forward:
    logits_per_image = exp(logit_scale) · norm(I) · norm(T)ᵀ, one image per prompt -> its diagonal."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(processor_dir)
    inputs = processor(text=prompts, images=list(images), padding=True, truncation=True, max_length=77,
                       return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        return torch.diagonal(model(**inputs).logits_per_image)


def test_pickscore_matches_official_formula(pickscore_dirs: tuple[Path, Path]) -> None:
    model_dir, processor_dir = pickscore_dirs
    torch.manual_seed(7)
    images = torch.rand(3, 3, 32, 32)
    reward = PickScore(model_dir, processor_dir)
    expected = official_pickscore(model_dir, processor_dir, images, PROMPTS)
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=2e-4, rtol=1e-4)
    assert reward.tokenizer("a cat")["input_ids"][0] == reward.tokenizer.bos_token_id


def test_pickscore_scale_is_logit_scale(pickscore_dirs: tuple[Path, Path]) -> None:
    model_dir, processor_dir = pickscore_dirs
    reward = PickScore(model_dir, processor_dir)
    torch.manual_seed(8)
    images = torch.rand(2, 3, 32, 32)
    image_embeds, text_embeds = reward.features(images, PROMPTS[:2])
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    torch.testing.assert_close(reward(images, PROMPTS[:2]), torch.exp(torch.tensor(1.5)) * cosine, atol=1e-5, rtol=1e-5)


def test_pickscore_missing_folder(tmp_path: Path, pickscore_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match=r"'pickscore'.*does_not_exist"):
        PickScore(tmp_path / "does_not_exist", pickscore_dirs[1])


def test_pickscore_mismatching_weights(tmp_path: Path, pickscore_dirs: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file, save_file

    model_dir, processor_dir = pickscore_dirs
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["not_in_clip.weight"] = weights.pop("text_projection.weight")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"'pickscore'.*text_projection\.weight"):
        PickScore(broken, processor_dir)
