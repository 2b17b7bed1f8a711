"""RewardHackingMonitor: the warning rule on hand-made histories, and a fit whose reward is hacked on purpose."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_grpo.callbacks.reward_hacking import (
    DIVERSITY,
    TRAIN,
    HackingDetector,
    Observation,
    RewardHackingMonitor,
    paired_change,
    within_prompt_diversity,
)
from lightning_grpo.checkpointing import GRPOCheckpoint
from lightning_grpo.rewards.base import Reward
from tests.training.fixtures import PROMPTS, ListPrompts, make_module


def _obs(step: int, train: list[float], gold: list[float]) -> Observation:
    return Observation(step, {TRAIN: torch.tensor(train), "gold": torch.tensor(gold)})


def test_paired_change_by_hand() -> None:
    change, se = paired_change(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))  # diffs 1, 2, 3
    assert change == pytest.approx(2.0) and se == pytest.approx(1.0 / 3**0.5)


def test_detector_warns_only_when_train_rises_and_gold_falls() -> None:
    detector = HackingDetector(["gold"])
    assert detector.add(_obs(0, [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8])) == []
    # both rise: learning, not hacking
    assert detector.add(_obs(10, [0.3, 0.4, 0.5, 0.6], [0.6, 0.7, 0.8, 0.9])) == []
    # training rises by 0.2 on every sample (SE 0); gold falls by 0.3 from its best (step 10)
    messages = detector.add(_obs(20, [0.5, 0.6, 0.7, 0.8], [0.3, 0.4, 0.5, 0.6]))
    assert len(messages) == 1 and "since step 10" in messages[0] and "'gold'" in messages[0]
    # gap since step 0: train +0.4 / σ_train − gold (−0.2) / σ_gold, σ = std(0.1, 0.2, 0.3, 0.4) for both
    sigma = torch.tensor([0.1, 0.2, 0.3, 0.4]).std().item()
    assert detector.gaps()["gold"] == pytest.approx(0.4 / sigma + 0.2 / sigma, rel=1e-5)


def test_detector_ignores_changes_within_noise() -> None:
    detector = HackingDetector(["gold"], z=2.0)
    detector.add(_obs(0, [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]))
    # mean rise 0.05 with paired diffs (0.6, −0.5, 0.4, −0.3): SE ≈ 0.26, far below 2 SE
    assert detector.add(_obs(5, [0.6, -0.5, 0.4, -0.3], [0.4, 0.4, 0.4, 0.4])) == []
    # a fall smaller than min_change does not count either
    strict = HackingDetector(["gold"], min_change=0.2)
    strict.add(_obs(0, [0.0] * 4, [0.5] * 4))
    assert strict.add(_obs(5, [1.0] * 4, [0.4] * 4)) == []


def test_within_prompt_diversity_by_hand() -> None:
    pixels = torch.zeros(4, 1, 1, 2)  # 2 prompts × 2 samples, 2 elements each
    pixels[1] = torch.tensor([3.0, 4.0]).view(1, 1, 2)  # prompt 0: distance 5, RMS 5/√2
    assert torch.allclose(within_prompt_diversity(pixels, 2), torch.tensor([5 / 2**0.5, 0.0]))


class Greenness(Reward):
    """Mean green minus red: exactly what a policy hacking `Redness` (red minus green) destroys."""

    default_name = "greenness"

    def score(self, pixels, prompts, images=None):
        return (pixels[:, 1] - pixels[:, 0]).flatten(1).mean(1)


def _fit(tmp_path, monitor, steps: int = 12, **module_options):
    torch.manual_seed(0)
    module = make_module(**module_options)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=TensorBoardLogger(tmp_path, name="run"),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[monitor])
    trainer.fit(module, datamodule=ListPrompts(PROMPTS))
    return trainer


def test_a_hacked_reward_makes_the_monitor_warn(tmp_path) -> None:
    """Redness (red − green) is saturated by painting everything red; greenness, never optimised, falls."""
    prompts = tmp_path / "fixed.txt"
    prompts.write_text("a red circle\na green square\na blue circle\n")
    monitor = RewardHackingMonitor(str(prompts), gold_rewards=[Greenness()], diversity=True, samples_per_prompt=4,
                                   every_n_steps=4, batch_size=12)
    with pytest.warns(UserWarning, match="possible reward hacking"):
        trainer = _fit(tmp_path, monitor, learning_rate=1e-2)
    history = monitor.detector.history
    assert [o.step for o in history] == [0, 4, 8, 12]
    assert history[-1].mean(TRAIN) > history[0].mean(TRAIN) and history[-1].mean("greenness") < history[0].mean("greenness")
    assert any("'greenness'" in m for m in monitor.warnings)
    assert history[-1].values[DIVERSITY].shape == (3,)
    rows = (tmp_path / "run" / "version_0" / "reward_hacking.csv").read_text().splitlines()
    assert rows[0].startswith("step,hacking/train_reward,hacking/gold/greenness,hacking/gold/pixel_diversity,hacking/gap/greenness")
    assert len(rows) == 5 and "possible reward hacking" in rows[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "version_0")).Reload()
    assert "hacking/gap/greenness" in events.Tags()["scalars"]
    assert "hacking/warning/text_summary" in events.Tags()["tensors"]


def test_an_aligned_gold_measure_does_not_warn(tmp_path) -> None:
    """The same run with a gold measure that agrees with the reward (red alone) never warns."""

    class Red(Reward):
        default_name = "red"

        def score(self, pixels, prompts, images=None):
            return pixels[:, 0].flatten(1).mean(1)

    prompts = tmp_path / "fixed.txt"
    prompts.write_text("a red circle\na green square\n")
    # artifacts off: painting everything red is a real colour drift, which the artifact measures flag
    monitor = RewardHackingMonitor(str(prompts), gold_rewards=[Red()], samples_per_prompt=4, every_n_steps=4, artifacts=False)
    _fit(tmp_path, monitor, learning_rate=1e-2)
    assert monitor.warnings == [] and len(monitor.detector.history) == 4


def test_monitor_argument_errors(tmp_path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(ValueError, match="at least one gold measure"):
        RewardHackingMonitor(str(prompts), artifacts=False)
    with pytest.raises(ValueError, match="artifact_z"):
        RewardHackingMonitor(str(prompts), artifact_z=0)
    with pytest.raises(ValueError, match="keep_good must be >= 0"):
        GRPOCheckpoint(keep_good=-1)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RewardHackingMonitor(str(prompts), diversity=True, samples_per_prompt=1)
    with pytest.raises(ValueError, match="unique"):
        RewardHackingMonitor(str(prompts), gold_rewards=[Greenness(), Greenness()])


class Saboteur(Callback):
    """From optimizer step `at` on, the policy paints everything redder: the velocity's red
    channel gets a constant bias (a drift no reward here asked for)."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at and not self.done:
            with torch.no_grad():
                pl_module.policy.conv_out.bias[0] -= 1.5
            self.done = True


def _artifact_prompts(tmp_path):
    prompts = tmp_path / "fixed.txt"
    prompts.write_text("a red circle\na green square\na blue circle\na red square\n")
    return str(prompts)


def test_artifact_drift_warns_names_the_step_it_began_and_stops_the_run(tmp_path) -> None:
    """Artifacts alone (no gold reward): the weights barely move (lr 1e-12) until a saboteur
    reddens the policy at step 4. The monitor is silent at steps 0 and 2, warns at step 4 naming
    the colour measures and the step, stops the run (stop_on_hacking), and GRPOCheckpoint keeps
    the step-2 checkpoint as the last good model although keep_last=1 alone would have dropped it."""
    monitor = RewardHackingMonitor(_artifact_prompts(tmp_path), samples_per_prompt=4, every_n_steps=2, stop_on_hacking=True)
    checkpoints = GRPOCheckpoint(every_n_train_steps=2, keep_last=1, keep_best=0, keep_good=1, dirpath=str(tmp_path / "ckpt"))
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_steps=10, logger=TensorBoardLogger(tmp_path, name="run"),
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[Saboteur(4), monitor, checkpoints])
    with pytest.warns(UserWarning, match="artifact measure 'hue_shift' left the base samples' band at step 4"):
        trainer.fit(make_module(learning_rate=1e-12), datamodule=ListPrompts(PROMPTS))
    assert trainer.global_step == 4  # stopped after the evaluation that warned, not at max_steps
    assert monitor.verdicts == {0: True, 2: True, 4: False}
    assert [step for step, _ in monitor.artifact_history] == [0, 2, 4]
    assert checkpoints.good_model_path is not None and checkpoints.good_model_path.endswith("step=2.ckpt")
    kept = sorted(p.name.split("-")[-1] for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert kept == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]  # the last good one, the last one, last.ckpt
    header = (tmp_path / "run" / "version_0" / "reward_hacking.csv").read_text().splitlines()[0]
    assert "hacking/artifacts/periodic_energy" in header and "hacking/artifacts/hue_shift_band_high" in header


def test_monitor_state_round_trip(tmp_path) -> None:
    """The history, the artifact reference and the verdicts survive state_dict / load_state_dict:
    a resumed monitor compares with the base, not with its resumed weights."""
    monitor = RewardHackingMonitor(_artifact_prompts(tmp_path), samples_per_prompt=4, every_n_steps=2)
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
                      enable_model_summary=False, callbacks=[monitor])
    trainer.fit(make_module(learning_rate=1e-12), datamodule=ListPrompts(PROMPTS))
    fresh = RewardHackingMonitor(_artifact_prompts(tmp_path), samples_per_prompt=4, every_n_steps=2)
    fresh.load_state_dict(monitor.state_dict())
    assert [o.step for o in fresh.detector.history] == [0, 2]
    assert fresh.reference.bands == monitor.reference.bands
    assert torch.equal(fresh.reference.stats.hue, monitor.reference.stats.hue)
    assert fresh.verdicts == monitor.verdicts == {0: True, 2: True}
