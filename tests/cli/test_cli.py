"""The `lightning-grpo` command end to end on the tiny config: TensorBoard scalars, checkpoints, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grpo.cli import run
from lightning_grpo.policies.tiny import TinyPolicy

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def fit_args(tmp_path: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit", "-c", CONFIG, f"--trainer.max_steps={max_steps}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra,
    ]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_logs_tensorboard_scalars_and_moves_parameters(tmp_path):
    run(fit_args(tmp_path, 3))
    log_dir = tmp_path / "tiny" / "version_0"
    tags = scalars(log_dir)
    for tag in [
        "train/reward/jpeg_incompressibility_mean", "train/advantage/mean", "train/advantage/std", "train/ratio/mean",
        "train/clip_fraction", "train/loss", "train/approx_kl", "train/grad_norm", "train/lr", "train/time/rollout",
    ]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
        assert all(torch.isfinite(torch.tensor(tags[tag])))
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3 or checkpoint["global_step"] == 4
    initial = TinyPolicy(paradigm="flow", resolution=8).state_dict()
    trained = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    assert not torch.equal(initial["conv_out.weight"], trained["conv_out.weight"])
    assert "embedding.weight" not in trained  # frozen weights are rebuilt from the config, not saved


def final_policy(log_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    """Resume from the step-2 checkpoint of a 4-step run (as after a crash) and finish: same weights
    as the run itself, so weights, optimizer, LR schedule, prompt position and noise are restored.

    (A run that *ended* at max_steps has closed its epoch in Lightning's loop state; extending it
    starts the next epoch, with a fresh shuffle.)
    """
    every_two = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
                 "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.dirpath={tmp_path / 'every2'}"]
    run(fit_args(tmp_path / "straight", 4, *every_two))
    mid_run = tmp_path / "every2" / "epoch=0-step=2.ckpt"
    saved = torch.load(mid_run, map_location="cpu", weights_only=False)
    assert saved["PromptDataModule"]["samples_consumed"] == 2  # one batch of 2 prompts consumed
    cli = run(fit_args(tmp_path / "resumed", 4, f"--ckpt_path={mid_run}"))
    assert cli.trainer.global_step == 4
    straight = final_policy(tmp_path / "straight" / "tiny" / "version_0")
    resumed = final_policy(tmp_path / "resumed" / "tiny" / "version_0")
    at_step_two = {k: v for k, v in saved["state_dict"].items() if k.startswith("policy.")}
    assert not torch.equal(at_step_two["policy.conv_out.weight"], straight["policy.conv_out.weight"])
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=f"{name} differs after resume")


def test_console_script_help_documents_options():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "lightning_grpo", "fit", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--model.group_size", "--model.timestep_fraction", "--model.clip_range", "--model.best_of_n"):
        assert option in out.stdout
    assert "shared initial noise" in out.stdout or "initial noise" in out.stdout


def test_validate_and_test_subcommands_score_the_held_out_prompts(tmp_path):
    for subcommand, stage in (("validate", "val"), ("test", "test")):
        args = fit_args(tmp_path, 1)
        args[0] = subcommand
        args = [a for a in args if not a.startswith("--trainer.max_steps")]
        cli = run(args)
        value = cli.trainer.callback_metrics[f"{stage}/reward/jpeg_incompressibility"]
        assert torch.isfinite(value) and value > 0


def test_configured_callback_replaces_the_default_of_its_class(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_grpo.callbacks import ODEVisualizer, RewardLogger

    extra = ["--trainer.callbacks+=lightning_grpo.callbacks.ODEVisualizer", "--trainer.callbacks.every_n_steps=7",
             "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={tmp_path / 'extra'}"]
    cli = run(["-c", CONFIG, f"--trainer.logger.init_args.save_dir={tmp_path}", f"--data.init_args.train_files={PROMPTS}", *extra],
              subcommand=False)
    visualizers = [c for c in cli.trainer.callbacks if isinstance(c, ODEVisualizer)]
    assert [v.every_n_steps for v in visualizers] == [7]  # the configured one only
    assert sum(isinstance(c, RewardLogger) for c in cli.trainer.callbacks) == 1  # defaults not configured stay
    assert sum(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks) == 2  # checkpoints add up


def test_expected_lightning_warnings_are_silenced(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fit_args(tmp_path, 2, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=1",
                     f"--trainer.callbacks.dirpath={tmp_path / 'every1'}"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "module(s) in eval mode" in m or "ModelCheckpoint with manual" in m]
