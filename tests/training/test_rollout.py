"""rollout(): the trajectories the update trains on, checked step by step against the sampler."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.noise import SampleNoise, base_seed, sample_keys
from lightning_grpo.rollout import ode_from, ode_sample, rollout
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler

PROMPTS = ["a red circle", "a blue square", "a green circle"]


def sampler_for(paradigm: str):
    return FlowSDESampler(num_steps=3, eta=0.6) if paradigm == "flow" else DDIMSDESampler(num_steps=3, eta=1.0)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_rollout_layout_and_each_step_replays_from_the_same_noise(paradigm):
    policy, sampler = TinyPolicy(paradigm=paradigm, resolution=4), sampler_for(paradigm)
    out = rollout(policy, sampler, PROMPTS, 2, torch.Generator().manual_seed(7))
    assert out.latents.shape == (6, 4, 3, 4, 4) and out.log_probs.shape == (6, 3)
    assert out.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.prompts == [p for p in PROMPTS for _ in range(2)]
    assert out.images is None
    # replay by hand from the same generator: its one draw is the base seed of the per-sample
    # streams keyed by (group, member) (lightning_grpo.noise); x_0 from each group's own stream,
    # then one sampler step at a time with each sample's next standard-normal draw
    noise = SampleNoise(base_seed(torch.Generator().manual_seed(7)), sample_keys(0, 3, range(2)), True, torch.device("cpu"))
    x = noise.initial(policy)
    torch.testing.assert_close(out.latents[:, 0], x)
    assert torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])  # shared within a group only
    condition = policy.encode_prompts(out.prompts)
    for i in range(3):
        t = sampler.timesteps[i].expand(6)
        step = sampler.step(policy.predict(x, t, condition), x, i, noise=noise.standard_normal(x))
        torch.testing.assert_close(out.latents[:, i + 1], step.prev_sample)
        torch.testing.assert_close(out.log_probs[:, i], step.log_prob)
        x = step.prev_sample
    torch.testing.assert_close(out.condition["text_embeds"], condition["text_embeds"])


def test_shared_noise_within_a_group_and_distinct_noise_without():
    policy = TinyPolicy(resolution=4)
    seed, keys = 11, sample_keys(0, 2, range(3))
    shared = SampleNoise(seed, keys, True, torch.device("cpu")).initial(policy)
    assert shared.shape == (6, 3, 4, 4)
    assert torch.equal(shared[0], shared[2]) and not torch.equal(shared[2], shared[3])
    own = SampleNoise(seed, keys, False, torch.device("cpu")).initial(policy)
    assert all(not torch.equal(own[a], own[b]) for a in range(6) for b in range(a + 1, 6))
    out = rollout(policy, sampler_for("flow"), PROMPTS[:2], 3, torch.Generator().manual_seed(0), shared_noise=False)
    assert not torch.equal(out.latents[0, 0], out.latents[1, 0])
    out = rollout(policy, sampler_for("flow"), PROMPTS[:2], 3, torch.Generator().manual_seed(0), shared_noise=True)
    assert torch.equal(out.latents[0, 0], out.latents[2, 0]) and not torch.equal(out.latents[2, 0], out.latents[3, 0])


def test_rollout_expands_first_frames_per_sample():
    policy = TinyPolicy(resolution=4)
    images = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    out = rollout(policy, sampler_for("flow"), PROMPTS[:2], 2, torch.Generator().manual_seed(0), images=images)
    assert out.images[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_rollout_passes_every_step_through_progress():
    seen = []

    def progress(steps):
        seen.extend(steps)
        return iter(seen)

    rollout(TinyPolicy(resolution=4), sampler_for("flow"), PROMPTS[:1], 2, torch.Generator().manual_seed(0), progress=progress)
    assert seen == [0, 1, 2]


def test_ode_sample_is_the_eta_zero_integration_from_seeded_noise():
    policy, sampler = TinyPolicy(resolution=4), sampler_for("flow")
    x = policy.prepare_latents(2, torch.Generator().manual_seed(3))
    condition = policy.encode_prompts(PROMPTS[:2])
    for i in range(3):
        x = sampler.ode_step(policy.predict(x, sampler.timesteps[i].expand(2), condition), x, i)
    torch.testing.assert_close(ode_sample(policy, sampler, PROMPTS[:2], torch.Generator().manual_seed(3)), x)
    start = policy.prepare_latents(2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ode_from(policy, sampler, start, PROMPTS[:2]), x)
