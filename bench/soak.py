"""Soak run: does memory stay flat over a long run, and how fast does the TensorBoard log grow?

    OMP_NUM_THREADS=1 nice -n 5 python bench/soak.py -- --trainer.max_steps=500

Runs `lightning-grpo fit -c configs/demo.yaml` (plus the arguments after `--`) in this process
with a callback that records the resident set size (RSS, from /proc/self/statm) after every
training step. Prints the RSS at the end of the warm-up (`--warmup` steps: allocator pools,
lazily built kernels and the first checkpoint settle in), its maximum and final value after it,
the growth in percent, and the size of the run's TensorBoard event files per 500 steps. The last
line is the RSS growth after warm-up, in percent. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    """Current resident set size of this process (pages in /proc/self/statm × page size)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSRecorder(Callback):
    """(global step, RSS bytes) after every training batch."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples.append((trainer.global_step, rss_bytes()))


def summarize(samples: list[tuple[int, int]], warmup: int) -> dict[str, float]:
    """RSS at the end of warm-up, max and last after it, growth (last vs warm-up end) in percent."""
    after = [rss for step, rss in samples if step >= warmup]
    if not after:
        raise SystemExit(f"the run made fewer than {warmup} steps: nothing after warm-up to compare")
    base = after[0]
    return {"rss_warmup_mb": base / 2**20, "rss_max_mb": max(after) / 2**20, "rss_last_mb": after[-1] / 2**20,
            "growth_percent": 100.0 * (after[-1] - base) / base, "max_growth_percent": 100.0 * (max(after) - base) / base}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cli_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--warmup", type=int, default=50, help="optimizer steps before the reference RSS")
    parser.add_argument("--save-dir", default=str(ROOT / "runs" / "soak"))
    parser.add_argument("--output", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    from lightning_grpo.cli import run

    recorder = RSSRecorder()
    cli = run(["-c", args.config, f"--trainer.logger.init_args.save_dir={args.save_dir}", "--trainer.enable_progress_bar=false", *cli_args], subcommand=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    log_dir = Path(cli.trainer.log_dir)
    steps = cli.trainer.global_step
    event_bytes = sum(f.stat().st_size for f in log_dir.glob("events.out.tfevents.*"))
    summary = summarize(recorder.samples, args.warmup)
    summary.update({"steps": steps, "event_bytes": event_bytes, "event_mb_per_500_steps": event_bytes / 2**20 * 500 / max(steps, 1),
                    "log_dir": str(log_dir)})
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps({**summary, "samples": recorder.samples}))
    print(f"RSS growth after warm-up: {summary['growth_percent']:.2f}%")


if __name__ == "__main__":
    main()
