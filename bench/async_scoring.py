"""Asynchronous scoring: time per training step of the toy demo, synchronous vs asynchronous,
with its reward on a reward server that takes as long as a real reward model.

Set-up: `lightning-grpo serve-reward` on 127.0.0.1 serves `Delayed(ShapesVerifier(mode=graded),
seconds=S)` (the demo's reward, plus S seconds per request: a stand-in for HPS-v2.1 ViT-H or a
VLM judge on its own GPU); the demo's model and data (configs/demo.yaml, FLUX toy, 4 prompts × 8
samples, 8 steps) train through `RemoteReward` (one request per reward call: batch_size = the
decode batch), first with `async_scoring=false`, then `true`, `--steps` training batches each.

Reported (medians over the batches after `--warmup`, the last one left out: it writes the final
checkpoint, which under asynchronous scoring waits for the pending scores): the synchronous step and its phases
(a = rollout + decode + update, s = scoring wait), the asynchronous step, the ideal
max(a, s) and the sum a + s. Asynchronous scoring should take the step from about a + s to about
max(a, s). Printed last: the ratio asynchronous / synchronous step time.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/async_scoring.py [--seconds 1.0 --steps 8 --warmup 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from lightning.pytorch import Callback

from lightning_grpo.cli import run
from lightning_grpo.rewards import RemoteReward

ROOT = Path(__file__).resolve().parents[1]


class StepTimes(Callback):
    """Wall time of each training batch and the phase times the module logged for it."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        metrics = trainer.callback_metrics
        self.phases.append({k.removeprefix("train/time/"): float(v) for k, v in metrics.items() if k.startswith("train/time/")})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(seconds: float, port: int, workdir: Path) -> subprocess.Popen:
    config = {
        "reward": {
            "class_path": "lightning_grpo.rewards.Delayed",
            "init_args": {"seconds": seconds, "reward": {"class_path": "lightning_grpo.worlds.shapes.verifier.ShapesVerifier", "init_args": {"mode": "graded"}}},
        },
        "accelerator": "cpu", "devices": 1, "max_batch_size": 1,
    }
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(workdir / "server.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_grpo", "serve-reward", "-c", str(path), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
    )


def train(url: str, asynchronous: bool, steps: int, workdir: Path) -> StepTimes:
    overlay = {"model": {"rewards": [{"class_path": "lightning_grpo.rewards.RemoteReward", "init_args": {
        "url": url, "name": "verifier", "batch_size": 32, "timeout": 120, "retries": 1}}]}}
    path = workdir / f"remote_{asynchronous}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    args = [
        "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(path),
        f"--model.async_scoring={str(asynchronous).lower()}",
        # the step alone: no held-out evaluation, no visualiser, one checkpoint policy that never fires
        "--trainer.callbacks=[{class_path: lightning_grpo.checkpointing.GRPOCheckpoint, init_args: {every_n_train_steps: 100000}}, "
        "{class_path: lightning_grpo.callbacks.ODEVisualizer, init_args: {num_prompts: 1, seeds: [0], every_n_steps: 100000}}]",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", "--trainer.enable_model_summary=false",
    ]
    cli = run(args, subcommand=False)
    times = StepTimes()
    cli.trainer.callbacks.append(times)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="extra seconds the reward server takes per request")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per mode (one per batch; async adds one batch)")
    parser.add_argument("--warmup", type=int, default=2, help="first batches left out of the medians")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        workdir, port = Path(tmp), free_port()
        server = start_server(options.seconds, port, workdir)
        url = f"http://127.0.0.1:{port}"
        try:
            RemoteReward(url).wait_until_ready(timeout=300)
            sync = train(url, False, options.steps, workdir)
            # async: one more batch, since the first one only rolls out
            asyn = train(url, True, options.steps, workdir)
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
    # left out: the warm-up batches, the async run's first batch (it only rolls out) and each run's
    # last batch (it writes the final checkpoint, which under async scoring waits for the pending scores)
    skip = options.warmup
    sync_kept, async_kept = slice(skip, -1), slice(skip + 1, -1)
    sync_step = statistics.median(sync.seconds[sync_kept])
    async_step = statistics.median(asyn.seconds[async_kept])
    phase = lambda name: statistics.median(p.get(name, 0.0) for p in sync.phases[sync_kept])  # noqa: E731
    a = phase("rollout") + phase("decode") + phase("update")
    s = phase("reward")
    wait = statistics.median(p.get("reward_wait", 0.0) for p in asyn.phases[async_kept])
    print(f"reward server: Delayed(ShapesVerifier, seconds={options.seconds}); medians of {len(sync.seconds[sync_kept])} sync and {len(asyn.seconds[async_kept])} async batches")
    print(f"synchronous step   {sync_step:7.3f} s   (a = rollout + decode + update {a:.3f} s, s = scoring {s:.3f} s)")
    print(f"asynchronous step  {async_step:7.3f} s   (waiting for scores {wait:.3f} s)")
    print(f"sum a + s          {a + s:7.3f} s")
    print(f"ideal max(a, s)    {max(a, s):7.3f} s")
    if os.environ.get("BENCH_DEBUG"):
        print("sync phases", sync.phases, sync.seconds)
        print("async phases", asyn.phases, asyn.seconds)
    print(f"async / sync step time: {async_step / sync_step:.3f}")


if __name__ == "__main__":
    main()
