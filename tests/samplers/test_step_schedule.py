"""Step schedules: MixGRPO's sliding window, Flow-GRPO-Fast's random branch, and the trainable-step set."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.samplers import AllSteps, DDIMSDESampler, FlowSDESampler, RandomBranch, SlidingWindow
from lightning_grpo.samplers.step_schedule import trainable_steps


def _steps(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def test_all_steps_is_every_step():
    assert AllSteps().sde_steps(5, iteration=123).tolist() == [True] * 5


@pytest.mark.parametrize(
    "iteration, start",
    # T = 10, w = 3, τ = 4, s = 2: starts 0, 2, 4, 6 (last start T − w = 7), then back to 0
    [(0, 0), (3, 0), (4, 2), (7, 2), (8, 4), (12, 6), (15, 6), (16, 0), (21, 2)],
)
def test_sliding_window_moves_every_shift_interval_and_rolls_back(iteration, start):
    window = SlidingWindow(size=3, shift_interval=4, stride=2)
    assert window.start(10, iteration) == start
    assert _steps(window.sde_steps(10, iteration)) == [start, start + 1, start + 2]


def test_sliding_window_without_roll_back_stays_at_its_last_position():
    window = SlidingWindow(size=2, shift_interval=1, stride=3, first=1, roll_back=False)
    # T = 8: starts 1, 4 (7 would end past the last step: last start is T − w = 6)
    assert [window.start(8, n) for n in range(5)] == [1, 4, 4, 4, 4]


def test_sliding_window_with_stride_zero_is_frozen_and_last_start_bounds_it():
    assert {SlidingWindow(size=4, stride=0, first=2).start(25, n) for n in range(0, 500, 7)} == {2}
    window = SlidingWindow(size=4, shift_interval=25, stride=1, last_start=21)  # MixGRPO: 25 steps
    assert [window.start(25, n) for n in (0, 24, 25, 549, 550, 575)] == [0, 0, 1, 21, 0, 1]


@pytest.mark.parametrize(
    "kwargs, num_steps, message",
    [
        (dict(size=0), 8, "size"),
        (dict(shift_interval=0), 8, "shift_interval"),
        (dict(stride=-1), 8, "stride"),
        (dict(size=9), 8, "does not fit"),
        (dict(size=2, first=7), 8, "does not fit"),
        (dict(size=2, last_start=7), 8, "does not fit"),
    ],
)
def test_sliding_window_rejects_bad_settings(kwargs, num_steps, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindow(**kwargs).sde_steps(num_steps, 0)


def test_random_branch_draws_k_consecutive_steps_inside_its_range():
    branch = RandomBranch(num_sde_steps=2)  # T = 10: steps inside [0, 5), starts 0..3
    generator = torch.Generator().manual_seed(0)
    starts = []
    for n in range(400):
        steps = _steps(branch.sde_steps(10, n, generator))
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] and steps[1] < 5
        starts.append(steps[0])
    counts = torch.bincount(torch.tensor(starts), minlength=4)
    assert counts.numel() == 4 and bool((counts > 60).all())  # uniform over the 4 starts (100 expected)


def test_random_branch_is_reproducible_from_its_generator_and_validates():
    branch = RandomBranch(num_sde_steps=1, low=2, high=6)
    draws = [branch.sde_steps(8, 0, torch.Generator().manual_seed(s)) for s in (5, 5)]
    assert torch.equal(*draws)
    with pytest.raises(ValueError, match="does not fit"):
        RandomBranch(num_sde_steps=3, low=2, high=4).sde_steps(8, 0)
    with pytest.raises(ValueError, match="num_sde_steps"):
        RandomBranch(num_sde_steps=0)


def test_trainable_steps_are_the_stochastic_steps_inside_the_mask():
    flow = FlowSDESampler(num_steps=6, eta=0.7)
    mask = SlidingWindow(size=3, first=3).sde_steps(6, 0)  # steps 3, 4, 5
    assert trainable_steps(flow).tolist() == [0, 1, 2, 3, 4, 5]
    assert trainable_steps(flow, mask).tolist() == [3, 4, 5]
    assert trainable_steps(flow, mask, drop_last=True).tolist() == [3, 4]
    # DDIM's last step (set_alpha_to_one) has std 0: never trainable, window or not
    ddim = DDIMSDESampler(num_steps=6, eta=1.0)
    assert trainable_steps(ddim, mask).tolist() == [3, 4]
    with pytest.raises(ValueError, match="mask of 6 steps"):
        trainable_steps(flow, torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- MixGRPO-Flash ODE tail
def _gaussian_velocity(variance: float):
    """Exact flow velocity for data x0 ~ N(0, variance): E[ε − x0 | x_σ] = x·(σ − (1 − σ)·s²) / V(σ),
    V(σ) = (1 − σ)²·s² + σ²; the ODE maps x(1) to x(σ) = x(1)·sqrt(V(σ)), so x(0) = s·x(1)."""

    def velocity(x, t):
        sigma = (t / 1000).double().view(-1, *[1] * (x.ndim - 1))
        return (x.double() * (sigma - (1 - sigma) * variance) / ((1 - sigma) ** 2 * variance + sigma**2)).float()

    return velocity


def _euler(velocity, sigmas, x):
    for k in range(len(sigmas) - 1):
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity(x, (sigmas[k] * 1000).expand(x.shape[0]))
    return x


def test_ode_tail_compresses_the_remaining_grid_and_beats_euler_at_half_the_calls():
    from lightning_grpo.samplers import MultistepODETail

    sampler = FlowSDESampler(num_steps=16, eta=0.7, shift=3.0)
    start, velocity = 4, _gaussian_velocity(1.0)
    sigma = sampler.sigmas[start].double()
    x_start = torch.linspace(-2, 2, 5).view(5, 1) * ((1 - sigma) ** 2 + sigma**2).sqrt().float()  # on the exact path
    exact = torch.linspace(-2, 2, 5).view(5, 1)  # s = 1
    tail = MultistepODETail(compression=0.5, order=2)
    sigmas = tail.sigmas(sampler, start)
    assert len(sigmas) == 7 and sigmas[0] == sampler.sigmas[start] and sigmas[-1] == 0  # 12 steps left → 6
    torch.testing.assert_close(sigmas[::2][:4], sampler.sigmas[start::4][:4])  # every other grid point, in order
    out, calls = tail.integrate(velocity, sampler, x_start, start)
    assert calls == 6
    second_order = (out - exact).abs().max()
    euler_same_calls = (_euler(velocity, sigmas, x_start) - exact).abs().max()
    euler_full_grid = (_euler(velocity, sampler.sigmas[start:], x_start) - exact).abs().max()
    assert second_order < 0.5 * euler_same_calls
    assert second_order < euler_full_grid  # 6 calls of the 2nd-order solver beat the grid's 12 Euler calls


def test_ode_tail_start_and_validation():
    from lightning_grpo.samplers import MultistepODETail

    assert MultistepODETail.start(SlidingWindow(size=2, first=1).sde_steps(6, 0), 6) == 3
    assert MultistepODETail.start(SlidingWindow(size=2, first=4).sde_steps(6, 0), 6) is None  # window ends the trajectory
    assert MultistepODETail.start(None, 6) is None
    with pytest.raises(ValueError, match="flow sampler"):
        MultistepODETail().sigmas(DDIMSDESampler(num_steps=6), 0)
    with pytest.raises(ValueError, match="compression"):
        MultistepODETail(compression=0.0)
