"""The `lightning-grpo` command: LightningCLI with GRPO defaults (TensorBoard, checkpoints)."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import DiversityMonitor, ODEVisualizer, RewardLogger
from lightning_grpo.module import GRPOModule

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "grpo"},
    },
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def default_callbacks() -> list:
    """The callbacks of every run unless a config replaces the `trainer.callbacks` list
    (`--trainer.callbacks+=...` adds to them):

    - ModelCheckpoint: checkpoints in the log directory every 50 optimizer steps, and `last.ckpt`;
    - RewardLogger: per-reward normalised statistics, reward and advantage histograms;
    - DiversityMonitor: within-group and across-prompt diversity in pixel and latent space
      (cheap; CLIP space only when configured, since it needs a model);
    - ODEVisualizer: deterministic samples of 4 validation prompts × 2 seeds at fit start, every
      50 optimizer steps and at the end, beside the step-0 samples (off by itself without
      validation prompts).
    EMA and HeldOutEvaluation need choices (decay; a prompts file) and are opt-in.
    """
    return [
        ModelCheckpoint(every_n_train_steps=50, save_last=True, save_top_k=-1),
        RewardLogger(),
        DiversityMonitor(spaces=["pixel", "latent"]),
        ODEVisualizer(num_prompts=4, seeds=[0, 1], every_n_steps=50),
    ]


class GRPOCLI(LightningCLI):
    """LightningCLI for GRPOModule; any LightningDataModule that yields {"prompts": [...]} batches.

    `max_steps` counts optimizer steps (Lightning's convention under manual optimisation): one
    rollout makes (trained samples / samples_per_update) of them.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # One seed for everything: `seed_everything` also seeds the rollout noise (model.seed).
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_as_seed)


def _as_seed(value: int | bool | None) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def main(args: list[str] | None = None) -> None:
    """Entry point of `lightning-grpo` and `python -m lightning_grpo`."""
    run(args)


def run(args: list[str] | None = None, subcommand: bool = True) -> GRPOCLI:
    """Parse `args` (default: the command line) and run its subcommand; with subcommand=False,
    `args` has none and the model, datamodule and trainer are only instantiated."""
    # A hub lookup here would hang for minutes without network; models are loaded from paths.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return GRPOCLI(
        GRPOModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        run=subcommand,
        args=args if args is not None else sys.argv[1:],
    )
