"""Checkpoints that nothing can spoil: atomic writes, retention, a saved model signature, and
resume overrides that apply or are refused.

- `AtomicCheckpointIO`: each checkpoint is written to a temporary file in the target folder,
  flushed to disk, then renamed over the target (`os.replace` is atomic on POSIX), so a crash or
  a full disk while saving never leaves a file that a resume accepts; loading names the file
  when it is truncated or corrupt. A temporary left by a process killed mid-save is removed at
  the next start (`remove_interrupted_saves`).
- `verify_checkpoint`: integrity at load. `torch.save` writes a zip archive whose every record
  (the pickled structure, each tensor's storage) carries the CRC-32 of its bytes, computed while
  saving; torch's reader never checks them, so a checkpoint with bytes overwritten in its tensor
  data loaded "fine" with garbage weights. Every record is re-read and checked here before
  anything loads, and a mismatch names the file and the tensor. A checkpoint that is a folder
  (sharded) is checked file by file: zip files by their CRCs, the others against the
  `checksums.json` manifest that `record_checksums` writes beside them.
- `find_nonfinite` / `check_finite`: no checkpoint holding NaN/inf is ever written or resumed.
- `RunLock`: a run holds its version folder (an `flock` on `<log_dir>/.lock`, released by the
  kernel when the process dies, however it dies), so a second live run refuses to write there.
- `find_last_checkpoint` / `run_folder_of`: `--ckpt_path=last` across the versions of a run's name,
  and the version folder a checkpoint belongs to (a resumed run appends there).
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
import json
import math
import os
import pickle
import re
import socket
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

import torch

from lightning_grpo.compat import is_local_path
from lightning_grpo.errors import InputError
from lightning_grpo.stopping import StopNow


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the cause."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint of another model configuration, or with nothing left to train."""


class RunLockedError(InputError, RuntimeError):
    """Another live run holds the version folder this run would write into."""


# ------------------------------------------------------------------------------------ file I/O
class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temporary file beside the target, fsync, then atomic rename; loading
    verifies the file's checksums first (`verify_checkpoint`).

    Lightning's own `_atomic_save` serialises the whole checkpoint into memory first (a FLUX
    checkpoint with optimizer state is hundreds of GB) and then writes the target in place, so
    a crash mid-write still leaves a truncated file under the real name. Remote filesystems
    (fsspec URLs) keep Lightning's behaviour. A checkpoint holding NaN/inf is refused at load
    (`check_finite`; `GRPOModule.on_save_checkpoint` refuses to write one, for every strategy).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
            with os.fdopen(handle, "wb") as file, _crc32_on():
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
        if is_local_path(path) and is_sharded_checkpoint(path):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is a folder of shards written by DenoiserFSDPStrategy: resume it with that strategy "
                "(`lightning-grpo export` reads it too)"
            )
        verify_checkpoint(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupt and cannot be resumed from: {err}") from err
        check_finite(checkpoint, f"checkpoint {str(path)!r} cannot be resumed from")
        return checkpoint


class _crc32_on:
    """Make sure `torch.save` writes each record's CRC-32 (it can be switched off process-wide
    with `torch.serialization.set_crc32_options`): `verify_checkpoint` relies on them."""

    def __enter__(self) -> None:
        self.previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(True)

    def __exit__(self, *exc: Any) -> None:
        torch.serialization.set_crc32_options(self.previous)


SHARDED_METADATA = "meta.pt"
"""File of a sharded checkpoint folder (`DenoiserFSDPStrategy`) holding everything but the shards
(loops, callbacks, schedulers, hyperparameters), written by rank zero (Lightning's name)."""
SHARD_INDEX = ".metadata"
"""torch distributed checkpoint's index of the shard files, written once every rank's shard is."""


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A sharded checkpoint folder (torch distributed checkpoint shards + `meta.pt`), not a file."""
    return Path(path).is_dir()


def check_checkpoint_file(path: str | os.PathLike, part: tuple[int, int] | None = None, verify: bool = True) -> None:
    """Check that a local checkpoint exists and is intact before anything loads: a sharded
    checkpoint folder has its shard index and `meta.pt` (both written after the shards), and every
    file's bytes match the checksums written when it was saved (`verify_checkpoint`; `part`: this
    process's share of a folder's files, see there; `verify=False`: existence and completeness
    only, the bytes are checked later, when it loads)."""
    text = str(path)
    if not is_local_path(text):
        return
    if not Path(text).exists():
        raise CheckpointError(f"checkpoint {text!r} does not exist")
    if is_sharded_checkpoint(text):
        absent = [name for name in (SHARD_INDEX, SHARDED_METADATA) if not (Path(text) / name).is_file()]
        if absent:
            raise CheckpointError(f"sharded checkpoint {text!r} is incomplete and cannot be resumed from: no {' or '.join(absent)} in it")
    if verify:
        verify_checkpoint(text, part)


# ------------------------------------------------------------------------------------ integrity
MANIFEST = "checksums.json"
"""Per-file CRC-32 of a checkpoint that is a folder (written by `record_checksums`)."""

_VERIFIED: dict[str, tuple[int, int]] = {}
"""path -> (size, mtime_ns) of the files verified in this process: the CLI checks a checkpoint
before the model loads and the CheckpointIO would check it again when it loads."""


def verify_checkpoint(path: str | os.PathLike, part: tuple[int, int] | None = None) -> None:
    """Raise CheckpointError naming the file (and the tensor, when it can be told) unless every
    byte of a local checkpoint matches the checksums written when it was saved.

    A file is a `torch.save` zip: each record is re-read and its CRC-32 compared with the one the
    zip holds (zipfile's own check; torch's reader skips it). A folder (a sharded checkpoint) is
    checked file by file: zip files the same way, the others against `checksums.json` when the
    saver wrote one (`record_checksums`; a folder without one is checked as far as its zip files
    go, with a warning). Cost: one sequential read of the checkpoint.

    Args:
        part: (rank, world size): check only the files of a folder whose index (in sorted order)
            is rank modulo world size, so W processes share one read of a sharded checkpoint
            (`DenoiserFSDPStrategy.load_checkpoint` gathers their verdicts); None: all of them.
    """
    text = str(path)
    if not is_local_path(text):
        return
    root = Path(text)
    if root.is_dir():
        _verify_folder(root, part)
    elif root.exists():
        _verify_file(root, label=str(root))


def record_checksums(folder: str | os.PathLike, entries: dict[str, list[int]] | None = None) -> Path:
    """Write `<folder>/checksums.json` ({relative path: [size, crc32]}) for a checkpoint saved as a
    folder of files (e.g. a sharded one), so `verify_checkpoint` can check the files that are not
    zip archives. Call it once every file of the checkpoint is written (rank 0). `entries`: the
    checksums already computed (`checksum_entries`, e.g. each rank's part, gathered); default:
    computed here for every file."""
    root = Path(folder)
    entries = checksum_entries(root) if entries is None else entries
    temporary = root / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
    os.replace(temporary, root / MANIFEST)
    return root / MANIFEST


def checksum_entries(folder: str | os.PathLike, part: tuple[int, int] | None = None) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of the files of `folder` (the files of index ≡ rank mod W
    with `part=(rank, W)`, so W processes share the reading; their dicts merge into the manifest)."""
    root = Path(folder)
    return {name: [(root / name).stat().st_size, _crc32_of(root / name)] for name in _part(_folder_files(root), part)}


def _part(names: list[str], part: tuple[int, int] | None) -> list[str]:
    if part is None:
        return names
    rank, world = part
    return [name for index, name in enumerate(names) if index % world == rank]


def _folder_files(root: Path) -> list[str]:
    return sorted(
        str(f.relative_to(root)) for f in root.rglob("*")
        if f.is_file() and f.name != MANIFEST and not f.name.endswith(".tmp")
    )


def _verify_folder(root: Path, part: tuple[int, int] | None = None) -> None:
    manifest = root / MANIFEST
    listed: dict[str, list[int]] = {}
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text())
        except ValueError as err:
            raise CheckpointError(f"checkpoint {str(root)!r} is corrupt: its {MANIFEST} cannot be read ({err})") from err
    else:
        unzipped = [name for name in _folder_files(root) if not zipfile.is_zipfile(root / name)]
        if unzipped and (part is None or part[0] == 0):
            warnings.warn(
                f"checkpoint {str(root)!r} has no {MANIFEST} (written before sharded checkpoints recorded one): "
                f"{len(unzipped)} of its files ({', '.join(unzipped[:3])}) cannot be checked for corruption", stacklevel=3,
            )
    for name in _part(sorted(listed), part):
        size, crc = listed[name]
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {str(root)!r} is incomplete: {name!r} listed in {MANIFEST} is missing")
        if file.stat().st_size != size or _crc32_of(file) != crc:
            raise CheckpointError(
                f"checkpoint {str(root)!r} is corrupt: {name!r} does not match the checksum written when it was saved; "
                "it cannot be trained on or evaluated: resume from an earlier checkpoint"
            )
    for name in _part(_folder_files(root), part):
        if name not in listed and zipfile.is_zipfile(root / name):
            _verify_file(root / name, label=f"{root}/{name}")


def _verify_file(file: Path, label: str) -> None:
    stat = file.stat()
    key = str(file.resolve())
    if _VERIFIED.get(key) == (stat.st_size, stat.st_mtime_ns):
        return
    if not zipfile.is_zipfile(file):
        raise CheckpointError(f"checkpoint {label!r} is truncated or corrupt and cannot be resumed from: not a complete torch.save archive")
    unchecked = 0
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:  # saved with torch's CRC-32 switched off
                    unchecked += 1
                    continue
                try:
                    with archive.open(info) as member:
                        while member.read(1 << 24):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
                    what = _describe_record(archive, info.filename)
                    raise CheckpointError(
                        f"checkpoint {label!r} is corrupt: {what} does not match the checksum (CRC-32) written when it was "
                        f"saved ({err}); it cannot be trained on or evaluated: resume from an earlier checkpoint"
                    ) from err
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {label!r} is truncated or corrupt and cannot be resumed from: {err}") from err
    if unchecked:
        warnings.warn(f"checkpoint {label!r}: {unchecked} records were saved without checksums and could not be verified", stacklevel=3)
    _VERIFIED[key] = (stat.st_size, stat.st_mtime_ns)


def _crc32_of(file: Path) -> int:
    crc = 0
    with file.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class _StorageRef:
    """Stands for a tensor while reading a checkpoint's structure without its data."""

    def __init__(self, key: str) -> None:
        self.key = key


class _StructureOnly(pickle.Unpickler):
    """Unpickles `data.pkl` of a torch.save archive with every tensor replaced by the key of its
    storage record, to tell which tensor a corrupt record holds (classes that cannot be imported
    become empty stand-ins: only the nesting of dicts and lists matters here)."""

    def persistent_load(self, pid: Any) -> Any:
        return _StorageRef(str(pid[2])) if isinstance(pid, tuple) and len(pid) > 2 else None

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch") and name.startswith("_rebuild"):
            return lambda *args, **kwargs: next((a for a in args if isinstance(a, _StorageRef)), None)
        try:
            return super().find_class(module, name)
        except Exception:
            return _Anything


class _Anything:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _describe_record(archive: zipfile.ZipFile, record: str) -> str:
    """'the tensor state_dict['policy.w']' for a storage record, else 'record <name>'."""
    match = re.fullmatch(r"(.*)/data/(\w+)", record)
    if match is None:
        return f"record {record!r}"
    try:
        with archive.open(f"{match.group(1)}/data.pkl") as handle:
            structure = _StructureOnly(handle).load()
    except Exception:
        return f"the tensor data in record {record!r}"
    for where, value in _walk(structure, ""):
        if isinstance(value, _StorageRef) and value.key == match.group(2):
            return f"the tensor {where}"
    return f"the tensor data in record {record!r}"


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(path, leaf) of nested dicts, lists and tuples, paths written as Python indexing."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
    else:
        yield where.lstrip(), value


WEIGHT_ENTRIES = ("state_dict", "optimizer_states")
"""The entries of a Lightning checkpoint that hold weights and optimizer state (callbacks' states
are checked where they hold weights, e.g. the EMA's "weights"; other callback values may be inf
on purpose, like ModelCheckpoint's `kth_value`)."""


def find_nonfinite(state: Any) -> str | None:
    """Where the first NaN/inf of a checkpoint's weights is, e.g. "['state_dict']['policy.w']",
    or None when every floating-point value there is finite. For a Lightning checkpoint (a dict
    with "state_dict") the `WEIGHT_ENTRIES` and the callbacks' "weights"; anything else is
    searched whole (see `nonfinite_tensors` for the cost)."""
    if isinstance(state, dict) and "state_dict" in state:
        parts = {key: state[key] for key in WEIGHT_ENTRIES if key in state}
        callbacks = state.get("callbacks") or {}
        parts["callbacks"] = {name: {"weights": cb["weights"]} for name, cb in callbacks.items() if isinstance(cb, dict) and "weights" in cb}
        state = parts
    found = [(where, tensor) for where, value in _walk(state, "") if (tensor := _local(value)) is not None]
    found = [(where, t) for where, t in found if (t.is_floating_point() or t.is_complex()) and t.numel()]
    bad = nonfinite_tensors([t for _, t in found])
    return found[bad[0]][0] if bad else None


def nonfinite_tensors(tensors: list[torch.Tensor]) -> list[int]:
    """Indices of the tensors holding a NaN or inf. A fused L2 norm per tensor screens them (one
    read, no temporary; NaN and inf propagate into it); a non-finite norm is confirmed exactly
    with `isfinite`, since the squares of huge finite values overflow too. On a CPU the fused
    norm costs about a tenth of an AdamW step over the same tensors (bench/integrity_overhead.py)."""
    if not tensors:
        return []
    by_device: dict[tuple[Any, Any], list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_device.setdefault((tensor.device, tensor.dtype), []).append(index)
    suspects: list[int] = []
    for indices in by_device.values():
        norms = torch._foreach_norm([tensors[i].detach() for i in indices], 2)
        finite = torch.isfinite(torch.stack([n.float() for n in norms])).tolist()  # one sync per group
        suspects += [i for i, ok in zip(indices, finite) if not ok]
    return sorted(i for i in suspects if not bool(torch.isfinite(tensors[i].detach()).all()))


def _local(value: Any) -> torch.Tensor | None:
    """A plain tensor, or this rank's part of a DTensor or ShardedTensor; None for anything else
    (then not checked)."""
    if not isinstance(value, torch.Tensor):
        return None
    try:
        if hasattr(value, "to_local"):  # DTensor
            return value.to_local()
        if hasattr(value, "local_shards"):  # ShardedTensor (FSDP1 sharded state dicts)
            shards = [shard.tensor.flatten() for shard in value.local_shards()]
            return torch.cat(shards) if shards else None
    except Exception:
        return None
    return None if value.is_meta else value


def check_finite(checkpoint: Any, context: str) -> None:
    """Raise NonFiniteError "<context>: <where> holds NaN/inf" when `find_nonfinite` finds one."""
    where = find_nonfinite(checkpoint)
    if where is not None:
        from lightning_grpo.errors import NonFiniteError

        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        at = f" (optimizer step {step})" if step is not None else ""
        raise NonFiniteError(f"{context}: {where} holds NaN/inf{at}; no checkpoint with NaN/inf weights or state is kept")


# ------------------------------------------------------------------------------------ interrupted saves
def remove_interrupted_saves(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries `AtomicCheckpointIO` leaves when its process is killed mid-save
    (`.<name>.<random>.tmp`); return them. Call it only while no other process saves into
    `folder` (the run's lock is held)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = [f for f in root.glob(".*.tmp") if f.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]+\.tmp", f.name)]
    for file in removed:
        file.unlink(missing_ok=True)
    return removed


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


def sharded_keys(path: str | os.PathLike, prefix: str = "state_dict", verify: bool = True) -> set[str]:
    """The keys under `prefix` that a sharded checkpoint holds (read from its shard index);
    `verify=False` when the caller has checked the folder already (`check_checkpoint_file`)."""
    from torch.distributed.checkpoint import FileSystemReader

    if verify:
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


# ------------------------------------------------------------------------------------ run folders
LOCK_FILE = ".lock"


class RunLock(Callback):
    """Hold the run's version folder for the whole fit: a second run started into the same folder
    (the same `version`, or a resume of a run that is still alive) stops with `RunLockedError`
    naming the holder, instead of mixing its config, checkpoints and event files into the first's.

    The lock is an exclusive `flock` on `<log_dir>/.lock` taken by global rank 0 in `setup`: the
    kernel releases it when the process ends in any way (even SIGKILL), so a stale lock never
    blocks a requeued run. Every rank resolves `trainer.log_dir` (a collective under DDP).
    Once held, the temporaries of a save interrupted by a kill are removed (`remove_interrupted_saves`).
    """

    def __init__(self) -> None:
        self._handle: int | None = None
        self.folder: Path | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self._handle is not None or trainer.logger is None:
            return  # without a logger there is no run folder (default_root_dir may be the working directory)
        folder = trainer.log_dir  # on every rank: a broadcast under DDP
        if not trainer.is_global_zero or not folder or not is_local_path(str(folder)):
            return
        self.folder = Path(folder)
        self._handle = acquire_run_lock(self.folder)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.release()  # Lightning calls no teardown hook after an exception

    def release(self) -> None:
        if self._handle is not None:
            release_run_lock(self._handle)
            self._handle = None

    def holds(self, folder: str | os.PathLike | None) -> bool:
        """Whether this lock is held and covers `folder` (the run folder or a folder inside it)."""
        if self._handle is None or self.folder is None or folder is None:
            return False
        path = Path(folder).resolve()
        return path == self.folder.resolve() or self.folder.resolve() in path.parents


def acquire_run_lock(folder: Path) -> int:
    """Take the exclusive lock of a run folder (created if needed); RunLockedError when held."""
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunLockedError(f"cannot write into the run folder {str(folder)!r}: {err}") from err
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(handle, 4096, 0).decode(errors="replace").strip() or "unknown process"
        os.close(handle)
        raise RunLockedError(
            f"the run folder {str(folder)!r} is in use by another run that is still alive ({holder}): two runs would mix "
            "their configs, checkpoints and logs there; stop that run, or give this one another "
            "--trainer.logger.init_args.version"
        ) from None
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}"
    os.ftruncate(handle, 0)
    os.pwrite(handle, holder.encode(), 0)
    return handle


def release_run_lock(handle: int) -> None:
    import fcntl

    fcntl.flock(handle, fcntl.LOCK_UN)
    os.close(handle)


def run_folder_of(checkpoint: str | os.PathLike, save_dir: str | os.PathLike, name: str) -> str | None:
    """The version folder name (e.g. "version_3") when `checkpoint` is `<save_dir>/<name>/<version>/
    checkpoints/<file>` (the default checkpoint folder of a run of that logger), else None."""
    path = Path(checkpoint).expanduser().resolve()
    if path.parent.name != "checkpoints":
        return None
    version = path.parent.parent
    return version.name if version.parent == (Path(save_dir).expanduser() / name).resolve() else None


def find_last_checkpoint(save_dir: str | os.PathLike, name: str) -> Path | None:
    """The newest (by modification time) `<save_dir>/<name>/*/checkpoints/last.ckpt`, or None."""
    candidates = [p for p in (Path(save_dir).expanduser() / name).glob("*/checkpoints/last.ckpt") if p.exists()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


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

    It overrides and calls protected ModelCheckpoint members (`compat.MODEL_CHECKPOINT`, checked
    against the installed Lightning by tests/training/test_compat.py).

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

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        lock = next((c for c in trainer.callbacks if isinstance(c, RunLock)), None)
        if stage == "fit" and trainer.is_global_zero and lock is not None and lock.holds(self.dirpath):
            removed = remove_interrupted_saves(self.dirpath)
            if removed:
                rank_zero_info(f"Removed {len(removed)} temporary file(s) of a save interrupted by a kill: {[f.name for f in removed]}")

    # -- when to save
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None:  # the resumed step is saved already (the file resumed from)
            self._last_global_step_saved = trainer.global_step

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
        if isinstance(exception, StopNow):  # a second stop signal: stop at once (the state may be half-updated)
            return
        if isinstance(exception, SIGTERMException) or not self._in_training_step:
            super().on_exception(trainer, pl_module, exception)
            if isinstance(exception, SIGTERMException):
                last = self.last_model_path or trainer.ckpt_path
                if last:
                    rank_zero_info(f"Stopped by a signal at step {trainer.global_step}: resume with --ckpt_path={last}")

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


def model_signature(module: Any) -> dict[str, Any]:
    """What must match for a checkpoint's weights to mean the same thing in a rebuilt module."""
    policy, sampler = module.policy, module.sampler
    return {
        "policy": f"{type(policy).__module__}.{type(policy).__qualname__}",
        "paradigm": getattr(policy, "paradigm", None),
        "pretrained_model_name_or_path": getattr(policy, "pretrained_model_name_or_path", None),
        # the family names the arguments that fix its latents' shape (`PolicyAdapter.geometry_arguments`)
        **{f"policy.{name}": getattr(policy, name) for name in getattr(policy, "geometry_arguments", ()) if isinstance(getattr(policy, name, None), int)},
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
        raise CheckpointMismatchError(
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
        raise CheckpointMismatchError(
            f"checkpoint{f' {path!r}' if path else ''} is at optimizer step {step} and trainer.max_steps={max_steps}: "
            f"nothing left to train; extend the run with --trainer.max_steps greater than {step}"
        )


# ------------------------------------------------------------------------------------ the module's checkpoint entries
def rebuilt_keys(module: Any) -> set[str]:
    """`GRPOModule.rebuilt_keys`: the state its config rebuilds exactly, left out of checkpoints:
    reward models, the KL reference, the first-frame image policy and the policy's frozen weights
    (text encoders, VAE, LoRA base weights: gigabytes otherwise). Under FSDP, this rank's shards' keys."""
    saved = set(module.state_dict())
    keys = {k for k in saved if k.startswith(("rewards.", "reference_policy.", "first_frames."))}
    # remove_duplicate=False: tied weights (T5's encoder.embed_tokens = shared) under every name
    keys |= {f"policy.{name}" for name, p in module.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}
    # the policy's buffers too: rebuilt from its config and never trained (SD3's sin-cos position table)
    return keys | ({f"policy.{name}" for name, _ in module.policy.named_buffers(remove_duplicate=False)} & saved)


def save_module_checkpoint(module: Any, checkpoint: dict[str, Any], scoring_key: str) -> None:
    """`GRPOModule.on_save_checkpoint`: leave out the state the config rebuilds (`rebuilt_keys`),
    add the model signature and (async scoring) every rank's pending rollout, and refuse NaN/inf
    weights or optimizer state (the non-finite guard stops a run first)."""
    from lightning_grpo.scoring import checkpoint_entry

    state = checkpoint["state_dict"]
    for key in module.rebuilt_keys() & set(state):
        del state[key]
    checkpoint[SIGNATURE_KEY] = model_signature(module)
    if module._scoring is not None:  # the rollout being scored, with its scores: exact resume
        checkpoint[scoring_key] = checkpoint_entry(module._scoring.state_dict())  # every rank's, on rank zero
    check_finite(checkpoint, "refusing to write a checkpoint")


def load_module_checkpoint(module: Any, checkpoint: dict[str, Any], scoring_key: str) -> None:
    """`GRPOModule.on_load_checkpoint`: refuse a checkpoint of another model (naming what differs)
    or one with nothing left to train; write changed optimizer settings into its optimizer state;
    fill in the rebuilt state (strict loading) and give each rank its pending rollout back."""
    from lightning_grpo.scoring import rank_state

    trainer = module.trainer if module._trainer is not None else None
    path = trainer.ckpt_path if trainer is not None else None
    check_signature(checkpoint, module, path)
    if trainer is not None and trainer.state.fn == "fit":
        check_max_steps(checkpoint, trainer.max_steps, path)
        changes = apply_resume_overrides(_with_loaded_optimizers(checkpoint, trainer), module.hparams)
        if changes:
            listed = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
            rank_zero_info(f"Resuming with changed settings (applied from the next step): {listed}")
    if "state_dict" not in checkpoint:  # sharded (FSDP): the strategy loaded the weights already
        return
    state, current = checkpoint["state_dict"], module.state_dict()
    for key in module.rebuilt_keys():
        state.setdefault(key, current[key])
    if module._scoring is not None:
        rank = module.global_rank if trainer is not None else 0
        module._scoring.load_state_dict(rank_state(checkpoint.get(scoring_key), rank, module._world_size()))


def _with_loaded_optimizers(checkpoint: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The checkpoint, or, when the strategy has already loaded the optimizer state itself (a
    sharded checkpoint holds it in its shards, not under "optimizer_states"), the checkpoint with
    the live optimizers' parameter groups in that place, so resume overrides are written there."""
    if "optimizer_states" in checkpoint or "state_dict" in checkpoint:
        return checkpoint
    return {**checkpoint, "optimizer_states": [{"param_groups": o.param_groups} for o in trainer.strategy.optimizers]}
