"""Family knowledge lives in the family: no library module outside `lightning_grpo/policies/` names a
policy class (issue 30, acceptance 3).

The library is every Python file of the `lightning_grpo` package outside `policies/` and the test
support `testing/` (whose stand-ins are per family, like the tests), and of the `callbacks/` and
`datamodules/` folders it installs. Docs, configs, tests and the benchmark scripts (which measure
particular families) may name them. A module that needs a family's knowledge asks
the policy (`uses_cfg_with`, `geometry_steps`, `config_geometry`, `block_classes`, `fsdp_roots`,
`geometry_arguments`, `published_config`) or the registry (`lightning_grpo.policies.registry`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import lightning_grpo.policies as policies
from lightning_grpo.policies.base import PolicyAdapter

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_grpo"
LIBRARY_FOLDERS = (PACKAGE, ROOT / "callbacks", ROOT / "datamodules")


def policy_class_names() -> set[str]:
    """The concrete policy classes defined in `lightning_grpo/policies/` (the families and the
    weight-free tiny policy; not the abstract contracts every module may use)."""
    names = set()
    for info in pkgutil.iter_modules(policies.__path__, f"{policies.__name__}."):
        for obj in vars(importlib.import_module(info.name)).values():
            if inspect.isclass(obj) and issubclass(obj, PolicyAdapter) and obj.__module__ == info.name and not inspect.isabstract(obj):
                names.add(obj.__name__)
    return names


def library_files() -> list[Path]:
    """Every .py file of the library outside policies/ and testing/ (each file once, by its real path)."""
    files = set()
    for folder in LIBRARY_FOLDERS:
        for path in folder.rglob("*.py"):
            real = path.resolve()
            if (PACKAGE / "policies") in real.parents or (PACKAGE / "testing") in real.parents:
                continue
            files.add(real)
    return sorted(files)


def mentions(path: Path, names: set[str]) -> list[str]:
    text = path.read_text()
    return sorted(name for name in names if re.search(rf"\b{re.escape(name)}\b", text))


def test_the_scan_sees_every_policy_class_and_the_library():
    names = policy_class_names()
    assert {"FluxPolicy", "StableDiffusionPolicy", "HunyuanVideoPolicy", "SkyReelsI2VPolicy", "TinyPolicy"} <= names
    assert not names & {"PolicyAdapter", "DiffusersPolicy", "FlowMatchingFamily"}  # the contracts are not families
    files = library_files()
    assert PACKAGE / "module.py" in files and ROOT / "callbacks" / "ema.py" in files
    # the scan can fail: each family's own file names its class
    assert mentions(PACKAGE / "policies" / "flux.py", names) == ["FluxPolicy"]


def test_no_library_module_outside_policies_names_a_policy_class():
    names = policy_class_names()
    offenders = {str(path.relative_to(ROOT)): found for path in library_files() if (found := mentions(path, names))}
    assert not offenders, f"library modules naming policy classes (ask the family or the registry instead): {offenders}"
