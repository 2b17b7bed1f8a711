"""Installed layout: callbacks/ and datamodules/ live at the top of the repository but install
only as lightning_grpo.callbacks / lightning_grpo.datamodules (issue 10, item 7), through
pyproject.toml's package-dir mapping, without symlinks (issue 30, item 4): modules named
`callbacks` or `datamodules` at the top of site-packages would collide with other projects, and a
module importable under two names has two copies of every class."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the folders whose .py files make up the installed package (pyproject's package-dir and packages)
SOURCE_FOLDERS = {"lightning_grpo": ROOT / "lightning_grpo", "lightning_grpo.callbacks": ROOT / "callbacks",
                  "lightning_grpo.datamodules": ROOT / "datamodules"}
NOT_IN_GIT = {".git", ".venv", ".venv-floors", "mutants", "mutation", "build", "dist", "runs", "lightning_logs", "outputs", "__pycache__"}

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


def test_no_symlinks_in_the_repository():
    """Symlinks break on Windows checkouts and in tools that copy the sources file by file (mutmut)."""
    links = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (Path(folder) == ROOT and d in NOT_IN_GIT) and d != "__pycache__"]
        links += [Path(folder, name).relative_to(ROOT) for name in dirs + files if Path(folder, name).is_symlink()]
    assert links == []


def test_every_source_folder_is_a_listed_package():
    """pyproject lists the packages (setuptools cannot find packages and add mapped ones at once):
    a folder of .py files missing from the list would be left out of the wheel, while the editable
    install and the tests still see it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    assert mapped == {k: v for k, v in SOURCE_FOLDERS.items() if k != "lightning_grpo"}
    on_disk = set()
    for name, top in SOURCE_FOLDERS.items():
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d != "__pycache__" and d != "pretrained"]
            if any(f.endswith(".py") for f in files):
                on_disk.add(".".join([name, *Path(folder).relative_to(top).parts]))
    assert on_disk == set(setuptools["packages"])


ONE_IDENTITY = """
import importlib, pkgutil, sys
from pathlib import Path
import lightning_grpo, lightning_grpo.callbacks, lightning_grpo.datamodules
from lightning_grpo.cli import run

# the repository root is on sys.path here (as in the tests): the bare names still must not import
for bare in ("callbacks", "datamodules.streaming"):
    try:
        importlib.import_module(bare)
    except ImportError as error:
        assert "lightning_grpo." + bare.split(".")[0] in str(error), error
    else:
        raise SystemExit(f"{bare} imports beside lightning_grpo.{bare}")

# the CLI builds the callbacks and the datamodule of a recipe from its class paths
cli = run(["-c", "configs/tiny.yaml", "--trainer.logger=false",
           "--trainer.callbacks+=lightning_grpo.callbacks.EMA", "--trainer.callbacks.decay=0.99"], subcommand=False)
assert type(cli.datamodule) is lightning_grpo.datamodules.PromptDataModule, type(cli.datamodule)
emas = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMA"]
assert len(emas) == 1 and type(emas[0]) is lightning_grpo.callbacks.EMA, emas

# every module of the package, imported: one name per file
for package in (lightning_grpo, lightning_grpo.callbacks, lightning_grpo.datamodules):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
names = {}
venv = Path(sys.prefix).resolve()  # CI's .venv lies inside the repository: its packages are not ours
for name, module in list(sys.modules.items()):
    path = Path(module.__file__).resolve() if getattr(module, "__file__", None) else None
    if path is not None and path.is_relative_to(Path.cwd()) and not path.is_relative_to(venv):
        names.setdefault(Path(module.__file__).resolve(), []).append(name)
twice = {str(f): n for f, n in names.items() if len(n) > 1}
assert not twice, twice
bare = sorted(n for n in sys.modules if n.split(".")[0] in ("callbacks", "datamodules"))
assert not bare, bare
print("modules", sum(map(len, names.values())))
"""


@pytest.mark.timeout(300)
def test_each_module_has_one_identity():
    """With the repository root on sys.path (as pytest's `pythonpath` puts it, for `tests.`), the
    folders cannot be imported as top-level `callbacks` / `datamodules`; the classes the CLI builds
    from class paths are the package's; after importing every module no file is loaded twice."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ONE_IDENTITY], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout[-2000:]
    assert int(out.stdout.split("modules")[-1]) > 60  # the package's modules were all imported and checked
