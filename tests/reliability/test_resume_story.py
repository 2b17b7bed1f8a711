"""A resumed run tells the same story as an uninterrupted one (issue 28, acceptance 4): the held-out
"before" is the base policy's, the visualiser's "step 0" samples are the true step-0 samples, and
the reward-hacking monitor keeps the base as its baseline. Through the CLI on the tiny config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_grpo.cli import run

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")


def story_args(save_dir: Path, max_steps: int, *extra: str) -> list[str]:
    """The tiny config with the three callbacks that tell the story, and a checkpoint every 2 steps."""
    return [
        "fit", "-c", TINY, f"--trainer.max_steps={max_steps}", f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false", f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false",
        "--seed_everything=1",
        "--trainer.callbacks+=lightning_grpo.callbacks.HeldOutEvaluation", f"--trainer.callbacks.prompts_file={PROMPTS}",
        "--trainer.callbacks.max_prompts=6", "--trainer.callbacks.samples_per_prompt=2", "--trainer.callbacks.batch_size=12",
        "--trainer.callbacks+=lightning_grpo.callbacks.RewardHackingMonitor", f"--trainer.callbacks.prompts_file={PROMPTS}",
        "--trainer.callbacks.max_prompts=4", "--trainer.callbacks.samples_per_prompt=2", "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks+=lightning_grpo.callbacks.ODEVisualizer", "--trainer.callbacks.num_prompts=3",
        "--trainer.callbacks.every_n_steps=2",
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.dirpath={save_dir / 'every2'}",
        *extra,
    ]


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert found, f"no {pattern} under {folder}"
    return found[-1]


def csv_row(path: Path, step: int) -> dict[str, str]:
    rows = [r for r in csv.DictReader(path.open()) if r["step"] == str(step)]
    assert rows, f"no step {step} in {path}"
    return rows[-1]


@pytest.mark.timeout(600)
def test_a_resumed_run_reports_the_same_before_after_story(tmp_path):
    run(story_args(tmp_path / "straight", 4))
    mid_run = tmp_path / "straight" / "every2" / "epoch=0-step=2.ckpt"
    cli = run(story_args(tmp_path / "resumed", 4, f"--ckpt_path={mid_run}"))
    assert cli.trainer.global_step == 4
    straight, resumed = tmp_path / "straight" / "tiny", tmp_path / "resumed" / "tiny"

    # the held-out table: "before" is the base policy's in both, so the whole table matches
    table = one(straight, "heldout_before_after.md").read_text()
    assert "Artifact and drift measures" in table
    assert one(resumed, "heldout_before_after.md").read_text() == table
    assert not list(resumed.rglob("heldout_before/results.csv"))  # "before" was not evaluated again

    # the visualiser: the step-4 grid (step-0 block | step-4 block, with their titles) is the same
    # image; the resumed run drew no new "step 0" at its start (step 2)
    grid = one(straight, "ode_samples_step000004.png")
    from PIL import Image
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(one(resumed, "ode_samples_step000004.png"))))
    assert not list(resumed.rglob("ode_samples_step000002.png"))

    # the monitor: its step-4 row (values, bands from the base, gaps since the base) is the same
    row_straight = csv_row(one(straight, "reward_hacking.csv"), 4)
    row_resumed = csv_row(one(resumed, "reward_hacking.csv"), 4)
    assert row_resumed == row_straight
    state = torch.load(one(resumed, "last.ckpt"), map_location="cpu", weights_only=False)["callbacks"]
    monitor_state = next(v for k, v in state.items() if k.startswith("RewardHackingMonitor"))
    assert [step for step, _ in monitor_state["history"]] == [0, 2, 4]
