"""Every piece of Lightning's private (underscore) API that lightning-grpo uses, in one place, with
the Lightning versions it is tested with.

Lightning keeps no promise about its protected names between releases; each use below was checked
against the versions in `TESTED` (tests/training/test_compat.py checks them against the installed
Lightning, `lightning-grpo` warns at start when the installed version is outside the range). When
a Lightning release moves one of them, this file and that test are where it shows.

Private functions, wrapped here (call these, not Lightning's):
- `logging_step`: `fit_loop.epoch_loop._batches_that_stepped`, the x-axis Lightning gives
  `self.log` scalars (per training batch; no public accessor);
- `set_module_device`: `lightning.fabric.utilities.device_dtype_mixin._update_properties`, the
  device a LightningModule reports, set without `.to()` (which would move FSDP2's offloaded
  shards back to the device).

Protected methods overridden or called by subclasses (they cannot be wrapped; listed so the test
checks them and a reader of the subclass knows what it depends on):
- `MODEL_CHECKPOINT`: `GRPOCheckpoint` (checkpointing.py) saves at the batch that reaches
  `max_steps` and applies its retention after each save through ModelCheckpoint's own steps;
- `LIGHTNING_CLI`: `GRPOCLI._parse_ckpt_path` (cli.py) replaces LightningCLI's reading of the
  checkpoint's hyperparameters.

Replaced by public API: `lightning.fabric.utilities.cloud_io._is_local_file_protocol` (now
`is_local_path`, fsspec's public `get_protocol`).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import fsspec.utils
import torch
from lightning.pytorch import Trainer

TESTED = ("2.6.0", "2.7.0")
"""Lightning versions tested: from the first (inclusive) to the second (exclusive), i.e. 2.6.x."""

MODEL_CHECKPOINT = ("_fs", "_last_global_step_saved", "_monitor_candidates", "_remove_checkpoint", "_save_checkpoint",
                    "_save_last_checkpoint", "_save_topk_checkpoint", "_should_skip_saving_checkpoint")
"""ModelCheckpoint's protected members `GRPOCheckpoint` overrides or uses."""

LIGHTNING_CLI = ("_parse_ckpt_path",)
"""LightningCLI's protected methods `GRPOCLI` overrides."""

SIGNAL_CONNECTOR_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"
"""The Python logger of Lightning's SIGTERM messages (`cli` filters two of its lines)."""


def logging_step(trainer: Trainer) -> int:
    """The x-axis value Lightning gives `self.log` scalars during fit (one per training batch, i.e.
    per rollout), so histograms and images line up with the scalars of the same step; the global
    step if this Lightning has no such counter."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def set_module_device(module: torch.nn.Module, device: torch.device) -> None:
    """Make a LightningModule (and its device-aware submodules) report `device` without moving
    any tensor."""
    from lightning.fabric.utilities.device_dtype_mixin import _update_properties

    _update_properties(module, device=device)


def is_local_path(path: Any) -> bool:
    """Whether `path` is on the local file system (no `s3://`, `gs://`, ... protocol)."""
    return fsspec.utils.get_protocol(str(path)) == "file"


def version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string: "2.6.6" → (2, 6, 6), "2.7.0rc1" → (2, 7, 0)."""
    numbers = [int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def untested_version(version: str | None = None) -> str | None:
    """A warning when Lightning `version` (default: the installed one) is outside `TESTED`, else None."""
    import lightning

    version = version or lightning.__version__
    low, high = TESTED
    if version_tuple(low) <= version_tuple(version) < version_tuple(high):
        return None
    return (f"lightning {version} is outside the versions lightning-grpo is tested with (>= {low}, < {high}): "
            "it uses some of Lightning's private API (lightning_grpo/compat.py lists it), which may have changed")


def missing_names() -> list[str]:
    """The private names listed here that the installed Lightning lacks (empty when all are there)."""
    import importlib

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    checkpoint = ModelCheckpoint()  # `_fs` and `_last_global_step_saved` are set by its __init__
    missing = [f"ModelCheckpoint.{n}" for n in MODEL_CHECKPOINT if not hasattr(checkpoint, n)]
    missing += [f"LightningCLI.{n}" for n in LIGHTNING_CLI if not hasattr(LightningCLI, n)]
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if not hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped"):
        missing.append("fit_loop.epoch_loop._batches_that_stepped")
    if not hasattr(importlib.import_module("lightning.fabric.utilities.device_dtype_mixin"), "_update_properties"):
        missing.append("lightning.fabric.utilities.device_dtype_mixin._update_properties")
    try:
        importlib.import_module(SIGNAL_CONNECTOR_LOGGER)
    except ImportError:
        missing.append(SIGNAL_CONNECTOR_LOGGER)
    return missing


def warn_if_untested() -> None:
    """Warn (once per process) when the installed Lightning is outside `TESTED`."""
    message = untested_version()
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)


__all__ = ["LIGHTNING_CLI", "MODEL_CHECKPOINT", "SIGNAL_CONNECTOR_LOGGER", "TESTED", "is_local_path", "logging_step", "missing_names",
           "set_module_device", "untested_version", "version_tuple", "warn_if_untested"]
