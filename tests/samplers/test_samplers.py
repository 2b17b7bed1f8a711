"""Sampler contract and math: hand-worked steps, Normal log-prob, ODE limit, diffusers parity, ratio == 1."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler
from lightning_grpo.samplers.flow_sde import shifted_sigmas


def all_samplers():
    yield FlowSDESampler(num_steps=6, eta=0.7, shift=3.0)
    yield FlowSDESampler(num_steps=6, eta=0.7, shift=1.0, noise_form="flow_grpo")
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        yield DDIMSDESampler(num_steps=6, eta=1.0, scheduler=DDIMScheduler(prediction_type=prediction_type, set_alpha_to_one=False))


SAMPLERS = list(all_samplers())
IDS = [repr(s) for s in SAMPLERS]


class TinyDenoiser(torch.nn.Module):
    """A conv net conditioned on the timestep: enough to make model outputs depend on inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


def test_shifted_sigmas_hand_values():
    # t = 1, .75, .5, .25, 0 and σ = 3t / (1 + 2t)
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    torch.testing.assert_close(shifted_sigmas(4, 3.0), expected)
    sampler = FlowSDESampler(num_steps=4, eta=0.3, shift=3.0)
    torch.testing.assert_close(sampler.timesteps, expected[:-1] * 1000)


def test_flow_dance_grpo_step_hand_worked():
    sampler = FlowSDESampler(num_steps=4, eta=0.3, shift=3.0)
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    mean, std = sampler.mean_and_std(v, x, 0, sampler.eta)
    # x̂0 = 0.5; score = -(1 - 0·0.5)/1 = -1; mean = 1 - 0.1·0.5 - ½·0.09·(-1)·(-0.1) = 0.9455
    torch.testing.assert_close(mean, torch.tensor([[0.9455]]))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.3 * math.sqrt(0.1)]))


def test_flow_grpo_form_hand_worked():
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0, noise_form="flow_grpo")
    x, v = torch.ones(1, 1), torch.full((1, 1), 0.5)
    mean, std = sampler.mean_and_std(v, x, 1, sampler.eta)
    # σ = 0.9, dσ = -0.15, s = 0.5·sqrt(0.9/0.1) = 1.5: mean = 1·(1 - 2.25·0.15/1.8) + 0.5·(1 + 2.25·0.1/1.8)·(-0.15)
    torch.testing.assert_close(mean, torch.tensor([[0.728125]]))
    torch.testing.assert_close(std.flatten(), torch.tensor([1.5 * math.sqrt(0.15)]))


def test_flow_grpo_first_step_is_finite():
    sampler = FlowSDESampler(num_steps=4, eta=0.5, noise_form="flow_grpo")
    out = sampler.step(torch.randn(2, 3), torch.randn(2, 3), 0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(sampler, reduction):
    sampler = copy.deepcopy(sampler)  # SAMPLERS is shared by the tests: change a copy, never the original
    sampler.log_prob_reduction = reduction
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 3, 5, 5, generator=gen)
    index = torch.tensor([0, 2, 3, 4])  # one batch, four different steps
    step = sampler.step(out, x, index, generator=gen)
    reference = Normal(step.mean, step.std).log_prob(step.prev_sample.float())
    reduce = reference.mean if reduction == "mean" else reference.sum
    torch.testing.assert_close(step.log_prob, reduce(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_per_sample_index_equals_scalar_index(sampler):
    gen = torch.Generator().manual_seed(2)
    x, out = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    index = torch.tensor([1, 3, 5])
    batched_mean, batched_std = sampler.mean_and_std(out, x, index, sampler.eta)
    for b, i in enumerate(index.tolist()):
        mean, std = sampler.mean_and_std(out[b : b + 1], x[b : b + 1], i, sampler.eta)
        torch.testing.assert_close(batched_mean[b : b + 1], mean)
        torch.testing.assert_close(batched_std[b : b + 1], std)


@pytest.mark.parametrize("noise_form", ["dance_grpo", "flow_grpo"])
def test_flow_eta_zero_is_euler(noise_form):
    sampler = FlowSDESampler(num_steps=5, eta=0.0, shift=2.0, noise_form=noise_form)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    for i in range(5):
        euler = x + (sampler.sigmas[i + 1] - sampler.sigmas[i]) * v
        torch.testing.assert_close(sampler.ode_step(v, x, i), euler)
        torch.testing.assert_close(sampler.step(v, x, i).prev_sample, euler)


def test_ode_step_ignores_eta():
    noisy, ode = FlowSDESampler(5, eta=0.8), FlowSDESampler(5, eta=0.0)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(noisy.ode_step(v, x, 2), ode.ode_step(v, x, 2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ddim_matches_diffusers(prediction_type, set_alpha_to_one, clip_sample):
    kwargs = dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample, steps_offset=1)
    sampler = DDIMSDESampler(num_steps=10, eta=1.0, scheduler=DDIMScheduler(**kwargs))
    reference = DDIMScheduler(**kwargs)
    reference.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for i, t in enumerate(reference.timesteps):
        out, noise = torch.randn_like(x), torch.randn(x.shape, generator=gen)
        mean, std = sampler.mean_and_std(out, x, i, 1.0)
        # the SDE mean is DDIMScheduler.step without its noise; with noise, the same sample
        no_noise = reference.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(mean, no_noise, rtol=1e-5, atol=1e-5)
        noisy = reference.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, noisy, rtol=1e-5, atol=1e-5)
        # eta = 0: the deterministic DDIM step
        torch.testing.assert_close(sampler.ode_step(out, x, i), reference.step(out, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
        x = noisy


def test_ddim_timesteps_come_from_diffusers():
    scheduler = DDIMScheduler(steps_offset=1, timestep_spacing="trailing")
    sampler = DDIMSDESampler(num_steps=7, scheduler=scheduler)
    reference = DDIMScheduler(steps_offset=1, timestep_spacing="trailing")
    reference.set_timesteps(7)
    assert sampler.timesteps.tolist() == reference.timesteps.tolist()


def test_ddim_deterministic_last_step_has_zero_log_prob_and_is_not_trained():
    sampler = DDIMSDESampler(num_steps=5, eta=1.0, scheduler=DDIMScheduler(set_alpha_to_one=True))
    assert sampler.stochastic_steps().tolist() == [0, 1, 2, 3]
    x = torch.randn(2, 3)
    out = sampler.step(torch.randn(2, 3), x, 4)
    assert out.log_prob.tolist() == [0.0, 0.0]
    torch.testing.assert_close(out.prev_sample, out.mean)
    # SD 1.x config: ᾱ_final = ᾱ_0 and timesteps offset by 1, so the last step stays stochastic
    sd_like = DDIMScheduler(set_alpha_to_one=False, steps_offset=1)
    assert DDIMSDESampler(num_steps=5, eta=1.0, scheduler=sd_like).stochastic_steps().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=IDS)
def test_ratio_is_one_when_recomputing_a_fresh_sample(sampler):
    """Rollout in one batch, recompute per sample on a shuffled sub-batch: exp(Δ log p) == 1 to 1e-6."""
    model = TinyDenoiser()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    trajectory, old_log_probs = [x], []
    with torch.no_grad():
        for i in range(sampler.num_steps):
            t = sampler.timesteps[i].float().expand(6)
            step = sampler.step(model(x, t), x, i, generator=gen)
            x = step.prev_sample
            trajectory.append(x)
            old_log_probs.append(step.log_prob)
    latents, old = torch.stack(trajectory, 1), torch.stack(old_log_probs, 1)  # [B, T+1, ...], [B, T]
    samples = torch.tensor([4, 1, 3])
    index = torch.tensor([5, 0, 2])
    x_i, x_next = latents[samples, index], latents[samples, index + 1]
    new = sampler.log_prob(model(x_i, sampler.timesteps[index].float()), x_i, x_next, index)
    ratio = torch.exp(new - old[samples, index])
    torch.testing.assert_close(ratio, torch.ones(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(eta=-1.0), "eta"),
        (dict(shift=0.0), "shift"),
        (dict(noise_form="ddpm"), "noise_form"),
        (dict(log_prob_reduction="max"), "reduction"),
        (dict(num_steps=2, sigmas=[1.0, 0.5]), "num_steps \\+ 1"),
        (dict(num_steps=2, sigmas=[1.0, 0.2, 0.5]), "decrease"),
        (dict(num_steps=3, sigmas=[1.0, 0.5, 0.5, 0.0]), "decrease"),  # strictly: a repeated σ
        (dict(num_steps=2, sigmas=[1.0, 0.5, -0.1]), "decrease"),  # below 0 at the end
        (dict(num_steps=2, sigmas=[1.2, 0.5, 0.0]), "decrease"),  # above 1 at the start
    ],
)
def test_flow_sampler_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowSDESampler(**kwargs)


def test_flow_sampler_accepts_the_edges_of_its_options():
    """σ from exactly 1 down to exactly 0 is a valid schedule, kept in float32 even when given in
    float64 (numpy, as pipelines compute it); "sum" is a valid reduction."""
    sampler = FlowSDESampler(num_steps=3, sigmas=np.array([1.0, 0.6, 0.25, 0.0]), log_prob_reduction="sum")
    assert sampler.sigmas.dtype == torch.float32 and sampler.timesteps.dtype == torch.float32
    torch.testing.assert_close(sampler.sigmas, torch.tensor([1.0, 0.6, 0.25, 0.0]))
    assert sampler.log_prob_reduction == "sum"


def test_ddim_sampler_refuses_thresholding_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSDESampler(scheduler=DDIMScheduler(thresholding=True))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DDIMSDESampler(pretrained_model_name_or_path=str(tmp_path / "nowhere"))


def test_ddim_sampler_loads_a_saved_scheduler(tmp_path):
    DDIMScheduler(prediction_type="v_prediction", steps_offset=1).save_pretrained(tmp_path / "scheduler")
    sampler = DDIMSDESampler(num_steps=4, pretrained_model_name_or_path=str(tmp_path))
    assert sampler.prediction_type == "v_prediction"
