"""Mixed ODE-SDE rollouts (MixGRPO window, Flow-GRPO-Fast branch) through the rollout and the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_grpo.cli import run
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler, RandomBranch, SlidingWindow
from tests.training.fixtures import PROMPTS, make_module
from tests.training.test_module import fit

ROOT = Path(__file__).resolve().parents[2]
NUM_STEPS = 4  # make_module's samplers


def _policy_and_sampler(paradigm: str):
    sampler = FlowSDESampler(num_steps=6, eta=0.7) if paradigm == "flow" else DDIMSDESampler(num_steps=6, eta=1.0)
    return TinyPolicy(paradigm=paradigm, resolution=8), sampler


def _rollout(policy, sampler, sde_steps=None):
    return rollout(policy, sampler, PROMPTS[:2], group_size=3, generator=torch.Generator().manual_seed(7), sde_steps=sde_steps)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_a_window_covering_every_step_is_todays_rollout_bit_for_bit(paradigm):
    policy, sampler = _policy_and_sampler(paradigm)
    today = _rollout(policy, sampler)
    windowed = _rollout(policy, sampler, SlidingWindow(size=6).sde_steps(6, iteration=0))
    assert torch.equal(today.latents, windowed.latents)
    assert torch.equal(today.log_probs, windowed.log_probs)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_steps_outside_the_window_are_ode_steps_without_noise(paradigm):
    policy, sampler = _policy_and_sampler(paradigm)
    mask = SlidingWindow(size=2, first=2).sde_steps(6, 0)  # SDE on steps 2, 3
    out = _rollout(policy, sampler, mask)
    assert torch.equal(out.sde_steps, mask)
    for i in range(6):
        x, x_next = out.latents[:, i], out.latents[:, i + 1]
        t = sampler.timesteps[i].expand(x.shape[0])
        ode = sampler.ode_step(policy.predict(x, t, out.condition), x, i)
        if mask[i]:
            assert (out.log_probs[:, i] != 0).all()
            assert not torch.allclose(x_next, ode)  # noise was drawn
        else:
            assert torch.equal(x_next, ode)  # the deterministic step, exactly
            assert (out.log_probs[:, i] == 0).all()
    # the G = 3 samples of a prompt share x_0 and the ODE steps before the window: identical until it
    assert torch.equal(out.latents[0, :3], out.latents[1, :3])
    assert not torch.equal(out.latents[0, 4], out.latents[1, 4])


def test_module_with_a_full_window_trains_exactly_like_today():
    weights = []
    for schedule in (None, SlidingWindow(size=NUM_STEPS)):
        torch.manual_seed(0)
        module = make_module(step_schedule=schedule)
        fit(module, PROMPTS, batches=2)
        weights.append(module.policy.conv_out.weight.detach().clone())
    assert torch.equal(*weights)


def _record_trained_indices(module, monkeypatch) -> list[list[int]]:
    """Wrap the objective's loss so every call's timestep indices are kept, grouped by rollout."""
    per_rollout: list[list[int]] = []
    original_update, original_loss = module._update, module.objective.loss

    def update(*args, **kwargs):
        per_rollout.append([])
        return original_update(*args, **kwargs)

    def loss(module_, prepared, samples, column):
        per_rollout[-1].extend(prepared.columns[samples, column].tolist())
        return original_loss(module_, prepared, samples, column)

    monkeypatch.setattr(module, "_update", update)
    monkeypatch.setattr(module.objective, "loss", loss)
    return per_rollout


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_the_window_follows_its_schedule_and_only_its_steps_are_trained(paradigm, monkeypatch):
    # T = 4, w = 2, one shift per rollout: windows [0, 1], [1, 2], [2, 3], then back to [0, 1]
    module = make_module(paradigm, timestep_fraction=1.0, step_schedule=SlidingWindow(size=2, shift_interval=1))
    trained = _record_trained_indices(module, monkeypatch)
    _, record = fit(module, PROMPTS, batches=4)
    assert [m["train/sde_steps/first"] for m in record.metrics] == [0.0, 1.0, 2.0, 0.0]
    windows = [{0, 1}, {1, 2}, {2, 3}, {0, 1}]
    if paradigm == "diffusion":
        windows[2] = {2}  # DDIM's last step has std 0: in the window, never trained
    assert [set(indices) for indices in trained] == windows
    for metrics in record.metrics:  # the first inner update of every rollout still has ratio 1
        assert metrics["train/ratio/first_update_max_dev"] <= 1e-6


def test_branching_trains_only_its_k_steps_with_a_timestep_subset(monkeypatch):
    # T = 4, k = 2 inside [0, 4); timestep_fraction 0.5: one of the two branch steps per sample
    module = make_module(timestep_fraction=0.5, step_schedule=RandomBranch(num_sde_steps=2, high=NUM_STEPS))
    trained = _record_trained_indices(module, monkeypatch)
    _, record = fit(module, PROMPTS, batches=3)
    for indices, metrics in zip(trained, record.metrics):
        first = int(metrics["train/sde_steps/first"])
        assert set(indices) <= {first, first + 1}
        assert len(indices) == 8  # 8 samples × K = 1
        assert metrics["train/ratio/first_update_max_dev"] <= 1e-6


def test_a_schedule_that_does_not_fit_the_sampler_is_refused_at_construction():
    with pytest.raises(ValueError, match="does not fit in 4 sampling steps"):
        make_module(step_schedule=SlidingWindow(size=5))


def test_the_cli_builds_the_demo_with_a_window(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = run([
        "-c", "configs/demo.yaml", "--model.step_schedule=lightning_grpo.samplers.SlidingWindow",
        "--model.step_schedule.size=2", "--model.step_schedule.shift_interval=10",
    ], subcommand=False)
    assert cli.model.step_schedule == SlidingWindow(size=2, shift_interval=10)


def test_the_flash_tail_replaces_the_steps_after_the_window_with_fewer_calls(monkeypatch):
    from lightning_grpo.samplers import MultistepODETail

    policy, sampler = _policy_and_sampler("flow")
    calls = []
    predict = policy.predict
    monkeypatch.setattr(policy, "predict", lambda x, t, c: calls.append(float(t[0])) or predict(x, t, c))
    mask = SlidingWindow(size=2, first=1).sde_steps(6, 0)  # SDE on 1, 2; tail from step 3 (3 steps → 2)
    plain = _rollout(policy, sampler, mask)
    calls.clear()
    flash = rollout(policy, sampler, PROMPTS[:2], group_size=3, generator=torch.Generator().manual_seed(7),
                    sde_steps=mask, ode_tail=MultistepODETail(compression=0.5))
    assert len(calls) == 5  # steps 0, 1, 2 on the grid + 2 tail steps (6 without the tail)
    # the same layout as without the tail: T + 1 latents and T log-probs for each of the 6 samples
    assert flash.latents.shape == plain.latents.shape and flash.log_probs.shape == plain.log_probs.shape == (6, 6)
    assert calls[3] == pytest.approx(float(sampler.timesteps[3]))
    assert torch.equal(flash.latents[:, :4], plain.latents[:, :4])  # identical up to the tail
    assert torch.equal(flash.log_probs[:, :3], plain.log_probs[:, :3])
    assert flash.latents[:, 4:6].isnan().all() and flash.latents[:, 6].isfinite().all()
    assert (flash.log_probs[:, 3:] == 0).all()
    # a 2-step 2nd-order tail lands near the grid's 3 Euler steps (same ODE, same start)
    assert (flash.latents[:, 6] - plain.latents[:, 6]).abs().max() < 0.1 * plain.latents[:, 6].abs().max()


def test_module_trains_with_the_flash_tail_and_refuses_it_where_it_cannot_apply(monkeypatch):
    from lightning_grpo.samplers import MultistepODETail

    module = make_module(timestep_fraction=1.0, step_schedule=SlidingWindow(size=2, shift_interval=1), ode_tail=MultistepODETail())
    trained = _record_trained_indices(module, monkeypatch)
    _, record = fit(module, PROMPTS, batches=2)
    assert [set(indices) for indices in trained] == [{0, 1}, {1, 2}]
    assert all(m["train/ratio/first_update_max_dev"] <= 1e-6 for m in record.metrics)
    with pytest.raises(ValueError, match="needs a step_schedule"):
        make_module(ode_tail=MultistepODETail())
    with pytest.raises(ValueError, match="flow sampler"):
        make_module("diffusion", step_schedule=SlidingWindow(size=2), ode_tail=MultistepODETail())


@pytest.mark.parametrize("drop_last, expected", [(False, {0, 1, 2, 3}), (True, {0, 1, 2})])
def test_drop_last_timestep_leaves_the_last_step_out_of_the_update(drop_last, expected, monkeypatch):
    module = make_module(timestep_fraction=1.0, drop_last_timestep=drop_last)  # flow, T = 4: every step trainable
    trained = _record_trained_indices(module, monkeypatch)
    fit(module, PROMPTS, batches=1)
    assert set(trained[0]) == expected
