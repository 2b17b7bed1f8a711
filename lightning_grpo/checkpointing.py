"""Checkpoints that nothing can spoil: atomic writes, retention, a saved model signature, and
resume overrides that apply or are refused.

- `AtomicCheckpointIO`: each checkpoint is written to a temporary file in the target folder,
  flushed to disk, then renamed over the target (`os.replace` is atomic on POSIX), so a crash or
  a full disk while saving never leaves a file that a resume accepts; loading names the file
  when it is truncated or corrupt.
- `GRPOCheckpoint`: Lightning's ModelCheckpoint with a retention rule (the last `keep_last` plus
  the `keep_best` best by a logged metric), a checkpoint of the last step *before* the epoch
  closes (so extending a finished run continues its data epoch), and saving on a stop signal.
- `model_signature` / `check_signature`: what identifies the trained model (policy class,
  paradigm, weights source, geometry, sampler, trainable parameter shapes), stored in every
  checkpoint, compared on load with a message naming what differs.
- `apply_resume_overrides`: optimizer settings given on resume are written into the restored
  optimizer and scheduler state (they would otherwise be silently replaced by the saved ones).
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol, get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the cause."""


# ------------------------------------------------------------------------------------ file I/O
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file beside the target, fsync, then atomic rename.

    Lightning's own `_atomic_save` serialises the whole checkpoint into memory first (a FLUX
    checkpoint with optimizer state is hundreds of GB) and then writes the target in place, so
    a crash mid-write still leaves a truncated file under the real name. Remote filesystems
    (fsspec URLs) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except OSError as err:
            Path(temporary).unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise CheckpointError(
                    f"disk full while writing checkpoint {str(target)!r}: nothing was written under that name, "
                    "earlier checkpoints are intact; free space (or lower keep_last) and resume from the last one"
                ) from err
            raise CheckpointError(f"cannot write checkpoint {str(target)!r}: {err}") from err
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if _is_local_file_protocol(path) and is_sharded_checkpoint(path):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a folder of shards written by DenoiserFSDPStrategy: resume it with that strategy "
                "(`lightning-grpo export` reads it too)"
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be resumed from: {err}") from err


SHARDED_METADATA = "meta.pt"
"""File of a sharded checkpoint folder (`DenoiserFSDPStrategy`) holding everything but the shards
(loops, callbacks, schedulers, hyperparameters), written by rank zero (Lightning's name)."""
SHARD_INDEX = ".metadata"
"""torch distributed checkpoint's index of the shard files, written once every rank's shard is."""


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A sharded checkpoint folder (torch distributed checkpoint shards + `meta.pt`), not a file."""
    return Path(path).is_dir()


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Cheap check that a local checkpoint exists and is complete: `torch.save` writes a zip
    archive, whose directory sits at the very end, so a truncated file is not a zip; a sharded
    checkpoint folder has its shard index and `meta.pt`, both written after the shards."""
    text = str(path)
    if not _is_local_file_protocol(text):
        return
    if is_sharded_checkpoint(text):
        absent = [name for name in (SHARD_INDEX, SHARDED_METADATA) if not (Path(text) / name).is_file()]
        if absent:
            raise CheckpointError(f"sharded checkpoint {text!r} is incomplete and cannot be resumed from: no {' or '.join(absent)} in it")
        return
    if not Path(text).is_file():
        raise FileNotFoundError(f"checkpoint {text!r} does not exist")
    if not zipfile.is_zipfile(text):
        raise CheckpointError(f"checkpoint {text!r} is truncated or corrupt and cannot be resumed from: not a complete torch.save archive")


def read_sharded_state(path: str | os.PathLike, template: dict[str, torch.Tensor], prefix: str = "state_dict") -> dict[str, torch.Tensor]:
    """Read entries `prefix.<key>` of a sharded checkpoint into full tensors shaped like
    `template`'s (in place; returned), in one process: e.g. the trained weights for export.
    Every key of `template` must be in the checkpoint (torch distributed checkpoint names any
    that is not)."""
    from torch.distributed.checkpoint import load as dcp_load

    check_checkpoint_file(path)
    state = {prefix: template}
    dcp_load(state, checkpoint_id=Path(path), no_dist=True)
    return state[prefix]


def sharded_keys(path: str | os.PathLike, prefix: str = "state_dict") -> set[str]:
    """The keys under `prefix` that a sharded checkpoint holds (read from its shard index)."""
    from torch.distributed.checkpoint import FileSystemReader

    check_checkpoint_file(path)
    saved = FileSystemReader(Path(path)).read_metadata().state_dict_metadata
    return {key.removeprefix(f"{prefix}.") for key in saved if key.startswith(f"{prefix}.")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give the trainer's strategy `AtomicCheckpointIO` unless another CheckpointIO was configured."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ------------------------------------------------------------------------------------ callback
class GRPOCheckpoint(ModelCheckpoint):
    """Checkpoints every `every_n_train_steps` optimizer steps, `last.ckpt`, and on a stop signal,
    keeping the last `keep_last` plus the `keep_best` best by `best_monitor`.

    Beyond ModelCheckpoint:
    - retention: ModelCheckpoint ranks by one monitor per instance; two instances (last k by step,
      best by reward) would write every checkpoint twice, so the rule is applied here after each
      save: a file is kept if it is among the last `keep_last` or the best `keep_best`, and the
      best one is named in `best.txt` beside them;
    - the step that reaches `max_steps` is saved at that batch's end, while the data epoch is still
      open: ModelCheckpoint's end-of-fit save comes after Lightning closed the epoch, and a run
      extended from it would skip the rest of that epoch's prompts;
    - on an exception, a checkpoint is written for a stop signal (SIGTERM, or SIGINT forwarded as
      SIGTERM by the CLI), raised by Lightning between steps, and for any exception outside a
      training step; never for one inside a step, whose weights may be half updated;
    - keep the last good model (`keep_good`): with a `RewardHackingMonitor` in the trainer, a
      checkpoint saved at a step the monitor evaluated and found clean (no gold or artifact
      warning) is "good"; the `keep_good` most recent good ones are kept besides the others, and
      `good_model_path` names the latest (printed at the end of fit). Lightning runs checkpoint
      callbacks after the others, so the monitor's verdict of a step is in before its save; give
      the monitor an `every_n_steps` that `every_n_train_steps` divides, or no save is checked.

    Args:
        keep_last: the most recent checkpoints to keep (>= 1); -1 keeps all.
        keep_best: checkpoints to keep by `best_monitor` besides the recent ones (0 = none); the
            best of them is named in `<dirpath>/best.txt` (file name, score, step).
        best_monitor: logged metric that ranks checkpoints (default: the mean reward "reward").
        best_mode: "max" or "min".
        every_n_train_steps: optimizer steps between checkpoints.
        dirpath, filename: as for ModelCheckpoint (default: `<log_dir>/checkpoints`).
        save_last: also keep `last.ckpt`, the most recent state.
        keep_good: checkpoints to keep that the `RewardHackingMonitor` found clean (0 = none).
    """

    def __init__(
        self,
        keep_last: int = 3,
        keep_best: int = 1,
        best_monitor: str = "reward",
        best_mode: str = "max",
        every_n_train_steps: int = 50,
        dirpath: str | None = None,
        filename: str | None = None,
        save_last: bool = True,
        keep_good: int = 0,
    ) -> None:
        if keep_good < 0:
            raise ValueError(f"keep_good must be >= 0, got {keep_good}")
        if keep_last == 0 or keep_last < -1:
            raise ValueError(f"keep_last must be >= 1 (or -1 to keep all), got {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        super().__init__(
            dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps,
            save_last=save_last, save_top_k=-1, save_on_exception=True,
        )
        self.keep_last, self.keep_best, self.keep_good = keep_last, keep_best, keep_good
        self.best_monitor, self.best_mode = best_monitor, best_mode
        self.saved: list[dict[str, Any]] = []  # [{"path", "step", "score"}] in save order
        self._in_training_step = False

    # -- when to save
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_training_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_training_step = False
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.keep_good and trainer.is_global_zero:
            found = self.good_model_path
            rank_zero_info(f"Last checkpoint the RewardHackingMonitor found clean: {found}" if found else
                           "No checkpoint was saved at a step the RewardHackingMonitor found clean")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) or not self._in_training_step:
            super().on_exception(trainer, pl_module, exception)
            if isinstance(exception, SIGTERMException) and self.last_model_path:
                rank_zero_info(f"Stopped by a signal at step {trainer.global_step}: resume with --ckpt_path={self.last_model_path}")

    # -- retention
    @property
    def good_model_path(self) -> str | None:
        """The most recent kept checkpoint that the RewardHackingMonitor found clean (None: none)."""
        good = [s["path"] for s in self.saved if s.get("good")]
        return good[-1] if good else None

    @staticmethod
    def _monitor_verdict(trainer, step: int) -> bool:
        """True when a RewardHackingMonitor evaluated this very step and found nothing."""
        from lightning_grpo.callbacks.reward_hacking import RewardHackingMonitor

        monitors = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, RewardHackingMonitor)]
        return bool(monitors) and all(m.verdicts.get(step) is True for m in monitors)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if filepath == self.last_model_path or (self.keep_last == -1 and not self.keep_good):
            return
        score = trainer.callback_metrics.get(self.best_monitor)
        self.saved = [s for s in self.saved if s["path"] != filepath]
        self.saved.append({"path": filepath, "step": trainer.global_step, "score": None if score is None else float(score),
                           "good": bool(self.keep_good) and self._monitor_verdict(trainer, trainer.global_step)})
        if self.keep_last == -1:
            return
        for record in self._to_remove():
            self.saved.remove(record)
            if record["path"] != self.last_model_path:
                self._remove_checkpoint(trainer, record["path"])
        self._mark_best(trainer)

    BEST_FILE = "best.txt"

    def best(self) -> dict[str, Any] | None:
        """The kept checkpoint with the best `best_monitor` score ({"path", "step", "score"}), or
        None (keep_best = 0, or no scored checkpoint yet)."""
        scored = [s for s in self.saved if s["score"] is not None and s["score"] == s["score"]]  # not NaN
        if self.keep_best == 0 or not scored:
            return None
        return (max if self.best_mode == "max" else min)(scored, key=lambda s: s["score"])

    def _mark_best(self, trainer) -> None:
        """Name the best kept checkpoint in `<dirpath>/best.txt`, one line rewritten after every
        save: its file name, the score and the step (no symlink: copies and object stores keep it)."""
        best = self.best()
        if best is None or not trainer.is_global_zero or self.dirpath is None:
            return
        line = f"{os.path.basename(best['path'])}  {self.best_monitor}={best['score']:.6g} ({self.best_mode})  step={best['step']}\n"
        with self._fs.open(f"{str(self.dirpath).rstrip('/')}/{self.BEST_FILE}", "w") as file:
            file.write(line)

    def _to_remove(self) -> list[dict[str, Any]]:
        """Saved checkpoints neither among the last `keep_last`, the best `keep_best`, nor the last `keep_good` good ones."""
        keep = {id(s) for s in self.saved[-self.keep_last :]}
        good = [s for s in self.saved if s.get("good")]
        keep |= {id(s) for s in good[len(good) - self.keep_good :]} if self.keep_good else set()
        scored = [s for s in self.saved if s["score"] is not None and s["score"] == s["score"]]  # not NaN
        scored.sort(key=lambda s: s["score"], reverse=self.best_mode == "max")
        keep |= {id(s) for s in scored[: self.keep_best]}
        return [s for s in self.saved if id(s) not in keep]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "saved": list(self.saved)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath") == self.dirpath:
            self.saved = list(state_dict.get("saved", []))


# ------------------------------------------------------------------------------------ signature
SIGNATURE_KEY = "grpo_model_signature"
GEOMETRY_ATTRIBUTES = ("height", "width", "resolution", "num_frames")


def model_signature(module: Any) -> dict[str, Any]:
    """What must match for a checkpoint's weights to mean the same thing in a rebuilt module."""
    policy, sampler = module.policy, module.sampler
    return {
        "policy": f"{type(policy).__module__}.{type(policy).__qualname__}",
        "paradigm": getattr(policy, "paradigm", None),
        "pretrained_model_name_or_path": getattr(policy, "pretrained_model_name_or_path", None),
        **{f"policy.{name}": getattr(policy, name) for name in GEOMETRY_ATTRIBUTES if isinstance(getattr(policy, name, None), int)},
        "sampler": type(sampler).__qualname__,
        "sampler.num_steps": int(sampler.num_steps),
        "trainable": {name: list(p.shape) for name, p in policy.named_parameters() if p.requires_grad},
    }


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's signature and the configured model's."""
    differences = [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} in the config"
        for key in sorted(set(saved) | set(current)) if key != "trainable" and saved.get(key) != current.get(key)
    ]
    old, new = saved.get("trainable", {}), current.get("trainable", {})
    missing, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    reshaped = [name for name in sorted(set(old) & set(new)) if list(old[name]) != list(new[name])]
    if missing:
        differences.append(f"{len(missing)} trained parameters of the checkpoint are not trainable in the config's model, e.g. {missing[:3]}")
    if added:
        differences.append(f"{len(added)} trainable parameters of the config's model are not in the checkpoint, e.g. {added[:3]}")
    for name in reshaped[:3]:
        differences.append(f"parameter {name}: shape {list(old[name])} in the checkpoint, {list(new[name])} in the config")
    return differences


def check_signature(checkpoint: dict[str, Any], module: Any, path: str | None = None) -> None:
    """Raise ValueError naming each difference between the checkpoint's model and the configured one."""
    saved = checkpoint.get(SIGNATURE_KEY)
    if saved is None:  # written before signatures existed: strict loading still guards the keys
        return
    differences = signature_differences(saved, model_signature(module))
    if differences:
        where = f" {path!r}" if path else ""
        raise ValueError(
            f"checkpoint{where} was written by a different model configuration:\n  - " + "\n  - ".join(differences)
            + "\nresume with the config the checkpoint was trained with (its config.yaml is in the run folder)"
        )


# ------------------------------------------------------------------------------------ overrides
OPTIMIZER_SETTINGS = {"learning_rate": "lr", "weight_decay": "weight_decay", "adam_betas": "betas", "adam_eps": "eps"}
"""Module hyperparameters stored inside the optimizer state: restored from the checkpoint unless rewritten."""


def changed_hyperparameters(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{name: (saved, current)} for every hyperparameter whose configured value differs from the checkpoint's."""
    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return {k: (saved[k], current[k]) for k in current if k in saved and norm(saved[k]) != norm(current[k])}


def apply_resume_overrides(checkpoint: dict[str, Any], hparams: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Write changed optimizer settings into the checkpoint's optimizer/scheduler state; return all changes.

    The learning rate keeps the schedule's position: each group's current lr is rescaled by
    new/old base rate, and the scheduler's base rates become the new one. The other
    hyperparameters are read from `hparams` at every step, so they apply without rewriting.
    """
    changes = changed_hyperparameters(checkpoint.get("hyper_parameters", {}), dict(hparams))
    for optimizer_state in checkpoint.get("optimizer_states", []):
        for group in optimizer_state.get("param_groups", []):
            for name, key in OPTIMIZER_SETTINGS.items():
                if name not in changes:
                    continue
                old, new = changes[name]
                if name == "learning_rate":
                    group["lr"] = group["lr"] * new / old if old else new
                    group["initial_lr"] = new
                else:
                    group[key] = tuple(new) if isinstance(new, (list, tuple)) else new
    if "learning_rate" in changes:
        for scheduler_state in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in scheduler_state:
                scheduler_state["base_lrs"] = [changes["learning_rate"][1]] * len(scheduler_state["base_lrs"])
            if "_last_lr" in scheduler_state:
                old, new = changes["learning_rate"]
                scheduler_state["_last_lr"] = [lr * new / old if old else new for lr in scheduler_state["_last_lr"]]
    return changes


def check_max_steps(checkpoint: dict[str, Any], max_steps: int, path: str | None = None) -> None:
    """Refuse a resume that would train nothing: the checkpoint already reached `max_steps`."""
    step = int(checkpoint.get("global_step", 0))
    if 0 <= max_steps <= step:
        raise ValueError(
            f"checkpoint{f' {path!r}' if path else ''} is at optimizer step {step} and trainer.max_steps={max_steps}: "
            f"nothing left to train; extend the run with --trainer.max_steps greater than {step}"
        )
