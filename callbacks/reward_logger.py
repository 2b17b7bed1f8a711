"""Reward logging beyond the module's scalars: per-reward normalised statistics and histograms.

GRPOModule already logs, every step, per reward the raw mean/std/min/max and the share of
zero-variance groups, plus advantage, ratio, clip fraction, approx KL, grad norm, lr, time per
phase and samples/s. This callback adds what needs the whole rollout:

- scalars `train/reward_normalized/{name}_{mean,std,min,max}`: each reward normalised within its
  group (its own contribution A_k to the advantage, before weighting and clamping);
- histograms `train/reward/{name}` (raw scores of all rolled-out samples),
  `train/reward_normalized/{name}` and `train/advantage` (combined advantages of the trained
  samples), written to every TensorBoard logger;
- the rolled-out samples themselves, ranked by reward: every `media_every_n_steps` rollouts, the
  first `media_prompts` groups, each a row of up to `media_samples` samples from best to worst
  (by Σ_k w_k·A_k, the weighted group-normalised rewards), the first reward's raw score under
  each. Images: TensorBoard image `train/samples` and `<log_dir>/rollouts/step{N}.png`. Videos:
  the same grid with film strips, plus the playable clip `train/samples_video` (`add_video`)
  and `<log_dir>/rollouts/step{N}.gif`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_grpo.callbacks._logging import RunFolder, add_video, last_step, logging_step, tensorboard_writers
from lightning_grpo.grids import captioned_grid, filmstrip, save_gif, save_png
from lightning_grpo.types import StepRecord


class RewardLogger(Callback):
    """Per-reward normalised statistics (scalars) and reward/advantage histograms (TensorBoard).

    Args:
        log_every_n_steps: log every this many training batches (rollouts); 1 = every rollout.
        histograms: write the TensorBoard histograms (scalars are logged regardless).
        histogram_every_n_steps: write the histograms every this many rollouts (by the logging
            step, so the interval holds across epochs and resumes); histograms dominate the event
            file (docs/performance.md, soak run), so long runs want e.g. 10.
        media_every_n_steps: show the ranked samples (module doc) every this many rollouts (by
            the logging step); 0 turns it off.
        media_prompts: groups (prompts) shown, one row each.
        media_samples: samples per row, evenly spaced in rank from the best to the worst.
        fps: frames per second of video clips.
        cell_size: side of each upscaled sample (frame), pixels.
        save_dir: folder of the PNG/GIF files (default `<log_dir>/rollouts`); False: TensorBoard only.
    """

    def __init__(
        self,
        log_every_n_steps: int = 1,
        histograms: bool = True,
        histogram_every_n_steps: int = 1,
        media_every_n_steps: int = 50,
        media_prompts: int = 4,
        media_samples: int = 4,
        fps: int = 4,
        cell_size: int = 96,
        save_dir: str | bool | None = None,
    ) -> None:
        if log_every_n_steps < 1 or histogram_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps and histogram_every_n_steps must be >= 1, got {log_every_n_steps}, {histogram_every_n_steps}")
        if media_every_n_steps < 0 or media_prompts < 1 or media_samples < 1:
            raise ValueError(f"media_every_n_steps must be >= 0 and media_prompts, media_samples >= 1, got "
                             f"{media_every_n_steps}, {media_prompts}, {media_samples}")
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.histogram_every_n_steps = histogram_every_n_steps
        self.media_every_n_steps = media_every_n_steps
        self.media_prompts, self.media_samples = media_prompts, media_samples
        self.fps, self.cell_size, self.save_dir = fps, cell_size, save_dir
        self._folder = RunFolder()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._folder.resolve(trainer)  # a collective: on every rank here, read by rank zero in `write_media`

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = last_step(pl_module)
        if record is None or not record.num_samples or batch_idx % self.log_every_n_steps:  # no collective here
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
        if self.media_every_n_steps and step % self.media_every_n_steps == 0 and trainer.is_global_zero:
            self.write_media(trainer, record, getattr(pl_module.rewards, "weights", {}), step)

    def ranked_samples(self, record: StepRecord, weights: dict[str, float]) -> tuple[Tensor, list[str], list[list[str]]]:
        """(cells [R, K, ...] of the first R groups' samples from best to worst, the R prompts, the
        R × K captions: the first reward's raw score)."""
        group = record.group_size
        rows = min(self.media_prompts, len(record.prompts) // group)
        combined = sum(weights.get(name, 1.0) * a.detach().float().cpu() for name, a in record.reward_advantages.items())  # [B]
        first = next(iter(record.scores.values())).detach().float().cpu()  # [B]
        picks = torch.linspace(0, group - 1, min(group, self.media_samples)).round().long()  # ranks shown
        cells, captions = [], []
        for g in range(rows):
            order = combined[g * group:(g + 1) * group].argsort(descending=True)[picks] + g * group  # [K] sample indices
            cells.append(record.pixels[order].detach().float().cpu())
            captions.append([f"{first[i]:.3g}" for i in order.tolist()])
        return torch.stack(cells), [record.prompts[g * group] for g in range(rows)], captions

    def write_media(self, trainer: Trainer, record: StepRecord, weights: dict[str, float], step: int) -> None:
        """TensorBoard image (and video) and files of the ranked samples of one rollout (module doc)."""
        cells, prompts, captions = self.ranked_samples(record, weights)  # [R, K, (F,) C, H, W]
        ranks = [f"rank {k + 1}" for k in range(cells.shape[1])]
        titles = [f"{r} · {next(iter(record.scores))}" for r in ranks]

        def grid(frame: int | None) -> Tensor:
            if cells.ndim == 6:
                shown = filmstrip(cells.flatten(0, 1)) if frame is None else cells[:, :, frame].flatten(0, 1)
                shown = shown.view(*cells.shape[:2], *shown.shape[1:])
            else:
                shown = cells
            return captioned_grid(shown, row_captions=prompts, column_titles=titles, cell_captions=captions, cell_size=self.cell_size)

        still = grid(None)
        video = torch.stack([grid(f) for f in range(cells.shape[2])]) if cells.ndim == 6 else None  # [F, 3, H', W']
        for writer in tensorboard_writers(trainer):
            writer.add_image("train/samples", still, global_step=step)
            if video is not None:
                add_video(writer, "train/samples_video", video, step, fps=self.fps)
        if self.save_dir is not False:
            folder = Path(self.save_dir or self._folder.get(trainer) / "rollouts")
            save_png(still, folder / f"step{step:06d}.png")
            if video is not None:
                save_gif(video, folder / f"step{step:06d}.gif", fps=self.fps)


def summary_stats(values: Tensor) -> dict[str, Tensor]:
    """mean, std (0 for a single value), min and max of a 1-D tensor."""
    values = values.detach().float()
    std = values.std() if values.numel() > 1 else torch.zeros((), device=values.device)
    return {"mean": values.mean(), "std": std, "min": values.min(), "max": values.max()}
