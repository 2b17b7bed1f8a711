"""Reward logging beyond the module's scalars: per-reward normalised statistics and histograms.

GRPOModule already logs, every step, per reward the raw mean/std/min/max and the share of
zero-variance groups, plus advantage, ratio, clip fraction, approx KL, grad norm, lr, time per
phase and samples/s. This callback adds what needs the whole rollout:

- scalars `train/reward_normalized/{name}_{mean,std,min,max}`: each reward normalised within its
  group (its own contribution A_k to the advantage, before weighting and clamping);
- histograms `train/reward/{name}` (raw scores of all rolled-out samples),
  `train/reward_normalized/{name}` and `train/advantage` (combined advantages of the trained
  samples), written to every TensorBoard logger.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_grpo.callbacks._logging import last_step, logging_step, tensorboard_writers


class RewardLogger(Callback):
    """Per-reward normalised statistics (scalars) and reward/advantage histograms (TensorBoard).

    Args:
        log_every_n_steps: log every this many training batches (rollouts); 1 = every rollout.
        histograms: write the TensorBoard histograms (scalars are logged regardless).
        histogram_every_n_steps: write the histograms every this many rollouts (by the logging
            step, so the interval holds across epochs and resumes); histograms dominate the event
            file (docs/performance.md, soak run), so long runs want e.g. 10.
    """

    def __init__(self, log_every_n_steps: int = 1, histograms: bool = True, histogram_every_n_steps: int = 1) -> None:
        if log_every_n_steps < 1 or histogram_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps and histogram_every_n_steps must be >= 1, got {log_every_n_steps}, {histogram_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.histogram_every_n_steps = histogram_every_n_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = last_step(pl_module)
        if record is None or batch_idx % self.log_every_n_steps:
            return
        stats: dict[str, Tensor] = {}
        for name, normalised in record.reward_advantages.items():
            stats.update({f"train/reward_normalized/{name}_{k}": v for k, v in summary_stats(normalised).items()})
        pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(record.prompts))
        step = logging_step(trainer)
        if self.histograms and step % self.histogram_every_n_steps == 0:
            values = {f"train/reward/{name}": s for name, s in record.scores.items()}
            values.update({f"train/reward_normalized/{name}": a for name, a in record.reward_advantages.items()})
            values["train/advantage"] = record.advantages
            for writer in tensorboard_writers(trainer):
                for tag, tensor in values.items():
                    writer.add_histogram(tag, tensor.detach().float().cpu(), global_step=step)


def summary_stats(values: Tensor) -> dict[str, Tensor]:
    """mean, std (0 for a single value), min and max of a 1-D tensor."""
    values = values.detach().float()
    std = values.std() if values.numel() > 1 else torch.zeros((), device=values.device)
    return {"mean": values.mean(), "std": std, "min": values.min(), "max": values.max()}
