"""What a family states about itself agrees with what its built policy does, for every registered family.

The start-up validation and `lightning-grpo estimate` act before anything loads, on the family's
word: its CFG use from a config's arguments (`uses_cfg_with`), its geometry rules from the
folder's config.json files (`geometry_steps`), one sample's shapes (`config_geometry`) and an
instance that can run `predict` without loading (`estimate_predictor`). Here each is checked
against the policy built on the family's stand-in, so a new family's statements are tested with no
new test code. Also: the FSDP units and roots, and the checkpoint geometry, come from the family.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_grpo.estimate import KIND_DTYPES
from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.policies.family import block_classes_of
from lightning_grpo.policies.registry import FAMILIES
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.validation import ConfigError, validate_config

from tests.families.fitting import PROMPTS, condition_for

NAMES = sorted(FAMILIES)


def folder_configs(policy, path: Path) -> dict[str, dict]:
    """{subfolder: config.json} of the stand-in's model components, as the validation reads them."""
    return {sub: json.loads((path / sub / "config.json").read_text()) for sub, (kind, _) in policy.components.items()
            if kind == "model" and (path / sub / "config.json").is_file()}


@pytest.mark.parametrize("name", NAMES)
def test_cfg_from_the_config_is_what_the_policy_does(name, stand_in_paths):
    family = FAMILIES[name]
    policy = family.stand_in_policy(stand_in_paths[name])
    assert type(policy).uses_cfg_with(family.stand_in_kwargs) is policy.uses_cfg
    assert type(policy).uses_cfg_with({}) is False  # every family's default is unguided (one optimizer step rule)


def test_the_tiny_policy_states_its_cfg_too():
    assert TinyPolicy.uses_cfg_with({"guidance_scale": 3.0}) is TinyPolicy(guidance_scale=3.0).uses_cfg is True
    assert TinyPolicy.uses_cfg_with({}) is TinyPolicy().uses_cfg is False


@pytest.mark.parametrize("name", NAMES)
def test_geometry_rules_from_the_folder_are_the_built_policys(name, stand_in_paths):
    family = FAMILIES[name]
    policy = family.stand_in_policy(stand_in_paths[name])
    steps = type(policy).geometry_steps(folder_configs(policy, stand_in_paths[name]))
    assert steps == type(policy).geometry_steps(policy.component_configs())
    assert steps.vae_factor == policy.vae_scale_factor
    assert policy.height % steps.spatial == 0 and policy.width % steps.spatial == 0
    # a height off the family's multiple: refused by the constructor and, before loading, by the validation
    bad = policy.height + steps.spatial // 2 if steps.spatial > 1 else None
    if bad is not None:
        with pytest.raises(ValueError, match=f"multiples of {steps.spatial}"):
            family.stand_in_policy(stand_in_paths[name], height=bad)
        config = {"model": {"policy": {"class_path": family.policy_class, "init_args": {
            **family.stand_in_kwargs, "pretrained_model_name_or_path": str(stand_in_paths[name]), "height": bad}}}}
        with pytest.raises(ConfigError, match=f"height={bad} must be a multiple of {steps.spatial}"):
            validate_config(config)
    if "num_frames" in policy.geometry_arguments:  # a clip length the VAE cannot encode
        assert steps.frame_ratio > 1 and (policy.num_frames - 1) % steps.frame_ratio == 0
        with pytest.raises(ValueError, match=f"{steps.frame_ratio}k \\+ 1"):
            family.stand_in_policy(stand_in_paths[name], num_frames=policy.num_frames + 1)


@pytest.mark.parametrize("name", NAMES)
def test_config_geometry_is_the_built_policys_shapes(name, stand_in_paths):
    family = FAMILIES[name]
    policy = family.stand_in_policy(stand_in_paths[name])
    geometry = type(policy).config_geometry(family.stand_in_kwargs, folder_configs(policy, stand_in_paths[name]), policy.uses_cfg)
    latents = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(0))
    assert geometry.latent == tuple(latents.shape[1:])
    assert geometry.vae_latent == tuple(policy.unpack_latents(latents).shape[1:])
    assert (geometry.height, geometry.width, geometry.vae_factor) == (policy.height, policy.width, policy.vae_scale_factor)
    assert geometry.num_frames == getattr(policy, "num_frames", 1)
    condition = condition_for(policy)
    assert set(geometry.condition) == set(condition)
    for key, (shape, kind) in geometry.condition.items():
        assert tuple(condition[key].shape) == (len(PROMPTS), *shape), key
        assert condition[key].is_floating_point() == KIND_DTYPES.get(kind, torch.float32).is_floating_point, key


@pytest.mark.parametrize("name", NAMES)
def test_the_estimates_predictor_predicts_as_the_policy(name, stand_in_paths):
    family = FAMILIES[name]
    policy = family.stand_in_policy(stand_in_paths[name])
    geometry = type(policy).config_geometry(family.stand_in_kwargs, folder_configs(policy, stand_in_paths[name]), policy.uses_cfg)
    predictor = type(policy).estimate_predictor(policy.denoiser, family.stand_in_kwargs, geometry)
    latents = policy.prepare_latents(len(PROMPTS), torch.Generator().manual_seed(1))
    t = policy.build_sampler().timesteps[1:2].expand(len(PROMPTS))
    condition = condition_for(policy)
    with torch.no_grad():
        torch.testing.assert_close(predictor.predict(latents, t, condition), policy.predict(latents, t, condition), atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_published_config_builds_the_family_components(name):
    """The architecture `lightning-grpo estimate` falls back on exists and builds on the meta device."""
    from lightning_grpo.estimate import MODEL_CONFIGS, meta_component, param_count

    cls = FAMILIES[name].policy_type()
    assert cls.published_config, f"{name}: no published_config for the estimate"
    folder = MODEL_CONFIGS / cls.published_config
    denoiser = json.loads((folder / cls.denoiser_name / "config.json").read_text())
    assert param_count(meta_component(cls.components[cls.denoiser_name][1], denoiser)) > 1e8  # a real model, not a stand-in
    assert cls.geometry_steps({"vae": json.loads((folder / "vae" / "config.json").read_text()), cls.denoiser_name: denoiser}).spatial >= 8


@pytest.mark.parametrize("name", NAMES)
def test_fsdp_units_and_checkpoint_geometry_come_from_the_family(name, stand_in_paths):
    policy = FAMILIES[name].stand_in_policy(stand_in_paths[name])
    assert policy.block_classes == block_classes_of(policy.denoiser) and policy.block_classes
    assert policy.fsdp_roots(None) == [policy.denoiser]
    reference = policy.kl_reference()  # full fine-tuning: a frozen denoiser copy, sharded the same way
    assert policy.fsdp_roots(reference) == [policy.denoiser, reference]
    assert {"height", "width"} <= set(policy.geometry_arguments)
    assert all(isinstance(getattr(policy, arg), int) for arg in policy.geometry_arguments)


def test_a_weight_free_adapter_is_its_own_unit():
    policy = TinyPolicy()
    assert policy.block_classes == {TinyPolicy} and policy.fsdp_roots(None) == [policy]
    assert policy.geometry_arguments == ("resolution",) and PolicyAdapter.uses_cfg_with({}) is None
