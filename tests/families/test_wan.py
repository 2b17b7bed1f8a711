"""What only the Wan family does: the published checkpoints' scheduler and VAE config.

The family contract test covers the Wan family on its stand-in, which ships the flow-matching
Euler scheduler; the published Wan 2.1 folders ship `UniPCMultistepScheduler` (flow_shift 3 at
480p) and a VAE config written before diffusers stated its compression factors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from lightning_grpo.estimate import MODEL_CONFIGS
from lightning_grpo.policies.registry import FAMILIES

NAME = "wan_t2v"


def with_scheduler(stand_in_paths, tmp_path, scheduler):
    """A copy of the Wan stand-in whose scheduler/ holds `scheduler` (model_index.json updated)."""
    folder = tmp_path / "wan"
    shutil.copytree(stand_in_paths[NAME], folder)
    shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
def test_a_unipc_checkpoint_samples_on_the_euler_schedule_with_its_flow_shift(flow_shift, stand_in_paths, tmp_path):
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    policy = FAMILIES[NAME].stand_in_policy(with_scheduler(stand_in_paths, tmp_path, unipc))
    euler = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    euler.set_timesteps(6)  # what WanPipeline does with the Euler scheduler
    assert policy.pipeline_sigmas(6) == euler.sigmas.tolist()
    assert policy.build_sampler(num_steps=6).sigmas.tolist() == euler.sigmas.tolist()
    assert type(policy.make_scheduler()) is UniPCMultistepScheduler  # an export keeps the checkpoint's own


def test_a_scheduler_without_a_flow_shift_is_refused_by_name(stand_in_paths, tmp_path):
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="'DDIMScheduler' states no flow_shift"):
        FAMILIES[NAME].stand_in_policy(with_scheduler(stand_in_paths, tmp_path, DDIMScheduler()))


def test_the_published_vae_config_gives_the_factors_diffusers_gives_it():
    """The published vae/config.json states no scale_factor_*: the family derives them from the
    architecture; they equal what AutoencoderKLWan (and so WanPipeline) reads after loading it."""
    cls = FAMILIES[NAME].policy_type()
    raw = json.loads((MODEL_CONFIGS / cls.published_config / "vae" / "config.json").read_text())
    assert "scale_factor_spatial" not in raw
    with torch.device("meta"):  # the config only; no weights allocated
        loaded = dict(AutoencoderKLWan.from_config(raw).config)
    assert cls.vae_compression(raw) == cls.vae_compression(loaded) == (8, 4)
