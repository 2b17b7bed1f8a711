"""The `lightning-grpo` command: LightningCLI with GRPO defaults (TensorBoard, checkpoints)."""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_grpo.callbacks import DiversityMonitor, ODEVisualizer, RewardLogger
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
    """The callbacks of every run; a config's `trainer.callbacks` entry of the same class replaces
    the default one (see `GRPOCLI.instantiate_trainer`; a configured ModelCheckpoint is added
    beside the default one, as several checkpoint policies are common), others are added:

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

    def instantiate_trainer(self, **kwargs):
        """The configured callbacks plus each default whose class the config does not list.

        LightningCLI always appends `trainer_defaults["callbacks"]`, so a config that sets its own
        ODEVisualizer would otherwise run two; a default is dropped when its class is configured
        (except ModelCheckpoint: a second checkpoint policy complements the default one).
        """
        trainer = super().instantiate_trainer(**kwargs)
        defaults = {id(callback) for callback in self.trainer_defaults.get("callbacks", [])}
        configured = {type(c) for c in trainer.callbacks if id(c) not in defaults and not isinstance(c, ModelCheckpoint)}
        trainer.callbacks = [c for c in trainer.callbacks if id(c) not in defaults or type(c) not in configured]
        return trainer


# Lightning warnings that describe GRPO's intended set-up, not a mistake; each is explained here.
EXPECTED_WARNINGS = (
    # Manual optimisation: checkpoints hold the weights after the step, which is what resuming needs.
    "Using ModelCheckpoint with manual optimization",
    # GRPOModule.train keeps the policy (frozen encoders, VAE, denoiser) in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode",
)


def _silence_expected_warnings() -> None:
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _as_seed(value: int | bool | None) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def main(args: list[str] | None = None) -> None:
    """Entry point of `lightning-grpo` and `python -m lightning_grpo`: LightningCLI's subcommands
    (fit, validate, test, ...) plus `export` (lightning_grpo/export.py)."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["export"]:
        from lightning_grpo.export import main as export_main

        export_main(args[1:])
        return
    run(args)


def run(args: list[str] | None = None, subcommand: bool = True) -> GRPOCLI:
    """Parse `args` (default: the command line) and run its subcommand; with subcommand=False,
    `args` has none and the model, datamodule and trainer are only instantiated."""
    # A hub lookup here would hang for minutes without network; models are loaded from paths.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _silence_expected_warnings()
    return GRPOCLI(
        GRPOModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        run=subcommand,
        args=args if args is not None else sys.argv[1:],
    )
