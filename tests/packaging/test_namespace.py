"""Installed layout: callbacks/ and datamodules/ live at the top of the repository but install
only as lightning_grpo.callbacks / lightning_grpo.datamodules (issue 10, item 7): modules named
`callbacks` or `datamodules` at the top of site-packages would collide with other projects."""

import os
import subprocess
import sys

CODE = """
import importlib, sys
sys.path = [p for p in sys.path if p not in ('', '.')]  # only what the install provides
for bare in ('callbacks', 'datamodules'):
    try:
        importlib.import_module(bare)
    except ImportError:
        pass
    else:
        raise SystemExit(f'top-level module {bare!r} is importable after install')
import lightning_grpo.callbacks, lightning_grpo.datamodules
from lightning_grpo.callbacks import ODEVisualizer
from lightning_grpo.datamodules.prompts import PromptDataModule
print('ok')
"""


def test_only_the_project_namespace_is_installed(tmp_path):
    # run from an unrelated folder so the repository root is not on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # what the install gives, nothing else
    out = subprocess.run([sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.strip().endswith("ok")
