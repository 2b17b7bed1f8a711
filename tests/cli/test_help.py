"""Complete help: `lightning-grpo --help` lists every subcommand with its purpose, `fit --help` and
`lightning-grpo list` every shipped class a config can name."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_grpo
from lightning_grpo import cli
from lightning_grpo.catalog import CATALOG, listing, resolve

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_grpo", *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


@pytest.mark.timeout(600)
def test_top_level_help_lists_every_subcommand_with_its_purpose():
    result = command("--help")
    assert result.returncode == 0, result.stderr
    listed = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^  ([\w-]+)\s{2,}(\S.*)$", line)
        if match:
            listed[match.group(1)] = match.group(2)
    for name in ("fit", "validate", "test", "export", "estimate", "serve-reward", "list"):
        assert name in listed, f"{name} missing from:\n{result.stdout}"
    for name, entry in cli.COMMANDS.items():
        assert listed.get(name) == entry.purpose  # the whole purpose on its line, never cut mid-sentence
    assert "--verbose" in result.stdout
    assert "LightningCLI's args parameter" not in result.stderr


def test_no_subcommand_prints_the_help_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2
    assert capsys.readouterr().out == cli.top_level_help() + "\n"


def test_every_dispatched_subcommand_is_registered():
    """What `main` can run is what `COMMANDS` lists: LightningCLI's subcommands of GRPOCLI, the
    modules of the others, and no hand-written dispatch beside the table (a merge that adds
    `if args[:1] == ["x"]` to `main` would leave `x` out of the help)."""
    lightning = set(cli.GRPOCLI.subcommands())
    assert lightning == {name for name, c in cli.COMMANDS.items() if c.module is None} == {"fit", "validate", "test"}
    for name, entry in cli.COMMANDS.items():
        if entry.module is not None:
            assert callable(importlib.import_module(entry.module).main), name
    source = inspect.getsource(cli.main)
    literal = set(re.findall(r"args\[(?::1|0)\]\s*==\s*\[?[\"'](\w+)[\"']", source))
    assert literal <= set(cli.COMMANDS), f"main dispatches {literal - set(cli.COMMANDS)} outside COMMANDS"


@pytest.mark.parametrize("name", ["export", "list"])
def test_each_module_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lightning-grpo {name}")


def _package_classes() -> dict[str, set[str]]:
    """Every concrete public class of the package by kind, found by importing every module."""
    from lightning.pytorch import Callback, LightningDataModule

    from lightning_grpo.first_frames import FirstFrames
    from lightning_grpo.objectives.base import Objective
    from lightning_grpo.policies.base import PolicyAdapter
    from lightning_grpo.rewards.base import Reward
    from lightning_grpo.samplers.base import Sampler
    from lightning_grpo.samplers.ode_tail import MultistepODETail
    from lightning_grpo.samplers.step_schedule import StepSchedule

    # callbacks/ and datamodules/ are walked apart: in the editable install they are mapped packages
    # (pyproject's package-dir), not folders under lightning_grpo/, so walking lightning_grpo misses them
    import lightning_grpo.callbacks
    import lightning_grpo.datamodules

    packages = (lightning_grpo, lightning_grpo.callbacks, lightning_grpo.datamodules)
    modules = [importlib.import_module(m.name) for p in packages for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
    bases = {"policies": PolicyAdapter, "samplers": Sampler, "step schedules": StepSchedule, "ODE tails": MultistepODETail,
             "rewards": Reward, "first frames": FirstFrames, "callbacks": Callback, "data modules": LightningDataModule,
             "objectives": Objective}
    found: dict[str, set[str]] = {kind: set() for kind in bases}
    for module in modules:
        if any(part.startswith("_") for part in module.__name__.split(".")):
            continue
        for obj in vars(module).values():
            if not inspect.isclass(obj) or obj.__module__ != module.__name__ or obj.__name__.startswith("_") or inspect.isabstract(obj):
                continue
            for kind, base in bases.items():
                if issubclass(obj, base) and (obj is not base or kind == "ODE tails"):  # a base class is not a choice
                    found[kind].add(f"{obj.__module__}.{obj.__qualname__}")
    return found


def test_the_catalog_holds_every_shipped_class():
    catalogued = {kind: {f"{c.__module__}.{c.__qualname__}" for c in map(resolve, paths)} for kind, (_, paths) in CATALOG.items()}
    for kind, classes in _package_classes().items():
        assert classes == catalogued[kind], f"{kind}: not catalogued {classes - catalogued[kind]}, not shipped {catalogued[kind] - classes}"


def test_list_shows_each_class_with_its_purpose(capsys):
    cli.main(["list", "rewards"])
    text = capsys.readouterr().out
    for path in CATALOG["rewards"][1]:
        assert path in text
    assert "lightning_grpo.rewards.ClipScore\n      CLIP score of each (image, prompt) pair" in text
    assert "policies" not in text  # only the kind asked for
    assert "lightning_grpo.callbacks.EMA" in listing()
    with pytest.raises(SystemExit):
        cli.main(["list", "nonsense"])
    assert "unknown kind 'nonsense'" in capsys.readouterr().err


def test_fit_help_names_every_shipped_class(capsys):
    """`fit --help` lists the known subclasses of each option: all shipped ones, not only those
    a config happened to import (it listed Binary and ShapesVerifier as the only rewards)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--help"])
    assert stop.value.code == 0
    text = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps long class paths mid-name
    for kind, (_, paths) in CATALOG.items():
        for path in paths:
            assert resolve(path).__name__ in text, f"{kind}: {path} not in fit --help"
