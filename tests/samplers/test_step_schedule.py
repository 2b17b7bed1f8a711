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


# ---------------------------------------------------------------- boundaries, by hand
def test_all_steps_is_a_boolean_mask_that_selects_every_step_and_reprs_as_its_constructor():
    mask = AllSteps().sde_steps(4, iteration=0)
    assert mask.dtype == torch.bool
    assert torch.arange(10, 14)[mask].tolist() == [10, 11, 12, 13]  # usable as a mask, not as indices
    assert eval(repr(AllSteps()), {"AllSteps": AllSteps}).sde_steps(3, 0).tolist() == [True] * 3


def test_sliding_window_accepts_its_smallest_settings():
    assert _steps(SlidingWindow(size=1, shift_interval=1).sde_steps(5, 3)) == [3]  # one step, moved 3 times
    frozen = SlidingWindow(size=2, shift_interval=1, first=3, last_start=3)  # last_start == first: one position
    assert {frozen.start(8, n) for n in range(6)} == {3}


def test_random_branch_draws_only_inside_a_range_that_starts_above_zero():
    branch = RandomBranch(num_sde_steps=1, low=2, high=6)  # starts 2..5 on T = 8
    generator = torch.Generator().manual_seed(1)
    starts = {_steps(branch.sde_steps(8, n, generator))[0] for n in range(200)}
    assert starts == {2, 3, 4, 5}


def test_random_branch_sequence_follows_its_generator_and_uses_an_explicit_high():
    branch = RandomBranch(num_sde_steps=1, low=0, high=8)
    runs = [[_steps(branch.sde_steps(8, n, generator))[0] for n in range(16)] for generator in
            (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))]
    assert runs[0] == runs[1] and max(runs[0]) >= 4  # high = 8 (not T // 2 = 4): starts past the first half
    # a range exactly num_sde_steps wide is one position; high is the explicit value, not T // 2 = 5
    assert _steps(RandomBranch(num_sde_steps=2, low=4, high=6).sde_steps(10, 0, torch.Generator())) == [4, 5]


# ---------------------------------------------------------------- ODE tail, by hand
def test_ode_tail_sigmas_interpolate_the_grid_by_hand():
    from lightning_grpo.samplers import MultistepODETail

    sampler = FlowSDESampler(num_steps=4, eta=0.7, shift=1.0)  # σ = 1, .75, .5, .25, 0
    # start 1, 3 steps left, compression 2/3: m = 2, fractional indices 1, 2.5, 4
    torch.testing.assert_close(MultistepODETail(compression=2 / 3).sigmas(sampler, 1), torch.tensor([0.75, 0.375, 0.0]))
    # one step left: round(0.4 · 1) = 0, at least one step
    torch.testing.assert_close(MultistepODETail(compression=0.4).sigmas(sampler, 3), torch.tensor([0.25, 0.0]))
    # compression 1 (the largest) keeps the grid
    torch.testing.assert_close(MultistepODETail(compression=1.0).sigmas(sampler, 0), sampler.sigmas)
    with pytest.raises(ValueError, match="tail start 4"):
        MultistepODETail().sigmas(sampler, 4)  # past the last step
    for bad in (dict(compression=1.5), dict(order=0), dict(order=4)):
        with pytest.raises(ValueError, match="compression|order"):
            MultistepODETail(**bad)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ode_tail_integrates_a_constant_velocity_exactly_from_the_grid_sigma(order):
    """v = c everywhere: x(σ) = x0 + σ·c is the exact path, so any consistent solver lands on
    x(0) = x_start − σ_start·c; the model sees σ·1000 of the tail's own points."""
    from lightning_grpo.samplers import MultistepODETail

    sampler = FlowSDESampler(num_steps=8, eta=0.7, shift=1.0)  # σ_2 = 0.75
    c = torch.tensor([[0.5, -1.25, 2.0]])
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return c.expand_as(x)

    x_start = torch.tensor([[1.0, 0.0, -1.0], [0.25, 0.5, 0.75]])
    tail = MultistepODETail(compression=0.5, order=order)
    out, calls = tail.integrate(velocity, sampler, x_start, 2)
    torch.testing.assert_close(out, x_start - 0.75 * c, atol=1e-5, rtol=1e-5)
    assert calls == 3 and len(seen) == 3
    torch.testing.assert_close(torch.stack(seen)[:, 0], tail.sigmas(sampler, 2)[:-1] * 1000)


def test_ode_tail_order_one_is_less_accurate_than_order_two():
    from lightning_grpo.samplers import MultistepODETail

    sampler = FlowSDESampler(num_steps=16, eta=0.7, shift=3.0)
    start, velocity = 4, _gaussian_velocity(1.0)
    sigma = sampler.sigmas[start].double()
    x_start = torch.linspace(-2, 2, 5).view(5, 1) * ((1 - sigma) ** 2 + sigma**2).sqrt().float()
    exact = torch.linspace(-2, 2, 5).view(5, 1)
    errors = {order: (MultistepODETail(0.5, order).integrate(velocity, sampler, x_start, start)[0] - exact).abs().max() for order in (1, 2)}
    assert errors[1] > 1.5 * errors[2], errors


def test_ode_tail_runs_the_model_in_the_latents_dtype():
    """A bfloat16 model refuses float32 inputs: the tail feeds it x's dtype and returns x's dtype."""
    from lightning_grpo.samplers import MultistepODETail

    weight = torch.eye(3, dtype=torch.bfloat16) * 0.5

    def velocity(x, t):
        return x @ weight  # raises on a float32 x

    x = torch.ones(2, 3, dtype=torch.bfloat16)
    out, _ = MultistepODETail(0.5).integrate(velocity, FlowSDESampler(num_steps=8, eta=0.7), x, 4)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3) and bool(torch.isfinite(out.float()).all())
