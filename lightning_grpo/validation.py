"""Start-up validation: everything that can be checked before the first rollout, with errors that
name the bad value, so a misconfigured run fails in seconds instead of after the model loaded
(or after a held-out evaluation ran).

Two layers:
- `validate_config` runs in the CLI on the parsed config, before any class is instantiated (no
  weights loaded): batch divisibility, resolutions (against the VAE factor read from a local
  folder's `vae/config.json`), reward weights, trainer options manual optimisation refuses,
  paths (a local-looking path that does not exist; a hub id named as such offline), and whether
  the prompt data fills one training step.
- `check_batch_settings`, `check_reward_weights` and `validate_fit` are called by `GRPOModule` (constructor and
  `setup`), so the same checks hold for runs built in Python.

`SkipGuard` stops a run whose every step is skipped (all groups dropped), which would otherwise
never reach `max_steps`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning_grpo.policies.loading import check_pretrained_folder, looks_local


class ConfigError(ValueError):
    """A setting that cannot work; the message names the option and its value."""


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


# --------------------------------------------------------------------------------- at fit set-up
def validate_fit(module: Any, trainer: Any) -> None:
    """Checks that need the built module and trainer (world size, the policy's CFG, the data)."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None)
    hp = module.hparams
    if isinstance(batch_size, int):
        check_batch_settings(batch_size, hp.group_size, hp.best_of_n, hp.samples_per_update, hp.micro_batch_size, module.policy.uses_cfg)
    check_manual_optimisation(trainer.accumulate_grad_batches, trainer.gradient_clip_val)


def check_manual_optimisation(accumulate_grad_batches: int | None, gradient_clip_val: float | None) -> None:
    """Trainer options that manual optimisation ignores or refuses, with the module option to use."""
    if accumulate_grad_batches not in (None, 1):
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} is not supported (GRPO optimises manually): "
            "use model.samples_per_update to accumulate samples per optimizer step"
        )
    if gradient_clip_val:
        raise ConfigError(f"trainer.gradient_clip_val={gradient_clip_val} is not supported (manual optimisation): use model.max_grad_norm")


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

    def step(self, skipped: bool, why: str = "") -> None:
        """Record one training step; raise RuntimeError after `limit` skipped ones in a row."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} training steps in a row were skipped because every group was dropped ({why}); "
                "the run cannot make progress: fix the reward (see the warnings above) or raise model.max_skipped_steps"
            )


# --------------------------------------------------------------------------------- on the config
def validate_config(config: Any, fit: bool = True) -> None:
    """Check a parsed `lightning-grpo` config (a jsonargparse Namespace) before anything is built;
    `fit`: also check that the training prompts fill one step (not needed to validate or test)."""
    model, data, trainer = _section(config, "model"), _section(config, "data"), _section(config, "trainer")
    policy = _section(model, "policy")
    _check_trainer(trainer)
    _check_policy(policy)
    check_reward_weights({f"reward {i}": _init_args(r).get("weight", 1.0) for i, r in enumerate(model.get("rewards") or [])})
    data_args = _init_args(data)
    batch_size = data_args.get("batch_size")
    if isinstance(batch_size, int) and isinstance(model.get("group_size"), int):
        check_batch_settings(
            batch_size, model["group_size"], model.get("best_of_n"), model.get("samples_per_update"),
            model.get("micro_batch_size", 1), _uses_cfg(policy),
        )
    if fit:
        _check_data(data, trainer)


def _check_trainer(trainer: Mapping[str, Any]) -> None:
    check_manual_optimisation(trainer.get("accumulate_grad_batches", 1), trainer.get("gradient_clip_val"))


def _check_policy(policy: Mapping[str, Any]) -> None:
    args = _init_args(policy)
    for name in ("height", "width", "resolution", "num_frames"):
        value = args.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"model.policy {name} must be a positive integer, got {value!r}")
    path = args.get("pretrained_model_name_or_path")
    if not path:
        return
    check_pretrained_folder(path, {})  # a missing local folder, or a hub id that cannot load offline
    if looks_local(path):
        _check_vae_multiple(str(policy.get("class_path", "")), Path(path).expanduser(), args)


# How many VAE factors the pixel size must be a multiple of, per policy class (FLUX packs 2×2 latents).
VAE_MULTIPLES = {"FluxPolicy": 2, "StableDiffusionPolicy": 1}


def _check_vae_multiple(class_path: str, root: Path, args: Mapping[str, Any]) -> None:
    multiple = VAE_MULTIPLES.get(class_path.rsplit(".", 1)[-1])
    config_file = root / "vae" / "config.json"
    if multiple is None or not config_file.is_file():
        return
    try:
        factor = 2 ** (len(json.loads(config_file.read_text())["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the VAE factor from {str(config_file)!r}: {err}") from err
    step = factor * multiple
    for name in ("height", "width"):
        value = args.get(name)
        if isinstance(value, int) and value % step:
            raise ConfigError(f"model.policy {name}={value} must be a multiple of {step} (VAE factor {factor} of {str(root)!r} × {multiple})")


def _uses_cfg(policy: Mapping[str, Any]) -> bool | None:
    """CFG from the config where the classes are known (guidance_scale > 1 of SD and the tiny
    policy; FLUX never), else None (unknown before the policy is built)."""
    name = str(policy.get("class_path", "")).rsplit(".", 1)[-1]
    args = _init_args(policy)
    if name == "FluxPolicy":
        return False
    if name in ("StableDiffusionPolicy", "TinyPolicy"):
        return float(args.get("guidance_scale", 1.0)) > 1.0
    return None


def _check_data(data: Mapping[str, Any], trainer: Mapping[str, Any]) -> None:
    """Build the datamodule (cheap: it only stores its arguments) and check it fills one step."""
    class_path = data.get("class_path")
    if not class_path:
        return
    from jsonargparse import Namespace
    from lightning.pytorch.cli import instantiate_class

    args = _init_args(data)
    datamodule = instantiate_class((), Namespace(class_path=class_path, init_args=Namespace(**args)))
    check = getattr(datamodule, "check_training_prompts", None)
    if check is not None:
        check(world_size=_world_size(trainer))


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


__all__ = ["ConfigError", "SkipGuard", "check_batch_settings", "check_reward_weights", "validate_config", "validate_fit"]
