"""Prompt datamodule for text-to-image and text-to-video GRPO: streamed, sharded, resumable.

The heavy lifting lives in :mod:`lightning_grpo.datamodules.sources` (formats, malformed records) and
:mod:`lightning_grpo.datamodules.streaming` (hold-out, shuffle, exactly-once sharding, resume); this module
wires them into Lightning: rank discovery, dataloaders, and the position kept in checkpoints.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader

from lightning_grpo.errors import InputError
from lightning_grpo.datamodules.sources import (
    DEFAULT_PROMPT_KEYS,
    BadLinePolicy,
    BadRecordReporter,
    FormatOption,
    RecordSpec,
    Source,
    list_units,
    read_units,
    resolve_sources,
)
from lightning_grpo.datamodules.streaming import (
    HoldOut,
    PromptStream,
    Remainder,
    ResumableLoader,
    SplitRole,
    StreamConfig,
    StreamPosition,
    keep_batch,
    resolve_rank,
    stable_hash,
)


class NoTrainingBatchError(InputError, ValueError):
    """The training split cannot fill one batch on every rank: a run would loop over empty epochs."""


class NoEvaluationPromptsError(InputError, ValueError):
    """`validate` or `test` has no held-out prompt to evaluate: it would exit 0 having done nothing."""


class PromptDataModule(LightningDataModule):
    """Streams prompts from text, JSONL, Parquet or ``save_to_disk`` datasets, larger than memory.

    A training batch is ``{"prompts": list[str]}`` (``batch_size`` prompts, per rank and step),
    plus ``"metadata": list[dict]`` when ``metadata_keys`` is set. The GRPO module repeats each
    prompt into a group itself. Every prompt of the training split is seen exactly once per
    epoch across all ranks and dataloader workers, except for the last incomplete block of
    ``world_size * max(num_workers, 1) * batch_size`` prompts, which is dropped
    (``remainder="drop"``; reshuffled each epoch so a different tail is dropped) or padded with
    repeats (``remainder="pad"``); either way every rank yields the same number of batches, so
    DDP never hangs. Validation batches are never shuffled and always padded; they carry each
    prompt's position in the held-out split (``"indices"``), so padded repeats can be told apart.

    The position (epoch and prompts consumed) is saved in checkpoints through ``state_dict``;
    a resumed run continues with the next unseen prompt. Under a Trainer a batch counts as
    consumed when it reaches the training step (in ``on_before_batch_transfer``; batches
    prefetched by Lightning or the workers do not count). Without a Trainer, a batch counts
    when the train dataloader hands it out, and :meth:`set_epoch` chooses the epoch.

    Args:
        train_files: Paths or globs of prompt files: ``.txt`` (one prompt a line), ``.jsonl``,
            ``.parquet`` (``.txt.gz``/``.jsonl.gz`` too), or folders written by a Hugging Face
            dataset's ``save_to_disk``. Read in the given order (sorted within a glob) unless
            shuffled.
        val_files: Separate validation prompts (same formats). Their prompts are also removed
            from training. Mutually exclusive with ``val_fraction``.
        val_fraction: Fraction of the training prompts held out for validation, chosen by a
            stable hash of the prompt text (same split in every run and process; duplicates of
            a prompt fall on the same side). Each validation pass rereads the training files to
            find them, so prefer ``val_files`` or ``limit_val_batches`` for very large data.
        batch_size: Prompts per training step per rank.
        val_batch_size: Prompts per validation step per rank; defaults to ``batch_size``.
        prompt_key: JSONL key or table column of the prompt; by default the first present of
            ``"prompt"`` and ``"caption"``.
        metadata_keys: Extra JSONL keys or columns carried along in ``batch["metadata"]``
            (``None`` when absent in a record). Not available for plain text.
        format: ``"auto"`` tells each file's format from its suffix (a folder is a HF dataset);
            or force ``"text"``, ``"jsonl"``, ``"parquet"`` or ``"hf"``.
        hf_split: Split to read when a ``save_to_disk`` folder holds a ``DatasetDict``
            (default ``"train"``).
        shuffle: Shuffle training prompts: the order of files, Parquet row groups and HF row
            slices, then the records through a bounded buffer; seeded by ``seed`` and the epoch.
        shuffle_buffer_size: Records held by the shuffle buffer (memory bound, shuffle quality).
        seed: Seed of the shuffles; the same seed gives the same order.
        remainder: ``"drop"`` or ``"pad"`` the last incomplete block of a training epoch.
        on_bad_line: Malformed lines/rows (bad JSON, empty, non-UTF-8, missing key, non-string
            or empty prompt): ``"skip"`` them with a warning naming ``path:line`` and a count
            at the end of each pass, or ``"error"`` to raise ``MalformedRecordError``.
        num_workers: DataLoader worker processes per rank (0 reads in the main process).
        rank: This process's rank; by default from the Trainer, else ``torch.distributed``.
        world_size: Number of ranks; by default from the Trainer, else ``torch.distributed``.
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        prompt_key: str | None = None,
        metadata_keys: list[str] | None = None,
        format: FormatOption = "auto",
        hf_split: str | None = None,
        shuffle: bool = True,
        shuffle_buffer_size: int = 10_000,
        seed: int = 0,
        remainder: Remainder = "drop",
        on_bad_line: BadLinePolicy = "skip",
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        # Saved as `data_seed`: the module's `seed` follows `seed_everything`, and Lightning refuses
        # to log a datamodule and a module hyperparameter of one name with different values.
        self.save_hyperparameters(ignore=["seed"])
        self.hparams["data_seed"] = seed
        if val_files is not None and val_fraction > 0:
            raise ValueError("give val_files or val_fraction, not both")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if on_bad_line not in ("skip", "error"):
            raise ValueError(f"on_bad_line must be 'skip' or 'error', got {on_bad_line!r}")
        self.train_files = train_files
        self.val_files = val_files
        self.hold_out = HoldOut(fraction=val_fraction)  # validates the fraction now
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.prompt_key = prompt_key
        self.metadata_keys = list(metadata_keys or [])
        self.format = format
        self.hf_split = hf_split
        self.shuffle = shuffle
        self.shuffle_buffer_size = shuffle_buffer_size
        self.seed = seed
        self.remainder = remainder
        self.on_bad_line = on_bad_line
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self._train_sources: list[Source] | None = None
        self._val_sources: list[Source] | None = None
        self._position = StreamPosition()
        self._epoch_without_trainer = 0

    # ------------------------------------------------------------------ extension points

    def record_spec(self) -> RecordSpec:
        """Which fields make a record; subclasses add required fields (e.g. an image)."""
        keys = (self.prompt_key,) if self.prompt_key else DEFAULT_PROMPT_KEYS
        return RecordSpec(prompt_keys=keys, metadata_keys=tuple(self.metadata_keys))

    def make_stream(self, config: StreamConfig) -> PromptStream:
        """The dataset for one loader; subclasses return a stream that builds richer batches."""
        return PromptStream(config)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        """Find the files (FileNotFoundError names a missing one) and index the validation files."""
        if self._train_sources is not None:
            return
        self._train_sources = resolve_sources(self.train_files, self.format)
        if self.val_files is not None:
            self._val_sources = resolve_sources(self.val_files, self.format)
            self.hold_out = HoldOut(prompt_hashes=self._hash_prompts(self._val_sources))

    def train_dataloader(self) -> DataLoader:
        """Shuffled, sharded training batches that start where the saved position says."""
        rank, world_size = self._rank_and_world_size()
        stream = self.make_stream(self._stream_config("train", self.batch_size, rank, world_size))
        self._position.samples_per_batch = self.batch_size * world_size
        loader = ResumableLoader(stream, batch_size=None, collate_fn=keep_batch, num_workers=self.num_workers)
        loader.position = self._position
        loader.epoch_fn = self._current_epoch
        loader.count_delivered = self._counts_delivered_batches
        loader.on_empty = lambda: self.check_training_prompts(world_size)
        return loader

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Held-out prompts in file order, padded so every rank gets as many batches; [] when none.

        Each batch holds ``"indices"``, the prompts' positions in the held-out split: the module
        keys each sample's noise by it (the same samples on any number of ranks) and drops the
        repeats that pad the last block (the ranks' results gathered, one row per prompt)."""
        rank, world_size = self._rank_and_world_size()
        if self._val_sources is None and not self.hold_out.active:
            return []
        stream = self.make_stream(self._stream_config("val", self.val_batch_size, rank, world_size))
        return DataLoader(stream, batch_size=None, collate_fn=keep_batch, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The held-out prompts again: `lightning-grpo test` evaluates on the validation split."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a training batch as consumed as it enters the training step.

        Lightning calls only the datamodule's hook when both the datamodule and the
        LightningModule define it, so the module's own hook is called from here.
        """
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._position.advance(trainer.current_epoch)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and is_overridden("on_before_batch_transfer", module):
            batch = module.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training position, stored by Lightning in checkpoints under this class's name."""
        return {
            "epoch": self._position.epoch,
            "samples_consumed": self._position.consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training pass of ``epoch`` skips the prompts already consumed."""
        if (state_dict.get("seed"), state_dict.get("shuffle")) != (self.seed, self.shuffle):
            warnings.warn(
                f"resuming the prompt position saved with seed={state_dict.get('seed')}, "
                f"shuffle={state_dict.get('shuffle')} under seed={self.seed}, shuffle={self.shuffle}: "
                "the order differs, so the skipped prompts are not the ones seen before",
                stacklevel=2,
            )
        self._position.epoch = int(state_dict["epoch"])
        self._position.consumed = int(state_dict["samples_consumed"])

    # ------------------------------------------------------------------ start-up check

    def check_training_prompts(self, world_size: int | None = None) -> None:
        """Raise `NoTrainingBatchError` when the training split cannot fill one step on every rank.

        Reads at most one step's worth of training records (`batch_size × world_size ×
        max(num_workers, 1)`, the block the stream cuts), so it is cheap for any dataset size;
        only when they are missing does it count the whole split to say why (empty or malformed
        files, prompts held out for validation, or a batch larger than the split).
        """
        self.setup()
        world_size = world_size if world_size is not None else self._rank_and_world_size()[1]
        config = replace(self._stream_config("train", self.batch_size, 0, world_size), shuffle=False)
        workers = max(self.num_workers, 1)
        needed = 1 if self.remainder == "pad" else self.batch_size * world_size * workers
        quiet = BadRecordReporter(self.on_bad_line, verbose=False)
        found = sum(1 for _ in itertools.islice(self.make_stream(config).records(quiet), needed))
        if found >= needed:
            return
        counted = BadRecordReporter(self.on_bad_line, verbose=False)
        total = sum(1 for _ in self.make_stream(replace(config, role="all")).records(counted))
        files = [source.path for source in config.sources]
        if total == 0:
            reason = f"no prompt in {files}: {counted.why_none()}"
        elif found == 0:
            held = f"val_fraction={self.hold_out.fraction}" if self._val_sources is None else f"val_files {self.val_files!r}"
            reason = f"{held} holds out all {total} prompts of {files}: no training prompt is left"
        else:
            reason = (
                f"only {found} training prompts in {files} ({total - found} held out for validation), fewer than one "
                f"step needs: batch_size={self.batch_size} × {world_size} rank(s) × {workers} worker(s) = {needed}, and "
                "remainder='drop' drops an incomplete step; lower batch_size or set remainder='pad'"
            )
        raise NoTrainingBatchError(f"no training batch: {reason}")

    def check_evaluation_prompts(self, stage: str = "test") -> None:
        """Raise `NoEvaluationPromptsError` when `validate`/`test` would evaluate nothing: no
        held-out split configured, or one without a single readable prompt (reads one batch)."""
        self.setup()
        if self._val_sources is None and not self.hold_out.active:
            raise NoEvaluationPromptsError(
                f"`{stage}` evaluates the held-out prompts and there are none: set data.init_args.val_files "
                "(a prompts file) or data.init_args.val_fraction > 0"
            )
        config = self._stream_config("val", self.val_batch_size, 0, 1)
        reporter = BadRecordReporter(self.on_bad_line, verbose=False)
        if next(iter(self.make_stream(config).records(reporter)), None) is not None:
            return
        held = f"val_files {self.val_files!r}" if self._val_sources is not None else f"val_fraction={self.hold_out.fraction} of {self.train_files!r}"
        files = [source.path for source in config.sources]
        reason = reporter.why_none() if self._val_sources is not None else f"no prompt of {files} falls in the held-out split"
        raise NoEvaluationPromptsError(f"`{stage}` has no held-out prompt to evaluate ({held}): {reason}")

    # ------------------------------------------------------------------ helpers

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (reshuffle) of the next training pass when no Trainer is attached."""
        self._epoch_without_trainer = epoch

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else self._epoch_without_trainer

    def _counts_delivered_batches(self) -> bool:
        return self.trainer is None

    def _rank_and_world_size(self) -> tuple[int, int]:
        self.setup()
        return resolve_rank(self.trainer, self.rank, self.world_size)

    def _stream_config(self, split: str, batch_size: int, rank: int, world_size: int) -> StreamConfig:
        """Stream settings for the training or the validation split."""
        assert self._train_sources is not None
        training = split == "train"
        role: SplitRole = "train" if training else "val"
        sources: Sequence[Source] = self._train_sources
        if not training and self._val_sources is not None:
            sources, role = self._val_sources, "all"
        return StreamConfig(
            sources=sources,
            spec=self.record_spec(),
            batch_size=batch_size,
            role=role,
            hold_out=self.hold_out,
            shuffle=self.shuffle and training,
            shuffle_buffer_size=self.shuffle_buffer_size,
            seed=self.seed,
            remainder=self.remainder if training else "pad",
            on_bad_line=self.on_bad_line,
            rank=rank,
            world_size=world_size,
            hf_split=self.hf_split,
            with_indices=not training,
        )

    def _hash_prompts(self, sources: list[Source]) -> frozenset[int]:
        """Hashes of the validation prompts, streamed once (the validation loader reports bad lines)."""
        reporter = BadRecordReporter(self.on_bad_line, verbose=False)
        records = read_units(list_units(sources, self.hf_split), self.record_spec(), reporter, self.hf_split)
        return frozenset(stable_hash(record.prompt) for record in records)
