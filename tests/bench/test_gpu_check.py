"""bench/gpu_check.py at reduced size on the CPU: the same script the GPU run is, one command; its
measured peaks (real tensors, the estimate's tracker) agree with the estimate (fake tensors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_gpu_check_runs_on_the_cpu_at_reduced_size_and_prints_the_ratio_last():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--reduced", "--device", "cpu", "--steps", "2"],
        capture_output=True, text=True, timeout=380, cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("reduced FLUX transformer + LoRA r=4 on cpu")
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:4]}
    assert set(rows) == {"rollout", "update"}
    for measured, estimated, ratio, seconds in rows.values():
        assert measured > 0 and estimated > 0 and seconds > 0
        assert abs(ratio - measured / estimated) < 0.02
    assert lines[-1].startswith("measured / estimate of the peak phase")
    ratio = float(lines[-1].rsplit(":", 1)[1])
    assert 0.8 <= ratio <= 1.25, out.stdout
