"""The shapes-world demos run end to end on the SHIPPED toy pipelines: a short CPU fit of each family
through `lightning-grpo fit -c configs/demo*.yaml`, with the held-out evaluation before and after."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lightning_grpo.callbacks import HeldOutEvaluation
from lightning_grpo.cli import run

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = ROOT / "lightning_grpo" / "toy" / "pretrained"
SHIPPED_BUDGET_BYTES = 12 * 1000 * 1000  # issue 4: both pipelines together at most 12 MB


def _short_fit(config: str, tmp_path: Path):
    return run([
        "fit", "-c", str(ROOT / "configs" / config),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_steps=2", "--model.group_size=2", "--data.init_args.batch_size=2",
        "--model.micro_batch_size=4", "--model.samples_per_update=4",
    ])


@pytest.mark.parametrize("config,denoiser", [("demo.yaml", "transformer"), ("demo_sd.yaml", "unet")])
def test_demo_fits_on_the_shipped_pipeline(tmp_path, monkeypatch, config, denoiser):
    monkeypatch.chdir(ROOT)  # the configs name repository-relative paths, as the README runs them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = _short_fit(config, tmp_path)
    # the policy stays in eval mode on purpose: Lightning's warning about it is silenced
    assert not [w for w in caught if "module(s) in eval mode" in str(w.message)]
    assert cli.trainer.global_step == 2
    trained = getattr(cli.model.policy, denoiser)
    base = type(trained).from_pretrained(PRETRAINED / ("flux" if denoiser == "transformer" else "sd") / denoiser)
    moved = any(not torch.equal(p, q.float()) for p, q in zip(trained.parameters(), base.parameters()))
    assert moved  # GRPO updated the pretrained denoiser
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, HeldOutEvaluation))
    assert set(evaluation.results) == {"before", "after"}
    assert evaluation.results["before"].summary()["exact_match"][3] == 160  # 80 held-out prompts × 2


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_shipped_pipeline_leaves_room_to_learn(family):
    report = json.loads((PRETRAINED / family / "pretrain_report.json").read_text())
    assert report["heldout"]["samples"] >= 256
    assert 0.15 <= report["heldout"]["exact_match"] <= 0.70


def test_shipped_pipelines_fit_the_size_budget():
    total = sum(f.stat().st_size for family in ("flux", "sd") for f in (PRETRAINED / family).rglob("*") if f.is_file())
    assert 0 < total <= SHIPPED_BUDGET_BYTES
