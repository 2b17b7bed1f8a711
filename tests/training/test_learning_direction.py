"""Learning direction through the real module path: rollout -> advantages -> update, both paradigms.

One GRPO step (a real Lightning fit of one batch, one optimizer step) must raise the
log-probability of the transitions of the samples with a positive advantage and lower it for
the negative ones. A sign error anywhere between the rewards and the loss (advantages, their
combination, best-of-n, the surrogate) turns training around and makes these tests fail; the
other module tests (parameters move, ratio == 1, step counts) pass either way.

Why it holds: the first optimizer step sees ratio == 1 everywhere (nothing is clipped), so the
loss is −mean(A·ρ) with ∂ρ/∂θ = ∂log p/∂θ; AdamW's first step is −lr·sign(g) per parameter, a
descent direction, so to first order (lr small) Σ_b A_b·Δlog p_b > 0.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import Reward
from lightning_grpo.samplers import DDIMSDESampler, FlowSDESampler
from lightning_grpo.types import Rollout

from tests.training.fixtures import PROMPTS, ListPrompts, Redness


class Blueness(Reward):
    """Mean blue of the image: a second reward that disagrees with redness on some samples."""

    default_name = "blueness"

    def score(self, pixels, prompts, images=None):
        return pixels[:, 2].flatten(1).mean(1)


def make(paradigm: str, rewards: list[Reward], **kwargs) -> GRPOModule:
    sampler = FlowSDESampler(num_steps=4, eta=0.7) if paradigm == "flow" else DDIMSDESampler(num_steps=4, eta=1.0)
    options = dict(
        group_size=4, timestep_fraction=1.0, micro_batch_size=2, samples_per_update=None, clip_range=0.2,
        learning_rate=1e-5, weight_decay=0.0, max_grad_norm=None, show_progress=False, seed=3,
    )
    options.update(kwargs)
    return GRPOModule(TinyPolicy(paradigm=paradigm, resolution=8), sampler, rewards, **options)


def one_step(module: GRPOModule, num_prompts: int = 2) -> tuple[Rollout, torch.Tensor]:
    """Fit one batch; return the rollout and advantages that `_update` trained on."""
    seen: dict[str, object] = {}
    update = module._update

    def recording_update(selection):
        seen["trajectories"], seen["advantages"] = selection.trained, selection.targets.values.detach().clone()
        return update(selection)

    module._update = recording_update
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=ListPrompts(PROMPTS, num_prompts))
    assert trainer.global_step == 1  # exactly one optimizer step: first-order regime, nothing clipped
    return seen["trajectories"], seen["advantages"]


@torch.no_grad()
def mean_log_prob(module: GRPOModule, trajectories: Rollout) -> torch.Tensor:
    """Mean over the stochastic steps of log p_θ(x_{i+1} | x_i) of every sample under the current policy: [B]."""
    policy, sampler = module.policy, module.sampler
    steps = sampler.stochastic_steps().tolist()
    total = torch.zeros(trajectories.batch_size)
    for i in steps:
        x, x_next = trajectories.latents[:, i], trajectories.latents[:, i + 1]
        t = sampler.timesteps[i].expand(x.shape[0])
        total += sampler.log_prob(policy.predict(x, t, trajectories.condition), x, x_next, i)
    return total / len(steps)


def assert_learns_in_the_advantage_direction(module: GRPOModule, trajectories: Rollout, advantages: torch.Tensor, before: torch.Tensor) -> None:
    after = mean_log_prob(module, trajectories)
    delta = after - before  # [B]
    positive, negative = advantages > 0, advantages < 0
    assert positive.any() and negative.any()
    assert (advantages * delta).sum() > 0
    assert delta[positive].mean() > 0, (advantages, delta)
    assert delta[negative].mean() < 0, (advantages, delta)
    # per sample: the strongest advantages of each sign move their own log-prob the right way
    assert delta[advantages.argmax()] > 0 and delta[advantages.argmin()] < 0, (advantages, delta)


def run_and_check(module: GRPOModule, num_prompts: int = 2) -> tuple[Rollout, torch.Tensor]:
    # log-probs before the update come from the rollout itself (ratio == 1 at the first update)
    trajectories, advantages = one_step(module, num_prompts)
    stochastic = module.sampler.stochastic_steps()
    before = trajectories.log_probs[:, stochastic].mean(dim=1)
    assert_learns_in_the_advantage_direction(module, trajectories, advantages, before)
    return trajectories, advantages


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_one_step_raises_positive_and_lowers_negative_log_probs(paradigm):
    module = make(paradigm, [Redness()])
    trajectories, advantages = run_and_check(module)
    assert trajectories.batch_size == 8 and advantages.shape == (8,)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
# top-only / bottom-only with full-group advantages have one sign only: see the next test
@pytest.mark.parametrize("best_of_n, advantages_from", [((1, 1), "group"), ((1, 1), "kept"), ((2, 0), "kept"), ((0, 2), "kept")])
def test_best_of_n_learns_in_the_direction_of_its_own_advantages(paradigm, best_of_n, advantages_from):
    module = make(paradigm, [Redness()], best_of_n=best_of_n, best_of_n_advantages=advantages_from)
    trajectories, advantages = run_and_check(module)
    kept = sum(best_of_n)
    assert trajectories.batch_size == 2 * kept
    if advantages_from == "kept":  # re-normalised within the kept samples: each group sums to zero
        torch.testing.assert_close(advantages.view(2, kept).sum(dim=1), torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
@pytest.mark.parametrize("best_of_n, sign", [((2, 0), 1.0), ((0, 2), -1.0)])
def test_best_or_worst_only_with_full_group_advantages_moves_one_way(paradigm, best_of_n, sign):
    """The best two of each group keep their (positive) full-group advantages: their log-probs rise;
    the worst two (negative) fall."""
    module = make(paradigm, [Redness()], best_of_n=best_of_n, best_of_n_advantages="group")
    trajectories, advantages = one_step(module)
    assert (sign * advantages > 0).all()
    before = trajectories.log_probs[:, module.sampler.stochastic_steps()].mean(dim=1)
    delta = mean_log_prob(module, trajectories) - before
    assert (sign * delta).mean() > 0, (advantages, delta)


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_several_rewards_learn_in_the_direction_of_the_weighted_sum(paradigm):
    module = make(paradigm, [Redness(weight=1.0), Blueness(weight=0.5)])
    _, advantages = run_and_check(module)
    scores = module.last_step.scores
    assert set(scores) == {"redness", "blueness"}
    per_reward = module.last_step.reward_advantages
    torch.testing.assert_close(advantages, (per_reward["redness"] + 0.5 * per_reward["blueness"]).clamp(-5, 5))


def test_the_module_clamps_both_signs_of_the_summed_advantage():
    """adv_clip_max bounds the combined advantage on both sides (DanceGRPO adv_clip_max)."""
    module = make("flow", [Redness(), Blueness()], adv_clip_max=0.6)
    _, advantages = one_step(module)
    per_reward = module.last_step.reward_advantages
    unclamped = per_reward["redness"] + per_reward["blueness"]
    assert unclamped.max() > 0.6 and unclamped.min() < -0.6  # both sides exceed the bound
    torch.testing.assert_close(advantages, unclamped.clamp(-0.6, 0.6))
    assert advantages.max().item() == pytest.approx(0.6) and advantages.min().item() == pytest.approx(-0.6)


def test_recomputed_log_probs_match_the_rollout_before_any_update():
    """The measurement above compares with the rollout's own log-probs: they agree with a recomputation."""
    from lightning_grpo.rollout import rollout

    module = make("flow", [Redness()])
    trajectories = rollout(module.policy, module.sampler, PROMPTS[:2], 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean_log_prob(module, trajectories), trajectories.log_probs.mean(dim=1), atol=1e-5, rtol=0)
