"""The streaming pipeline shared by the prompt datamodules: split, shuffle, shard, resume, batch.

How exactly-once sharding works without knowing the number of prompts in advance
--------------------------------------------------------------------------------
Every shard (one DataLoader worker of one rank) computes the *same global stream*: the units
in the same seeded order, the same records validated the same way, the same validation
hold-out, the same seeded shuffle buffer. The stream is cut into *blocks* of
``world_size * num_workers * batch_size`` records, and each shard keeps one ``batch_size``
slice of each block. Slices are laid out worker-major (slot ``worker * world_size + rank``)
because a DataLoader hands out its workers' batches round-robin from worker 0: after every
rank has consumed ``n`` batches, the records consumed are exactly the first
``n * batch_size * world_size`` of the global stream, which is all a resume needs to know
(and which stays true when the number of ranks, workers or the batch size changes). A resumed
pass keeps the blocks of the uninterrupted pass and rotates the workers' roles so the next
unseen slice comes first; resumed and uninterrupted runs then see the same batches.

Equal batch counts on every rank (so DDP never waits on a rank that ran out): every shard
emits exactly one batch per block. The last, incomplete block is dropped (``remainder="drop"``,
at most ``world_size * num_workers * batch_size - 1`` prompts an epoch; with a seeded shuffle
a different tail is dropped each epoch) or filled by repeating its own records
(``remainder="pad"``, every prompt seen at least once, a few twice).

The price: each shard reads and validates every record (prompts are small; parsing is cheap
next to a rollout), but only builds batches, and loads images, for its own slice.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_grpo.datamodules.sources import (
    BadLinePolicy,
    BadRecordReporter,
    Record,
    RecordSpec,
    Source,
    list_units,
    read_units,
)

Remainder = Literal["drop", "pad"]
SplitRole = Literal["all", "train", "val"]


# --------------------------------------------------------------------------- determinism helpers


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and Python run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def seeded_rng(seed: int, epoch: int, purpose: str) -> random.Random:
    """A random generator that depends only on (seed, epoch, purpose)."""
    return random.Random(stable_hash(f"{seed}/{epoch}/{purpose}"))


def buffered_shuffle(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``buffer_size`` items (memory bounded by the buffer).

    Each incoming item replaces a random buffered one, which is emitted; the rest of the buffer
    is emitted shuffled at the end. An item moves at most about ``buffer_size`` places earlier.
    """
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = int(rng.random() * buffer_size)  # randrange() is several times slower
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def blocks(items: Iterator[Any], size: int, remainder: Remainder) -> Iterator[list[Any]]:
    """Cut a stream into lists of ``size``; the incomplete last one is dropped or padded by cycling."""
    block: list[Any] = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block and remainder == "pad":
        yield [block[i % len(block)] for i in range(size)]


def keep_batch(batch: Any) -> Any:
    """``collate_fn`` for ready-made batches: pass them through (default_convert walks every string)."""
    return batch


def resume_point(skip: int, round_size: int, block_size: int) -> tuple[int, int]:
    """Where to restart blocking after ``skip`` consumed records: (origin, rounds done in its block).

    When ``skip`` is a whole number of rounds (the usual case: same ranks and batch size as the
    saved run), blocks stay aligned with an uninterrupted run's, so the resumed epoch continues
    exactly like it, tail included. Otherwise (the layout changed) blocks restart at ``skip``.
    """
    if skip % round_size:
        return skip, 0
    return skip - skip % block_size, (skip % block_size) // round_size


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this code; (0, 1) outside one."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- validation hold-out


@dataclass(frozen=True)
class HoldOut:
    """Which prompts are held out for validation, decided from the prompt text alone.

    A prompt is held out when its stable hash falls in the first ``fraction`` of the hash range,
    or when its hash is in ``prompt_hashes`` (the prompts of separate validation files). Deciding
    by text keeps duplicates of a prompt on the same side, and the split is the same in every
    process, epoch and run.
    """

    fraction: float = 0.0
    prompt_hashes: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.fraction}")

    @property
    def active(self) -> bool:
        """Whether any prompt can be held out."""
        return self.fraction > 0.0 or bool(self.prompt_hashes)

    def holds(self, prompt: str) -> bool:
        """True when ``prompt`` belongs to the validation split."""
        digest = stable_hash(prompt)
        return digest < self.fraction * 2.0**64 or digest in self.prompt_hashes


# --------------------------------------------------------------------------- the stream


@dataclass
class StreamConfig:
    """Everything a shard needs to rebuild the global stream; pickled into each DataLoader worker.

    Attributes:
        sources: Files and HF dataset folders, in the configured order.
        spec: Which fields make a record.
        batch_size: Prompts a batch (per rank).
        role: ``"train"`` drops held-out prompts, ``"val"`` keeps only them, ``"all"`` keeps all.
        hold_out: The validation hold-out.
        shuffle: Shuffle the unit order and the records (buffered) with ``seed`` and the epoch.
        shuffle_buffer_size: Records in the shuffle buffer.
        seed: Seed of both shuffles.
        remainder: What happens to the incomplete last block (see module docstring).
        on_bad_line: ``"skip"`` or ``"error"`` for malformed records.
        rank: This process's rank.
        world_size: Number of ranks.
        hf_split: Split to read from a HF ``DatasetDict`` folder.
        with_indices: Batches also hold ``"indices"``: each record's position in the global
            stream (padding repeats carry their record's), the key of its evaluation noise, so
            that results are the same on any number of ranks and a padded repeat is recognised.
    """

    sources: Sequence[Source]
    spec: RecordSpec
    batch_size: int
    role: SplitRole = "all"
    hold_out: HoldOut = field(default_factory=HoldOut)
    shuffle: bool = False
    shuffle_buffer_size: int = 10_000
    seed: int = 0
    remainder: Remainder = "drop"
    on_bad_line: BadLinePolicy = "skip"
    rank: int = 0
    world_size: int = 1
    hf_split: str | None = None
    with_indices: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder must be 'drop' or 'pad', got {self.remainder!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")


class PromptStream(IterableDataset):
    """Batches of prompts for one rank, streamed and sharded over the DataLoader's workers.

    Set :attr:`epoch` (reshuffles) and :attr:`skip` (records of the global stream already consumed)
    before each ``iter()``; :class:`ResumableLoader` does it. Each item is a batch
    ``{"prompts": list[str]}`` plus ``"metadata": list[dict]`` when metadata keys are configured.
    Subclasses change what a batch holds by overriding :meth:`make_batch`.
    """

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.config = config
        self.epoch = 0
        self.skip = 0

    def records(self, reporter: BadRecordReporter) -> Iterator[Record]:
        """The global stream: identical in every shard for a given (seed, epoch)."""
        cfg = self.config
        units = list_units(cfg.sources, cfg.hf_split)
        if cfg.shuffle:
            seeded_rng(cfg.seed, self.epoch, "units").shuffle(units)
        stream = read_units(units, cfg.spec, reporter, cfg.hf_split)
        if cfg.role != "all" and cfg.hold_out.active:
            keep_held = cfg.role == "val"
            stream = (r for r in stream if cfg.hold_out.holds(r.prompt) == keep_held)
        if cfg.shuffle:
            stream = buffered_shuffle(stream, cfg.shuffle_buffer_size, seeded_rng(cfg.seed, self.epoch, "records"))
        return stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.config
        worker, workers = worker_slot()
        round_size = cfg.world_size * cfg.batch_size  # records one batch on every rank consumes
        block_size = workers * round_size
        origin, rounds_done = resume_point(self.skip, round_size, block_size)
        # After a resume inside a block, DataLoader worker 0 must deliver the next unseen slice,
        # so the workers' roles rotate by the rounds already done in that block.
        role = (worker + rounds_done) % workers
        slot = role * cfg.world_size + cfg.rank  # worker-major: see the module docstring
        # Every shard sees every record, so one shard reports bad records; each shard reports
        # the failures of its own batches (e.g. images), which no other shard sees.
        record_reporter = BadRecordReporter(cfg.on_bad_line, verbose=slot == 0)
        batch_reporter = BadRecordReporter(cfg.on_bad_line)
        start, stop = slot * cfg.batch_size, (slot + 1) * cfg.batch_size
        indexed = (record._replace(index=i) for i, record in enumerate(self.records(record_reporter)))
        remaining = itertools.islice(indexed, origin, None)
        for index, block in enumerate(blocks(remaining, block_size, cfg.remainder)):
            if index == 0 and role < rounds_done:
                continue  # this role's slice of the first block was consumed before the resume
            yield self.block_batch(block, start, stop, batch_reporter)
        record_reporter.summarize("prompt records")
        batch_reporter.summarize("batch items")

    def block_batch(self, block: list[Record], start: int, stop: int, reporter: BadRecordReporter) -> dict[str, Any]:
        """This shard's batch of a block: its slice ``block[start:stop]``. Subclasses whose items
        can fail late (images) may fill the slice from the rest of the block, which every shard sees."""
        return self.make_batch(block[start:stop], reporter)

    def make_batch(self, records: list[Record], reporter: BadRecordReporter) -> dict[str, Any]:
        """Turn this shard's slice of a block into a batch; ``reporter`` takes items that fail."""
        batch: dict[str, Any] = {"prompts": [r.prompt for r in records]}
        if self.config.with_indices:
            batch["indices"] = [r.index for r in records]
        if self.config.spec.metadata_keys:
            batch["metadata"] = [{k: r.fields.get(k) for k in self.config.spec.metadata_keys} for r in records]
        return batch


# --------------------------------------------------------------------------- position and resume


@dataclass
class StreamPosition:
    """How far training got: the epoch and the records of its global stream consumed by all ranks.

    ``samples_per_batch`` is ``batch_size * world_size``: one batch consumed on every rank
    (ranks move in lockstep) consumes that many records of the global stream.
    """

    epoch: int = 0
    consumed: int = 0
    samples_per_batch: int = 1

    def start_epoch(self, epoch: int) -> int:
        """Enter ``epoch`` and return how many records of it to skip (0 unless resuming in it)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0
        return self.consumed

    def advance(self, epoch: int) -> None:
        """Count one batch consumed (on every rank) in ``epoch``."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0
        self.consumed += self.samples_per_batch


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`PromptStream` that starts each pass where training stopped.

    At each ``iter()`` it reads the epoch from ``epoch_fn`` and tells the stream to reshuffle for
    it and to skip what :attr:`position` says was consumed; then the workers (started by
    ``iter()``) get those values. When ``count_delivered()`` is true (no Trainer), handing out a
    batch counts it as consumed; under a Trainer, the datamodule counts batches instead when they
    reach the training step, because Lightning fetches one batch ahead.
    """

    position: StreamPosition
    epoch_fn: Callable[[], int]
    count_delivered: Callable[[], bool]
    on_empty: Callable[[], None] | None = None
    """Called when a pass that skips nothing yields no batch (it should raise, naming why): a
    training epoch without a batch would otherwise make the Trainer start epochs forever."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        stream: PromptStream = self.dataset  # type: ignore[assignment]
        epoch = self.epoch_fn()
        stream.epoch, stream.skip = epoch, self.position.start_epoch(epoch)
        return self._counted(super().__iter__(), epoch, stream.skip)

    def _counted(self, batches: Iterator[Any], epoch: int, skipped: int) -> Iterator[Any]:
        delivered = 0
        for batch in batches:
            if self.count_delivered():
                self.position.advance(epoch)
            delivered += 1
            yield batch
        if not delivered and not skipped and self.on_empty is not None:
            self.on_empty()


def resolve_rank(trainer: Any, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): explicit values first, then the Trainer, then torch.distributed, else (0, 1)."""
    if trainer is not None:
        found = (trainer.global_rank, trainer.world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        found = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    else:
        found = (0, 1)
    return (found[0] if rank is None else rank, found[1] if world_size is None else world_size)
