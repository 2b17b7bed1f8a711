"""Chunked rollout (`rollout_batch_size`) equals the one-batch rollout, and the noise is keyed by
sample identity: a rank's groups draw what one process rolling out the union draws for them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_grpo.policies import FluxPolicy, StableDiffusionPolicy
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler

sys.path.insert(0, str(Path(__file__).parents[1] / "policies"))
from tiny import build_tiny_flux, build_tiny_sd  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a cat on a sofa"]


def sampler_for(paradigm: str):
    return FlowSDESampler(num_steps=3, eta=0.7) if paradigm == "flow" else DDIMSDESampler(num_steps=3, eta=1.0)


def roll(policy, sampler, prompts=PROMPTS, **kwargs):
    return rollout(policy, sampler, prompts, group_size=4, generator=torch.Generator().manual_seed(7), **kwargs)


class ElementwisePolicy(TinyPolicy):
    """TinyPolicy whose prediction is element-wise (no conv), hence independent of the batch it
    is computed in: the rollout machinery must then reproduce the one-batch result bit for bit."""

    def predict(self, latents, timesteps, condition):
        return torch.tanh(latents) * (timesteps.float() / 1000).view(-1, 1, 1, 1) + condition["text_embeds"][:, :1, None, None]


def assert_same(a, b, exact: bool = True, atol: float = 1e-5):
    # a conv/transformer/UNet batch of 5 may round differently from one of 12 (oneDNN picks
    # kernels by shape): measured ≤ 3.2e-6 on TinyPolicy latents, ≤ 1.6e-5 on the tiny SD UNet's
    # (magnitude ≤ 3.4, CFG 3 amplifies), so fp32 tolerances; the noise itself is bit-identical
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=atol))
    assert check(a.latents, b.latents)
    assert check(a.log_probs, b.log_probs)
    assert a.prompts == b.prompts and torch.equal(a.sample_keys, b.sample_keys)
    for key in a.condition:
        assert torch.equal(a.condition[key], b.condition[key])


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
@pytest.mark.parametrize("shared_noise", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_rollout_equals_one_batch_tiny(paradigm, shared_noise, chunk_size):
    cfg = 2.0 if paradigm == "diffusion" else 1.0
    sampler = sampler_for(paradigm)
    exact = ElementwisePolicy(paradigm=paradigm, resolution=8, guidance_scale=cfg)
    assert_same(roll(exact, sampler, shared_noise=shared_noise, chunk_size=chunk_size), roll(exact, sampler, shared_noise=shared_noise))
    policy = TinyPolicy(paradigm=paradigm, resolution=8, guidance_scale=cfg)
    whole = roll(policy, sampler, shared_noise=shared_noise)
    assert whole.latents.shape[:2] == (12, 4)
    chunked = roll(policy, sampler, shared_noise=shared_noise, chunk_size=chunk_size)
    assert torch.equal(chunked.latents[:, 0], whole.latents[:, 0])  # the same noise, bit for bit
    assert_same(chunked, whole, exact=False)
    # shared initial noise within a group, distinct across groups; SDE noise distinct per sample
    x0 = whole.latents[:, 0].view(3, 4, -1)
    assert torch.equal(x0[:, 0], x0[:, 1]) == shared_noise
    assert not torch.equal(x0[0, 0], x0[1, 0])
    assert not torch.equal(whole.latents[0, -1], whole.latents[1, -1])


@pytest.fixture(scope="module")
def real_policies(tmp_path_factory):
    flux = FluxPolicy(build_tiny_flux(tmp_path_factory.mktemp("flux")), height=16, width=16, max_sequence_length=16)
    sd = StableDiffusionPolicy(build_tiny_sd(tmp_path_factory.mktemp("sd")), height=16, width=16, guidance_scale=3.0)
    return {"flow": flux.eval(), "diffusion": sd.eval()}


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_chunked_rollout_equals_one_batch_real_family(paradigm, real_policies):
    policy, sampler = real_policies[paradigm], sampler_for(paradigm)
    whole = roll(policy, sampler)
    for chunk_size in (5,):
        # a transformer/UNet batch of 5 may round differently from one of 12: equal to fp32 tolerance
        chunked = roll(policy, sampler, chunk_size=chunk_size)
        assert torch.equal(chunked.latents[:, 0], whole.latents[:, 0])
        assert_same(chunked, whole, exact=False, atol=5e-5)


def test_a_rank_draws_what_one_process_draws_for_its_groups():
    policy, sampler = TinyPolicy(resolution=8), sampler_for("flow")
    union = roll(policy, sampler, prompts=PROMPTS + ["a dog", "the photo"])
    rank1 = roll(policy, sampler, prompts=["a dog", "the photo"], first_group=3)
    assert torch.equal(rank1.latents[:, 0], union.latents[12:, 0])
    assert_same(rank1, union.select(torch.arange(12, 20)), exact=False)
    # groups spanning ranks: members 2, 3 of every group are those of the whole group
    half = roll(policy, sampler, members=[2, 3])
    index = torch.tensor([g * 4 + j for g in range(3) for j in (2, 3)])
    torch.testing.assert_close(half.latents, roll(policy, sampler).latents[index], rtol=1e-5, atol=1e-5)


def test_chunk_size_is_validated():
    with pytest.raises(ValueError, match="chunk_size"):
        roll(TinyPolicy(resolution=8), sampler_for("flow"), chunk_size=0)
