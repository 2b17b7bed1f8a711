"""The sampler contract's helpers, by hand: per-sample gathering of schedule values for every
kind of index, and the Gaussian log-density in fp32 whatever the std's dtype."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.samplers.base import gather_per_sample, gaussian_log_prob

VALUES = torch.tensor([0.9, 0.75, 0.5, 0.25], dtype=torch.float64)  # a float64 schedule, as DDIM's ᾱ


@pytest.mark.parametrize(
    "index, expected",
    [
        (2, [0.5, 0.5, 0.5]),  # an int: every sample at step 2
        (torch.tensor(1), [0.75, 0.75, 0.75]),  # a 0-d tensor: the same, expanded to B
        (torch.tensor([3, 0, 1]), [0.25, 0.9, 0.75]),  # one step per sample
    ],
)
def test_gather_per_sample_gives_b_values_shaped_to_broadcast(index, expected):
    like = torch.zeros(3, 5, 2, 2)  # B = 3, and a second dim that is not B
    out = gather_per_sample(VALUES, index, like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))


def test_gaussian_log_prob_is_fp32_and_exact_for_a_float64_std():
    x, mean = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.1, -0.2]])
    std = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    out = gaussian_log_prob(x, mean, std)
    assert out.dtype == torch.float32
    by_hand = [-(0.2**2) / (2 * 0.25) - math.log(0.5), -(1.0**2) / (2 * 4.0) - math.log(2.0)]
    expected = sum(by_hand) / 2 - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out, torch.tensor([expected]))


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_steps_return_latents_in_the_sample_dtype(paradigm):
    """The math is fp32 (mean, log-prob), the next latent is in the latents' own dtype (bf16 models)."""
    from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler

    sampler = FlowSDESampler(num_steps=4, eta=0.7) if paradigm == "flow" else DDIMSDESampler(num_steps=4, eta=1.0)
    x = torch.full((2, 3), 0.5, dtype=torch.bfloat16)
    output = torch.full((2, 3), 0.25, dtype=torch.bfloat16)
    step = sampler.step(output, x, 1, noise=torch.ones(2, 3))
    assert step.prev_sample.dtype == torch.bfloat16 and step.mean.dtype == torch.float32
    torch.testing.assert_close(step.prev_sample.float(), (step.mean + step.std * 1.0).bfloat16().float())
    ode = sampler.ode_step(output, x, 1)
    assert ode.dtype == torch.bfloat16
    torch.testing.assert_close(ode.float(), sampler.mean_and_std(output, x, 1, 0.0)[0].bfloat16().float())
