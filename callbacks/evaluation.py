"""Held-out evaluation before and after a fit: did GRPO improve the rewards on unseen prompts?

Uses `lightning_grpo.evaluation.evaluate` (deterministic ODE samples from per-sample seeds, own
generators, global RNG preserved), so the before and after numbers compare the same noise, and
evaluating never changes training.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_grpo.callbacks._logging import logging_step, tensorboard_writers
from lightning_grpo.callbacks.ema import ema_weights
from lightning_grpo.evaluation import EvaluationResult, evaluate, format_before_after
from lightning_grpo.rewards.base import MultiReward, Reward


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file (one per line; blank lines and lines starting with '#' skipped) or
    of a JSONL file (key "prompt" or "caption" per record)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines()]
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in lines if line]
        return [str(r.get("prompt", r.get("caption"))) for r in records]
    return [line for line in lines if line and not line.startswith("#")]


class HeldOutEvaluation(Callback):
    """Evaluate the policy on held-out prompts at fit start and fit end; report the change.

    Scores with the module's rewards plus `extra_rewards` (e.g. an exact-match verifier that is
    not trained on). Logs `heldout/{reward}` (mean) and `heldout/{reward}_ci_low`/`_ci_high` (95%
    interval) at the step of each evaluation, writes results.csv, results.md and grid.png (rows =
    prompts with their text, columns = samples; also TensorBoard image `heldout/grid_{before,after}`) into
    `<log_dir>/heldout_before/` and `<log_dir>/heldout_after/`, and at the end prints (and writes
    `<log_dir>/heldout_before_after.md`) the before/after table. When an `EMA` callback is present
    the "after" evaluation uses the EMA weights.

    Every rank runs the evaluation forward (an FSDP-sharded model needs all of them; the same
    prompts and seeds give every rank the same samples); rank zero writes and logs.

    Args:
        prompts_file: held-out prompts, .txt (one per line) or .jsonl ("prompt"/"caption").
        samples_per_prompt: samples per prompt (sample j of prompt i has its own seeded noise).
        seed: base seed of the evaluation noise (the same before and after).
        batch_size: samples generated and scored at once (memory knob; results do not change).
        extra_rewards: rewards scored in addition to the module's (names must differ from them).
        before: evaluate when the fit starts.
        after: evaluate when the fit ends.
        max_prompts: use only the first this many prompts of the file.
        grid: write grid.png of the samples with the results.
    """

    def __init__(
        self,
        prompts_file: str,
        samples_per_prompt: int = 1,
        seed: int = 1234,
        batch_size: int = 32,
        extra_rewards: list[Reward] | None = None,
        before: bool = True,
        after: bool = True,
        max_prompts: int | None = None,
        grid: bool = True,
    ) -> None:
        self.prompts = read_prompts(prompts_file)[:max_prompts]
        if not self.prompts:
            raise ValueError(f"no prompts in {prompts_file}")
        self.samples_per_prompt = samples_per_prompt
        self.seed = seed
        self.batch_size = batch_size
        self.extra_rewards = list(extra_rewards or [])
        self.before, self.after = before, after
        self.grid = grid
        self.results: dict[str, EvaluationResult] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for reward in self.extra_rewards:  # not part of the module: move them along explicitly
            reward.to(pl_module.device)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before:
            self._run(trainer, pl_module, "before", use_ema=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.after:
            return
        self._run(trainer, pl_module, "after", use_ema=True)
        if trainer.is_global_zero and "before" in self.results:
            table = format_before_after(self.results["before"], self.results["after"])
            (self._log_dir(trainer) / "heldout_before_after.md").write_text(table)
            print(f"Held-out evaluation ({len(self.prompts)} prompts x {self.samples_per_prompt}):\n{table}", flush=True)

    def evaluate(self, pl_module: LightningModule) -> EvaluationResult:
        """Score the module's policy now on the held-out prompts."""
        rewards = MultiReward([*pl_module.rewards.rewards, *self.extra_rewards])
        return evaluate(
            pl_module.policy, pl_module.sampler, self.prompts, rewards, samples_per_prompt=self.samples_per_prompt,
            seed=self.seed, batch_size=self.batch_size, keep_pixels=self.grid, show_progress=False,
        )

    def _run(self, trainer: Trainer, pl_module: LightningModule, when: str, use_ema: bool) -> None:
        context = ema_weights(trainer, pl_module) if use_ema else nullcontext()
        with context:
            result = self.evaluate(pl_module)  # every rank: FSDP shards the forward
        self.results[when] = result
        if trainer.is_global_zero:
            result.write(self._log_dir(trainer) / f"heldout_{when}", grid=self.grid)
            if self.grid and result.pixels is not None:  # the same grid as grid.png, in TensorBoard
                for writer in tensorboard_writers(trainer):
                    writer.add_image(f"heldout/grid_{when}", result.grid(), global_step=logging_step(trainer))
            metrics = {}
            for name, (mean, low, high, _) in result.summary().items():
                metrics.update({f"heldout/{name}": mean, f"heldout/{name}_ci_low": low, f"heldout/{name}_ci_high": high})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
        trainer.strategy.barrier("heldout_evaluation")

    @staticmethod
    def _log_dir(trainer: Trainer) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir)

