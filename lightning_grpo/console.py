"""What a `lightning-grpo` run prints: third-party noise filtered at the CLI, one place to switch it.

By default (quiet) the command drops output of the libraries underneath that says nothing about
the run, each entry of `QUIET_WARNINGS` / `QUIET_LOGS` with the reason it is noise; `--verbose`
(or LIGHTNING_GRPO_VERBOSE=1) shows all of it. Nothing here hides a warning of this project's own
code: those are fixed where they arise, not filtered.

- Python warnings are ignored by message (`warnings.filterwarnings`).
- Log records are dropped by a `logging.Filter` on the logger that creates them (a filter on a
  logger only sees that logger's own records, so each entry names its logger).
- transformers' per-model "Loading weights" bar is turned off through its tqdm hook (download
  bars of the hub stay on: a first download of a real model needs them).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

VERBOSE_ENV = "LIGHTNING_GRPO_VERBOSE"
"""Environment switch equal to `--verbose` (for scripts that call `lightning_grpo.cli.run`)."""


@dataclass(frozen=True)
class Noise:
    """One filtered message: where it comes from, a pattern of its start, why it is noise."""

    source: str  # the logger name (logs) or the warning's origin (warnings), for the docs
    pattern: str  # regular expression matched at the start of the message
    reason: str


QUIET_WARNINGS = (
    Noise("lightning.pytorch.utilities._pytree (torch >= 2.10)", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
          "Lightning's own use of a torch API torch deprecated; nothing a user can change"),
)

QUIET_LOGS = (
    # rank_zero_info logs through lightning_utilities' module logger, renamed by whichever of
    # lightning.pytorch / lightning.fabric was imported last: both names are listed.
    Noise("lightning.pytorch.utilities.rank_zero", "💡 Tip:", "advertisements for Lightning's cloud services"),
    Noise("lightning.fabric.utilities.rank_zero", "💡 Tip:", "advertisements for Lightning's cloud services"),
    Noise("transformers.tokenization_utils_base", "Token indices sequence length is longer",
          "raised when a pipeline's encode_prompt measures an untruncated prompt to report truncation; the "
          "model only ever sees the truncated ids (the pipeline's own line, shortened by the policy, says what was cut)"),
)


def verbose_requested(args: list[str]) -> tuple[bool, list[str]]:
    """(whether `--verbose` is among `args` or LIGHTNING_GRPO_VERBOSE=1 is set, `args` without it)."""
    rest = [a for a in args if a != "--verbose"]
    return len(rest) != len(args) or os.environ.get(VERBOSE_ENV, "") not in ("", "0"), rest


class _DropMatching(logging.Filter):
    """Drops the records whose message starts with one of `patterns`."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters (once per process; nothing when `verbose`)."""
    if verbose:
        return
    for noise in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=noise.pattern)
    by_logger: dict[str, list[str]] = {}
    for noise in QUIET_LOGS:
        by_logger.setdefault(noise.source, []).append(noise.pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(patterns))


def quiet_loading_bars(verbose: bool = False) -> None:
    """Turn off transformers' "Loading weights" bar (one per text encoder: two for FLUX) unless
    `verbose`; imported when models are about to load, not for `--help`."""
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs)

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # transformers before 5.1 has no hook: turn its bars off while we load
        hf_logging.disable_progress_bar()
        return
    set_hook(hook)


__all__ = ["QUIET_LOGS", "QUIET_WARNINGS", "VERBOSE_ENV", "Noise", "quiet_loading_bars", "quiet_third_party", "verbose_requested"]
