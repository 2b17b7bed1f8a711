"""Watch the policy change: deterministic (eta = 0) samples of fixed prompts from fixed seeds,
logged to TensorBoard at fit start and every N steps, beside the step-0 samples.

The samples come from `lightning_grpo.rollout.ode_sample` with the callback's own generators, in
eval mode, under `preserve_rng` (global CPU/CUDA random states saved and restored), with EMA
weights when an `EMA` callback is present. Training is unaffected: a seeded run logs exactly the
same metrics with the visualiser on or off (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_grpo.callbacks._logging import RunFolder, add_video, tensorboard_writers
from lightning_grpo.callbacks.ema import ema_weights
from lightning_grpo.evaluation import eval_mode, preserve_rng
from lightning_grpo.first_frames import frame_size
from lightning_grpo.grids import captioned_grid, filmstrip, save_gif, save_png, with_condition
from lightning_grpo.rollout import ode_sample


def spread_indices(total: int, k: int) -> list[int]:
    """min(k, total) indices spread evenly over range(total): ⌊i·total/k⌋ for i < k."""
    k = min(k, total)
    return [i * total // k for i in range(k)]


def to_uint8(pixels: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 (round(255·x)); x / 255 gives back what a saved PNG holds."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class ODEVisualizer(Callback):
    """Fixed-prompt, fixed-seed ODE samples as a TensorBoard image grid (videos as frames too).

    Layout of the image `visualization/ode_samples` (`lightning_grpo.grids.captioned_grid`): one row
    per prompt with the prompt written under it; the left block holds its step-0 samples (one
    column per seed, titled "step 0 · seed s"), the right block, after a wider gap, the current
    samples ("step N · seed s"); cells upscaled by nearest neighbour to `cell_size` pixels. The
    same PNG is written to `<log_dir>/visualization/ode_samples_step{N}.png`. Videos ([B, F, C,
    H, W], the policy contract) are shown as film strips (up to 5 frames) in that grid; the
    playable clip `visualization/ode_video` (TensorBoard `add_video`, moviepy < 2) shows the
    grid with every cell at frame f for f = 0 … F − 1, and the same clip is written as
    `<log_dir>/visualization/ode_samples_step{N}.gif`. Without moviepy,
    `visualization/ode_video_frames` shows the current samples' frames side by side as an image.
    Image-to-video: first frames come from the validation batches' ``"images"``, else from the
    module's `first_frames` source when it has one; the grids show each prompt's conditioning
    frame as their first column ("condition"), beside its clips.

    Prompts: by default `num_prompts` spread evenly over the first `max_scan` validation prompts
    (`prompt_choice="spread"`): a validation file lists each scene in several phrasings in a row,
    so its first prompts are one scene; "first" takes the first K as they come.

    Resume: the step-0 samples (as uint8), the prompts, first frames and last step are the
    callback's checkpoint state, so a resumed run shows the true step-0 samples beside its own.

    Every rank samples (a model sharded with FSDP needs all ranks in its forward; under DDP the
    ranks draw the same images), from rank zero's prompts; rank zero writes.

    Args:
        prompts: prompts to draw; default: `num_prompts` prompts of the validation dataloader,
            chosen by `prompt_choice` (the visualiser turns itself off with a warning when there
            are none).
        num_prompts: K, prompts taken from the validation data when `prompts` is not given.
        prompt_choice: "spread" (K prompts evenly spaced over the first `max_scan` validation
            prompts: several attribute combinations) or "first" (the first K).
        max_scan: validation prompts read at most when choosing by "spread".
        seeds: one generator seed per column; prompt k uses that generator's k-th noise draw.
        every_n_steps: visualise when the optimizer-step count crosses a multiple of this.
        at_fit_start: visualise before the first step (the step-0 reference is always drawn).
        at_fit_end: visualise after the last step, if that step was not visualised already.
        fps: frames per second of logged videos.
        cell_size: side of each upscaled sample in the grid, pixels.
        save_dir: folder for the PNGs (default `<log_dir>/visualization`); False: TensorBoard only.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 4,
        seeds: list[int] | None = None,
        every_n_steps: int = 50,
        at_fit_start: bool = True,
        at_fit_end: bool = True,
        fps: int = 4,
        cell_size: int = 128,
        save_dir: str | bool | None = None,
        prompt_choice: str = "spread",
        max_scan: int = 1000,
    ) -> None:
        if every_n_steps < 1 or num_prompts < 1:
            raise ValueError(f"every_n_steps and num_prompts must be >= 1, got {every_n_steps}, {num_prompts}")
        if prompt_choice not in ("spread", "first"):
            raise ValueError(f"prompt_choice must be 'spread' or 'first', got {prompt_choice!r}")
        if max_scan < num_prompts:
            raise ValueError(f"max_scan ({max_scan}) must be >= num_prompts ({num_prompts})")
        self.prompt_choice, self.max_scan = prompt_choice, max_scan
        self.prompts = list(prompts) if prompts is not None else None
        self.num_prompts = num_prompts
        self.seeds = list(seeds) if seeds is not None else [0, 1]
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        self.every_n_steps = every_n_steps
        self.at_fit_start = at_fit_start
        self.at_fit_end = at_fit_end
        self.fps = fps
        self.cell_size = cell_size
        self.save_dir = save_dir
        self.images: Tensor | None = None  # [K, C, H, W] first frames for image-to-video prompts
        self.initial: Tensor | None = None  # [S*K, C, H, W] or [S*K, F, C, H, W] step-0 samples (CPU)
        self.last_step = -1
        self._enabled = True
        self._warned_video = False
        self._restored = False
        self._folder = RunFolder()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._folder.resolve(trainer)  # a collective: on every rank here, read by rank zero in `write`

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored:  # resumed: the step-0 samples came with the checkpoint
            self._restored = False
            return
        if self.prompts is None:  # every rank reads its shard; all take rank zero's prompts
            self.prompts, self.images = trainer.strategy.broadcast(self._prompts_from_data(trainer))
        source = getattr(pl_module, "first_frames", None)
        if self.prompts and self.images is None and source is not None:  # image-to-video from text prompts
            self.images = source(list(self.prompts), frame_size(pl_module.policy)).cpu()
        if not self.prompts:
            rank_zero_warn("ODEVisualizer: no prompts given and no validation prompts found; visualisation is off")
            self._enabled = False
            return
        self.initial = self.sample(trainer, pl_module)
        if self.at_fit_start and trainer.is_global_zero:
            self.write(trainer, self.initial)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._active() and step // self.every_n_steps > max(self.last_step, 0) // self.every_n_steps:
            self._sample_and_write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active() and self.at_fit_end and self.last_step != trainer.global_step:
            self._sample_and_write(trainer, pl_module)

    def _active(self) -> bool:
        return self._enabled and self.initial is not None

    def _sample_and_write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        current = self.sample(trainer, pl_module)  # on every rank
        if trainer.is_global_zero:
            self.write(trainer, current)

    # ------------------------------------------------------------------ sampling
    def _prompts_from_data(self, trainer: Trainer) -> tuple[list[str], Tensor | None]:
        """K validation prompts (and first frames, for image-to-video data), by `prompt_choice`.

        Iterating a DataLoader draws its base seed from the global generator, hence `preserve_rng`.
        """
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return [], None
        wanted = self.num_prompts if self.prompt_choice == "first" else self.max_scan
        prompts: list[str] = []
        images: list[Tensor] = []
        with preserve_rng():
            loaders = datamodule.val_dataloader()
            for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
                for batch in loader:
                    prompts.extend(batch["prompts"])
                    if batch.get("images") is not None:
                        images.extend(batch["images"])
                    if len(prompts) >= wanted:
                        break
                if len(prompts) >= wanted:
                    break
        prompts = prompts[:wanted]
        chosen = spread_indices(len(prompts), self.num_prompts)
        first_frames = torch.stack([images[i] for i in chosen]) if images and len(images) >= len(prompts) else None
        return [prompts[i] for i in chosen], first_frames

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The step-0 samples (uint8: what the grids show, 4× smaller than float), prompts, first
        frames and last step: a resumed run shows the true step 0, not its resumed weights."""
        if self.initial is None:
            return {}
        return {"initial": to_uint8(self.initial), "prompts": list(self.prompts or []),
                "images": None if self.images is None else to_uint8(self.images), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or state_dict.get("initial") is None:
            return
        if self.prompts is not None and list(self.prompts) != list(state_dict["prompts"]):
            rank_zero_warn("ODEVisualizer: the configured prompts differ from the checkpoint's; drawing new step-0 samples "
                           "from the resumed weights")
            return
        self.prompts = list(state_dict["prompts"])
        self.initial = state_dict["initial"].float() / 255
        self.images = None if state_dict.get("images") is None else state_dict["images"].float() / 255
        self.last_step = int(state_dict.get("last_step", -1))
        self._restored = True

    @torch.no_grad()
    def sample(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        """Decoded ODE samples [S*K, ...] on CPU, row s = seed s, column k = prompt k."""
        policy, sampler = pl_module.policy, pl_module.sampler
        images = None if self.images is None else self.images.to(pl_module.device)
        rows = []
        with preserve_rng(pl_module.device), eval_mode(pl_module), ema_weights(trainer, pl_module):
            for seed in self.seeds:
                generator = torch.Generator(device=pl_module.device).manual_seed(seed)
                latents = ode_sample(policy, sampler, self.prompts, generator, images=images)  # [K, *L]
                rows.append(policy.decode(latents).float().cpu())  # [K, C, H, W] or [K, F, C, H, W]
        self.last_step = trainer.global_step
        return torch.cat(rows)

    # ------------------------------------------------------------------ logging
    def grid(self, current: Tensor, frame: int | None = None, step: int | None = None) -> Tensor:
        """Readable [C, H', W'] grid: one row per prompt, its text under it; left block the step-0
        samples (one column per seed), right block the current ones, column titles "step 0 · seed
        s" and "step N · seed s"; cells upscaled (nearest) to `cell_size`. Videos: frame `frame`
        of every clip, or (None) a film strip of each clip; image-to-video: the conditioning
        frame first ("condition")."""
        initial = self.initial
        if current.ndim == 5:  # [S*K, C, H, W] one frame, or [S*K, C, H, W'] strips
            pick = filmstrip if frame is None else (lambda clips: clips[:, frame])
            initial, current = pick(initial), pick(current)
        k, seeds = len(self.prompts), len(self.seeds)
        now = "now" if step is None else f"step {step}"

        def by_prompt(samples: Tensor) -> Tensor:  # [S*K, C, H, W] seed-major -> [K, S, C, H, W]
            return samples.reshape(seeds, k, *samples.shape[1:]).transpose(0, 1)

        cells = torch.cat([by_prompt(initial), by_prompt(current)], dim=1)  # [K, 2S, C, H, W]
        titles = [f"step 0 · seed {s}" for s in self.seeds] + [f"{now} · seed {s}" for s in self.seeds]
        if self.images is not None and current.ndim == 4 and current.shape[-2] == self.images.shape[-2]:
            cells = with_condition(cells, self.images)  # [K, 1 + 2S, C, H, W]
            titles = ["condition", *titles]
        gap = seeds + (1 if len(titles) > 2 * seeds else 0)
        return captioned_grid(cells, row_captions=list(self.prompts), column_titles=titles,
                              cell_size=self.cell_size, gap_after=gap)

    def write(self, trainer: Trainer, current: Tensor) -> None:
        # One step number for the TensorBoard image, the grid's title and the file name: the
        # optimizer step (the scalars' x-axis counts rollouts from 0, so after the rollout that
        # made step 50 it reads 49; an image there would not match `ode_samples_step000050.png`).
        step = trainer.global_step
        grid = self.grid(current, step=step)
        video = self.video(current, step) if current.ndim == 5 else None  # [F, 3, H', W']
        for writer in tensorboard_writers(trainer):
            writer.add_image("visualization/ode_samples", grid, global_step=step)
            if video is not None:
                self._log_video(writer, current, video, step)
        if self.save_dir is not False and trainer.is_global_zero:
            folder = Path(self.save_dir or self._folder.get(trainer) / "visualization")
            save_png(grid, folder / f"ode_samples_step{step:06d}.png")
            if video is not None:
                save_gif(video, folder / f"ode_samples_step{step:06d}.gif", fps=self.fps)

    def video(self, current: Tensor, step: int | None = None) -> Tensor:
        """The grid at every frame of the clips: [F, 3, H', W'] (what the video and the GIF show)."""
        return torch.stack([self.grid(current, f, step) for f in range(current.shape[1])])

    def _log_video(self, writer, current: Tensor, video: Tensor, step: int) -> None:
        if add_video(writer, "visualization/ode_video", video, step, fps=self.fps):
            return
        if not self._warned_video:
            rank_zero_warn("ODEVisualizer: add_video needs moviepy<2 (moviepy.editor); logging video frames as an image")
            self._warned_video = True
        captions = [f"seed {s} · {p}" for s in self.seeds for p in self.prompts]  # rows of `current`: seed-major
        titles = [f"frame {f}" for f in range(current.shape[1])]
        frames = captioned_grid(current, row_captions=captions, column_titles=titles, cell_size=self.cell_size)
        writer.add_image("visualization/ode_video_frames", frames, global_step=step)

