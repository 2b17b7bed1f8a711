"""Shared helpers of the callbacks: the run folder, the TensorBoard writers of a trainer, the
logging step, finding the module's step record, and writing a clip as a playable TensorBoard video."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_grpo import compat
from lightning_grpo.types import StepRecord

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def run_dir(trainer: Trainer) -> Path:
    """The run folder: `trainer.log_dir` (the first logger's version folder, else the trainer's
    `default_root_dir`).

    `Trainer.log_dir` broadcasts rank zero's value, a collective: reached in a branch that only
    rank zero runs (`if trainer.is_global_zero: write(...)`), it waits for ranks that never come,
    or pairs with their next collective (DDP's buffer broadcast, a gradient all-reduce) and
    corrupts both. Callbacks call this in `setup`, which every rank runs in the same order, and
    keep the result for their rank-zero writes (`RunFolder`).
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


class RunFolder:
    """The run folder resolved once on every rank (`resolve`, from a callback's `setup`), read by
    the rank-zero writers (`get`) without a collective."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def resolve(self, trainer: Trainer) -> Path:
        self.path = run_dir(trainer)
        return self.path

    def get(self, trainer: Trainer) -> Path:
        """The resolved folder; resolved now only on one process (where no collective can hang)."""
        if self.path is None:
            if trainer.world_size > 1:
                raise RuntimeError("the run folder must be resolved on every rank (in setup) before a rank-zero write")
            return self.resolve(trainer)
        return self.path


def tensorboard_writers(trainer: Trainer) -> list[SummaryWriter]:
    """The SummaryWriters of the trainer's TensorBoard loggers, on rank zero only (empty elsewhere
    and when no TensorBoard logger is configured)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def logging_step(trainer: Trainer) -> int:
    """The x-axis value Lightning gives `self.log` scalars during fit (one per training batch, i.e.
    per rollout), so histograms and images line up with the scalars of the same step."""
    return compat.logging_step(trainer)  # a private Lightning counter: lightning_grpo/compat.py


def last_step(pl_module: LightningModule) -> StepRecord | None:
    """The `StepRecord` GRPOModule keeps of its last training step (None for other modules)."""
    record = getattr(pl_module, "last_step", None)
    return record if isinstance(record, StepRecord) else None


def can_add_video() -> bool:
    """Whether TensorBoard's `add_video` can encode: it needs `moviepy.editor` (moviepy < 2, a
    dependency of this package; without it torch prints a notice and writes nothing)."""
    try:
        import moviepy.editor  # noqa: F401
    except ImportError:
        return False
    return True


def add_video(writer: SummaryWriter, tag: str, clip: Tensor, step: int, fps: int = 4) -> bool:
    """Write `clip` [F, 3, H, W] in [0, 1] as a playable TensorBoard video (an animated GIF image
    summary); False, writing nothing, when moviepy is missing (see `can_add_video`)."""
    if not can_add_video():
        return False
    writer.add_video(tag, clip.detach().float().clamp(0, 1).cpu()[None], global_step=step, fps=fps)  # [1, F, 3, H, W]
    return True
