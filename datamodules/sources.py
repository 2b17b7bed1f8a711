"""Prompt sources: find the files, then read them record by record without loading them whole.

Four formats are understood, each read lazily so a dataset may be larger than memory:

* ``text``: one prompt a line (``.txt``; ``.txt.gz`` too).
* ``jsonl``: one JSON object a line (``.jsonl``/``.json``; ``.gz`` too), prompt under a configurable key.
* ``parquet``: read one row group at a time, in small record batches, with pyarrow.
* ``hf``: a Hugging Face dataset written with ``save_to_disk`` (a folder); opened with
  ``datasets.load_from_disk``, whose Arrow files are memory-mapped, and read in row slices.

A file is cut into *units* (a whole text/JSONL file, one Parquet row group, one slice of rows of
a HF dataset): the unit is what the file-order shuffle permutes. Reading a unit yields
:class:`Record` values; a malformed line or row goes to a :class:`BadRecordReporter`, which
skips it with a warning or raises :class:`MalformedRecordError`, and always names ``path:line``
(row numbers of Parquet and HF datasets are 1-based, like line numbers).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Any, Literal, NamedTuple

from lightning_grpo.errors import InputError

Format = Literal["text", "jsonl", "parquet", "hf"]
FormatOption = Literal["auto", "text", "jsonl", "parquet", "hf"]
BadLinePolicy = Literal["skip", "error"]

#: Prompt keys tried in order when none is configured.
DEFAULT_PROMPT_KEYS: tuple[str, ...] = ("prompt", "caption")
#: Rows read at once from Parquet and HF datasets (bounds memory, amortises Arrow calls).
READ_BATCH_ROWS = 1024
#: Rows of a HF dataset in one shuffle unit.
HF_UNIT_ROWS = 8192
#: Malformed records listed one by one per epoch before only the count is kept.
MAX_LISTED_BAD_RECORDS = 10
#: Malformed records a reporter keeps as examples (named in "no prompt" errors).
KEPT_EXAMPLES = 3

_SUFFIX_FORMATS: dict[str, Format] = {
    ".txt": "text",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


class MalformedRecordError(InputError, ValueError):
    """A line or row that cannot become a prompt (raised when ``on_bad_line="error"``).

    The message starts with ``path:line``. It takes the message as its only argument so that a
    DataLoader worker can re-raise it in the main process.
    """


class MalformedRecordWarning(UserWarning):
    """A line or row that was skipped (``on_bad_line="skip"``); filter it like any warning."""


class Source(NamedTuple):
    """One data file (or HF dataset folder) and its format."""

    path: str
    format: Format


class Unit(NamedTuple):
    """The part of a source read as one piece: the file-order shuffle permutes units.

    ``part`` is ``None`` for a whole text/JSONL file, the row-group index for Parquet, and the
    ``(start, stop)`` row range for a HF dataset.
    """

    source: Source
    part: Any = None


class Record(NamedTuple):
    """One valid prompt, where it came from, and the extra fields asked for.

    ``fields`` holds the required fields (e.g. an image path) and the metadata fields, by key;
    ``index`` its position in the stream of a pass (set by the stream; -1 until then).
    """

    prompt: str
    fields: dict[str, Any]
    path: str
    line: int
    index: int = -1


@dataclass(frozen=True)
class RecordSpec:
    """Which fields make a record.

    Attributes:
        prompt_keys: Candidate keys of the prompt, first present wins.
        required_keys: Keys that must be present and not null (e.g. an image column).
        metadata_keys: Keys carried along when present (``None`` when absent).
    """

    prompt_keys: tuple[str, ...] = DEFAULT_PROMPT_KEYS
    required_keys: tuple[str, ...] = ()
    metadata_keys: tuple[str, ...] = ()

    @property
    def field_keys(self) -> tuple[str, ...]:
        """Required then metadata keys, without repeats."""
        return tuple(dict.fromkeys(self.required_keys + self.metadata_keys))

    def needs_fields(self) -> bool:
        """True when records need more than the prompt (plain text cannot provide it)."""
        return bool(self.field_keys)


class BadRecordReporter:
    """Skips (with a warning) or refuses malformed records, and counts the skipped ones.

    Args:
        policy: ``"skip"`` warns and goes on; ``"error"`` raises :class:`MalformedRecordError`.
        verbose: Whether this process emits the warnings. Every shard reads the whole stream, so
            only one of them (the first) warns to avoid repeating each warning per shard.
    """

    def __init__(self, policy: BadLinePolicy, verbose: bool = True) -> None:
        if policy not in ("skip", "error"):
            raise ValueError(f"on_bad_line must be 'skip' or 'error', got {policy!r}")
        self.policy = policy
        self.verbose = verbose
        self.skipped = 0
        self.examples: list[str] = []  # the first KEPT_EXAMPLES malformed records, "path:line: reason"

    def bad(self, path: str, line: int, reason: str) -> None:
        """Report one malformed record; raises under the ``"error"`` policy."""
        message = f"{path}:{line}: {reason}"
        if self.policy == "error":
            raise MalformedRecordError(message)
        if len(self.examples) < KEPT_EXAMPLES:
            self.examples.append(message)
        self.skipped += 1
        if self.verbose and self.skipped <= MAX_LISTED_BAD_RECORDS:
            warnings.warn(f"skipping malformed record at {message}", MalformedRecordWarning, stacklevel=2)

    def why_none(self) -> str:
        """Why a pass yielded no record: the files are empty, or the first malformed records."""
        if not self.skipped:
            return "the files are empty"
        shown = "; ".join(self.examples)
        more = f" (and {self.skipped - len(self.examples)} more)" if self.skipped > len(self.examples) else ""
        return f"every record is malformed: {shown}{more}"

    def summarize(self, what: str = "records") -> None:
        """Warn once with the number of records skipped so far (nothing when none)."""
        if self.verbose and self.skipped:
            warnings.warn(
                f"skipped {self.skipped} malformed {what} in this pass "
                f"(the first {min(self.skipped, MAX_LISTED_BAD_RECORDS)} are listed above)",
                MalformedRecordWarning,
                stacklevel=2,
            )


# --------------------------------------------------------------------------- finding files


def resolve_sources(patterns: str | Sequence[str], format: FormatOption = "auto") -> list[Source]:
    """Expand paths and globs into sources, sorted within each pattern, without repeats.

    Raises:
        FileNotFoundError: naming the path, or the glob that matched nothing.
        ValueError: when a format cannot be told from the name.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no prompt files given")
    paths: dict[str, None] = {}
    for pattern in map(os.fspath, patterns):
        for path in _expand(pattern):
            paths[path] = None
    return [Source(path, format if format != "auto" else detect_format(path)) for path in paths]


def _expand(pattern: str) -> list[str]:
    """One path, or the sorted matches of a glob; a missing path is an error naming it."""
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no prompt files match the pattern {pattern!r}")
        return matches
    if not os.path.exists(pattern):
        raise FileNotFoundError(f"prompt file not found: {pattern!r}")
    return [pattern]


def detect_format(path: str) -> Format:
    """Tell the format from the name: a folder is a HF dataset, else the suffix (``.gz`` ignored)."""
    if os.path.isdir(path):
        return "hf"
    name = path[: -len(".gz")] if path.endswith(".gz") else path
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in _SUFFIX_FORMATS:
        known = ", ".join(sorted(_SUFFIX_FORMATS))
        raise ValueError(f"cannot tell the format of {path!r} from its suffix (known: {known}, or a folder "
                         "written by datasets' save_to_disk); pass format= explicitly")
    return _SUFFIX_FORMATS[suffix]


# --------------------------------------------------------------------------- units


def list_units(sources: Iterable[Source], hf_split: str | None = None) -> list[Unit]:
    """Cut every source into the units the file-order shuffle permutes, in source order."""
    units: list[Unit] = []
    for source in sources:
        if source.format == "parquet":
            units += [Unit(source, group) for group in range(_parquet_row_groups(source.path))]
        elif source.format == "hf":
            rows = _open_hf(source.path, hf_split).num_rows
            units += [Unit(source, (start, min(start + HF_UNIT_ROWS, rows))) for start in range(0, rows, HF_UNIT_ROWS)]
        else:
            units.append(Unit(source))
    return units


def read_units(
    units: Iterable[Unit], spec: RecordSpec, reporter: BadRecordReporter, hf_split: str | None = None
) -> Iterator[Record]:
    """Chain the records of the units, in order."""
    for unit in units:
        yield from read_unit(unit, spec, reporter, hf_split)


def read_unit(
    unit: Unit, spec: RecordSpec, reporter: BadRecordReporter, hf_split: str | None = None
) -> Iterator[Record]:
    """The valid records of one unit; malformed ones go to ``reporter``."""
    path, fmt = unit.source
    if fmt == "text":
        if spec.needs_fields():
            raise ValueError(f"{path!r} is plain text, which has no fields {list(spec.field_keys)}; "
                             "use JSONL, Parquet or a HF dataset")
        return _read_text(path, reporter)
    if fmt == "jsonl":
        return _read_jsonl(path, spec, reporter)
    if fmt == "parquet":
        return _read_parquet_group(path, unit.part, spec, reporter)
    if fmt == "hf":
        return _read_hf_rows(path, hf_split, unit.part, spec, reporter)
    raise ValueError(f"unknown format {fmt!r} for {path!r}")


# --------------------------------------------------------------------------- line formats


def _open_binary(path: str) -> IO[bytes]:
    """Open a text/JSONL file as bytes (gzip when it ends in ``.gz``) so decoding errors are ours."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class CorruptFileError(InputError, OSError):
    """A data file that cannot be read to its end (truncated or corrupt); the message names it."""


def _lines(path: str, reporter: BadRecordReporter) -> Iterator[tuple[int, str]]:
    """Numbered, decoded, stripped, non-empty lines; bad bytes and empty lines are reported; a
    truncated or corrupt gzip file raises CorruptFileError naming it."""
    try:
        yield from _numbered_lines(path, reporter)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise CorruptFileError(f"{path!r} is truncated or corrupt (a compressed file that ends early?): {error}") from error


def _numbered_lines(path: str, reporter: BadRecordReporter) -> Iterator[tuple[int, str]]:
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                reporter.bad(path, number, f"not valid UTF-8 ({error.reason} at byte {error.start})")
                continue
            text = text.strip()
            if number == 1:
                text = text.lstrip("\ufeff")
            if not text:
                reporter.bad(path, number, "empty line")
                continue
            yield number, text


def _read_text(path: str, reporter: BadRecordReporter) -> Iterator[Record]:
    """One prompt a line."""
    for number, text in _lines(path, reporter):
        yield Record(text, {}, path, number)


def _read_jsonl(path: str, spec: RecordSpec, reporter: BadRecordReporter) -> Iterator[Record]:
    """One JSON object a line, validated like a table row."""
    for number, text in _lines(path, reporter):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            reporter.bad(path, number, f"invalid JSON ({error.msg} at column {error.colno})")
            continue
        if not isinstance(row, dict):
            reporter.bad(path, number, f"expected a JSON object, got {type(row).__name__}")
            continue
        record = make_record(row, spec, path, number, reporter)
        if record is not None:
            yield record


def make_record(
    row: Mapping[str, Any], spec: RecordSpec, path: str, number: int, reporter: BadRecordReporter
) -> Record | None:
    """Validate one row (JSON object or table row) into a record, or report it and return None."""
    key = next((k for k in spec.prompt_keys if k in row), None)
    if key is None:
        reporter.bad(path, number, f"missing prompt key ({' or '.join(map(repr, spec.prompt_keys))})")
        return None
    prompt = row[key]
    if not isinstance(prompt, str):
        kind = "null" if prompt is None else type(prompt).__name__
        reporter.bad(path, number, f"prompt {key!r} is {kind}, expected a string")
        return None
    prompt = prompt.strip()
    if not prompt:
        reporter.bad(path, number, f"prompt {key!r} is empty")
        return None
    for required in spec.required_keys:
        if row.get(required) is None:
            reporter.bad(path, number, f"missing or null {required!r}")
            return None
    return Record(prompt, {k: row.get(k) for k in spec.field_keys}, path, number)


# --------------------------------------------------------------------------- table formats


def _table_columns(path: str, names: Sequence[str], spec: RecordSpec) -> list[str]:
    """Columns to read: the first prompt candidate present, required ones, metadata present.

    Raises:
        ValueError: naming the file and its columns when the prompt or a required column is absent.
    """
    prompt = next((k for k in spec.prompt_keys if k in names), None)
    if prompt is None:
        raise ValueError(f"{path!r} has no prompt column {list(spec.prompt_keys)}; its columns are {list(names)}")
    missing = [k for k in spec.required_keys if k not in names]
    if missing:
        raise ValueError(f"{path!r} has no column {missing}; its columns are {list(names)}")
    return list(dict.fromkeys([prompt, *spec.required_keys, *(k for k in spec.metadata_keys if k in names)]))


def _rows_to_records(
    rows: list[dict[str, Any]], first_row: int, spec: RecordSpec, path: str, reporter: BadRecordReporter
) -> Iterator[Record]:
    """Validate a slice of table rows; ``first_row`` is the 1-based number of ``rows[0]``."""
    for offset, row in enumerate(rows):
        record = make_record(row, spec, path, first_row + offset, reporter)
        if record is not None:
            yield record


def _parquet_row_groups(path: str) -> int:
    """Number of row groups, read from the footer only (CorruptFileError when it is unreadable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            return parquet.metadata.num_row_groups
    except (pa.ArrowException, OSError) as error:
        raise CorruptFileError(f"{path!r} is not a readable Parquet file (truncated or corrupt?): {error}") from error


def _read_parquet_group(path: str, group: int, spec: RecordSpec, reporter: BadRecordReporter) -> Iterator[Record]:
    """The records of one row group, read in batches of :data:`READ_BATCH_ROWS` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            columns = _table_columns(path, parquet.schema_arrow.names, spec)
            row = 1 + sum(parquet.metadata.row_group(g).num_rows for g in range(group))
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=columns):
                yield from _rows_to_records(batch.to_pylist(), row, spec, path, reporter)
                row += batch.num_rows
    except (pa.ArrowException, OSError) as error:
        if isinstance(error, CorruptFileError):
            raise
        raise CorruptFileError(f"{path!r}: row group {group} cannot be read (truncated or corrupt Parquet file?): {error}") from error


@lru_cache(maxsize=16)
def _open_hf(path: str, split: str | None) -> Any:
    """Memory-map a ``save_to_disk`` dataset (cached per process: opening is cheap but not free).

    A ``DatasetDict`` folder needs ``split``; the error lists the splits it has.
    """
    import datasets

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        name = split or "train"
        if name not in dataset:
            raise ValueError(f"{path!r} holds splits {list(dataset)}, not {name!r}; set hf_split")
        dataset = dataset[name]
    return dataset


def _read_hf_rows(
    path: str, split: str | None, rows: tuple[int, int], spec: RecordSpec, reporter: BadRecordReporter
) -> Iterator[Record]:
    """The records of rows ``[start, stop)``, sliced from the memory-mapped Arrow table."""
    dataset = _open_hf(path, split)
    table = dataset.select_columns(_table_columns(path, dataset.column_names, spec)).with_format("arrow")
    start, stop = rows
    for begin in range(start, stop, READ_BATCH_ROWS):
        chunk = table[begin : min(begin + READ_BATCH_ROWS, stop)].to_pylist()
        yield from _rows_to_records(chunk, begin + 1, spec, path, reporter)
