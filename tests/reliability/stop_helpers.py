"""Helpers for the signal and fault tests, importable by a `lightning-grpo` subprocess (the tests put
this folder on its PYTHONPATH) and in-process (`tests.reliability.stop_helpers`):

- `PauseAtStep`: announces a finished step in a file and holds it open until SIGTERM arrived, so
  a signal lands at a known step (no sleeps to tune);
- `SlowReward`: an extra reward that marks a file when first called and sleeps per batch, so an
  evaluation is known to be in progress and takes long;
- `HangInStep`: blocks the main thread in C (as a collective that never returns does), where no
  Python signal handler can run;
- `KillDuringSave`: SIGKILLs the process while `torch.save` writes a checkpoint;
- `ConstantReward`: the same score for every sample (every advantage 0).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback

from lightning_grpo.rewards.base import Reward


class PauseAtStep(Callback):
    """After optimizer step `step`, write `marker` (its text: the step) and wait (at most
    `timeout` s) until the trainer has received SIGTERM, then let the loop go on."""

    def __init__(self, marker: str, step: int, timeout: float = 120.0) -> None:
        self.marker, self.step, self.timeout = Path(marker), step, timeout
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < self.step:
            return
        self.done = True
        self.marker.write_text(str(trainer.global_step))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class SlowReward(Reward):
    """Scores 0.5 after sleeping `seconds` per batch; appends a line to `marker` at every call
    (so the file's existence says an evaluation is in progress, its lines count the batches)."""

    default_name = "slow"

    def __init__(self, marker: str, seconds: float = 1.0, name: str | None = None) -> None:
        super().__init__(name=name)
        self.marker, self.seconds = Path(marker), seconds

    def score(self, pixels, prompts, images=None):
        with self.marker.open("a") as handle:
            handle.write("batch\n")
        time.sleep(self.seconds)
        return torch.full((pixels.shape[0],), 0.5, device=pixels.device)


class ConstantReward(Reward):
    """The same score for every sample: each group's rewards are equal, every advantage is 0."""

    default_name = "constant"

    def score(self, pixels, prompts, images=None):
        return torch.ones(pixels.shape[0], device=pixels.device)


class HangInStep(Callback):
    """At the start of the training batch that follows optimizer step `step`, write `marker` and
    block the main thread inside a C call that signals do not interrupt, as a collective waiting
    for a rank that never comes does (NCCL and gloo retry their waits): the main thread blocks
    SIGINT and SIGTERM for itself (other threads still receive them, so the process sees them)
    and sleeps in libc."""

    def __init__(self, marker: str, step: int) -> None:
        self.marker, self.step = Path(marker), step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.step:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        self.marker.write_text(str(trainer.global_step))
        ctypes.CDLL(None).sleep(3600)  # releases the GIL; never interrupted by a stop signal


class _KillWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        return (int, ())


class KillDuringSave(Callback):
    """On the `at`-th checkpoint save (1-based), SIGKILL the process while torch.save pickles it."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.calls += 1
        if self.calls == self.at:
            checkpoint["killed_here"] = _KillWhilePickled()
