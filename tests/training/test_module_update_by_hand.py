"""The module's update step by hand: the GRPO objective's loss at known ratios, the KL to the frozen reference,
the update schedule of uneven ranks (faked on one process), DDP's `no_sync` around every backward
but the last of an optimizer step, and `_optimizer_step`'s clipping on both branches.

The ratios are set by shifting the rollout's old log-probabilities by known amounts δ: before
any update the recomputed log-probability equals the rollout's, so ρ = exp(δ) exactly (to float
precision) and the clipped surrogate can be worked out by hand."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import lightning_grpo.distributed
from lightning_grpo.grpo.loss import gaussian_kl
from lightning_grpo.module import GRPOModule
from lightning_grpo.objectives import Prepared, Targets
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rollout import rollout
from lightning_grpo.samplers import FlowSDESampler
from lightning_grpo.types import Rollout

from tests.training.fixtures import PROMPTS, ListPrompts, Redness, make_module
from tests.training.test_module import Record, fit

SAMPLES = torch.tensor([1, 6])  # a sample of each of the two groups
INDEX = torch.tensor([2, 0])  # and a timestep of each, neither the first nor the last of both
SHIFTS = (0.5, -0.1)  # δ: ρ = e^0.5 ≈ 1.6487 (above 1 + ε = 1.2), e^-0.1 ≈ 0.9048 (inside [0.8, 1.2])


def _shifted_rollout(module: GRPOModule) -> Rollout:
    """A rollout of the module's own policy (2 prompts × 4) whose old log-probs at (SAMPLES, INDEX)
    are lowered by SHIFTS, so the recomputed ratio there is exp(SHIFTS)."""
    trajectories = rollout(module.policy, module.sampler, PROMPTS[:2], 4, torch.Generator().manual_seed(0))
    old = trajectories.log_probs.clone()
    old[SAMPLES, INDEX] -= torch.tensor(SHIFTS)
    return dataclasses.replace(trajectories, log_probs=old)


def _loss(module: GRPOModule, trajectories: Rollout, advantages: torch.Tensor, samples: torch.Tensor, index: torch.Tensor):
    """The objective's loss of `samples` at their step `index` (one trained column each)."""
    weights = None if advantages.ndim == 1 else torch.tensor([r.weight for r in module.rewards.rewards])
    columns = torch.zeros(trajectories.batch_size, 1, dtype=torch.long)
    columns[samples, 0] = index
    prepared = Prepared(trajectories, Targets(advantages, None, {}, weights), columns, {})
    return module.objective.loss(module, prepared, samples, 0)


def _surrogate(advantage: float, ratio: float, clip: float = 0.2) -> float:
    """max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) for one sample."""
    return max(-advantage * ratio, -advantage * min(max(ratio, 1 - clip), 1 + clip))


def test_the_loss_is_the_clipped_surrogate_at_known_ratios():
    module = make_module(clip_range=0.2, adv_clip_max=1.0)
    trajectories = _shifted_rollout(module)
    advantages = torch.zeros(8)
    advantages[SAMPLES] = torch.tensor([0.7, -2.5])  # −2.5 is clamped to −1 by adv_clip_max
    loss, stats = _loss(module, trajectories, advantages, SAMPLES, INDEX)
    r1, r6 = math.exp(0.5), math.exp(-0.1)
    # sample 1: A = 0.7, ρ clipped to 1.2 -> −0.84; sample 6: A = −1, ρ inside -> +0.9048
    expected = (-0.7 * 1.2 + 1.0 * r6) / 2
    assert expected == pytest.approx((_surrogate(0.7, r1) + _surrogate(-1.0, r6)) / 2)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(stats.ratio_max) == pytest.approx(r1, rel=1e-4)
    assert float(stats.ratio_min) == pytest.approx(r6, rel=1e-4)
    assert float(stats.clip_fraction) == 0.5 and float(stats.kl) == 0.0


def test_the_loss_of_per_reward_advantages_weights_each_rewards_surrogate():
    """[B, K] advantages: Σ_k w_k · mean_b(surrogate of A_bk), with the module's reward weights."""
    policy = TinyPolicy(paradigm="flow", resolution=8)
    rewards = [Redness(weight=1.0), Redness(name="redness_again", weight=0.5)]
    module = GRPOModule(policy, FlowSDESampler(num_steps=4, eta=0.7), rewards, group_size=4, multi_reward="per_reward",
                        clip_range=0.2, adv_clip_max=1.0, show_progress=False)
    trajectories = _shifted_rollout(module)
    advantages = torch.zeros(8, 2)
    advantages[SAMPLES] = torch.tensor([[0.7, -0.4], [-2.5, 0.3]])
    loss, _ = _loss(module, trajectories, advantages, SAMPLES, INDEX)
    r1, r6 = math.exp(0.5), math.exp(-0.1)
    first = (-0.7 * 1.2 + 1.0 * r6) / 2  # A_1 = 0.7 clipped ratio; A_6 = −1 (clamped)
    second = (0.4 * r1 - 0.3 * r6) / 2  # A_1 = −0.4: the unclipped ρ is the larger loss; A_6 = 0.3 inside
    assert float(loss) == pytest.approx(1.0 * first + 0.5 * second, rel=1e-4)


def test_the_loss_adds_beta_times_the_kl_to_the_frozen_initial_policy():
    """After the policy moved away from its frozen copy, the loss is the surrogate plus
    β·mean KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)), the means from each model's prediction at the same x_i."""
    module = make_module(kl_beta=0.3, clip_range=0.2)
    trajectories = _shifted_rollout(module)
    with torch.no_grad():
        module.policy.conv_out.weight.mul_(1.5)  # the reference keeps the initial weights
        module.policy.conv_out.bias.add_(0.05)
    advantages = torch.zeros(8)
    advantages[SAMPLES] = torch.tensor([0.7, -0.4])
    without_kl = make_module(kl_beta=0.0, clip_range=0.2)
    without_kl.policy.load_state_dict(module.policy.state_dict())
    loss, stats = _loss(module, trajectories, advantages, SAMPLES, INDEX)
    surrogate, _ = _loss(without_kl, trajectories, advantages, SAMPLES, INDEX)

    x, condition = trajectories.latents[SAMPLES, INDEX], {k: v[SAMPLES] for k, v in trajectories.condition.items()}
    t = module.sampler.timesteps[INDEX]
    with torch.no_grad():
        mean, std = module.sampler.mean_and_std(module.policy.predict(x, t, condition), x, INDEX, module.sampler.eta)
        ref_mean, _ = module.sampler.mean_and_std(module.reference_policy.predict(x, t, condition), x, INDEX, module.sampler.eta)
    kl = gaussian_kl(mean, ref_mean, std).mean()
    assert float(kl) > 1e-4  # the policy did move
    assert float(stats.kl) == pytest.approx(float(kl), rel=1e-5)
    assert float(loss) == pytest.approx(float(surrogate) + 0.3 * float(kl), rel=1e-5)


def test_trained_group_size_is_the_kept_count_under_best_of_n():
    assert make_module(group_size=6).objective.trained_group_size(6) == 6
    assert make_module(group_size=6, best_of_n=(2, 1), samples_per_update=None).objective.trained_group_size(6) == 3


def _recording_fit(module: GRPOModule, monkeypatch) -> tuple[object, list, list]:
    """Fit one batch (8 samples), recording each loss call (its rollout, samples and steps), each
    zero-weight padding backward (its rollout) and, at each optimizer step, the gradients of the
    trainable parameters (None where a parameter has none)."""
    calls, grads = [], []
    loss, padding, optimizer_step = module.objective.loss, lightning_grpo.distributed.padding_backward, module._optimizer_step

    def recording_loss(module_, prepared, samples, column):
        calls.append((prepared.rollout, samples.clone(), prepared.columns[samples, column].clone()))
        return loss(module_, prepared, samples, column)

    def recording_padding(module_, rollout_):
        calls.append(("padding", rollout_))
        return padding(module_, rollout_)

    def recording_step(optimizer, scheduler):
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in module.policy.trainable_parameters()])
        calls.append("step")
        return optimizer_step(optimizer, scheduler)

    monkeypatch.setattr(module.objective, "loss", recording_loss)
    monkeypatch.setattr(lightning_grpo.distributed, "padding_backward", recording_padding)
    monkeypatch.setattr(module, "_optimizer_step", recording_step)
    trainer, _ = fit(module, PROMPTS, batches=1)
    return trainer, calls, grads


def test_a_rank_with_fewer_samples_takes_part_in_the_other_ranks_steps_with_zero_weight(monkeypatch):
    """Ranks holding 8 and 16 samples, 4 per optimizer step: both run 4 steps; in the last two this
    rank has none and runs one zero-weight backward through the policy on the padding rollout, so
    DDP's all-reduce meets the other rank's (faked: the count all-gather)."""
    module = make_module(samples_per_update=4, micro_batch_size=2, timestep_fraction=0.5, kl_beta=0.1)  # K = 2 of 4
    monkeypatch.setattr(lightning_grpo.distributed, "counts_may_differ", lambda *args: True)
    monkeypatch.setattr(lightning_grpo.distributed, "all_gather_objects", lambda count: [count, 16])
    trainer, calls, grads = _recording_fit(module, monkeypatch)
    assert trainer.global_step == 4
    steps = " ".join("s" if c == "step" else ("p" if c[0] == "padding" else "c") for c in calls).split("s")[:-1]
    assert [s.split() for s in steps] == [["c"] * 4, ["c"] * 4, ["p"], ["p"]]  # 2 micro-batches × K, then a pad
    trained = [c for c in calls if c != "step"]
    rollout_of_step = trained[0][0]
    for padding_call in trained[-2:]:
        assert padding_call[1] is rollout_of_step  # the padding rollout: here the trained one (nothing dropped)
    for step_grads in grads[:2]:
        assert all(g is not None for g in step_grads) and any(g.abs().sum() > 0 for g in step_grads)
    for step_grads in grads[2:]:  # a backward ran (every gradient exists) and added nothing
        assert all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in step_grads)


def test_every_backward_but_the_last_of_an_optimizer_step_skips_the_gradient_sync(monkeypatch):
    module = make_module(samples_per_update=4, micro_batch_size=2, timestep_fraction=0.5)  # 2 steps × 4 backwards
    inside, log, models = [False], [], []

    @contextmanager
    def recording_skip(strategy_model):
        models.append(strategy_model)
        inside[0] = True
        yield
        inside[0] = False

    backward = module.manual_backward

    def recording_backward(loss, *args, **kwargs):
        log.append(inside[0])
        return backward(loss, *args, **kwargs)

    monkeypatch.setattr(lightning_grpo.distributed, "skip_gradient_sync", recording_skip)
    monkeypatch.setattr(module, "manual_backward", recording_backward)
    trainer, _ = fit(module, PROMPTS, batches=1)
    assert log == [True, True, True, False] * 2
    assert len(models) == 6 and all(m is trainer.strategy.model for m in models) and models[0] is not None


class _FakeOptimizer:
    def __init__(self) -> None:
        self.log: list[object] = []

    def step(self) -> None:
        self.log.append("step")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.log.append(("zero_grad", set_to_none))


class _FakeScheduler:
    def __init__(self, log: list) -> None:
        self.log = log

    def step(self) -> None:
        self.log.append("scheduler")


def test_an_optimizer_step_without_any_gradient_reports_a_zero_norm():
    module = make_module(max_grad_norm=None)
    optimizer = _FakeOptimizer()
    assert torch.equal(module._optimizer_step(optimizer, _FakeScheduler(optimizer.log)), torch.zeros(()))
    assert optimizer.log == ["step", ("zero_grad", True), "scheduler"]


@pytest.mark.parametrize("max_grad_norm", [1e-4, None])
def test_the_optimizer_steps_on_gradients_clipped_to_max_grad_norm_and_logs_the_norm_before(max_grad_norm):
    """One optimizer step per rollout: the gradient the optimizer sees has norm min(‖g‖, max_norm),
    the logged grad_norm is ‖g‖, and the gradients are released (None) after the step."""
    module = make_module(samples_per_update=None, max_grad_norm=max_grad_norm)
    seen, after = [], []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.cat([g.flatten() for g in grads]).norm()))

    class StepHook(Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_pre_hook(before_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after.append([p.grad for p in pl_module.policy.trainable_parameters()])

    record = Record()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record, StepHook()])
    trainer.fit(module, datamodule=ListPrompts(PROMPTS, 2))
    logged = record.metrics[0]["train/grad_norm"]
    assert len(seen) == 1 and logged > 1e-3
    if max_grad_norm is None:
        assert seen[0] == pytest.approx(logged, rel=1e-5)
    else:
        assert seen[0] == pytest.approx(max_grad_norm, rel=1e-3)
    assert all(g is None for g in after[0])


def test_max_grad_norm_clips_by_norm_and_a_trainer_set_to_clip_by_value_is_refused():
    """The module clips by norm (`model.max_grad_norm`): a Trainer configured to clip by value
    is refused at set-up, before any rollout, instead of being ignored."""
    from lightning_grpo.validation import ConfigError

    module = make_module(samples_per_update=None, max_grad_norm=1e-4)
    rollouts = []
    module._rollout = lambda work: rollouts.append(work)
    with pytest.raises(ConfigError, match="gradient_clip_algorithm='value'.*max_grad_norm"):
        fit(module, PROMPTS, batches=1, gradient_clip_algorithm="value")
    assert rollouts == []
