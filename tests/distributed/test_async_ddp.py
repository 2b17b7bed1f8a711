"""`async_scoring` on two processes (DDP, gloo): every rank's pending rollout is gathered into the
checkpoint, and a resume from it equals the uninterrupted run (tests/distributed/async_ddp_run.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_grpo.module import ASYNC_SCORING_KEY

ROOT = Path(__file__).parents[2]
SCRIPT = Path(__file__).parent / "async_ddp_run.py"


def fit(out: Path, steps: int, *extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--devices", "2", "--steps", str(steps), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_ranks_resume_exactly_from_the_gathered_pending_rollouts(tmp_path):
    short = fit(tmp_path / "short", 4)
    entry = short[ASYNC_SCORING_KEY]
    assert short["global_step"] == 4 and entry["world_size"] == 2 and len(entry["ranks"]) == 2
    prompts = [set(rank["trajectories"]["prompts"]) for rank in entry["ranks"]]
    assert all(len(p) == 2 for p in prompts) and not prompts[0] & prompts[1]  # each rank's own 2 prompts × G
    resumed = fit(tmp_path / "resumed", 8, "--ckpt", str(tmp_path / "short" / "checkpoints" / "last.ckpt"))
    straight = fit(tmp_path / "straight", 8)
    assert resumed["global_step"] == straight["global_step"] == 8
    policy = [k for k in straight["state_dict"] if k.startswith("policy.")]
    assert policy and any(not torch.equal(straight["state_dict"][k], short["state_dict"][k]) for k in policy)
    for name in policy:
        assert torch.equal(resumed["state_dict"][name], straight["state_dict"][name]), f"{name} differs after the 2-rank resume"
