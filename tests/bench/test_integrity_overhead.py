"""bench/integrity_overhead.py runs at a small size and prints its key ratio last."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_integrity_overhead_prints_both_ratios_guard_last():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "integrity_overhead.py"), "--megabytes", "2", "--params-millions", "0.2", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"verify / load: \d+\.\d\d", lines[1]), result.stdout
    assert re.fullmatch(r"guard / optimizer step: \d+\.\d{3}", lines[-1]), result.stdout
