"""The `lightning-grpo` command: LightningCLI with GRPO defaults (TensorBoard, checkpoints)."""

from __future__ import annotations

import os
import signal
import sys
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_grpo.callbacks import DiversityMonitor, ODEVisualizer, RewardLogger
from lightning_grpo.checkpointing import GRPOCheckpoint, check_checkpoint_file, use_atomic_checkpoints
from lightning_grpo.module import GRPOModule
from lightning_grpo.validation import validate_config

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

    - GRPOCheckpoint: checkpoints in the log directory every 50 optimizer steps, at the last step
      and on SIGTERM/SIGINT, and `last.ckpt`; keeps the last 3 plus the best by reward;
    - RewardLogger: per-reward normalised statistics, reward and advantage histograms;
    - DiversityMonitor: within-group and across-prompt diversity in pixel and latent space
      (cheap; CLIP space only when configured, since it needs a model);
    - ODEVisualizer: deterministic samples of 4 validation prompts × 2 seeds at fit start, every
      50 optimizer steps and at the end, beside the step-0 samples (off by itself without
      validation prompts).
    EMA and HeldOutEvaluation need choices (decay; a prompts file) and are opt-in.
    """
    return [
        GRPOCheckpoint(every_n_train_steps=50, keep_last=3, keep_best=1),
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

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's: that one loads the whole checkpoint here and writes its saved
        `model` hyperparameters over the parsed config, so options given on resume
        (`--model.learning_rate=...`) were silently dropped, and a large checkpoint was read twice.
        Here the config stays as given; `GRPOModule.on_load_checkpoint` applies the changed options
        or refuses them (see `checkpointing`). The file is only checked to exist and be complete,
        so a truncated checkpoint is named before anything loads."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)

    def instantiate_classes(self) -> None:
        """Validate the parsed config (batch divisibility, resolutions, reward weights, paths,
        enough prompts for one step) before anything is built: no weights load for a run that
        cannot work (see `lightning_grpo.validation`)."""
        validate_config(self.config[self.subcommand] if self.subcommand else self.config, fit=self.subcommand in (None, "fit"))
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        """The configured callbacks plus each default whose class the config does not list.

        LightningCLI always appends `trainer_defaults["callbacks"]`, so a config that sets its own
        ODEVisualizer (or GRPOCheckpoint) would otherwise run two — and two stateful callbacks of
        one class cannot both be checkpointed. A default is dropped when its class is configured,
        before the Trainer is built; a plain ModelCheckpoint complements the default checkpoints.
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        configured = (config.get("trainer") or {}).get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        classes = {type(c) for c in configured if type(c) is not ModelCheckpoint}
        defaults = self.trainer_defaults
        self.trainer_defaults = {**defaults, "callbacks": [c for c in defaults.get("callbacks", []) if type(c) not in classes]}
        try:
            trainer = super().instantiate_trainer(**kwargs)
        finally:
            self.trainer_defaults = defaults
        use_atomic_checkpoints(trainer)
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


EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
"""Exit status after a stop signal (the shell convention 128 + signal number): never 0, so a
scheduler does not take an interrupted run for a finished one."""


class _StopSignals:
    """SIGINT handled like SIGTERM: finish the current step, checkpoint, exit non-zero.

    Lightning handles SIGTERM itself (`Trainer.received_sigterm`: the loops stop between steps and
    raise `SIGTERMException`, which `GRPOCheckpoint` saves on; with SLURM auto-requeue its own
    handler checkpoints and requeues). Two things are hand-written here: SIGINT reaches Lightning
    as a KeyboardInterrupt at any point, possibly halfway through an update, so the first one is
    forwarded as SIGTERM (a second one interrupts at once); and `SIGTERMException` is a
    `SystemExit` without a code, i.e. exit status 0, so `main` turns it into 128 + signal.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = signal.getsignal(signal.SIGINT)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        lightning_handles_sigterm = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self.received is not None or not lightning_handles_sigterm:
            raise KeyboardInterrupt  # second Ctrl+C, or before training started: stop now
        self.received = signal.SIGINT
        print("\nSIGINT: stopping after the current step and saving a checkpoint (again to stop at once)", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)


def main(args: list[str] | None = None) -> None:
    """Entry point of `lightning-grpo` and `python -m lightning_grpo`: LightningCLI's subcommands
    (fit, validate, test, ...) plus `export` (lightning_grpo/export.py) and `serve-reward`
    (lightning_grpo/serving.py: serve a reward over HTTP).

    SIGTERM or SIGINT during `fit`: the current step finishes, a checkpoint of it is written
    (`GRPOCheckpoint`), and the process exits with status 143 (SIGTERM) or 130 (SIGINT).
    """
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["export"]:
        from lightning_grpo.export import main as export_main

        export_main(args[1:])
        return
    if args[:1] == ["serve-reward"]:  # serve a reward over HTTP for RemoteReward (lightning_grpo/serving.py)
        from lightning_grpo.serving import main as serve_main

        serve_main(args[1:])
        return
    stops = _StopSignals()
    stops.install()
    try:
        run(args)
    except SIGTERMException:
        sys.exit(EXIT_STATUS[stops.received or signal.SIGTERM])
    finally:
        stops.restore()


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
