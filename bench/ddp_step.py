"""Time per GRPO step with 1 and 2 CPU processes (gloo DDP), and gradient all-reduces per step
before and after issue 14 (accumulation micro-steps under DDP's no_sync).

Runs tests/distributed/ddp_run.py (tiny FLUX stand-in of tests/policies/tiny.py, 2 prompts × G = 4
per rank, 3 sampling steps, 2 of them trained, micro-batches of 2: 8 backward passes per
optimizer step) three times: 1 process, 2 processes, 2 processes with an all-reduce at every
backward (the old behaviour, `--sync-every-backward`). Time per step = mean over the steps after
the first (start-up excluded). All-reduces are counted by a DDP communication hook.

    OMP_NUM_THREADS=1 python bench/ddp_step.py [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "policies"))


def run(tmp: Path, tag: str, devices: int, steps: int, *extra: str) -> list[list[dict]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "tests" / "distributed" / "ddp_run.py"), "--flux", str(tmp / "flux"), "--out", str(tmp),
               "--tag", tag, "--devices", str(devices), "--steps", str(steps), "--prompts", str(tmp / "prompts.txt"), *extra]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return [torch.load(f, weights_only=False)["steps"] for f in sorted(tmp.glob(f"{tag}_rank_*.pt"))]


def per_step(rank: list[dict]) -> float:
    return (rank[-1]["seconds"] - rank[0]["seconds"]) / (len(rank) - 1)


def allreduces_per_step(rank: list[dict]) -> float:
    return (rank[-1]["allreduces"] - rank[0]["allreduces"]) / (len(rank) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from tiny import build_tiny_flux

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        build_tiny_flux(tmp / "flux")
        prompts = [f"a {c} {s}" for c in ("red", "blue", "cat", "dog") for s in ("circle", "square", "sofa", "photo")] * 4
        (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
        one = run(tmp, "one", 1, args.steps)
        after = run(tmp, "after", 2, args.steps)
        before = run(tmp, "before", 2, args.steps, "--sync-every-backward")
    print(f"1 process : {per_step(one[0]):.3f} s/step (8 samples)")
    print(f"2 processes: {max(per_step(r) for r in after):.3f} s/step (8 samples per rank), one all-reduce per optimizer step")
    print(f"2 processes: {max(per_step(r) for r in before):.3f} s/step with an all-reduce at every backward (before)")
    print(f"gradient all-reduces per optimizer step: before {allreduces_per_step(before[0]):.0f}, after {allreduces_per_step(after[0]):.0f}")
    print(f"2-process / 1-process time per step: {max(per_step(r) for r in after) / per_step(one[0]):.3f}")


if __name__ == "__main__":
    main()
