"""EMA callback: the average it keeps, swapping in and out, checkpoints, test with EMA weights, rollouts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_grpo.callbacks.ema import EMA, ema_weights
from tests.training.fixtures import PROMPTS, ListPrompts, make_module


def trainer_kwargs(**extra):
    return dict(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **extra)


def test_ema_update_and_swap_by_hand():
    module = make_module()
    ema = EMA(decay=0.75)
    ema.setup(None, module, "fit")
    assert set(ema.weights) == {n for n, p in module.policy.named_parameters() if p.requires_grad}
    start = {n: w.clone() for n, w in ema.weights.items()}
    with torch.no_grad():
        for p in module.policy.trainable_parameters():
            p.add_(1.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)
    current = dict(module.policy.named_parameters())
    for name, value in ema.weights.items():
        torch.testing.assert_close(value, 0.75 * start[name] + 0.25 * current[name].detach())
    ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 1)  # no new optimizer step
    assert ema.num_updates == 1
    before, average = current["conv_out.weight"].detach().clone(), ema.weights["conv_out.weight"].clone()
    frozen = module.policy.embedding.weight.detach().clone()
    with ema.applied(module):
        assert torch.equal(module.policy.conv_out.weight.detach(), average)
        assert torch.equal(module.policy.embedding.weight.detach(), frozen)  # frozen weights are not averaged
    assert torch.equal(module.policy.conv_out.weight.detach(), before)  # restored
    assert torch.equal(ema.weights["conv_out.weight"], average)


def test_update_every_n_steps_and_start_step():
    module = make_module()
    ema = EMA(decay=0.5, update_every_n_steps=2, start_step=2)
    ema.setup(None, module, "fit")
    for step in (1, 2, 3, 4, 6):
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
    assert ema.num_updates == 3  # at steps 2, 4 and 6
    assert ema.last_update_step == 6


class Probe(Callback):
    """Records the policy's conv_out weight as seen by test and validation steps."""

    def __init__(self):
        self.seen = {}

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen["test"] = pl_module.policy.conv_out.weight.detach().clone()


def test_ema_is_saved_in_checkpoints_and_used_by_test(tmp_path):
    module = make_module()
    ema = EMA(decay=0.5)
    trainer = Trainer(limit_train_batches=2, callbacks=[ema], default_root_dir=tmp_path, enable_checkpointing=False, **trainer_kwargs())
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    assert ema.num_updates == 2
    trained = module.policy.conv_out.weight.detach().clone()
    assert not torch.equal(ema.weights["conv_out.weight"], trained)  # the average lags behind
    path = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]["EMA"]
    assert torch.equal(saved["weights"]["conv_out.weight"], ema.weights["conv_out.weight"])

    probe, fresh = Probe(), EMA(decay=0.5)
    tester = Trainer(limit_test_batches=1, callbacks=[fresh, probe], default_root_dir=tmp_path, **trainer_kwargs())
    tester.test(make_module(), datamodule=ListPrompts(PROMPTS), ckpt_path=path)
    torch.testing.assert_close(probe.seen["test"], saved["weights"]["conv_out.weight"])  # tested with EMA weights


def test_rollouts_with_ema_weights(tmp_path):
    class RolloutProbe(Callback):
        def __init__(self):
            self.weights = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with pl_module.rollout_weights():
                self.weights.append(pl_module.policy.conv_out.weight.detach().clone())

    module, probe, ema = make_module(), RolloutProbe(), EMA(decay=0.5, use_for_rollouts=True)
    trainer = Trainer(limit_train_batches=2, callbacks=[ema, probe], enable_checkpointing=False, **trainer_kwargs())
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    assert len(probe.weights) == 2
    assert not torch.equal(probe.weights[1], module.policy.conv_out.weight.detach())  # EMA, not current
    average = ema.weights["conv_out.weight"].clone()
    with ema_weights(trainer, module):
        assert torch.equal(module.policy.conv_out.weight.detach(), average)
    assert module.rollout_weights().__class__.__name__ == "nullcontext"  # unhooked after fit


def test_options_are_validated():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)
