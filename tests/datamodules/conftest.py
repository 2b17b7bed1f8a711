"""Fixtures that write small prompt datasets in every supported format into a test's tmp dir."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Callable[..., str]:
    """Write prompts one a line (``.txt``) and return the path."""

    def write(prompts: Iterable[str], name: str = "prompts.txt") -> str:
        path = tmp_path / name
        path.write_text("".join(f"{p}\n" for p in prompts), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Callable[..., str]:
    """Write dicts one a line (``.jsonl``) and return the path."""

    def write(rows: Iterable[dict[str, Any]], name: str = "prompts.jsonl") -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def parquet_file(tmp_path: Path) -> Callable[..., str]:
    """Write rows to a Parquet file with the given row-group size and return the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(rows: list[dict[str, Any]], name: str = "prompts.parquet", row_group_size: int = 64) -> str:
        path = tmp_path / name
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
        return str(path)

    return write


@pytest.fixture
def hf_dir(tmp_path: Path) -> Callable[..., str]:
    """Save rows as a HF dataset (or a DatasetDict of splits) with ``save_to_disk``; return the folder."""
    import datasets

    datasets.disable_progress_bars()

    def write(rows: list[dict[str, Any]] | dict[str, list[dict[str, Any]]], name: str = "hf_prompts") -> str:
        path = tmp_path / name
        if isinstance(rows, dict):
            data = datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in rows.items()})
        else:
            data = datasets.Dataset.from_list(rows)
        data.save_to_disk(str(path))
        return str(path)

    return write
