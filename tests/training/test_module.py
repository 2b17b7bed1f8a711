"""GRPOModule in a real Lightning loop: parameters move, ratio == 1 first, optimizer-step counts."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_grpo.module import GRPOModule
from lightning_grpo.policies.tiny import TinyPolicy
from lightning_grpo.rewards.base import Reward
from lightning_grpo.samplers import FlowSDESampler

from tests.training.fixtures import PROMPTS, ListPrompts, Redness, make_module


@pytest.fixture
def prompts():
    return PROMPTS


class Record(Callback):
    """Keeps the logged metrics of every training batch."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, prompts, batches=2, batch_size=2, **trainer_kwargs):
    record = Record()
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=batches, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record], **trainer_kwargs,
    )
    trainer.fit(module, datamodule=ListPrompts(prompts, batch_size))
    return trainer, record


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
def test_fit_changes_the_trainable_parameters_only(paradigm, prompts):
    module = make_module(paradigm)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    fit(module, prompts)
    after = dict(module.policy.named_parameters())
    assert not torch.equal(before["conv_out.weight"], after["conv_out.weight"])
    assert torch.equal(before["embedding.weight"], after["embedding.weight"])  # frozen


@pytest.mark.parametrize("paradigm", ["flow", "diffusion"])
@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_first_inner_update_ratio_is_one(paradigm, micro_batch_size, prompts):
    module = make_module(paradigm, micro_batch_size=micro_batch_size)
    _, record = fit(module, prompts, batches=3)
    assert len(record.metrics) == 3
    for metrics in record.metrics:
        assert metrics["train/ratio/first_update_max_dev"] <= 1e-6
    # after the first optimizer step the policy has moved, so later ratios are not all 1
    assert any(m["train/ratio/max"] - 1 > 1e-6 or 1 - m["train/ratio/min"] > 1e-6 for m in record.metrics)


@pytest.mark.parametrize(
    "guidance_scale, samples_per_update, expected",
    [(1.0, 4, 2), (1.0, 2, 4), (1.0, None, 1), (3.0, 2, 1), (3.0, 4, 1)],
)
def test_optimizer_steps_per_rollout(guidance_scale, samples_per_update, expected, prompts):
    # one batch of 2 prompts × group of 4 = 8 samples
    module = make_module(guidance_scale=guidance_scale, samples_per_update=samples_per_update, micro_batch_size=2)
    trainer, record = fit(module, prompts, batches=1)
    assert trainer.global_step == expected
    assert record.metrics[0]["train/optimizer_steps"] == expected


def test_best_of_n_trains_on_the_kept_samples(prompts):
    module = make_module(group_size=4, best_of_n=(1, 1), samples_per_update=2)
    trainer, record = fit(module, prompts, batches=1)
    assert trainer.global_step == 2  # 2 prompts × 2 kept samples, 2 per optimizer step


def test_reward_failure_names_the_reward(prompts):
    class Broken(Reward):
        default_name = "broken"

        def score(self, pixels, prompts, images=None):
            return torch.full((pixels.shape[0],), float("nan"))

    module = GRPOModule(TinyPolicy(), FlowSDESampler(4, eta=0.7), [Broken()], group_size=2, show_progress=False)
    with pytest.raises(Exception, match="broken"):
        fit(module, prompts, batches=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=1), "group_size"),
        (dict(timestep_fraction=0.0), "timestep_fraction"),
        (dict(micro_batch_size=3, samples_per_update=4), "multiple of micro_batch_size"),
        (dict(best_of_n=(4, 4)), "best_of_n"),
        (dict(clip_range=0.0), "clip_range"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_ode_sampler_is_refused_for_training():
    with pytest.raises(ValueError, match="eta > 0"):
        GRPOModule(TinyPolicy(), FlowSDESampler(4, eta=0.0), [Redness()], group_size=2)


def test_kl_penalty_runs_against_a_frozen_reference(prompts):
    module = make_module(kl_beta=0.1, samples_per_update=None)  # one optimizer step per rollout
    _, record = fit(module, prompts, batches=2)
    assert module.reference_policy is not None
    assert all(not p.requires_grad for p in module.reference_policy.parameters())
    assert record.metrics[0]["train/kl"] == pytest.approx(0.0, abs=1e-10)  # identical before any update
    assert record.metrics[-1]["train/kl"] > 0


def test_checkpoints_leave_out_frozen_state_but_load_strictly(prompts, tmp_path):
    class Weighted(Redness):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    module = GRPOModule(TinyPolicy(), FlowSDESampler(4, eta=0.7), [Weighted()], group_size=2, kl_beta=0.1, show_progress=False)
    trainer, _ = fit(module, prompts, batches=1, default_root_dir=tmp_path)
    path = tmp_path / "grpo.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith(("rewards.", "reference_policy.")) for k in saved)
    assert "policy.conv_out.weight" in saved and "policy.embedding.weight" not in saved  # frozen: rebuilt
    fresh = GRPOModule(TinyPolicy(seed=1), FlowSDESampler(4, eta=0.7), [Weighted()], group_size=2, kl_beta=0.1, show_progress=False)
    checkpoint = torch.load(path, weights_only=False)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    torch.testing.assert_close(fresh.policy.conv_out.weight, module.policy.conv_out.weight)
