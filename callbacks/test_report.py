"""The report of `lightning-grpo test`: every rank's held-out samples gathered, the mean reward with
its 95% interval logged, and results.csv, results.md and grid.png written into `<log_dir>/test/`.

`GRPOModule.test_step` evaluates a batch (deterministic samples from fixed per-sample seeds,
scored by every reward) and returns its `EvaluationResult`; this callback collects those results
and reports them once the test ends. The CLI adds it by default (`cli.default_callbacks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_grpo.evaluation import EvaluationResult, gather_results


class TestReport(Callback):
    """Gathers the test batches' results and reports them (see the module docstring).

    Gathers every rank's results (`evaluation.gather_results`: each held-out prompt once, in the
    split's order; the repeats that pad the last block are dropped), logs `test/reward/{name}`
    (`GRPOModule.log_evaluation`) and `..._ci_low`, `..._ci_high`, `..._n` (the same on every
    rank); on rank zero writes results.csv, results.md and grid.png into `<log_dir>/test/` and
    prints the table.

    Args:
        grid_size: the pixels of this many test samples (per rank) are kept for the image grid.

    Attributes:
        results: `EvaluationResult` of the last test (all ranks gathered), or None.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, grid_size: int = 64) -> None:
        if grid_size < 0:
            raise ValueError(f"grid_size must be >= 0, got {grid_size}")
        self.grid_size = grid_size
        self.results: EvaluationResult | None = None
        self._parts: list[EvaluationResult] = []

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._parts = []

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # the module keeps a batch's pixels only while the grid still wants samples
        pl_module.keep_test_pixels = sum(len(p.prompts) for p in self._parts) < self.grid_size

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if isinstance(outputs, EvaluationResult):
            self._parts.append(outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = gather_results(self._parts, self.grid_size)
        self._parts, self.results = [], result
        pl_module.keep_test_pixels = False
        if callable(getattr(pl_module, "log_evaluation", None)):
            pl_module.log_evaluation(result, "test")
        for name, (mean, low, high, n) in result.summary().items():
            interval = {f"test/reward/{name}_ci_low": low, f"test/reward/{name}_ci_high": high, f"test/reward/{name}_n": float(n)}
            pl_module.log_dict(interval, sync_dist=True)  # the same on every rank (gathered)
        directory = Path(trainer.log_dir or ".") / "test"  # a collective (a broadcast): on every rank
        if trainer.is_global_zero:
            result.write(directory)
            print(f"Held-out test, {len(result.prompts)} samples (written to {directory}):\n{result.to_markdown()}")


__all__ = ["TestReport"]
