"""Progress of a GRPO run that reads well in a terminal and in a log file.

Lightning's bars count batches per epoch: a step-based run (`trainer.max_steps`, every GRPO recipe)
shows "Epoch 12/-2" (no epoch limit) and a bar that restarts every pass over the prompts, and
with output redirected to a file (a scheduler's log) a bar prints nothing useful for the whole run.
`GRPOProgressBar` (on by default in `lightning-grpo`) keeps Lightning's tqdm bars for validation
and test, and for training:

- in a terminal: one bar over the whole run in optimizer steps (`trainer.max_steps`), with the
  mean reward and the data epoch after it;
- otherwise (stdout not a terminal): a line every `log_every_n_steps` optimizer steps and at the
  last one, e.g. ``step 50/500 (10%) | reward 0.612 | 3.41 s/step | elapsed 2:51 | ETA 25:35``
  (s/step over the steps since the previous line; ETA from the mean time per step since the start
  of training, so the callbacks' periodic work is included).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["GRPOProgressBar", "format_duration", "progress_line"]


def format_duration(seconds: float) -> str:
    """h:mm:ss, or m:ss under an hour (as tqdm)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(step: int, max_steps: int, seconds_per_step: float | None, elapsed: float, eta: float | None,
                  metrics: dict[str, float]) -> str:
    """One log-file progress line (the module doc's example); `max_steps` <= 0: no total known."""
    parts = [f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%)" if max_steps > 0 else f"step {step}"]
    parts += [f"{name} {value:.3f}" for name, value in metrics.items()]
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


class GRPOProgressBar(TQDMProgressBar):
    """Training progress by optimizer steps: a bar in a terminal, lines in a log file (module doc).

    Args:
        log_every_n_steps: optimizer steps between progress lines when stdout is not a terminal.
        refresh_rate: batches between terminal bar refreshes (as TQDMProgressBar).
        terminal: force the terminal bar (True) or the lines (False); None: whether stdout is a TTY.
    """

    # Lightning's format with tqdm's {rate_fmt}: "3.41s/step" below one step a second, "8.2step/s" above
    STEP_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, log_every_n_steps: int = 10, refresh_rate: int = 1, terminal: bool | None = None) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        super().__init__(refresh_rate=refresh_rate)
        self.log_every_n_steps = log_every_n_steps
        self.terminal = terminal
        self._started: float | None = None  # time.monotonic() at the start of training
        self._start_step = 0  # global step at the start (a resumed run starts past 0)
        self._last_line: tuple[int, float] | None = None  # (step, time) of the previous line

    # ------------------------------------------------------------------ mode
    @property
    def is_terminal(self) -> bool:
        return sys.stdout.isatty() if self.terminal is None else self.terminal

    @property
    def is_disabled(self) -> bool:
        """tqdm bars only in a terminal; the lines replace them elsewhere."""
        return not self.is_enabled or not self.is_terminal

    @staticmethod
    def _step_based(trainer: Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The progress-bar metrics (the mean reward) without Lightning's `v_num` (the run folder's
        version number, which is not a metric); the data epoch for step-based runs."""
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        if self._step_based(trainer):
            metrics["epoch"] = trainer.current_epoch
        return metrics

    # ------------------------------------------------------------------ training
    def init_train_tqdm(self) -> Tqdm:
        """Step-based runs: one bar "fit" from the current optimizer step (a resumed run starts
        past 0) to max_steps; epoch-based runs: Lightning's bar."""
        trainer = self.trainer
        if not self._step_based(trainer):
            return super().init_train_tqdm()
        return Tqdm(desc="fit", total=trainer.max_steps, initial=trainer.global_step, unit="step",
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.STEP_BAR_FORMAT)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._started, self._start_step = time.monotonic(), trainer.global_step
        self._last_line = (trainer.global_step, self._started)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not self._step_based(trainer):  # epoch-based: Lightning's bar per epoch
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._step_based(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self.train_progress_bar is not None and not self.train_progress_bar.disable:
            bar = self.train_progress_bar
            if trainer.global_step - bar.n >= self.refresh_rate or trainer.global_step >= trainer.max_steps:
                bar.n = trainer.global_step
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                bar.refresh()
        if self.is_enabled and not self.is_terminal:
            self._maybe_print_line(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._step_based(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.is_enabled and not self.is_terminal and self._started is not None:
            steps = trainer.global_step - self._start_step
            elapsed = time.monotonic() - self._started  # end-of-fit callbacks (evaluations) included
            print(f"fit done: {steps} optimizer steps in {format_duration(elapsed)}", flush=True)

    def _maybe_print_line(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step, now = trainer.global_step, time.monotonic()
        last_step, last_time = self._last_line or (self._start_step, now)
        at_end = self._step_based(trainer) and step >= trainer.max_steps
        if step == last_step or not (step // self.log_every_n_steps > last_step // self.log_every_n_steps or at_end):
            return
        done = step - self._start_step
        elapsed = now - (self._started or now)
        eta = elapsed / done * (trainer.max_steps - step) if done and self._step_based(trainer) else None
        metrics = {k: float(v) for k, v in trainer.progress_bar_metrics.items() if isinstance(v, (int, float))}
        line = progress_line(step, trainer.max_steps if self._step_based(trainer) else -1,
                             (now - last_time) / (step - last_step), elapsed, eta, metrics)
        print(line, flush=True)
        self._last_line = (step, now)


# ---------------------------------------------------------------------------- inside a training step
class PhaseTimer:
    """Wall-clock seconds per phase of a training step (rollout, decode, reward, update), logged as
    `train/time/<phase>`; CUDA is synchronised around each phase so the numbers mean something."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def phase_bar(phase: str, enabled: bool) -> Callable[[Iterable], Iterable]:
    """Wraps an iterable of a step's phase in a tqdm bar when `enabled`; disable=None lets tqdm turn
    itself off when stderr is not a terminal (a log file would get a carriage-return-joined line of
    bar frames per rollout)."""
    from tqdm.auto import tqdm

    return lambda iterable: tqdm(iterable, desc=phase, leave=False, disable=None if enabled else True, dynamic_ncols=True)


__all__ += ["PhaseTimer", "phase_bar"]


def step_logs(selection: Any, objective: Any, stats: list[Any], grad_norms: list[Any], lr: float, timer: PhaseTimer,
              group_size: int) -> dict[str, Any]:
    """{name: value} a training step logs under `train/`: per reward its mean, std, range and share
    of groups without variance; the training targets' mean, std and largest magnitude; the
    objective's statistics (`Objective.summarize`); the mean gradient norm, the learning rate, the
    optimizer steps made; the seconds per phase and the samples trained per second."""
    import torch

    from lightning_grpo.grpo.advantages import zero_variance_fraction

    logs: dict[str, Any] = {}
    trained_group, values = objective.trained_group_size(group_size), selection.targets.values
    for name, s in selection.scores.items():
        logs.update({f"reward/{name}_mean": s.mean(), f"reward/{name}_std": s.std(), f"reward/{name}_min": s.min(), f"reward/{name}_max": s.max()})
        logs[f"reward/{name}_zero_var_groups"] = zero_variance_fraction(s, trained_group)
    logs.update({"advantage/mean": values.mean(), "advantage/std": values.std(), "advantage/abs_max": values.abs().max()})
    logs.update(objective.summarize(stats))
    logs.update({"grad_norm": torch.stack(grad_norms).mean(), "lr": lr, "optimizer_steps": float(len(grad_norms))})
    logs.update({f"time/{phase}": seconds for phase, seconds in timer.seconds.items()})
    logs["time/samples_per_s"] = selection.trained.batch_size / max(sum(timer.seconds.values()), 1e-9)
    return logs


__all__ += ["step_logs"]


def log_reward(module: Any, scores: dict[str, Any], num_samples: int) -> None:
    """Log `reward` through the module: the mean of the rewards' means over every rank's trained
    samples (one all-reduce, `distributed.mean_over_ranks`, on every rank: a rank that trained
    nothing adds zeros), so the number the progress bar shows and `GRPOCheckpoint` ranks
    checkpoints by is the run's, not rank zero's."""
    import torch

    from lightning_grpo.distributed import mean_over_ranks

    zero = torch.zeros((), device=module.device)
    sums = torch.stack([scores[r.name].float().sum() if r.name in scores else zero for r in module.rewards.rewards])
    means = mean_over_ranks(sums, num_samples)
    if means is not None:
        module.log("reward", means.mean(), prog_bar=True, batch_size=max(num_samples, 1))


__all__ += ["log_reward"]
