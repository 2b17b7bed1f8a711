"""Rendering speed of the shapes world (the toy data every demo and test draws on).

    OMP_NUM_THREADS=1 python bench/render_throughput.py [--size 32] [--repeats 21]

Renders every one of the 48 scenes `--repeats` times (1008 images by default) through
`render_indices`, after one warm-up call, and prints images per second last. Speed is measured
here, never asserted in tests (docs/performance.md records the figures).
"""

from __future__ import annotations

import argparse
import time

from lightning_grpo.worlds.shapes import all_scenes, render_indices, scenes_to_indices


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=21, help="renders of each of the 48 scenes")
    args = parser.parse_args(argv)
    indices = scenes_to_indices(all_scenes()).repeat(args.repeats, 1)  # [48·repeats, 3]
    render_indices(indices[:48], size=args.size)  # warm-up
    start = time.perf_counter()
    render_indices(indices, size=args.size)
    rate = len(indices) / (time.perf_counter() - start)
    print(f"render {args.size}x{args.size}, {len(indices)} images: {rate:.0f} images/s")
    return rate


if __name__ == "__main__":
    main()
