"""GRPOModule wires the multi-reward forms and best-of-n advantage modes through to the loss."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_grpo.grpo import effective_advantages, grpo_advantages
from lightning_grpo.rewards.base import Reward

from tests.training.fixtures import PROMPTS, ListPrompts, Redness, make_module


class Blueness(Reward):
    """Mean blue of the image: a second reward that disagrees with redness in places."""

    default_name = "blueness"

    def score(self, pixels, prompts, images=None):
        return pixels[:, 2].flatten(1).mean(1)


@pytest.mark.parametrize("form", ["sum", "per_reward"])
@pytest.mark.parametrize("mode", ["group", "kept"])
def test_step_trains_on_the_advantages_of_the_chosen_form(form, mode):
    module = make_module(group_size=4, best_of_n=(1, 1), samples_per_update=2, multi_reward=form, best_of_n_advantages=mode)
    module.rewards.rewards.append(Blueness(weight=2.0))
    seen = []
    original = module.objective.loss

    def spy(module_, prepared, samples, column):
        seen.append(prepared.targets.values)
        return original(module_, prepared, samples, column)

    module.objective.loss = spy
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ListPrompts(PROMPTS, 2))
    record = module.last_step
    expected = grpo_advantages(record.scores, {"redness": 1.0, "blueness": 2.0}, 4, form=form, best_of_n=(1, 1),
                               best_of_n_advantages=mode, clip_max=5.0)
    assert seen[0].shape == ((4,) if form == "sum" else (4, 2))
    torch.testing.assert_close(seen[0], expected.advantages)
    weights = torch.tensor([1.0, 2.0]) if form == "per_reward" else None
    torch.testing.assert_close(record.advantages, effective_advantages(expected.advantages, weights))


def test_unknown_forms_are_refused():
    with pytest.raises(ValueError, match="multi_reward"):
        make_module(multi_reward="mean")
    with pytest.raises(ValueError, match="best_of_n_advantages"):
        make_module(best_of_n_advantages="renormalise")
