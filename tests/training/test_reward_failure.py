"""reward_failure="drop_group": a NaN reward drops its whole group from the update, in a real loop."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import RewardError
from lightning_grpo.samplers import FlowSDESampler
from tests.training.fixtures import Redness
from tests.training.test_module import fit

# batches of 2 prompts (one group each): [1 failing group of 2], [2 of 2], [none]
PROMPTS = ["a red circle", "a green square", "a green circle", "a green triangle", "a blue circle", "a red square"]


class GreenFails(Redness):
    """Redness, but NaN on every sample whose prompt says "green" (a reward failing on one group)."""

    default_name = "green_fails"

    def score(self, pixels, prompts, images=None):
        scores = super().score(pixels, prompts, images)
        bad = torch.tensor(["green" in p for p in prompts], device=scores.device)
        return torch.where(bad, torch.full_like(scores, float("nan")), scores)


def module(reward_failure: str = "drop_group", **kwargs) -> GRPOModule:
    options = dict(group_size=4, timestep_fraction=0.5, micro_batch_size=2, samples_per_update=4, clip_range=0.2, learning_rate=1e-3, show_progress=False)
    options.update(kwargs)
    return GRPOModule(TinyPolicy(resolution=8), FlowSDESampler(4, eta=0.7), [GreenFails(), Redness()], reward_failure=reward_failure, **options)


def test_failing_groups_are_dropped_and_a_fully_failed_step_is_skipped():
    grpo = module()
    before = grpo.policy.conv_out.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, record = fit(grpo, PROMPTS, batches=3, limit_val_batches=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]
    assert len(messages) == 2
    assert "'green_fails' on 4 sample(s): dropping 1 of 2 groups" in messages[0] and "training on the others" in messages[0]
    assert "'green_fails' on 8 sample(s): dropping 2 of 2 groups" in messages[1] and "skipping this update" in messages[1]
    assert [m["train/reward/dropped_groups"] for m in record.metrics] == [1.0, 2.0, 0.0]
    # step 1: 4 kept samples = 1 optimizer step; step 2: skipped; step 3: 8 samples = 2 steps
    assert trainer.global_step == 3
    assert record.metrics[0]["train/optimizer_steps"] == 1.0 and record.metrics[2]["train/optimizer_steps"] == 2.0
    # the logged rewards are the kept groups' only: finite, and the red circle group's redness
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in record.metrics)
    after = grpo.policy.conv_out.weight.detach()
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_kept_samples_may_end_in_a_shorter_optimizer_step():
    # samples_per_update = 8 = the full rollout; after a drop only 4 remain: one (short) step, not an error
    grpo = module(samples_per_update=8)
    with pytest.warns(RuntimeWarning, match="dropping 1 of 2 groups"):
        trainer, record = fit(grpo, PROMPTS[:2], batches=1, limit_val_batches=0)
    assert trainer.global_step == 1 and record.metrics[0]["train/optimizer_steps"] == 1.0


def test_default_still_raises_naming_the_reward():
    with pytest.raises(RewardError, match=r"'green_fails' returned non-finite scores at samples \[4, 5, 6, 7\]"):
        fit(module(reward_failure="raise"), PROMPTS[:2], batches=1, limit_val_batches=0)


def test_an_exception_cannot_be_attributed_to_a_group_and_raises():
    class Crashes(Redness):
        default_name = "crashes"

        def score(self, pixels, prompts, images=None):
            raise RuntimeError("out of memory")

    grpo = GRPOModule(TinyPolicy(resolution=8), FlowSDESampler(4, eta=0.7), [Crashes()], group_size=2, reward_failure="drop_group", show_progress=False)
    with pytest.raises(RewardError, match="'crashes' failed: RuntimeError: out of memory"):
        fit(grpo, PROMPTS[:2], batches=1)


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="reward_failure"):
        module(reward_failure="ignore")
