"""A callback for the signal tests: announces each finished step in a file and holds one step
open until the test's signal arrived, so the signal lands at a known step (no sleeps to tune)."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


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
