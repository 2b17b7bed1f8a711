"""bench/time_to_accuracy.py: time to target, the table and the key ratio from progress lines."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "time_to_accuracy.py"
spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
tta = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tta  # its dataclasses look their module up
spec.loader.exec_module(tta)

LOG = """
  [full SDE] rollouts    0  train     0.0 s wall     0.0 s cpu  calls      0  held-out exact match  25.0%
  [branching] rollouts    0  train     0.0 s wall     0.0 s cpu  calls      0  held-out exact match  25.0%
  [full SDE] rollouts   10  train    30.0 s wall    10.0 s cpu  calls    120  held-out exact match  40.0%
  [branching] rollouts   10  train    20.0 s wall     8.0 s cpu  calls    100  held-out exact match  46.0%
  [full SDE] rollouts   20  train    60.0 s wall    20.0 s cpu  calls    240  held-out exact match  45.0%
  [branching] rollouts   20  train    40.0 s wall    16.0 s cpu  calls    200  held-out exact match  30.0%
  [full SDE] rollouts   30  train    90.0 s wall    30.0 s cpu  calls    360  held-out exact match  50.0%
"""


def test_time_to_target_table_and_key_ratio_from_a_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(LOG)
    curves = tta.curves_from_log(log, ["full SDE", "mixed window", "branching"], budget=25.0, clock="cpu")
    assert [c.name for c in curves] == ["full SDE", "branching"]  # cut at 25 s cpu: full SDE's 30 s point is out
    assert [p.rollouts for p in curves[0].points] == [0, 10, 20]
    target = 0.25 + 0.20
    assert curves[0].first_reaching(target).rollouts == 20  # 45% >= 45%: the first point at or above
    assert curves[1].first_reaching(target).rollouts == 10
    text = tta.table(curves, 0.25, target, 25.0, "cpu")
    assert "| full SDE | 12.0 | 20 | 240 | 60.0 s | 20.0 s | 20 | 45.0% | 45.0% |" in text
    assert "| branching | 10.0 | 10 | 100 | 20.0 s | 8.0 s | 20 | 30.0% | 46.0% |" in text
    ratio = tta.key_ratio(curves, target, 25.0)
    assert ratio.startswith("branching: denoiser calls to target 0.42x full SDE") and "= 0.40x full SDE (60% less)" in ratio
    # full SDE never reaching the target: the ratio is a bound against the budget
    assert "<= 0.32x" in tta.key_ratio([curves[0], curves[1]], 0.455, 25.0)


def test_the_nft_ratio_compares_diffusion_nft_with_full_sde_grpo(tmp_path):
    """NFT at target after 12 s cpu, full SDE after 20 s: 0.60x; the GRPO key ratio leaves NFT out;
    where GRPO never reaches the target, NFT's ratio is a bound against the budget."""
    log = tmp_path / "run.log"
    log.write_text(LOG + """
  [DiffusionNFT] rollouts    0  train     0.0 s wall     0.0 s cpu  calls      0  held-out exact match  25.0%
  [DiffusionNFT] rollouts   10  train    36.0 s wall    12.0 s cpu  calls    160  held-out exact match  50.0%
""")
    curves = tta.curves_from_log(log, ["full SDE", "branching", "DiffusionNFT"], budget=25.0, clock="cpu")
    target = 0.45
    ratio = tta.nft_ratio(curves, target, 25.0, "cpu")
    assert ratio == "DiffusionNFT vs GRPO (full SDE): time to target 12.0 s vs 20.0 s cpu = 0.60x GRPO; denoiser calls 0.67x"
    assert tta.key_ratio(curves, target, 25.0).startswith("branching:")  # NFT is not a GRPO variant
    assert "<= 0.48x GRPO" in tta.nft_ratio(curves, 0.48, 25.0, "cpu")  # full SDE's best is 45%: not reached
    assert "needs both" in tta.nft_ratio(curves[:2], target, 25.0, "cpu")


def test_every_variant_is_a_valid_command_line():
    """The DiffusionNFT variant names the objective by its short name and sets its beta; every
    variant states its step schedule and KL weight, whatever configs/demo.yaml chooses (the demo
    is the branching schedule with KL since issue 28: "full SDE" must not inherit it)."""
    chosen = tta.variants(2, 25, 2, 0.4, nft_beta=0.1)
    assert list(chosen) == ["full SDE", "mixed window", "mixed window + 2nd-order tail", "branching", "DiffusionNFT"]
    assert chosen["DiffusionNFT"][:2] == ["--model.objective=DiffusionNFT", "--model.objective.init_args.beta=0.1"]
    for name, overrides in chosen.items():
        assert "--model.kl_beta=0" in overrides, name
        assert any(o.startswith("--model.step_schedule=") for o in overrides), name
    assert "--model.step_schedule=null" in chosen["full SDE"] and "--model.step_schedule=null" in chosen["DiffusionNFT"]
