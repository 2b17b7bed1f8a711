"""bench/demo_learning.py over seeds: argument checks, the summary's figures by hand, and a real
two-seed run of the FLUX demo through the script's command line (slow)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_grpo.evaluation import EvaluationResult

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "demo_learning.py"
spec = importlib.util.spec_from_file_location("demo_learning", SCRIPT)
demo_learning = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = demo_learning
spec.loader.exec_module(demo_learning)


def test_seed_and_split_lists_are_checked() -> None:
    assert demo_learning.seed_list("0,1,2") == [0, 1, 2]
    for bad in ("0,a", "1,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            demo_learning.seed_list(bad)
    assert demo_learning.split_list("both") == ["new_combinations", "both"]  # the gain is read on new combinations
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown held-out split\(s\) \['old'\]"):
        demo_learning.split_list("old,both")
    with pytest.raises(SystemExit):
        demo_learning.parse_args(["--seeds", "0,1", "--ckpt-path", "x.ckpt"])
    with pytest.raises(SystemExit):
        demo_learning.parse_args(["--seeds", "0,1", "--", "--seed_everything=3"])


def test_checkpoint_lists_are_checked(tmp_path, capsys) -> None:
    """--checkpoints: existing files, one per seed, never with --ckpt-path; each error names its cause."""
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"x"), b.write_bytes(b"x")
    assert demo_learning.checkpoint_list(f"{a},{b}") == [a, b]
    with pytest.raises(argparse.ArgumentTypeError, match="not found: .*missing.ckpt"):
        demo_learning.checkpoint_list(f"{a},{tmp_path / 'missing.ckpt'}")
    args, _ = demo_learning.parse_args(["--seeds", "0,1", "--checkpoints", f"{a},{b}"])
    assert args.checkpoints == [a, b]
    for argv, cause in ((["--seeds", "0,1,2", "--checkpoints", f"{a},{b}"], "2 checkpoint(s) for 3 run(s)"),
                        (["--checkpoints", f"{a},{b}"], "2 checkpoint(s) for 1 run(s)"),
                        (["--checkpoints", str(a), "--ckpt-path", str(b)], "cannot be combined with --ckpt-path")):
        with pytest.raises(SystemExit):
            demo_learning.parse_args(argv)
        assert cause in capsys.readouterr().err


def _result(values: list[float], name: str = "exact_match") -> EvaluationResult:
    return EvaluationResult(prompts=["p"] * len(values), scores={name: torch.tensor(values, dtype=torch.float32)})


def test_seed_summary_by_hand(capsys) -> None:
    """Base 1 of 4 right (25%); seed 3 gets 2 of 4 (+25 points), seed 5 gets 3 of 4 (+50): minimum +25,
    mean +37.5 = the pooled 5 of 8 (62.5%) minus the base. Wilson 95% intervals: base [4.6, 69.9],
    pooled [30.6, 86.3] overlap. The mean is the last line printed."""
    summary = demo_learning.seed_summary("flux", [3, 5], _result([1, 0, 0, 0]), [_result([1, 1, 0, 0]), _result([1, 1, 1, 0])])
    s = summary["exact_match"]
    assert s["per_seed"] == pytest.approx([25.0, 50.0]) and s["min"] == pytest.approx(25.0) and s["mean"] == pytest.approx(37.5)
    assert s["after_pooled"]["mean"] == pytest.approx(0.625) and s["after_pooled"]["n"] == 8
    assert s["before"]["ci95"] == pytest.approx([0.0456, 0.6994], abs=1e-3)
    assert s["after_pooled"]["ci95"] == pytest.approx([0.3057, 0.8632], abs=1e-3)
    assert s["intervals_overlap"]
    assert demo_learning.print_seed_summary("flux", summary) == pytest.approx(37.5)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "mean gain over seeds 3,5 (new combinations, exact_match): +37.5 points"
    assert lines[-2] == "minimum over seeds (new combinations, exact_match): +25.0 points"
    assert lines[-4:-2] == ["seed 3: gain (new combinations, exact_match) +25.0 points",
                            "seed 5: gain (new combinations, exact_match) +50.0 points"]


def test_seed_summary_of_graded_measures_is_in_their_units() -> None:
    """A non-0/1 measure (appearance dense) is summarised in its own units, not points."""
    name = "appearance_dense"
    summary = demo_learning.seed_summary("i2v", [0, 1], _result([0.5, 0.5], name), [_result([0.25, 0.25], name), _result([0.5, 1.0], name)])
    assert summary[name]["per_seed"] == pytest.approx([-0.25, 0.25]) and not summary[name]["points"]
    assert set(summary) == {name}  # only the measures the evaluation has


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two subprocesses, each with its own 850 s limit
def test_two_seeds_through_the_command_line(tmp_path) -> None:
    """The FLUX demo, 1 optimizer step per seed on tiny groups, new combinations only: each seed trains
    its own run (distinct run folders), the base is evaluated once, every seed's artifact measures
    and grids are written, and the JSON and the printed summary agree; the mean is the last line."""
    out = tmp_path / "seeds.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--seeds", "0,1", "--splits", "new_combinations", "--samples-per-prompt", "1",
               "--json", str(out), "--grids", str(tmp_path / "grids"), "--", f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=1",
               "--model.group_size=2", "--data.init_args.batch_size=2", "--model.micro_batch_size=4", "--model.samples_per_update=4"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    runs = figures["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["optimizer_steps"] == 1 for r in runs)
    assert len({r["run_dir"] for r in runs}) == 2
    assert list(runs[0]["splits"]) == ["new_combinations"]
    s = figures["summary"]["exact_match"]
    gains = [r["splits"]["new_combinations"]["exact_match"]["change"] for r in runs]
    assert s["per_seed"] == pytest.approx(gains, abs=1e-4) and s["mean"] == pytest.approx(sum(gains) / 2, abs=1e-4)
    assert s["before"]["n"] == 80 and s["after_pooled"]["n"] == 160
    # the artifact measures of each seed's samples against the base's band, and the grids
    assert {"periodic_energy", "background_energy", "chroma", "luminance", "hue_shift", "kid"} <= set(runs[0]["artifacts"])
    assert set(figures["artifacts_outside"]) == {"0", "1"}
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["after_seed0.png", "after_seed1.png", "before.png"]
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"mean gain over seeds 0,1 (new combinations, exact_match): {s['mean']:+.1f} points"

    # --checkpoints judges the two finished runs again without training: the same figures
    judged = tmp_path / "judged.json"
    checkpoints = ",".join(str(Path(r["run_dir"]) / "checkpoints" / "last.ckpt") for r in runs)
    command = [sys.executable, str(SCRIPT), "--seeds", "0,1", "--checkpoints", checkpoints, "--splits", "new_combinations",
               "--samples-per-prompt", "1", "--json", str(judged), "--", f"--trainer.logger.init_args.save_dir={tmp_path / 'judge'}",
               "--model.group_size=2", "--data.init_args.batch_size=2", "--model.micro_batch_size=4", "--model.samples_per_update=4"]
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert again.returncode == 0, again.stderr[-3000:]
    rejudged = json.loads(judged.read_text())
    assert [r["optimizer_steps"] for r in rejudged["runs"]] == [1, 1] and [r["train_seconds"] for r in rejudged["runs"]] == [None, None]
    for run, rerun in zip(runs, rejudged["runs"]):
        assert rerun["splits"] == run["splits"] and rerun["artifacts"] == run["artifacts"]
    assert not (tmp_path / "judge").exists()  # nothing trained, no run folder written
