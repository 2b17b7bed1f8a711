"""FSDP set-up: the strategy of configs/flux_hps_fsdp.yaml instantiates, and shards the denoiser
by its diffusers block classes while the frozen parts stay out of FSDP.

A fit itself needs CUDA: torch's FSDP refuses CPU-only machines ("FSDP needs a non-CPU
accelerator device"), see docs/scaling.md; tests/distributed/ddp_run.py --fsdp runs it there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import instantiate_class

from lightning_grpo.distributed import DenoiserFSDPStrategy, denoiser_blocks, frozen_modules
from lightning_grpo.policies import FluxPolicy, StableDiffusionPolicy
from lightning_grpo.policies.tiny import TinyPolicy

sys.path.insert(0, str(Path(__file__).parents[1] / "policies"))
from tiny import build_tiny_flux, build_tiny_sd  # noqa: E402

ROOT = Path(__file__).parents[2]


def test_fsdp_config_builds_the_denoiser_strategy():
    raw = yaml.safe_load((ROOT / "configs" / "flux_hps_fsdp.yaml").read_text())
    strategy = instantiate_class((), raw["trainer"]["strategy"])
    assert isinstance(strategy, DenoiserFSDPStrategy)
    assert strategy.replicate_frozen is True
    assert raw["trainer"]["precision"] == "bf16-mixed"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return FluxPolicy(build_tiny_flux(tmp_path_factory.mktemp("flux")), height=16, width=16, max_sequence_length=16)


def test_flux_is_wrapped_by_its_transformer_blocks(flux):
    name, classes = denoiser_blocks(flux)
    assert name == "transformer"
    assert {c.__name__ for c in classes} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}


def test_sd_is_wrapped_by_its_unet_blocks(tmp_path):
    policy = StableDiffusionPolicy(build_tiny_sd(tmp_path / "sd"), height=16, width=16)
    name, classes = denoiser_blocks(policy)
    assert name == "unet"
    assert {c.__name__ for c in classes} == set(policy.unet._no_split_modules) & {
        type(m).__name__ for m in policy.unet.modules()
    }
    assert "BasicTransformerBlock" in {c.__name__ for c in classes}


def test_frozen_parts_are_left_out_of_fsdp(flux):
    from lightning_grpo.module import GRPOModule
    from lightning_grpo.samplers import FlowSDESampler
    from tests.training.fixtures import Redness

    module = GRPOModule(policy=flux, sampler=FlowSDESampler(num_steps=2, eta=0.5), rewards=[Redness()], group_size=2, kl_beta=0.1)
    frozen = frozen_modules(module)
    assert flux.text_encoder in frozen and flux.text_encoder_2 in frozen and flux.vae in frozen
    assert module.reference_policy in frozen and flux.transformer not in frozen
    # the weight-free policy has no denoiser attribute: the policy itself is the unit
    assert denoiser_blocks(TinyPolicy()) == ("", {TinyPolicy})
