"""Start-up validation: everything that can be checked before the first rollout, with errors that
name the bad value, so a misconfigured run fails in seconds instead of after the model loaded
(or after a held-out evaluation ran).

Two layers:
- `validate_config` runs in the CLI on the parsed config, before any class is instantiated (no
  weights loaded): every numeric option of the module, the policy and the sampler against its
  range (`MODULE_RANGES`, `POLICY_RANGES`, `SAMPLER_RANGES`, `TRAINER_RANGES`), the callbacks'
  and the datamodule's own checks (they are cheap to build), batch divisibility, image and video
  geometry against the VAE and patch factors read from the model folder's `config.json` files,
  reward weights, trainer options manual optimisation refuses, paths (a local-looking path that
  does not exist; a hub id named as such offline), a log folder that cannot be written, whether
  the prompt data fills one training step, and whether `validate`/`test` have prompts at all.
- `check_module_options`, `check_batch_settings`, `check_reward_weights` and `validate_fit` are
  called by `GRPOModule` (constructor and `setup`), so the same checks hold for runs built in Python.

`SkipGuard` stops a run whose every step is skipped (all groups dropped, or non-finite gradients
under `nonfinite="skip"`), which would otherwise never reach `max_steps`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning_grpo.errors import InputError
from lightning_grpo.policies.loading import check_pretrained_folder, looks_local


class ConfigError(InputError, ValueError):
    """A setting that cannot work; the message names the option and its value."""


# --------------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: [low, high] (open ends where said), an integer or
    any finite number, None allowed when `optional`; `why` explains the bound in the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    why: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("must be > 0"), or None when it is accepted."""
        if value is None:
            return None if self.optional else "must be set"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not float(value).is_integer()):
            return f"must be {'an integer' if self.integer else 'a number'}"
        if not math.isfinite(value):
            return "must be finite"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}" + self._upper_text()
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'<' if self.high_open else '<='} {self.high:g}" + self._lower_text()
        return None

    def _upper_text(self) -> str:
        return "" if self.high is None else f" and {'<' if self.high_open else '<='} {self.high:g}"

    def _lower_text(self) -> str:
        return "" if self.low is None else f" and {'>' if self.low_open else '>='} {self.low:g}"


MODULE_RANGES: dict[str, Range] = {
    "group_size": Range(2, integer=True, why="advantages compare the samples of a prompt"),
    "timestep_fraction": Range(0, 1, low_open=True, optional=True),
    "micro_batch_size": Range(1, integer=True),
    "samples_per_update": Range(1, integer=True, optional=True),
    "clip_range": Range(0, low_open=True, optional=True),
    "adv_clip_max": Range(0, low_open=True, optional=True, why="advantages are clamped to ±adv_clip_max: 0 makes every advantage 0, "
                                                               "a negative value sets every advantage to -adv_clip_max"),
    "kl_beta": Range(0, optional=True, why="a negative weight rewards moving away from the initial policy"),
    "learning_rate": Range(0, why="a negative rate climbs the loss"),
    "weight_decay": Range(0),
    "adam_eps": Range(0, low_open=True),
    "lr_warmup_steps": Range(0, integer=True),
    "max_grad_norm": Range(0, low_open=True, optional=True, why="null disables clipping; 0 would clip every gradient to 0"),
    "decode_batch_size": Range(1, integer=True),
    "rollout_batch_size": Range(1, integer=True, optional=True),
    "seed": Range(0, integer=True),
    "max_skipped_steps": Range(1, integer=True),
    "constant_reward_steps": Range(1, integer=True),
}
"""GRPOModule's numeric options (`adam_betas` and `best_of_n` are checked beside them); the flat
GRPO options are optional here (None: not set, the objective's own value; see `objectives.GRPO.ranges`)."""

POLICY_RANGES: dict[str, Range] = {
    "height": Range(1, integer=True),
    "width": Range(1, integer=True),
    "resolution": Range(1, integer=True),
    "num_frames": Range(1, integer=True),
    "lora_rank": Range(0, integer=True),
    "lora_alpha": Range(0, low_open=True, optional=True),
    "num_sampling_steps": Range(1, integer=True, optional=True),
    "sampling_eta": Range(0, low_open=True, optional=True, why="the training sampler needs noise"),
    "sampling_shift": Range(0, low_open=True, optional=True),
    "max_sequence_length": Range(1, integer=True),
    "guidance": Range(0),
    "guidance_scale": Range(0),
    "true_cfg_scale": Range(0),
}
"""Numeric options of the policy families (those a family has)."""

SAMPLER_RANGES: dict[str, Range] = {
    "num_steps": Range(1, integer=True),
    "eta": Range(0, low_open=True, why="the training sampler needs noise: eta = 0 is an ODE sampler with no log-probability"),
    "shift": Range(0, low_open=True),
}

TRAINER_RANGES: dict[str, Range] = {
    "max_steps": Range(-1, integer=True, why="-1 trains without a step limit"),
    "max_epochs": Range(-1, integer=True, optional=True),
    "log_every_n_steps": Range(1, integer=True),
}


def check_ranges(values: Mapping[str, Any], ranges: Mapping[str, Range], prefix: str) -> None:
    """Raise ConfigError naming the first option of `values` outside its range (`prefix` + name)."""
    for name, allowed in ranges.items():
        if name not in values:
            continue
        problem = allowed.problem(values[name])
        if problem is not None:
            why = f" ({allowed.why})" if allowed.why else ""
            raise ConfigError(f"{prefix}{name} {problem}, got {values[name]!r}{why}")


def check_module_options(options: Mapping[str, Any], prefix: str = "model.") -> None:
    """GRPOModule's numeric options in range, before anything is built (`MODULE_RANGES`)."""
    check_ranges(options, MODULE_RANGES, prefix)
    betas = options.get("adam_betas")
    if betas is not None:
        if len(betas) != 2 or any(Range(0, 1, high_open=True).problem(b) for b in betas):
            raise ConfigError(f"{prefix}adam_betas must be two numbers in [0, 1), got {betas!r}")
    best = options.get("best_of_n")
    if best is not None:
        group_size = options.get("group_size", 12)
        top, bottom = best
        if top < 0 or bottom < 0 or not 2 <= top + bottom <= group_size:
            raise ConfigError(f"{prefix}best_of_n {tuple(best)} must keep between 2 and group_size ({group_size}) samples per group")
    samples_per_update, micro = options.get("samples_per_update"), options.get("micro_batch_size", 1)
    if samples_per_update is not None and samples_per_update % micro:
        raise ConfigError(f"{prefix}samples_per_update ({samples_per_update}) must be a multiple of micro_batch_size ({micro})")


def warn_cannot_learn(options: Mapping[str, Any], prefix: str = "model.") -> None:
    """Settings that are valid but train nothing: a zero learning rate."""
    if options.get("learning_rate") == 0:
        warnings.warn(f"{prefix}learning_rate=0: the weights never change, this run learns nothing", UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------- batch settings
def check_batch_settings(
    batch_size: int, group_size: int, best_of_n: Sequence[int] | None, samples_per_update: int | None, micro_batch_size: int,
    uses_cfg: bool | None = False,
) -> None:
    """The trained samples of one rollout (per rank) must split into optimizer steps of
    `samples_per_update` samples, each made of micro-batches of `micro_batch_size`.

    Trained samples per rank = batch_size × (group_size, or top + bottom of best_of_n). With CFG
    (`uses_cfg`) there is one optimizer step per rollout and `samples_per_update` is ignored; None
    (unknown before the policy loads) leaves the check to `validate_fit`.
    """
    if batch_size < 1:
        raise ConfigError(f"data batch_size must be >= 1, got {batch_size}")
    per_group = group_size if best_of_n is None else sum(best_of_n)
    trained = batch_size * per_group
    if uses_cfg is None:
        return
    per_update = trained if (uses_cfg or samples_per_update is None) else samples_per_update
    where = f"batch_size={batch_size} prompts × {per_group} trained samples per group = {trained} samples per rollout (per rank)"
    if trained % per_update:
        raise ConfigError(
            f"{where} do not split into optimizer steps of samples_per_update={samples_per_update}; "
            f"choose a divisor of {trained}, or change batch_size / group_size"
        )
    if per_update % micro_batch_size:
        raise ConfigError(f"{where}: optimizer steps of {per_update} samples do not split into micro-batches of micro_batch_size={micro_batch_size}")


def check_reward_weights(weights: Mapping[str, float]) -> None:
    """At least one reward must count: all-zero weights make every advantage 0 (nothing learns)."""
    bad = {name: w for name, w in weights.items() if not isinstance(w, (int, float)) or w != w}
    if bad:
        raise ConfigError(f"reward weights must be numbers, got {bad}")
    if weights and all(w == 0 for w in weights.values()):
        raise ConfigError(f"every reward weight is 0 ({dict(weights)}): advantages would all be 0; give one reward a non-zero weight")


def check_module_parts(options: Mapping[str, Any], objective: Any, policy: Any, sampler: Any, step_schedule: Any, ode_tail: Any) -> None:
    """What `GRPOModule.__init__` checks before it builds anything: the sampler fits the policy's
    paradigm, every numeric option is in its range (`MODULE_RANGES`), the choice options are known,
    the step schedule fits the sampler and an ODE tail has a schedule (unless the objective's
    rollouts are ODE rollouts) and a flow sampler."""
    import torch

    from lightning_grpo.policies.base import check_sampler_matches

    check_sampler_matches(policy, sampler)
    check_module_options(dict(options), prefix="")
    for name, allowed in (("nonfinite", ("stop", "skip")), ("reward_failure", ("raise", "drop_group"))):
        if options[name] not in allowed:
            raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {options[name]!r}")
    if step_schedule is not None:  # fail at construction if the schedule does not fit the sampler
        step_schedule.sde_steps(sampler.num_steps, 0, torch.Generator().manual_seed(0))
    if ode_tail is not None:
        if step_schedule is None and objective.needs.log_probs:
            raise ValueError("ode_tail needs a step_schedule: without one every step is an SDE step and there is no tail")
        ode_tail.sigmas(sampler, 0)  # a flow sampler, or a clear error


# --------------------------------------------------------------------------------- at fit set-up
def validate_fit(module: Any, trainer: Any) -> None:
    """Checks that need the built module and trainer (world size, the policy's CFG, the data)."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    hp = module.hparams
    if isinstance(batch_size, int):
        check_batch_settings(batch_size, hp.group_size, hp.best_of_n, hp.samples_per_update, hp.micro_batch_size, module.policy.uses_cfg)
        per_group = hp.group_size if hp.best_of_n is None else sum(hp.best_of_n)
        trained = batch_size * per_group
        per_update = trained if (module.policy.uses_cfg or hp.samples_per_update is None) else hp.samples_per_update
        round_max_steps(trainer, trained // per_update, f"batch_size={batch_size} × {per_group} trained samples per group / {per_update} per optimizer step")
    check_manual_optimisation(trainer.accumulate_grad_batches, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)


def round_max_steps(trainer: Any, steps_per_rollout: int, how: str = "") -> int:
    """A rollout is trained on whole: `trainer.max_steps` that ends inside one is rounded up to the
    end of that rollout, with a warning naming the rollout's optimizer steps, so the last
    checkpoint is at a rollout boundary and a run extended from it is exact. Returns max_steps."""
    max_steps = trainer.max_steps
    if max_steps <= 0 or steps_per_rollout <= 1 or max_steps % steps_per_rollout == 0:
        return max_steps
    rounded = -(-max_steps // steps_per_rollout) * steps_per_rollout
    trainer.fit_loop.epoch_loop.max_steps = rounded
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    rank_zero_warn(
        f"trainer.max_steps={max_steps} ends inside a rollout: each rollout makes {steps_per_rollout} optimizer steps "
        f"({how}), so the run stops at optimizer step {rounded}, the end of that rollout"
    )
    return rounded


def check_manual_optimisation(accumulate_grad_batches: int | None, gradient_clip_val: float | None,
                              gradient_clip_algorithm: Any = None) -> None:
    """Trainer options that manual optimisation ignores or refuses, with the module option to use
    (the module clips by norm, `model.max_grad_norm`: a trainer asking for value clipping is refused)."""
    if accumulate_grad_batches not in (None, 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} is not supported (GRPO optimises manually): "
            "use model.samples_per_update to accumulate samples per optimizer step"
        )
    if gradient_clip_val:
        raise ConfigError(f"trainer.gradient_clip_val={gradient_clip_val} is not supported (manual optimisation): use model.max_grad_norm")
    algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
    if algorithm not in (None, "norm"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={algorithm!r} is not supported: GRPOModule clips the gradient by its "
                          "norm, model.max_grad_norm (None turns clipping off)")


# --------------------------------------------------------------------------------- skipped steps
class SkipGuard:
    """Counts training steps skipped in a row (every group dropped) and stops the run at `limit`.

    A skipped step makes no optimizer step, so `global_step` never moves and `max_steps` is never
    reached: without this, a reward that is always NaN under `reward_failure="drop_group"` would
    loop forever.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"max_skipped_steps must be >= 1, got {limit}")
        self.limit, self.in_a_row = limit, 0

    def step(self, skipped: bool, why: str = "", what: str = "every group was dropped", remedy: str = "fix the reward (see the warnings above)") -> None:
        """Record one training step; raise RuntimeError after `limit` skipped ones in a row,
        saying `what` happened, `why`, and the `remedy`."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} training steps in a row were skipped because {what} ({why}); "
                f"the run cannot make progress: {remedy} or raise model.max_skipped_steps"
            )

    def empty_batch(self) -> None:
        """Warn of a training batch without a readable record and count its step as skipped."""
        warnings.warn("empty training batch (no readable record in it): skipping this step", RuntimeWarning, stacklevel=4)
        self.step(True, why="every record of the data's block was malformed or its image unreadable",
                  what="their batches were empty", remedy="fix the data (the malformed records are named in the warnings above)")


# --------------------------------------------------------------------------------- on the config
def validate_config(config: Any, fit: bool = True, stage: str | None = None) -> None:
    """Check a parsed `lightning-grpo` config (a jsonargparse Namespace) before anything is built.

    `stage`: the subcommand ("fit", "validate", "test"; default "fit" when `fit`, else "test").
    A fit also checks that the training prompts fill one step; validate and test that there are
    held-out prompts to evaluate.
    """
    stage = stage or ("fit" if fit else "test")
    model, data, trainer = _section(config, "model"), _section(config, "data"), _section(config, "trainer")
    policy = _section(model, "policy")
    _check_trainer(trainer)
    data_args = _init_args(data)
    batch_size = data_args.get("batch_size")
    if isinstance(batch_size, int) and isinstance(model.get("group_size"), int):  # first: its message says the most
        check_batch_settings(
            batch_size, model["group_size"], model.get("best_of_n"), model.get("samples_per_update"),
            model.get("micro_batch_size", 1), _uses_cfg(policy),
        )
    check_module_options(model)
    _check_objective(model)
    _check_sampler(model)
    _check_policy(policy)
    check_reward_weights({f"reward {i}": _init_args(r).get("weight", 1.0) for i, r in enumerate(model.get("rewards") or [])})
    _check_callbacks(trainer)
    if stage == "fit":
        _check_log_folder(trainer)
    _check_data(data, trainer, stage)
    if stage == "fit":
        warn_cannot_learn(model)


def _check_objective(model: Mapping[str, Any]) -> None:
    """The objective's numeric options in their ranges (its `ranges`), named as the config sets
    them, before it is built (its constructor's error would reach the user inside a parser traceback)."""
    from lightning_grpo.objectives.base import objective_class

    cls, section = objective_class(model), model.get("objective")
    init_args = _init_args(section) if section is not None and not isinstance(section, str) else {}
    if cls is not None and init_args:  # the flat GRPO options are checked with the module's (MODULE_RANGES)
        check_ranges({name: init_args[name] for name in cls.ranges if name in init_args}, cls.ranges, "model.objective.init_args.")


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    check_ranges(trainer, TRAINER_RANGES, "trainer.")
    check_manual_optimisation(trainer.get("accumulate_grad_batches", 1), trainer.get("gradient_clip_val"), trainer.get("gradient_clip_algorithm"))


def _check_sampler(model: Mapping[str, Any]) -> None:
    sampler = _section(model, "sampler")
    if sampler.get("class_path"):
        check_ranges(_init_args(sampler), SAMPLER_RANGES, "model.sampler.")


def _check_policy(policy: Mapping[str, Any]) -> None:
    args = _init_args(policy)
    for name in ("height", "width", "resolution", "num_frames"):
        value = args.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"model.policy {name} must be a positive integer, got {value!r}")
    check_ranges(args, POLICY_RANGES, "model.policy.")
    path = args.get("pretrained_model_name_or_path")
    if not path:
        return
    check_pretrained_folder(path, {})  # a missing local folder, or a hub id that cannot load offline
    if looks_local(path):
        _check_geometry(str(policy.get("class_path", "")), Path(path).expanduser(), args)


def _check_geometry(class_path: str, root: Path, args: Mapping[str, Any]) -> None:
    """Height and width multiples of the VAE's spatial factor × the denoiser's latent multiple
    (FLUX's 2×2 packing, a video transformer's patch size), and a video's frame count of the
    VAE's temporal form (t·k + 1), by the family's own rules (`DiffusersPolicy.geometry_steps`)
    applied to the folder's `config.json` files: no weights load. Defaults of the policy class
    apply to options the config leaves out."""
    cls = _import(class_path)
    if cls is None:
        return
    from lightning_grpo.policies.base import configured
    from lightning_grpo.policies.family import DiffusersPolicy

    if not (isinstance(cls, type) and issubclass(cls, DiffusersPolicy)):
        return
    values = configured(cls, args)
    configs = {sub: config for sub, (kind, _) in cls.components.items() if kind == "model"
               for config in [_read_config(root / sub / "config.json")] if config is not None}
    if "vae" not in configs:
        return
    try:
        steps = cls.geometry_steps(configs)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"cannot read the VAE factor from {str(root / 'vae' / 'config.json')!r}: {err}") from err
    factor, multiple = steps.vae_factor, steps.latent_multiple
    for name in ("height", "width"):
        value = values.get(name)
        if isinstance(value, int) and value % steps.spatial:
            raise ConfigError(
                f"model.policy {name}={value} must be a multiple of {steps.spatial} (VAE factor {factor} of {str(root)!r} × {multiple}){steps.multiple_source}"
            )
    frames, ratio = values.get("num_frames"), steps.frame_ratio
    if isinstance(frames, int) and ratio > 1 and (frames - 1) % ratio:
        raise ConfigError(
            f"model.policy num_frames={frames} must be {ratio}k + 1 (the VAE of {str(root)!r} compresses time {ratio}×, "
            f"keeping the first frame), e.g. {(frames - 1) // ratio * ratio + 1} or {((frames - 1) // ratio + 1) * ratio + 1}"
        )


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"cannot read {str(path)!r}: {err}") from err


def _import(class_path: str) -> Any:
    import importlib

    module, _, name = class_path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _check_callbacks(trainer: Mapping[str, Any]) -> None:
    """Build the configured callbacks of lightning-grpo and Lightning whose arguments hold no other
    class (cheap: no reward or model inside), so their own checks run before the model loads;
    the CLI builds them again with the rest."""
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        entry = _as_dict(callback)
        class_path = str(entry.get("class_path", ""))
        args = _init_args(entry)
        if not class_path.startswith(("lightning_grpo.", "lightning.")) or any(_holds_class(v) for v in args.values()):
            continue
        try:
            _build(class_path, args)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"trainer.callbacks {class_path.rsplit('.', 1)[-1]}: {err}") from err


def _holds_class(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "class_path" in value or any(_holds_class(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_class(v) for v in value)
    return False


def _build(class_path: str, args: Mapping[str, Any]) -> Any:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    return instantiate_class((), Namespace(class_path=class_path, init_args=Namespace(**args)))


def _check_log_folder(trainer: Mapping[str, Any]) -> None:
    """The logger's folder (or default_root_dir) must be writable: found out only once the model
    has loaded and the first file is written, otherwise. Probed by creating (and removing) a
    temporary file in the folder, or in its nearest existing parent (a permission bit check would
    pass for root on a read-only filesystem)."""
    logger = _as_dict(trainer.get("logger"))
    folder = _init_args(logger).get("save_dir") if logger else None
    folder = folder if folder is not None else trainer.get("default_root_dir")
    if not folder or "://" in str(folder):
        return
    path = Path(folder).expanduser()
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ConfigError(f"the log folder {str(path)!r} cannot be created: {str(existing)!r} is not a folder (trainer.logger.init_args.save_dir)")
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"the log folder {str(path)!r} cannot be written: {err.strerror} in {str(existing)!r} (trainer.logger.init_args.save_dir)") from err


def _uses_cfg(policy: Mapping[str, Any]) -> bool | None:
    """CFG from the config, as the policy's class says (`PolicyAdapter.uses_cfg_with`), or None
    where the class cannot be imported or only the built policy knows."""
    from lightning_grpo.policies.base import PolicyAdapter

    cls = _import(str(policy.get("class_path", "")))
    if not (isinstance(cls, type) and issubclass(cls, PolicyAdapter)):
        return None
    return cls.uses_cfg_with(_init_args(policy))


def _check_data(data: Mapping[str, Any], trainer: Mapping[str, Any], stage: str = "fit") -> None:
    """Build the datamodule (cheap: it only stores its arguments, and checks them) and check it
    fills one training step (fit) or has held-out prompts (validate, test)."""
    class_path = data.get("class_path")
    if not class_path:
        return
    try:
        datamodule = _build(class_path, _init_args(data))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"data ({class_path.rsplit('.', 1)[-1]}): {err}") from err
    check = getattr(datamodule, "check_training_prompts" if stage == "fit" else "check_evaluation_prompts", None)
    if check is None:
        return
    if stage == "fit":
        check(world_size=_world_size(trainer))
    else:
        check(stage)


def _world_size(trainer: Mapping[str, Any]) -> int:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    return 1  # "auto" / -1: known only once the accelerator is set up (the runtime check covers it)


def _section(config: Any, key: str) -> dict[str, Any]:
    value = config.get(key) if config is not None else None
    return _as_dict(value)


def _init_args(section: Any) -> dict[str, Any]:
    return _as_dict(_as_dict(section).get("init_args"))


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return dict(value) if isinstance(value, Mapping) else {}


__all__ = [
    "ConfigError", "Range", "SkipGuard", "check_batch_settings", "check_module_options", "check_ranges", "check_reward_weights",
    "round_max_steps", "validate_config", "validate_fit", "warn_cannot_learn",
]


# --------------------------------------------------------------------------------- constant rewards
class ConstantRewardWatch:
    """Warns once `limit` training steps in a row had every advantage 0 (each reward constant within
    every group): such steps change nothing, e.g. a verifier that always fails."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def step(self, advantages: Any, optimizer_step: int) -> None:
        """Record one training step's advantages (a tensor; empty: this rank trained nothing)."""
        if advantages.numel() == 0:
            return
        self.in_a_row = self.in_a_row + 1 if bool((advantages == 0).all()) else 0
        if self.in_a_row == self.limit:
            warnings.warn(
                f"the reward was constant within every group for {self.in_a_row} training steps in a row (up to "
                f"optimizer step {optimizer_step}): every advantage is 0 and nothing is learned; check the reward (one that never "
                "varies, e.g. a verifier that always fails?) or sample more varied groups (group_size, the sampler's eta)",
                RuntimeWarning, stacklevel=4,
            )


__all__ += ["ConstantRewardWatch"]


def watch_selection(skips: SkipGuard, constant: ConstantRewardWatch, selection: Any, drop_group: bool, whole_groups: bool,
                    alone: bool, step: int) -> bool:
    """After a step's groups were selected (`distributed.StepSelection`): count the step as skipped
    when every group was dropped, or as made when `drop_group` kept some (on a rank that sees whole
    groups, `whole_groups`), and feed the constant-reward watch. False when this process has nothing
    to update (every group dropped and no other rank to pair collectives with, `alone`)."""
    if selection.all_dropped and whole_groups:
        skips.step(True, why="reward_failure='drop_group'; each failing reward is named in the warnings above")
    elif drop_group and whole_groups:
        skips.step(False)
    if selection.all_dropped and alone:
        return False
    constant.step(selection.targets.values, step)
    return True
__all__ += ["watch_selection"]
