"""HPS-v2.1 and CLIP score on a tiny open_clip model saved in the official checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_grpo.rewards import ClipScore, HPSReward, RewardError
from lightning_grpo.rewards._common import CheckpointMismatchError
from lightning_grpo.rewards._preprocess import resize_longest_pad

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red cat", "a dog", "blue sky at night"]


def official_hps(model: torch.nn.Module, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """hpsv2/img_score.py: features from the output_dict forward (normalised), diag(I @ T.T)."""
    import open_clip

    out = model((pixels - MEAN) / STD, open_clip.tokenize(prompts))
    image_features, text_features = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return torch.diagonal(image_features @ text_features.T)


@pytest.fixture()
def images() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(3, 3, 32, 32)  # already at the model's 32 px: the eval transform is the identity


def test_hps_matches_hand_computation(hps_checkpoint: Path, tiny_open_clip_name: str, tiny_open_clip_model, images) -> None:
    reward = HPSReward(hps_checkpoint, architecture=tiny_open_clip_name)
    with torch.no_grad():
        expected = official_hps(tiny_open_clip_model, images, PROMPTS)
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1.0  # a cosine: logit scale (set to e²) not applied
    # pairing: each image against its own prompt, not the first one
    assert not torch.allclose(scores, reward(images, [PROMPTS[0]] * 3))


def test_hps_accepts_module_prefix(tmp_path: Path, tiny_open_clip_name: str, tiny_open_clip_model, images) -> None:
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_open_clip_model.state_dict().items()}}, path)
    with torch.no_grad():
        expected = official_hps(tiny_open_clip_model, images, PROMPTS)
    torch.testing.assert_close(HPSReward(path, tiny_open_clip_name)(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_hps_video_scores_mean_over_frames(hps_checkpoint: Path, tiny_open_clip_name: str, images) -> None:
    reward = HPSReward(hps_checkpoint, tiny_open_clip_name)
    video = torch.stack([images, images.flip(0)])  # [2, 3 frames, C, H, W]
    per_frame = torch.stack([reward(images, ["a dog"] * 3), reward(images.flip(0), ["a cat"] * 3)])
    torch.testing.assert_close(reward(video, ["a dog", "a cat"]), per_frame.mean(1))


def test_hps_preprocesses_other_resolutions_on_tensors(hps_checkpoint: Path, tiny_open_clip_name: str) -> None:
    torch.manual_seed(4)
    wide = torch.rand(2, 3, 40, 64)
    reward = HPSReward(hps_checkpoint, tiny_open_clip_name)
    expected = reward(resize_longest_pad(wide, 32), PROMPTS[:2])  # 40×64 -> 20×32, padded to 32×32
    torch.testing.assert_close(reward(wide, PROMPTS[:2]), expected)


def test_hps_follows_module_dtype(hps_checkpoint: Path, tiny_open_clip_name: str, images) -> None:
    reward = HPSReward(hps_checkpoint, tiny_open_clip_name)
    fp32 = reward(images, PROMPTS)
    reward = reward.to(torch.float64)
    assert reward.dtype == torch.float64 and reward.device.type == "cpu"
    scores = reward(images, PROMPTS)
    assert scores.dtype == torch.float32  # the contract: fp32 scores whatever the model dtype
    torch.testing.assert_close(scores, fp32, atol=1e-5, rtol=1e-5)


def test_reward_stays_in_eval_mode_and_frozen(hps_checkpoint: Path, tiny_open_clip_name: str) -> None:
    reward = HPSReward(hps_checkpoint, tiny_open_clip_name)
    parent = torch.nn.ModuleDict({"reward": reward}).train()  # what Lightning does to the LightningModule
    assert not any(m.training for m in parent["reward"].modules())
    assert not any(p.requires_grad for p in reward.parameters())


def test_missing_checkpoint_names_path_and_reward(tmp_path: Path, tiny_open_clip_name: str) -> None:
    missing = tmp_path / "nope" / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match=r"'hps'.*nope/HPS_v2\.1_compressed\.pt"):
        HPSReward(missing, tiny_open_clip_name)


def test_mismatching_state_dict_names_reward_and_keys(tmp_path: Path, tiny_open_clip_name: str, tiny_open_clip_model) -> None:
    state = dict(tiny_open_clip_model.state_dict())
    state["extra.weight"] = state.pop("ln_final.weight")
    state["text_projection"] = torch.zeros(32, 8)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointMismatchError, match="'hps'") as err:
        HPSReward(path, tiny_open_clip_name)
    for fragment in ("ln_final.weight", "extra.weight", "text_projection"):
        assert fragment in str(err.value)


def test_clip_score_scales(hps_checkpoint: Path, tiny_open_clip_name: str, tiny_open_clip_model, images) -> None:
    # ClipScore reads plain state dicts too (DFN5B's open_clip_pytorch_model.bin is one)
    plain = hps_checkpoint.parent / "open_clip_pytorch_model.bin"
    torch.save(tiny_open_clip_model.state_dict(), plain)
    with torch.no_grad():
        feats_i = F.normalize(tiny_open_clip_model.encode_image((images - MEAN) / STD), dim=-1)
        import open_clip

        feats_t = F.normalize(tiny_open_clip_model.encode_text(open_clip.tokenize(PROMPTS)), dim=-1)
    cosine = (feats_i * feats_t).sum(-1)
    torch.testing.assert_close(ClipScore(plain, tiny_open_clip_name, pretrained_tag=None)(images, PROMPTS), cosine, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ClipScore(plain, tiny_open_clip_name, scale=100.0, pretrained_tag=None)(images, PROMPTS), 100 * cosine, atol=1e-3, rtol=1e-5)
    by_logit = ClipScore(plain, tiny_open_clip_name, scale="logit_scale", pretrained_tag=None)(images, PROMPTS)
    torch.testing.assert_close(by_logit, torch.exp(torch.tensor(2.0)) * cosine, atol=1e-4, rtol=1e-5)


def test_clip_score_runtime_failure_is_named(hps_checkpoint: Path, tiny_open_clip_name: str) -> None:
    reward = ClipScore(hps_checkpoint, tiny_open_clip_name, pretrained_tag=None, name="clip_dfn")
    with pytest.raises(RewardError, match="'clip_dfn'"):
        reward(torch.rand(1, 4, 32, 32), ["four channels"])  # neither grey nor RGB
