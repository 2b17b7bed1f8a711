"""A file of 1,000,000 prompts streams in bounded memory: far less than the file's size."""

from __future__ import annotations

import itertools
import os
import tracemalloc
from pathlib import Path

import pytest

from lightning_grpo.datamodules import PromptDataModule

MILLION = 1_000_000
BATCH = 100


@pytest.fixture(scope="module")
def million_prompts(tmp_path_factory: pytest.TempPathFactory) -> str:
    """~55 MB of distinct prompts, written in chunks (well under a second)."""
    path = tmp_path_factory.mktemp("million") / "million.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for start in range(0, MILLION, 100_000):
            chunk = range(start, start + 100_000)
            handle.write("".join(f"a studio photo of object {i} on an oak table\n" for i in chunk))
    return str(path)


def train_batches(path: str, **kwargs):
    dm = PromptDataModule(path, batch_size=BATCH, rank=0, world_size=1, **kwargs)
    return iter(dm.train_dataloader())


def traced_peak(batches, count: int | None) -> tuple[int, int]:
    """(prompts seen, peak bytes allocated by Python) while iterating ``count`` batches (None: all)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = sum(len(b["prompts"]) for b in itertools.islice(batches, count))
        return seen, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_prefix_of_million_prompts_streams_in_bounded_memory(million_prompts):
    file_size = Path(million_prompts).stat().st_size
    seen, peak = traced_peak(train_batches(million_prompts), 2_500)  # 250k prompts: past the shuffle buffer
    assert seen == 250_000
    print(f"traced peak {peak / 2**20:.2f} MiB over {seen} prompts of a {file_size / 2**20:.0f} MiB file")
    assert peak < file_size / 10, f"peak {peak / 2**20:.1f} MiB for a {file_size / 2**20:.0f} MiB file"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS read from /proc")
def test_all_million_prompts_stream_with_flat_resident_memory(million_prompts):
    file_size = Path(million_prompts).stat().st_size
    batches = train_batches(million_prompts, val_fraction=0.01)
    baseline, peak_growth, seen = rss_bytes(), 0, 0
    for index, batch in enumerate(batches):
        seen += len(batch["prompts"])
        if index % 500 == 0:
            peak_growth = max(peak_growth, rss_bytes() - baseline)
    assert 0.98 * MILLION < seen < MILLION  # 1% held out for validation
    print(f"RSS growth {peak_growth / 2**20:.1f} MiB over {seen} prompts of a {file_size / 2**20:.0f} MiB file")
    assert peak_growth < file_size / 4, f"RSS grew {peak_growth / 2**20:.1f} MiB for a {file_size / 2**20:.0f} MiB file"


@pytest.mark.slow
def test_all_million_prompts_traced_memory(million_prompts):
    file_size = Path(million_prompts).stat().st_size
    seen, peak = traced_peak(train_batches(million_prompts), None)
    assert seen == MILLION
    print(f"traced peak {peak / 2**20:.2f} MiB over {seen} prompts of a {file_size / 2**20:.0f} MiB file")
    assert peak < file_size / 10, f"peak {peak / 2**20:.1f} MiB for a {file_size / 2**20:.0f} MiB file"
