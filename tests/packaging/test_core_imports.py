"""The library core imports neither the worlds nor the test support (issue 30): importing
`lightning_grpo` and each of its own modules (module, cli, catalog, ...), and every module of its
objectives, samplers, policies (every family and the registry), rewards, callbacks, datamodules
(and grpo) packages leaves
`lightning_grpo.worlds` and `lightning_grpo.testing` out of `sys.modules`. Configs and tests name
world classes and stand-in builders by path; they are imported only when used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ["lightning_grpo", "lightning_grpo.module", "lightning_grpo.objectives", "lightning_grpo.samplers",
        "lightning_grpo.policies", "lightning_grpo.rewards", "lightning_grpo.callbacks", "lightning_grpo.datamodules",
        "lightning_grpo.grpo"]
APART = ("lightning_grpo.worlds", "lightning_grpo.testing")

IMPORT_CORE = """
import importlib, json, pkgutil, sys
core, apart = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
for name in core:
    module = importlib.import_module(name)
    if name == "lightning_grpo":  # its own modules; its subpackages are the other entries (or apart)
        infos = [i for i in pkgutil.iter_modules(module.__path__, prefix="lightning_grpo.") if not i.ispkg]
    else:
        infos = list(pkgutil.walk_packages(getattr(module, "__path__", []), prefix=name + "."))
    for info in infos:
        assert not info.name.startswith(apart), info.name
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.timeout(300)
def test_the_core_imports_neither_the_worlds_nor_the_test_support(tmp_path):
    done = subprocess.run([sys.executable, "-c", IMPORT_CORE, json.dumps(CORE), json.dumps(APART)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env={"HF_HUB_OFFLINE": "1", "PATH": "", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert "lightning_grpo.policies.registry" in imported and "lightning_grpo.module" in imported  # it did walk the core
    leaked = [name for name in imported if name.startswith(APART)]
    assert not leaked, f"the core imported {leaked}"
