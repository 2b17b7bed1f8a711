"""SIGTERM / SIGINT during `lightning-grpo fit` (a real subprocess): non-zero exit, a checkpoint of
the last completed step, and a resume that logs the same metrics as a run never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")
STEPS, STOP_AT = 8, 4  # tiny.yaml: 2 optimizer steps per rollout, so steps 2, 4, 6, 8


def fit_command(save_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lightning_grpo", "fit", "-c", CONFIG, f"--trainer.max_steps={STEPS}", "--seed_everything=3",
        f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
        f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra,
    ]


def environment() -> dict[str, str]:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])  # stop_helpers; the package comes from the install
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def interrupt(tmp_path: Path, signum: int) -> tuple[int, Path, str]:
    """Start a fit that pauses after step STOP_AT, send `signum` there, return (status, log dir, output)."""
    marker = tmp_path / "reached"
    pause = ["--trainer.callbacks+=stop_helpers.PauseAtStep", f"--trainer.callbacks.marker={marker}", f"--trainer.callbacks.step={STOP_AT}"]
    log = open(tmp_path / "interrupted.log", "w")
    process = subprocess.Popen(fit_command(tmp_path / "interrupted", *pause), stdout=log, stderr=subprocess.STDOUT, env=environment())
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, (tmp_path / "interrupted.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the pause step"
            time.sleep(0.2)
        process.send_signal(signum)
        status = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    return status, tmp_path / "interrupted" / "tiny" / "version_0", (tmp_path / "interrupted.log").read_text()


def test_sigterm_saves_the_last_completed_step_exits_non_zero_and_resumes_exactly(tmp_path):
    """SIGTERM at step 4, then the same command with `--ckpt_path=last` (what a requeue script
    runs): it continues from step 4 in the same run folder, and the folder's curves (both runs'
    event files) and final weights are those of a run never stopped."""
    status, log_dir, output = interrupt(tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, output[-3000:]
    last = log_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STOP_AT  # the step that finished when the signal came
    assert checkpoint["PromptDataModule"]["samples_consumed"] == STOP_AT // 2 * 2  # 2 prompts per rollout
    assert f"resume with --ckpt_path={last}" in output
    # one clear line when the signal arrives, one when the run stops: not Lightning's "Received
    # SIGTERM: 15" nor its empty "SIGTERMException was raised with message:"
    assert output.count("SIGTERM: stopping after the current step or evaluation batch and saving a checkpoint") == 1, output[-3000:]
    assert "Received SIGTERM" not in output and "was raised with message" not in output, output[-3000:]

    env = environment()
    resumed = subprocess.run(fit_command(tmp_path / "interrupted", "--ckpt_path=last"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr
    assert sorted(p.name for p in log_dir.parent.iterdir()) == ["version_0"]  # appended to the run's folder
    subprocess.run(fit_command(tmp_path / "straight"), check=True, env=env, capture_output=True, timeout=600)
    both, straight = scalars(log_dir), scalars(tmp_path / "straight" / "tiny" / "version_0")
    for tag in ("train/loss", "train/reward/jpeg_incompressibility_mean", "train/grad_norm", "train/approx_kl"):
        assert both[tag] == straight[tag] and len(straight[tag]) == STEPS // 2, f"{tag}: stopped + resumed {both[tag]} vs uninterrupted {straight[tag]}"
    end_resumed = torch.load(last, weights_only=False)
    end_straight = torch.load(tmp_path / "straight" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert end_resumed["global_step"] == end_straight["global_step"] == STEPS
    for name, value in end_straight["state_dict"].items():
        assert torch.equal(end_resumed["state_dict"][name], value), name


def test_sigint_finishes_the_step_saves_it_and_exits_130(tmp_path):
    status, log_dir, output = interrupt(tmp_path, signal.SIGINT)
    assert status == 128 + signal.SIGINT, output[-3000:]
    assert output.count("SIGINT (Ctrl+C): stopping after the current step or evaluation batch and saving a checkpoint") == 1, output[-3000:]
    assert "SIGTERM" not in output and "was raised with message" not in output, output[-3000:]  # the forwarded signal is not shown
    assert f"resume with --ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}" in output
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == STOP_AT


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_before_training_starts_still_exits_non_zero(tmp_path, signum):
    """During start-up (imports, model loading) nothing can be saved; the exit must not be 0."""
    process = subprocess.Popen(fit_command(tmp_path / "early"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    time.sleep(0.5)
    process.send_signal(signum)
    assert process.wait(timeout=300) != 0
