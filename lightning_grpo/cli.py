"""The `lightning-grpo` command: LightningCLI with GRPO defaults (TensorBoard, checkpoints)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import warnings
from dataclasses import dataclass

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lightning_grpo.callbacks import EMA, DiversityMonitor, ODEVisualizer, RewardLogger
from lightning_grpo.catalog import import_shipped
from lightning_grpo.checkpointing import GRPOCheckpoint, check_checkpoint_file, use_atomic_checkpoints
from lightning_grpo.console import quiet_loading_bars, quiet_third_party, verbose_requested
from lightning_grpo.module import GRPOModule
from lightning_grpo.progress import GRPOProgressBar
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
    - GRPOProgressBar: progress in optimizer steps, a bar in a terminal, a line every 10 steps
      (reward, s/step, ETA) in a log file (`trainer.enable_progress_bar: false` turns it off).
    EMA and HeldOutEvaluation need choices (decay; a prompts file) and are opt-in.
    """
    return [
        GRPOProgressBar(log_every_n_steps=10),
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

    def __init__(self, *args, verbose: bool = False, **kwargs) -> None:
        self.verbose = verbose  # show the third-party output `lightning_grpo.console` filters
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands that GRPOModule supports (those in `COMMANDS`): not
        `predict`, as GRPOModule has no `predict_step` (sampling from a trained policy is `export`
        plus diffusers)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in COMMANDS}

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
        quiet_loading_bars(self.verbose)
        super().instantiate_classes()

    def before_fit(self) -> None:
        """Say where the run writes; on CUDA, warn when the memory estimate of this run
        (`lightning-grpo estimate`) exceeds the GPU's, naming the phase and the knobs (returns at
        once on other accelerators)."""
        from lightning_grpo.estimate import warn_if_over_capacity

        rank_zero_info(f"fit: config, logs, checkpoints and samples in {self.run_folder()}")
        warn_if_over_capacity(self.config["fit"].as_dict(), self.trainer)

    def before_validate(self) -> None:
        rank_zero_info(self.scored_weights("validate"))

    def before_test(self) -> None:
        rank_zero_info(self.scored_weights("test") + f"; results in {self.run_folder()}/test")

    def run_folder(self) -> str | None:
        """The run's folder (`runs/<name>/version_<N>`; each command opens a new version), on rank
        zero only: `Trainer.log_dir` broadcasts, a collective that must not run before the fit
        has set up its processes."""
        if rank_zero_only.rank != 0:
            return None
        logger = self.trainer.logger
        return getattr(logger, "log_dir", None) or self.trainer.default_root_dir

    def scored_weights(self, subcommand: str) -> str:
        """One line saying which weights `validate` / `test` score: a checkpoint's, or the base
        model's when no --ckpt_path is given (an easy mistake: the untrained model scores too)."""
        ckpt_path = self.config[subcommand].get("ckpt_path")
        use = "use_for_validation" if subcommand == "validate" else "use_for_test"
        ema = any(isinstance(c, EMA) and getattr(c, use) for c in self.trainer.callbacks)
        if ckpt_path:
            averaged = " (the EMA callback's averaged weights, where the checkpoint holds them)" if ema else ""
            return f"{subcommand}: scoring the trained weights in {ckpt_path}{averaged}"
        policy = self.model.policy
        base = getattr(policy, "pretrained_model_name_or_path", None) or type(policy).__name__
        return (f"{subcommand}: no --ckpt_path given, so scoring the base model ({base}), not a trained run; "
                f"to score a run add --ckpt_path=runs/<name>/version_<N>/checkpoints/last.ckpt")

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
        # One progress bar at most (Lightning refuses two, and refuses any with enable_progress_bar=False)
        no_bar = (config.get("trainer") or {}).get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in configured)
        defaults = self.trainer_defaults
        kept = [c for c in defaults.get("callbacks", []) if type(c) not in classes and not (no_bar and isinstance(c, ProgressBar))]
        self.trainer_defaults = {**defaults, "callbacks": kept}
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
    # `run` always passes the arguments to parse (`main` strips --verbose from the command line),
    # so LightningCLI's check against sys.argv, for scripts that pass both by mistake, does not apply.
    "LightningCLI's args parameter is intended",
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
        print("\nSIGINT (Ctrl+C): stopping after the current step and saving a checkpoint; Ctrl+C again stops at once", file=sys.stderr)
        os.kill(os.getpid(), signal.SIGTERM)


class _StopMessages(logging.Filter):
    """One clear line per stop instead of Lightning's "Received SIGTERM: 15" and its empty "An
    SIGTERMException was raised with message: , saved checkpoint to ..." (`GRPOCheckpoint`'s
    resume line says where the checkpoint is). A forwarded Ctrl+C has its own line already
    (`_StopSignals`), so the SIGTERM record it causes is dropped."""

    LOGGERS = ("lightning.pytorch.trainer.connectors.signal_connector", "lightning.pytorch.utilities.rank_zero",
               "lightning.fabric.utilities.rank_zero")

    def __init__(self, stops: _StopSignals) -> None:
        super().__init__()
        self.stops = stops

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "SIGTERMException was raised with message" in message:
            return False
        if re.search(r"Received SIGTERM: \d+", message):
            if self.stops.received == signal.SIGINT:
                return False
            record.msg = re.sub(r"Received SIGTERM: \d+", "SIGTERM: stopping after the current step and saving a checkpoint", message)
            record.args = ()
        return True

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


@dataclass(frozen=True)
class Command:
    """A subcommand of `lightning-grpo`: its one-line purpose (the top-level help) and, for a
    command outside LightningCLI, the module whose `main(argv)` runs it (None: LightningCLI's)."""

    purpose: str
    module: str | None = None


COMMANDS: dict[str, Command] = {
    "fit": Command("train a policy with GRPO from a config: lightning-grpo fit -c configs/demo.yaml"),
    "validate": Command("ODE-sample the validation prompts and score them, with the weights of --ckpt_path (else the base model)"),
    "test": Command("score the test prompts with 95% intervals, write results.md and a grid (weights of --ckpt_path)"),
    "export": Command("write a checkpoint as a plain diffusers folder (or LoRA weights) with its generation settings",
                      "lightning_grpo.export"),
    "estimate": Command("per-GPU peak memory of a recipe at full size (rollout, update, checkpoint) before renting GPUs",
                        "lightning_grpo.estimate"),
    "serve-reward": Command("serve a reward over HTTP (LitServe) for RemoteReward, e.g. on a dedicated reward GPU",
                            "lightning_grpo.serving"),
    "list": Command("list the shipped rewards, policies, samplers, step schedules, callbacks and data modules",
                    "lightning_grpo.catalog"),
}
"""Every subcommand, in the order `lightning-grpo --help` lists them: the one place a new one is
registered (its help line and, outside LightningCLI, its module); `main` dispatches from it."""

GLOBAL_OPTIONS = {
    "-h, --help": "this help; `lightning-grpo <command> --help` gives a command's options",
    "--verbose": "also show the third-party warnings, tips and loading bars filtered by default "
                 "(lightning_grpo/console.py; or LIGHTNING_GRPO_VERBOSE=1)",
}


def top_level_help() -> str:
    """The text of `lightning-grpo --help`: every subcommand with its purpose, the global options."""
    width = max(len(name) for name in [*COMMANDS, *GLOBAL_OPTIONS]) + 2
    lines = ["usage: lightning-grpo [--verbose] <command> [options]", "",
             "GRPO fine-tuning of image and video generators (DanceGRPO) on PyTorch Lightning.", "", "commands:"]
    lines += [f"  {name:<{width}}{command.purpose}" for name, command in COMMANDS.items()]
    lines += ["", "options:"]
    lines += [f"  {name:<{width}}{text}" for name, text in GLOBAL_OPTIONS.items()]
    lines += ["", "Without network set HF_HUB_OFFLINE=1; on a shared or loaded machine set OMP_NUM_THREADS=1 (docs/performance.md)."]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of `lightning-grpo` and `python -m lightning_grpo`: the subcommands of
    `COMMANDS` (LightningCLI's fit, validate, test; export; estimate; serve-reward; list), `--help`, `--verbose`.

    SIGTERM or SIGINT during `fit`: the current step finishes, a checkpoint of it is written
    (`GRPOCheckpoint`), and the process exits with status 143 (SIGTERM) or 130 (SIGINT).
    """
    verbose, args = verbose_requested(list(sys.argv[1:] if args is None else args))
    if not args or args[0] in ("-h", "--help"):
        print(top_level_help())
        if not args:
            sys.exit(2)  # a command is required (as argparse's usage error)
        return
    command = COMMANDS.get(args[0])
    if command is not None and command.module is not None:
        quiet_third_party(verbose)
        quiet_loading_bars(verbose)  # export loads the text encoders
        importlib.import_module(command.module).main(args[1:])
        return
    stops = _StopSignals()
    messages = _StopMessages(stops)
    stops.install()
    messages.install()
    try:
        run(args, verbose=verbose)
    except SIGTERMException:
        sys.exit(EXIT_STATUS[stops.received or signal.SIGTERM])
    finally:
        stops.restore()
        messages.remove()


def run(args: list[str] | None = None, subcommand: bool = True, verbose: bool | None = None) -> GRPOCLI:
    """Parse `args` (default: the command line) and run its subcommand; with subcommand=False,
    `args` has none and the model, datamodule and trainer are only instantiated. `verbose`
    (default: LIGHTNING_GRPO_VERBOSE) keeps the third-party output `lightning_grpo.console` filters."""
    # A hub lookup here would hang for minutes without network; models are loaded from paths.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose is None:
        verbose, _ = verbose_requested([])
    quiet_third_party(verbose)
    _silence_expected_warnings()
    import_shipped()  # so `fit --help` lists every shipped reward, policy, sampler, callback (catalog.py)
    return GRPOCLI(
        GRPOModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        run=subcommand,
        args=args if args is not None else sys.argv[1:],
        verbose=verbose,
    )
