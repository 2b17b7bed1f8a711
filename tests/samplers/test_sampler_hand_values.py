"""Every sampler form by hand at general points: several schedule steps, σ neither 0 nor 1, η ≠ 1.

A check at σ = 1 alone cannot tell /σ² from /σ in the DanceGRPO score, nor η from η²; these
values can. Each expected number was worked out from the equations in the samplers' docstrings
(eqs. F1–F4, G1–G2, DDIM eqs. 12 and 16) with the intermediate values written in the comments.

Shared inputs: two elements x = (0.8, −1.3) and model output (−0.4, 0.7).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler
from lightning_grpo.samplers.base import gaussian_log_prob

X = torch.tensor([[0.8, -1.3]])
OUT = torch.tensor([[-0.4, 0.7]])
TOL = dict(rtol=1e-6, atol=1e-6)

# shift 3, 4 steps: σ = 3t / (1 + 2t) at t = 1, .75, .5, .25, 0  ->  1, 0.9, 0.75, 0.5, 0


@pytest.mark.parametrize(
    "index, expected_mean, expected_std",
    [
        # σ = 0.9, σ' = 0.75, dσ = −0.15. Element 1: x̂0 = 0.8 + 0.9·0.4 = 1.16; x − 0.1·1.16 = 0.684;
        # score = −0.684 / 0.81 = −0.84444; mean = 0.8 + 0.06 − ½·0.25·(−0.84444)·(−0.15) = 0.8441667.
        # Element 2: x̂0 = −1.93; score = (1.3 − 0.193)/0.81 = 1.36667; mean = −1.3 − 0.105 + 0.025625 = −1.379375.
        # std = 0.5·sqrt(0.15) = 0.1936492
        (1, [0.8441666667, -1.3793750000], 0.1936491673),
        # σ = 0.75, σ' = 0.5, dσ = −0.25: x̂0 = 1.1, score = −(0.8 − 0.275)/0.5625 = −0.93333;
        # mean = 0.8 + 0.1 − ½·0.25·0.93333·0.25 = 0.8708333; element 2 −1.428125; std = 0.5·0.5
        (2, [0.8708333333, -1.4281250000], 0.25),
        # σ = 0.5, σ' = 0 (the last step): x̂0 = 1.0, score = −(0.8 − 0.5)/0.25 = −1.2;
        # mean = 0.8 + 0.2 − ½·0.25·1.2·0.5 = 0.925; element 2 −1.53125; std = 0.5·sqrt(0.5)
        (3, [0.9250000000, -1.5312500000], 0.3535533906),
    ],
)
def test_dance_grpo_flow_step_by_hand(index, expected_mean, expected_std):
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0)
    mean, std = sampler.mean_and_std(OUT, X, index, sampler.eta)
    torch.testing.assert_close(mean, torch.tensor([expected_mean]), **TOL)
    torch.testing.assert_close(std.flatten(), torch.tensor([expected_std]), **TOL)


@pytest.mark.parametrize(
    "index, expected_mean, expected_std",
    [
        # σ = 1 uses σ_1 = 0.9 in the denominator: s = 0.5·sqrt(1/0.1) = 1.58114, s² = 2.5, dσ = −0.1;
        # mean = 0.8·(1 − 2.5·0.1/2) + (−0.4)·(1 + 0)·(−0.1) = 0.7 + 0.04 = 0.74; std = s·sqrt(0.1) = 0.5
        (0, [0.7400000000, -1.2075000000], 0.5),
        # σ = 0.9: s² = 0.25·9 = 2.25, dσ = −0.15; mean = 0.8·(1 − 2.25·0.15/1.8) − 0.4·(1 + 2.25·0.1/1.8)·(−0.15)
        # = 0.8·0.8125 + 0.4·1.125·0.15 = 0.65 + 0.0675 = 0.7175; std = 1.5·sqrt(0.15)
        (1, [0.7175000000, -1.1743750000], 0.5809475019),
        # σ = 0.75: s² = 0.25·3 = 0.75, dσ = −0.25; mean = 0.8·(1 − 0.75·0.25/1.5) − 0.4·(1 + 0.75·0.25/1.5)·(−0.25)
        # = 0.8·0.875 + 0.4·1.125·0.25 = 0.7 + 0.1125 = 0.8125; std = sqrt(0.75)·0.5
        (2, [0.8125000000, -1.3343750000], 0.4330127019),
    ],
)
def test_flow_grpo_step_by_hand(index, expected_mean, expected_std):
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0, noise_form="flow_grpo")
    mean, std = sampler.mean_and_std(OUT, X, index, sampler.eta)
    torch.testing.assert_close(mean, torch.tensor([expected_mean]), **TOL)
    torch.testing.assert_close(std.flatten(), torch.tensor([expected_std]), **TOL)


@pytest.mark.parametrize("noise_form, expected", [("dance_grpo", [0.8441666667, -1.5312500000]), ("flow_grpo", [0.7175000000, -1.5312500000])])
def test_flow_per_sample_steps_by_hand(noise_form, expected):
    """A batch whose samples sit at different steps (1 and 3): each uses its own σ, σ'."""
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0, noise_form=noise_form)
    x, v = X.view(2, 1), OUT.view(2, 1)
    mean, std = sampler.mean_and_std(v, x, torch.tensor([1, 3]), sampler.eta)
    torch.testing.assert_close(mean.flatten(), torch.tensor(expected), **TOL)
    first_std = 0.1936491673 if noise_form == "dance_grpo" else 0.5809475019
    torch.testing.assert_close(std.flatten(), torch.tensor([first_std, 0.3535533906]), **TOL)


def test_flow_step_log_prob_by_hand():
    """log N(x'; mean, std²) at σ = 0.75 for x' = (0.9, −1.5): mean (0.8708333, −1.428125), std 0.25.

    per element −(x' − m)²/(2·0.0625) − ln 0.25 − ½ ln 2π:
      (0.0291667)²/0.125 = 0.0068056 -> 0.4605503;   (0.071875)²/0.125 = 0.0413281 -> 0.4260278
    """
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0)
    x_next = torch.tensor([[0.9, -1.5]])
    per_element = torch.tensor([0.4605503, 0.4260278])
    assert sampler.log_prob(OUT, X, x_next, 2).item() == pytest.approx(per_element.mean().item(), abs=1e-6)
    sampler.log_prob_reduction = "sum"
    assert sampler.log_prob(OUT, X, x_next, 2).item() == pytest.approx(per_element.sum().item(), abs=1e-6)
    assert gaussian_log_prob(x_next, torch.tensor([[0.8708333, -1.428125]]), torch.tensor(0.25)).item() == pytest.approx(0.4432891, abs=1e-6)


def test_flow_step_draws_mean_plus_std_times_noise():
    sampler = FlowSDESampler(num_steps=4, eta=0.5, shift=3.0)
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(5))
    out = sampler.step(OUT, X, 1, generator=torch.Generator().manual_seed(5))
    expected = torch.tensor([[0.8441666667, -1.3793750000]]) + 0.1936491673 * noise
    torch.testing.assert_close(out.prev_sample, expected, **TOL)


# DDIM: 6 training timesteps with betas (0.1, 0.2, 0.25, 0.3, 0.4, 0.5): alphas 0.9, 0.8, 0.75, 0.7,
# 0.6, 0.5 and ᾱ = 0.9, 0.72, 0.54, 0.378, 0.2268, 0.1134. Three DDIM steps ("leading" spacing):
# t = 4, 2, 0 with t_prev = 2, 0, −2, so (ᾱ_t, ᾱ_prev) = (0.2268, 0.54), (0.54, 0.9), (0.9, 0.9)
# (set_alpha_to_one=False: the final ᾱ is ᾱ_0 = 0.9).
# σ² / η² = (1 − ᾱp)/(1 − ᾱt)·(1 − ᾱt/ᾱp):  step 0: 0.46/0.7732·0.58 = 0.3450595;
#                                           step 1: 0.1/0.46·0.4 = 0.0869565;   step 2: 0
def ddim(eta: float, prediction_type: str = "epsilon", clip_sample: bool = False) -> DDIMSDESampler:
    scheduler = DDIMScheduler(
        num_train_timesteps=6, trained_betas=[0.1, 0.2, 0.25, 0.3, 0.4, 0.5], set_alpha_to_one=False,
        clip_sample=clip_sample, prediction_type=prediction_type,
    )
    return DDIMSDESampler(num_steps=3, eta=eta, scheduler=scheduler)


def test_ddim_schedule_by_hand():
    sampler = ddim(1.0)
    assert sampler.timesteps.tolist() == [4, 2, 0]
    torch.testing.assert_close(sampler.alpha_prod, torch.tensor([0.2268, 0.54, 0.9]))
    torch.testing.assert_close(sampler.alpha_prod_prev, torch.tensor([0.54, 0.9, 0.9]))
    torch.testing.assert_close(sampler.variance, torch.tensor([0.3450594930, 0.0869565217, 0.0]))
    assert sampler.stochastic_steps().tolist() == [0, 1]  # σ = 0 at the last step


@pytest.mark.parametrize(
    "eta, index, expected_mean, expected_std",
    [
        # step 0, η = 1: x̂0 = (0.8 + sqrt(0.7732)·0.4)/sqrt(0.2268) = 2.41840; σ = 0.5874176;
        # mean = sqrt(0.54)·2.41840 + sqrt(0.46 − 0.3450595)·(−0.4) = 1.77715 − 0.13561 = 1.6415421
        (1.0, 0, [1.6415420930, -2.7183953128], 0.5874176479),
        # step 1, η = 1: x̂0 = (0.8 + sqrt(0.46)·0.4)/sqrt(0.54) = 1.45786; σ = sqrt(0.0869565) = 0.2948839;
        # mean = sqrt(0.9)·1.45786 + sqrt(0.1 − 0.0869565)·(−0.4) = 1.38304 − 0.04569 = 1.3373504
        (1.0, 1, [1.3373503540, -2.2112636747], 0.2948839123),
        # η = 0.6 scales σ (not σ²): σ = 0.6·0.5874176 = 0.3524506, sqrt(0.46 − 0.124221) = 0.57946
        (0.6, 0, [1.5453679820, -2.5500906186], 0.3524505887),
        (0.6, 1, [1.2781941516, -2.1077403204], 0.1769303474),
        # step 2: ᾱ_t = ᾱ_prev = 0.9 and σ = 0, so the ε-step returns x itself
        (1.0, 2, [0.8, -1.3], 0.0),
    ],
)
def test_ddim_epsilon_step_by_hand(eta, index, expected_mean, expected_std):
    sampler = ddim(eta)
    mean, std = sampler.mean_and_std(OUT, X, index, sampler.eta)
    torch.testing.assert_close(mean, torch.tensor([expected_mean]), **TOL)
    torch.testing.assert_close(std.flatten(), torch.tensor([expected_std]), **TOL)


@pytest.mark.parametrize(
    "prediction_type, index, expected_mean",
    [
        # v: x̂0 = sqrt(ᾱt)·x − sqrt(1 − ᾱt)·v, ε̂ = sqrt(ᾱt)·v + sqrt(1 − ᾱt)·x
        # step 1: x̂0 = 0.734847·0.8 + 0.678233·0.4 = 0.859171; ε̂ = −0.293939 + 0.542586 = 0.248647
        # mean = 0.948683·0.859171 + 0.114208·0.248647 = 0.815085 + 0.028398 = 0.8434785
        ("v_prediction", 1, [0.8434784894, -1.3986276895]),
        ("v_prediction", 0, [0.7123419037, -1.1817909244]),
        # sample: x̂0 = output, ε̂ = (x − sqrt(ᾱt)·x̂0)/sqrt(1 − ᾱt)
        # step 0: ε̂ = (0.8 + 0.476235·0.4)/0.879318 = 1.126441; mean = 0.734847·(−0.4) + 0.339029·1.126441 = 0.0879550
        ("sample", 0, [0.0879549555, -0.1153652911]),
        ("sample", 1, [-0.1952643351, 0.3585516445]),
    ],
)
def test_ddim_other_prediction_types_by_hand(prediction_type, index, expected_mean):
    sampler = ddim(1.0, prediction_type)
    mean, _ = sampler.mean_and_std(OUT, X, index, sampler.eta)
    torch.testing.assert_close(mean, torch.tensor([expected_mean]), **TOL)


def test_ddim_clip_sample_clamps_both_signs_of_x0():
    """Step 0 ε-prediction: x̂0 = (2.4184, −4.0222) is clipped to (1, −1) before the mean (DDIM clip_sample).

    mean = sqrt(0.54)·(±1) + 0.339029·ε̂ with ε̂ = (−0.4, 0.7): 0.734847 − 0.135612 = 0.5992354 and
    −0.734847 + 0.237320 = −0.4975268.
    """
    sampler = ddim(1.0, clip_sample=True)
    mean, _ = sampler.mean_and_std(OUT, X, 0, sampler.eta)
    torch.testing.assert_close(mean, torch.tensor([[0.5992354148, -0.4975267837]]), **TOL)
    x0, eps = sampler.predict_x0_eps(OUT, X, 0)
    torch.testing.assert_close(x0, torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(eps, OUT)


def test_ddim_deterministic_step_log_prob_is_zero_and_sample_is_the_mean():
    sampler = ddim(1.0)
    out = sampler.step(OUT, X, 2, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.tolist() == [0.0]
    torch.testing.assert_close(out.prev_sample, X)


def test_ddim_log_prob_by_hand():
    """Step 1 (σ = 0.2948839), x' = (1.2, −2.0) against mean (1.3373504, −2.2112637):
    −(0.1373504)²/(2·0.0869565) − ln 0.2948839 − ½ ln 2π = −0.1084744 + 1.2211735 − 0.9189385 = 0.1937606
    −(0.2112637)²/(2·0.0869565) + 0.3022350 = −0.2566360 + 0.3022350 = 0.0455990
    """
    sampler = ddim(1.0)
    lp = sampler.log_prob(OUT, X, torch.tensor([[1.2, -2.0]]), 1)
    assert lp.item() == pytest.approx((0.1937606 + 0.0455990) / 2, abs=2e-6)
    assert math.isfinite(lp.item())


def test_ddim_missing_scheduler_error_names_the_folder_it_looked_in(tmp_path):
    from lightning_grpo.samplers.ddim_sde import load_ddim_scheduler

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="cannot load a DDIM scheduler config from") as info:
        load_ddim_scheduler(str(missing))
    assert repr(f"{missing}/scheduler") in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        load_ddim_scheduler(str(missing), subfolder=None)
    assert f"from {str(missing)!r}:" in str(info.value)


def test_sampler_defaults_are_the_documented_recipes():
    # DanceGRPO: FLUX 16 steps, η 0.3, shift 3 (flow); SD 1.4 50 DDIM steps, η 1 (diffusion); mean log-prob
    flow, diffusion = FlowSDESampler(), DDIMSDESampler()
    assert (flow.num_steps, flow.eta, flow.shift, flow.noise_form, flow.log_prob_reduction) == (16, 0.3, 3.0, "dance_grpo", "mean")
    assert (diffusion.num_steps, diffusion.eta, diffusion.log_prob_reduction) == (50, 1.0, "mean")
    assert len(flow.sigmas) == 17 and len(diffusion.timesteps) == 50


def test_single_step_and_eta_zero_are_allowed_and_eta_zero_has_no_trainable_step():
    one = ddim(1.0)
    assert DDIMSDESampler(num_steps=1, eta=1.0).num_steps == 1 and FlowSDESampler(num_steps=1).num_steps == 1
    ode = DDIMSDESampler(num_steps=3, eta=0.0, scheduler=one.scheduler)
    steps = ode.stochastic_steps()
    assert steps.dtype == torch.long and steps.shape == (0,)
    flow_steps = FlowSDESampler(num_steps=3, eta=0.0).stochastic_steps()
    assert flow_steps.dtype == torch.long and flow_steps.shape == (0,)
    assert FlowSDESampler(num_steps=3, eta=0.2).stochastic_steps().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="eta"):
        DDIMSDESampler(eta=-0.1)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMSDESampler(num_steps=0)


def test_ddim_keeps_its_scheduler_and_converts_other_diffusers_schedulers():
    from diffusers import PNDMScheduler

    sampler = ddim(1.0)
    assert isinstance(sampler.scheduler, DDIMScheduler) and sampler.scheduler.config.num_train_timesteps == 6
    # an SD pipeline ships a PNDM scheduler: its config (betas, offsets) is read into a DDIMScheduler
    betas = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5]
    converted = DDIMSDESampler(num_steps=3, scheduler=PNDMScheduler(num_train_timesteps=6, trained_betas=betas, set_alpha_to_one=False))
    assert isinstance(converted.scheduler, DDIMScheduler)
    torch.testing.assert_close(converted.alpha_prod, sampler.alpha_prod)
    torch.testing.assert_close(converted.alpha_prod_prev, sampler.alpha_prod_prev)


def test_ddim_sum_reduction_is_accepted_and_sums():
    mean_lp = ddim(1.0).log_prob(OUT, X, torch.tensor([[1.2, -2.0]]), 1)
    sampler = DDIMSDESampler(num_steps=3, eta=1.0, scheduler=ddim(1.0).scheduler, log_prob_reduction="sum")
    torch.testing.assert_close(sampler.log_prob(OUT, X, torch.tensor([[1.2, -2.0]]), 1), 2 * mean_lp)
    with pytest.raises(ValueError, match="log_prob_reduction"):
        DDIMSDESampler(log_prob_reduction="max")
