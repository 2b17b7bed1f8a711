"""Shared helpers of the callbacks: the TensorBoard writers of a trainer, the logging step, and
finding the module's step record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_grpo.types import StepRecord

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def tensorboard_writers(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers, on rank zero only (empty elsewhere
    and when no TensorBoard logger is configured)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def logging_step(trainer: Trainer) -> int:
    """The x-axis value Lightning gives `self.log` scalars during fit (one per training batch, i.e.
    per rollout), so histograms and images line up with the scalars of the same step."""
    return getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)


def last_step(pl_module: LightningModule) -> StepRecord | None:
    """The `StepRecord` GRPOModule keeps of its last training step (None for other modules)."""
    record = getattr(pl_module, "last_step", None)
    return record if isinstance(record, StepRecord) else None
