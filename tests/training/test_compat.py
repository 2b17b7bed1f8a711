"""lightning_grpo/compat.py: the private Lightning API the project uses exists in the installed
Lightning, which is in the tested range; no module outside compat.py reaches for it."""

from __future__ import annotations

import re
from pathlib import Path

import lightning
import pytest
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from lightning_grpo import compat

ROOT = Path(__file__).resolve().parents[2]


def test_every_private_name_listed_exists_in_the_installed_lightning():
    assert compat.missing_names() == []


def test_the_installed_lightning_is_in_the_tested_range():
    assert compat.untested_version() is None, lightning.__version__


@pytest.mark.parametrize("version, untested", [
    ("2.6.0", False), ("2.6.6", False), ("2.6.10", False), ("2.5.9", True), ("2.7.0", True), ("2.7.0rc1", True), ("3.0", True),
])
def test_versions_outside_2_6_are_reported(version, untested):
    message = compat.untested_version(version)
    assert (message is not None) == untested
    if untested:
        assert version in message and "compat.py" in message


def test_version_tuple_reads_pre_releases_and_short_forms():
    assert compat.version_tuple("2.7.0rc1") == (2, 7, 0)
    assert compat.version_tuple("2.6") == (2, 6, 0)
    assert compat.version_tuple("2.10.1.post3") == (2, 10, 1)


@pytest.mark.parametrize("path", ["/tmp/x.ckpt", "relative/last.ckpt", "file:///tmp/x", "s3://bucket/a.ckpt", "gs://b/c", "memory://m"])
def test_is_local_path_agrees_with_lightnings_private_helper_it_replaces(path):
    assert compat.is_local_path(path) == _is_local_file_protocol(path)


def test_set_module_device_changes_the_reported_device_without_moving_tensors():
    from lightning.pytorch import LightningModule

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    module = Module()
    compat.set_module_device(module, torch.device("meta"))
    assert module.device == torch.device("meta") and module.layer.weight.device == torch.device("cpu")


def test_no_module_outside_compat_uses_a_private_lightning_name():
    """Underscore imports from lightning and the private names compat wraps appear in compat.py
    only (in code: strings, such as a warning filter's module name, and comments do not count)."""
    pattern = re.compile(r"from lightning(\.\w+)* import .*\b_[a-z]|\blightning(\.\w+)*\._[a-z]|_batches_that_stepped|_update_properties"
                         r"|_is_local_file_protocol|_checkpoint_connector|_logger_connector|trainer\._[a-z]")
    offenders = []
    for folder in ("lightning_grpo", "callbacks", "datamodules"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "compat.py" or "pretrained" in path.parts:
                continue
            for number, line in _code_lines(path):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_private_name_check_finds_each_kind_of_use(tmp_path):
    """The pattern above is not vacuous: each kind of use it names is found in code, none in strings."""
    uses = ["from lightning.fabric.utilities.cloud_io import _is_local_file_protocol",
            "x = trainer.fit_loop.epoch_loop._batches_that_stepped", "trainer._checkpoint_connector.resume_start()",
            "import lightning.pytorch.trainer.connectors._logger_connector"]
    path = tmp_path / "uses.py"
    path.write_text("\n".join(uses + ['NAME = "lightning.pytorch.utilities._pytree"  # lightning.x._y']) + "\n")
    found = [number for number, line in _code_lines(path)
             if re.search(r"from lightning(\.\w+)* import .*\b_[a-z]|\blightning(\.\w+)*\._[a-z]|_batches_that_stepped|trainer\._[a-z]", line)]
    assert found == [1, 2, 3, 4]


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, the line's code without its string literals and comments)."""
    import io
    import tokenize

    lines: dict[int, list[str]] = {}
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE) and token.string.strip():
            lines.setdefault(token.start[0], []).append(token.string)
    return [(number, " ".join(parts).replace(" . ", ".").replace(" .", ".").replace(". ", ".")) for number, parts in sorted(lines.items())]
