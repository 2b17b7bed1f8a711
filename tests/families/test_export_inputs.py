"""`lightning-grpo export` refuses bad input naming it (the round trips are in test_family_contract)."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_grpo.export import load_trained_weights, policy_from_config
from lightning_grpo.policies.registry import FAMILIES


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        policy_from_config(tmp_path / "nowhere.yaml")


def test_config_without_a_policy_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"group_size": 4}}))
    with pytest.raises(ValueError, match="model.policy"):
        policy_from_config(path)


def test_a_policy_that_is_not_diffusers_backed_is_refused():
    config = {"model": {"policy": {"class_path": "lightning_grpo.policies.tiny.TinyPolicy"}}}
    with pytest.raises(ValueError, match="TinyPolicy is not a diffusers-backed policy"):
        policy_from_config(config)


def test_missing_and_mismatched_checkpoints_are_named(stand_in_paths, tmp_path):
    policy = FAMILIES["sd"].stand_in_policy(stand_in_paths["sd"], lora_rank=2)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_trained_weights(policy, tmp_path / "absent.ckpt")
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"policy.unet.not_a_weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.ckpt.*missing trainable weights \['unet\..*lora_A.*unexpected \['unet\.not_a_weight'\]"):
        load_trained_weights(policy, wrong)
