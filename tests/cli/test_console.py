"""Third-party noise is filtered at the CLI and `--verbose` brings it back (`lightning_grpo.console`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_grpo.console import QUIET_LOGS, QUIET_WARNINGS, verbose_requested

ROOT = Path(__file__).resolve().parents[2]


def test_verbose_is_taken_from_the_arguments_or_the_environment(monkeypatch):
    monkeypatch.delenv("LIGHTNING_GRPO_VERBOSE", raising=False)
    assert verbose_requested(["fit", "-c", "x.yaml", "--verbose"]) == (True, ["fit", "-c", "x.yaml"])
    assert verbose_requested(["--verbose", "fit"]) == (True, ["fit"])
    assert verbose_requested(["fit"]) == (False, ["fit"])
    monkeypatch.setenv("LIGHTNING_GRPO_VERBOSE", "1")
    assert verbose_requested(["fit"]) == (True, ["fit"])
    monkeypatch.setenv("LIGHTNING_GRPO_VERBOSE", "0")
    assert verbose_requested(["fit"]) == (False, ["fit"])


def test_every_filter_says_why():
    for noise in (*QUIET_WARNINGS, *QUIET_LOGS):
        assert noise.source and noise.pattern and len(noise.reason) > 20, noise


@pytest.mark.timeout(900)
def test_verbose_shows_what_the_quiet_default_filters(tmp_path):
    """Lightning's litmodels tip (an INFO line on every fit) and its treespec deprecation warning are
    gone by default, back with --verbose."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTNING_GRPO_VERBOSE", None)
    outputs = {}
    for flag in ([], ["--verbose"]):
        command = [sys.executable, "-m", "lightning_grpo", *flag, "fit", "-c", "configs/tiny.yaml", "--trainer.max_steps=2",
                   f"--trainer.logger.init_args.save_dir={tmp_path / str(bool(flag))}"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[bool(flag)] = result.stdout + result.stderr
    # which filtered lines a run shows depends on the Lightning version (2.6.0 prints the treespec
    # deprecation, 2.6.6 the litmodels tip): at least one shows with --verbose, none without
    shown = [marker for marker in ("💡 Tip", "isinstance(treespec, LeafSpec)` is deprecated") if marker in outputs[True]]
    assert shown, outputs[True][-3000:]
    assert not any(marker in outputs[False] for marker in shown), outputs[False][-3000:]
    assert not any("LightningCLI's args parameter" in out for out in outputs.values())  # expected, not noise: never shown
