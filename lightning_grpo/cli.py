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
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lightning_grpo import compat, stopping
from lightning_grpo.callbacks import EMA, DiversityMonitor, ODEVisualizer, RewardLogger, TestReport
from lightning_grpo.catalog import import_shipped
from lightning_grpo.checkpointing import (
    GRPOCheckpoint,
    RunLock,
    check_checkpoint_file,
    find_last_checkpoint,
    run_folder_of,
    use_atomic_checkpoints,
)
from lightning_grpo.console import quiet_loading_bars, quiet_third_party, verbose_requested
from lightning_grpo.errors import InputError, NonFiniteError
from lightning_grpo.module import GRPOModule
from lightning_grpo.progress import GRPOProgressBar
from lightning_grpo.stopping import EXIT_STATUS, StopNow, StopSignals
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
      (reward, s/step, ETA) in a log file (`trainer.enable_progress_bar: false` turns it off);
    - TestReport: `lightning-grpo test`'s 95% intervals, results.csv/.md and the grid of 64 samples.
    EMA and HeldOutEvaluation need choices (decay; a prompts file) and are opt-in.
    """
    return [
        GRPOProgressBar(log_every_n_steps=10),
        GRPOCheckpoint(every_n_train_steps=50, keep_last=3, keep_best=1),
        RewardLogger(),
        DiversityMonitor(spaces=["pixel", "latent"]),
        ODEVisualizer(num_prompts=4, seeds=[0, 1], every_n_steps=50),
        TestReport(grid_size=64),
    ]


class GRPOCLI(LightningCLI):
    """LightningCLI for GRPOModule; any LightningDataModule that yields {"prompts": [...]} batches.

    `max_steps` counts optimizer steps (Lightning's convention under manual optimisation): one
    rollout makes (trained samples / samples_per_update) of them; a `max_steps` between two
    rollouts is rounded up to the next rollout's end, with a warning (`validation.validate_fit`).

    `--optimizer` and `--lr_scheduler` are not options (`auto_configure_optimizers=False`): the
    module builds its AdamW and warm-up itself from `--model.learning_rate`, `weight_decay`,
    `adam_betas`, `adam_eps` and `lr_warmup_steps`, and an optimizer given there would be ignored.

    `--ckpt_path=last` resumes the newest `last.ckpt` of the logger's `save_dir/name` across its
    version folders, and a fit resumed from a checkpoint in a version folder of that logger writes
    on into that folder (unless `--trainer.logger.init_args.version` says otherwise), where
    `RunLock` makes sure no other live run writes.
    """

    appending_to: str | None = None
    """The version folder a resumed fit writes on into, or None."""

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

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's, refusing `--optimizer` / `--lr_scheduler` with the options to use instead
        (the module builds its own optimizer; the parser alone would say "unrecognized arguments")."""
        given = sys.argv[1:] if args is None else args
        for arg in given if isinstance(given, (list, tuple)) else []:
            name = str(arg).split("=", 1)[0]
            if name.startswith(("--optimizer", "--lr_scheduler")):
                parser.error(
                    f"{name} is not an option: GRPOModule trains with its own AdamW; set it with --model.learning_rate, "
                    "--model.weight_decay, --model.adam_betas, --model.adam_eps and --model.lr_warmup_steps (linear warm-up)"
                )
            if name == "--model.test_grid_size":
                parser.error("--model.test_grid_size moved to the TestReport callback (on by default): "
                             "--trainer.callbacks+=lightning_grpo.callbacks.TestReport --trainer.callbacks.grid_size=N")
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's (a protected method: `compat.LIGHTNING_CLI`): that one loads the whole checkpoint here and writes its saved
        `model` hyperparameters over the parsed config, so options given on resume
        (`--model.learning_rate=...`) were silently dropped, and a large checkpoint was read twice.
        Here the config stays as given; `GRPOModule.on_load_checkpoint` applies the changed options
        or refuses them (see `checkpointing`).

        Here, before anything loads: `last` becomes the newest `last.ckpt` of the run's name across
        its versions (Lightning's own `last` looks in this run's new version folder only, so a
        requeued run restarted from step 0); the file is checked to exist and to match its
        checksums (`verify_checkpoint`); a fit resumed from a checkpoint of one of the logger's
        version folders writes on into that folder."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if not ckpt_path:
            return
        logger = _logger_init_args(section.get("trainer"))
        if ckpt_path == "last" and logger is not None:
            found = find_last_checkpoint(logger["save_dir"], logger["name"])
            where = Path(logger["save_dir"]) / logger["name"]
            if found is None:
                rank_zero_info(f"--ckpt_path=last: no last.ckpt in any version folder of {str(where)!r}: starting a new run")
                section["ckpt_path"] = None
                return
            ckpt_path = section["ckpt_path"] = str(found)
            rank_zero_info(f"--ckpt_path=last: resuming from {ckpt_path}")
        if ckpt_path in ("last", "best", "hpc", "registry"):
            return
        # the bytes on global rank zero only: it checks before it launches the other ranks (Lightning's
        # launcher) or stops the launch (torchrun, srun); they check their share when it loads
        # (a sharded folder: `DenoiserFSDPStrategy`) or the file they load (`AtomicCheckpointIO`)
        check_checkpoint_file(ckpt_path, verify=rank_zero_only.rank == 0)
        if subcommand == "fit" and logger is not None and logger.get("version") is None:
            version = run_folder_of(ckpt_path, logger["save_dir"], logger["name"])
            if version is not None:
                section["trainer"]["logger"]["init_args"]["version"] = version
                self.appending_to = str(Path(logger["save_dir"]) / logger["name"] / version)

    def instantiate_classes(self) -> None:
        """Validate the parsed config (batch divisibility, resolutions, reward weights, paths,
        enough prompts for one step) before anything is built: no weights load for a run that
        cannot work (see `lightning_grpo.validation`)."""
        validate_config(self.config[self.subcommand] if self.subcommand else self.config, stage=self.subcommand or "fit")
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
        if self.subcommand in (None, "fit") and not any(isinstance(c, RunLock) for c in trainer.callbacks):
            trainer.callbacks.insert(0, RunLock())  # first: before any callback writes into the folder
        if self.appending_to is not None:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            rank_zero_info(f"Resuming into the run folder {self.appending_to}")
        stopping.attach(trainer)
        return trainer


def _logger_init_args(trainer: Any) -> dict[str, Any] | None:
    """The `init_args` (a live Namespace, so `version` can be set) of a TensorBoard or CSV logger
    configured as `trainer.logger`, with `save_dir` and `name` present; None for other loggers."""
    logger = trainer.get("logger") if trainer is not None else None
    class_path = str(logger.get("class_path", "")) if hasattr(logger, "get") else ""
    if class_path.rsplit(".", 1)[-1] not in ("TensorBoardLogger", "CSVLogger"):
        return None
    init_args = logger.get("init_args")
    if init_args is None or init_args.get("save_dir") is None:
        return None
    if init_args.get("name") is None:
        init_args["name"] = "lightning_logs"
    return init_args


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


class _StopMessages(logging.Filter):
    """One clear line per stop: `stopping.StopSignals` prints it when the signal arrives, so
    Lightning's own "Received SIGTERM: 15" and its empty "An SIGTERMException was raised with
    message: , saved checkpoint to ..." are dropped (`GRPOCheckpoint`'s resume line says where the
    checkpoint is)."""

    LOGGERS = (compat.SIGNAL_CONNECTOR_LOGGER, "lightning.pytorch.utilities.rank_zero",
               "lightning.fabric.utilities.rank_zero")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "SIGTERMException was raised with message" not in message and not re.search(r"Received SIGTERM: \d+", message)

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

    SIGTERM or SIGINT (see `lightning_grpo.stopping`): in a training step, the step finishes, a
    checkpoint of it is written; in an evaluation, it stops at its next batch; a second signal
    stops at once. Exit status 143 (SIGTERM) or 130 (SIGINT).

    Errors: an `InputError` (a bad option, file, checkpoint, data or run folder) or a missing file
    prints its message alone and exits with status 2, as the parser does for an unknown option; a
    `NonFiniteError` prints its message alone and exits with status 1. Set
    LIGHTNING_GRPO_TRACEBACK=1 to see their tracebacks.
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
    stops = StopSignals()
    messages = _StopMessages()
    stops.install()
    messages.install()
    try:
        run(args, verbose=verbose)
    except (SIGTERMException, StopNow):
        sys.exit(EXIT_STATUS[stops.received or signal.SIGTERM])
    except SystemExit as exit_:
        # Lightning turns a KeyboardInterrupt (our StopNow) into sys.exit(1) after its clean-up
        sys.exit(EXIT_STATUS[stops.received] if stops.received else exit_.code)
    except (InputError, FileNotFoundError, NonFiniteError) as err:
        if os.environ.get("LIGHTNING_GRPO_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteError) else 2)
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
    compat.warn_if_untested()  # the private Lightning API used (compat.py) is checked for these versions only
    import_shipped()  # so `fit --help` lists every shipped reward, policy, sampler, callback (catalog.py)
    return GRPOCLI(
        GRPOModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module builds its own optimizer (see GRPOCLI)
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        run=subcommand,
        args=args if args is not None else sys.argv[1:],
        verbose=verbose,
    )
