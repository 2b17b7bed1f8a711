"""One GRPO fit of the tiny FLUX stand-in, on 1 or 2 CPU processes (gloo), recording per step the
trainable weights, the batch's prompts, the first-update ratio and the gradient all-reduces.

Run as a script (Lightning's DDP launcher re-runs it once per rank):
    python tests/distributed/ddp_run.py --flux DIR --out DIR --devices 2 --prompts FILE
    python tests/distributed/ddp_run.py --flux DIR --out DIR --devices 1 --union DIR/rank_*.pt
The second form trains one process on the union of the recorded ranks' batches (rank order per
step) with the same noise: tests/distributed/test_ddp.py compares the two. `--sync-every-backward`
restores the old behaviour (an all-reduce at every accumulation micro-step), for bench/ddp_step.py.
`--fsdp FULL_SHARD|SHARD_GRAD_OP|HYBRID_SHARD` trains with DenoiserFSDPStrategy instead of DDP
(recorded weights are gathered from the shards); HYBRID_SHARD over two "nodes" is two processes
started with NODE_RANK=0/1, MASTER_ADDR, MASTER_PORT and `--devices 1 --num-nodes 2`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

import lightning_grpo.distributed  # noqa: E402
from lightning_grpo.datamodules.prompts import PromptDataModule  # noqa: E402
from lightning_grpo.distributed import DenoiserFSDPStrategy  # noqa: E402
from lightning_grpo.testing.instrumentation import CommHookCounter, count_allreduce_hook  # noqa: E402
from lightning_grpo.module import GRPOModule  # noqa: E402
from lightning_grpo.policies import FluxPolicy  # noqa: E402
from lightning_grpo.samplers import FlowSDESampler  # noqa: E402
from tests.training.fixtures import ListPrompts, Redness  # noqa: E402

GROUP_SIZE, PROMPTS_PER_RANK = 4, 2


class RednessFailingOn(Redness):
    """Redness, but NaN for the samples of one prompt (a reward failing on some groups)."""

    def __init__(self, failing_prompt: str) -> None:
        super().__init__()
        self.failing_prompt = failing_prompt

    def score(self, pixels, prompts, images=None):
        scores = super().score(pixels, prompts, images)
        failing = torch.tensor([p == self.failing_prompt for p in prompts], device=scores.device)
        return torch.where(failing, torch.full_like(scores, float("nan")), scores)


class Recorder(Callback):
    """Per training step: weights after the step, the prompts, metrics, all-reduces so far."""

    def __init__(self, counter: CommHookCounter) -> None:
        self.counter, self.steps, self.start = counter, [], time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        # Lightning registers `ddp_comm_hook` on CUDA only; on CPU (gloo) register it here
        if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(self.counter, count_allreduce_hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        weights = torch.cat([_full(p.detach()).flatten() for p in pl_module.policy.trainable_parameters()])
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        record = pl_module.last_step
        self.steps.append({
            "prompts": list(batch["prompts"]), "weights": weights.clone(), "metrics": metrics,
            "allreduces": self.counter.calls, "buckets": list(self.counter.buckets), "seconds": time.perf_counter() - self.start,
            "optimizer_steps": trainer.global_step,
            "placements": [str(getattr(p, "placements", None)) for p in pl_module.policy.trainable_parameters()][:1],
            "devices": sorted({str(p.device) for p in pl_module.policy.trainable_parameters()}),
            "advantages": None if record is None else record.advantages.cpu(),
            "reward_advantages": None if record is None else {k: v.cpu() for k, v in record.reward_advantages.items()},
        })

    def on_train_end(self, trainer, pl_module):
        out = Path(self.out) / f"{self.tag}_rank_{trainer.global_rank}.pt"
        torch.save({"steps": self.steps, "world_size": trainer.world_size}, out)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded (FSDP) parameter is gathered from every rank (all call this)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def make_module(flux: str, failing_prompt: str | None = None, **options) -> GRPOModule:
    policy = FluxPolicy(flux, height=16, width=16, max_sequence_length=16)
    settings = dict(
        group_size=GROUP_SIZE, timestep_fraction=0.67, micro_batch_size=2, samples_per_update=None, clip_range=0.2,
        learning_rate=1e-3, show_progress=False, seed=3,
    )
    settings.update(options)
    reward = Redness() if failing_prompt is None else RednessFailingOn(failing_prompt)
    if failing_prompt is not None:
        settings["reward_failure"] = "drop_group"
    return GRPOModule(policy=policy, sampler=FlowSDESampler(num_steps=3, eta=0.7), rewards=[reward], **settings)


def union_batches(paths: list[str]) -> list[str]:
    """Prompts of the recorded ranks, step by step in rank order: the single process's data."""
    runs = [torch.load(p, weights_only=False)["steps"] for p in sorted(paths)]
    return [prompt for step in zip(*runs) for rank_step in step for prompt in rank_step["prompts"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flux", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", help="prompt file, sharded over ranks by PromptDataModule")
    parser.add_argument("--union", nargs="*", help="recorded rank files: train one process on their union")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--sync-every-backward", action="store_true")
    parser.add_argument("--groups-across-ranks", action="store_true")
    parser.add_argument("--best-of-n", type=int, nargs=2)
    parser.add_argument("--fsdp", choices=["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"], help="DenoiserFSDPStrategy instead of DDP")
    parser.add_argument("--cpu-offload", action="store_true", help="with --fsdp: cpu_offload=True")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (launch one process per node with NODE_RANK set)")
    parser.add_argument("--failing-prompt", help="the reward is NaN on this prompt; reward_failure='drop_group'")
    parser.add_argument("--samples-per-update", type=int, help="samples per optimizer step (default: the whole rollout)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sync_every_backward:  # the behaviour before issue 14: no no_sync at all
        lightning_grpo.distributed.skip_gradient_sync = lambda model: contextlib.nullcontext()  # looked up there at each backward
    options = {"groups_across_ranks": args.groups_across_ranks}
    if args.best_of_n:
        options["best_of_n"] = tuple(args.best_of_n)
    if args.samples_per_update:
        options["samples_per_update"] = args.samples_per_update
    module = make_module(args.flux, failing_prompt=args.failing_prompt, **options)
    if args.union:
        prompts = union_batches(args.union)
        per_step = len(prompts) // args.steps
        data = ListPrompts(prompts, batch_size=per_step)
    else:
        data = PromptDataModule(args.prompts, batch_size=PROMPTS_PER_RANK, shuffle=False, num_workers=0)
    counter = CommHookCounter()
    strategy = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    if args.fsdp:
        strategy = DenoiserFSDPStrategy(sharding_strategy=args.fsdp, cpu_offload=args.cpu_offload, process_group_backend="gloo")
    recorder = Recorder(counter)
    recorder.out, recorder.tag = args.out, args.tag
    trainer = Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy, max_steps=args.steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
