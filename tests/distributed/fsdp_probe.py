"""A test callback, added to a CLI run's `trainer.callbacks`, that records on every rank what the
ranks must agree on under FSDP: the trained weights gathered from their shards, which parameters
are sharded, where the frozen ones live, and what the visualiser, the held-out evaluation and the
reward-hacking monitor computed (each rank runs their sharded forwards). Written to
`<out>/rank<r>.pt` at the end of the fit; list it after those callbacks in the config."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

from lightning_grpo.callbacks import HeldOutEvaluation, ODEVisualizer, RewardHackingMonitor


class FSDPProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        def first(kind):
            return next((c for c in trainer.callbacks if isinstance(c, kind)), None)

        visualiser, heldout, monitor = first(ODEVisualizer), first(HeldOutEvaluation), first(RewardHackingMonitor)
        trainable = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        record = {
            "global_step": trainer.global_step,
            # every rank calls full_tensor (an all-gather) in the same order
            "weights": {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in trainable.items()},
            "placements": {name: str(p.placements) if isinstance(p, DTensor) else None for name, p in trainable.items()},
            "frozen_sharded": sorted(n for n, p in pl_module.named_parameters() if not p.requires_grad and isinstance(p, DTensor)),
            "frozen_devices": sorted({str(p.device) for p in pl_module.parameters() if not p.requires_grad}),
            "ode_initial": None if visualiser is None else visualiser.initial,
            "heldout": {} if heldout is None else {when: dict(r.scores) for when, r in heldout.results.items()},
            "hacking": [] if monitor is None else [(o.step, dict(o.values)) for o in monitor.detector.history],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
