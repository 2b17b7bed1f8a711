"""Issue 6 acceptance: a short `lightning-grpo fit` writes every reward/diversity/visualisation tag to
TensorBoard, held-out evaluation writes its files, and `lightning-grpo test` reports intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_grpo.callbacks import TestReport
from lightning_grpo.cli import run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.yaml")
PROMPTS = str(ROOT / "configs" / "prompts" / "tiny.txt")
REWARD = "jpeg_incompressibility"

SCALARS = [
    *(f"train/reward/{REWARD}_{s}" for s in ("mean", "std", "min", "max", "zero_var_groups")),
    *(f"train/reward_normalized/{REWARD}_{s}" for s in ("mean", "std", "min", "max")),
    "train/advantage/mean", "train/advantage/std", "train/advantage/abs_max",
    "train/ratio/mean", "train/ratio/min", "train/ratio/max", "train/clip_fraction", "train/approx_kl",
    "train/grad_norm", "train/lr",
    *(f"train/time/{p}" for p in ("rollout", "decode", "reward", "update", "samples_per_s")),
    *(f"train/diversity/{space}_{kind}" for space in ("pixel", "latent") for kind in ("within_group", "across_prompts")),
    f"heldout/{REWARD}", f"heldout/{REWARD}_ci_low", f"heldout/{REWARD}_ci_high",
]
HISTOGRAMS = [f"train/reward/{REWARD}", f"train/reward_normalized/{REWARD}", "train/advantage"]
IMAGES = ["visualization/ode_samples", "heldout/grid_before", "heldout/grid_after"]


def cli_args(subcommand: str, save_dir: Path, *extra: str) -> list[str]:
    return [
        subcommand, "-c", CONFIG, f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
        f"--data.init_args.train_files={PROMPTS}", "--model.show_progress=false", *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """Log dir of a 2-step fit with the default callbacks plus EMA and held-out evaluation."""
    root = tmp_path_factory.mktemp("fit")
    heldout = root / "heldout.txt"
    heldout.write_text("a purple hexagon\n# a comment line\na tiny orange star\n")
    run(cli_args(
        "fit", root, "--trainer.max_steps=2",
        "--trainer.callbacks+=lightning_grpo.callbacks.EMA", "--trainer.callbacks.decay=0.5",
        "--trainer.callbacks+=lightning_grpo.callbacks.HeldOutEvaluation", f"--trainer.callbacks.prompts_file={heldout}",
        "--trainer.callbacks.samples_per_prompt=2",
    ))
    return root / "tiny" / "version_0"


def test_fit_writes_every_tag(fitted: Path):
    events = EventAccumulator(str(fitted), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for kind, expected in (("scalars", SCALARS), ("histograms", HISTOGRAMS), ("images", IMAGES)):
        missing = sorted(set(expected) - set(tags[kind]))
        assert not missing, f"{kind} missing: {missing}; present: {sorted(tags[kind])}"
    for tag in SCALARS:
        values = [e.value for e in events.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), (tag, values)
    assert len(events.Scalars(f"heldout/{REWARD}")) == 2  # before and after
    assert len(events.Images("visualization/ode_samples")) >= 2  # fit start and fit end
    # the same grids in the run folder: one PNG per visualisation, named by optimizer step
    pngs = sorted(p.name for p in (fitted / "visualization").iterdir())
    assert pngs[0] == "ode_samples_step000000.png" and pngs[-1] == "ode_samples_step000002.png"
    # each TensorBoard image sits at the step its file is named by (tiny.yaml: 2 optimizer steps per
    # rollout, so the end-of-fit grid is step 2; it was logged at the rollout count, 1)
    assert [e.step for e in events.Images("visualization/ode_samples")] == [int(p[-10:-4]) for p in pngs]
    last = events.Images("visualization/ode_samples")[-1]
    from PIL import Image

    assert Image.open(fitted / "visualization" / pngs[-1]).size == (last.width, last.height)
    histogram = events.Histograms("train/advantage")[0].histogram_value
    assert histogram.num == 8  # 2 prompts × group of 4


def test_heldout_results_are_written(fitted: Path):
    for when in ("before", "after"):
        folder = fitted / f"heldout_{when}"
        assert {p.name for p in folder.iterdir()} == {"results.csv", "results.md", "grid.png"}
        rows = (folder / "results.csv").read_text().splitlines()
        assert rows[0] == f"index,prompt,sample,{REWARD}" and len(rows) == 1 + 2 * 2  # comment line skipped
    table = (fitted / "heldout_before_after.md").read_text()
    assert f"| {REWARD} |" in table and "change" in table


@pytest.mark.parametrize("from_checkpoint", [False, True])
def test_test_subcommand_reports_intervals_and_files(fitted: Path, tmp_path: Path, from_checkpoint: bool):
    extra = [f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}"] if from_checkpoint else []
    cli = run(cli_args("test", tmp_path, *extra))
    metrics = cli.trainer.callback_metrics
    mean, low, high = (float(metrics[f"test/reward/{REWARD}{s}"]) for s in ("", "_ci_low", "_ci_high"))
    assert low <= mean <= high and high > low
    folder = Path(cli.trainer.log_dir) / "test"
    assert {p.name for p in folder.iterdir()} == {"results.csv", "results.md", "grid.png"}
    result = next(c for c in cli.trainer.callbacks if isinstance(c, TestReport)).results
    assert len(result.prompts) == int(metrics[f"test/reward/{REWARD}_n"]) > 0
    assert result.summary()[REWARD][0] == pytest.approx(mean, rel=1e-5)
    if from_checkpoint:  # the trained weights were loaded (no EMA callback here: the current ones)
        base_cli = run(cli_args("test", tmp_path / "base"))
        base = next(c for c in base_cli.trainer.callbacks if isinstance(c, TestReport)).results.scores[REWARD]
        assert not torch.equal(base, result.scores[REWARD])
