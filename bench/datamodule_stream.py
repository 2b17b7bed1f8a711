"""Prompts per second and peak memory streaming a 10,000,000-line prompt file through
`PromptDataModule` (shuffle buffer, batching), one epoch, main process (num_workers=0).

The file (~10M distinct prompts, ~330 MB) is written to a temporary folder and deleted after.
Peak memory: the process's maximum resident set size (ru_maxrss) before and after streaming;
the stream keeps a bounded buffer, so the growth must stay far below the file's size.

    OMP_NUM_THREADS=1 python bench/datamodule_stream.py [--lines 10000000 --batch-size 64]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from lightning_grpo.datamodules.prompts import PromptDataModule


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_prompts(path: Path, lines: int) -> None:
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    with path.open("w") as f:
        for i in range(0, lines, 100_000):
            f.write("".join(f"a {colours[j % 4]} {shapes[j % 3]} number {j}\n" for j in range(i, min(lines, i + 100_000))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.txt"
        start = time.perf_counter()
        write_prompts(path, args.lines)
        print(f"wrote {args.lines:,} lines ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
        data = PromptDataModule(str(path), batch_size=args.batch_size, rank=0, world_size=1, num_workers=0)
        rss_before = max_rss_mb()
        start, seen = time.perf_counter(), 0
        for batch in data.train_dataloader():
            seen += len(batch["prompts"])
        seconds = time.perf_counter() - start
        rss_after = max_rss_mb()
    print(f"streamed {seen:,} prompts in {seconds:.1f} s; peak RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    print(f"prompts per second: {seen / seconds:,.0f}")


if __name__ == "__main__":
    main()
