"""HeldOutEvaluation with an extra (binary) reward: before/after results, table, untouched training."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer

from lightning_grpo.callbacks.evaluation import HeldOutEvaluation, read_prompts
from lightning_grpo.rewards.base import Reward
from tests.training.fixtures import PROMPTS, ListPrompts, make_module


class RedWins(Reward):
    """1 when red beats green on average: a {0, 1} verifier-like reward the module does not train on."""

    default_name = "red_wins"

    def score(self, pixels, prompts, images=None):
        return ((pixels[:, 0] - pixels[:, 1]).flatten(1).mean(1) > 0).float()


def fit(tmp_path, callbacks):
    torch.manual_seed(0)
    module = make_module()
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    return module


def test_before_and_after_with_an_extra_reward(tmp_path, capsys):
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text('{"prompt": "a violet cone"}\n{"caption": "an amber ring"}\n')
    assert read_prompts(prompts) == ["a violet cone", "an amber ring"]
    heldout = HeldOutEvaluation(str(prompts), samples_per_prompt=3, extra_rewards=[RedWins()], batch_size=4)
    trained = fit(tmp_path / "with", [heldout])
    before, after = heldout.results["before"], heldout.results["after"]
    assert set(before.scores) == {"redness", "red_wins"} and before.scores["red_wins"].shape == (6,)
    assert not torch.equal(before.scores["redness"], after.scores["redness"])  # the policy changed
    assert heldout.evaluate(trained).scores["redness"].equal(after.scores["redness"])  # deterministic
    printed = capsys.readouterr().out
    assert "| red_wins |" in printed and "pts" in printed  # binary reward: change in points
    assert (tmp_path / "with" / "heldout_before_after.md").exists()
    assert (tmp_path / "with" / "heldout_after" / "grid.png").exists()
    untouched = fit(tmp_path / "without", [])
    for a, b in zip(trained.policy.parameters(), untouched.policy.parameters()):
        assert torch.equal(a, b)  # evaluating did not change training
