"""A test callback, added to a CLI run's `trainer.callbacks`, that records on every rank what the
ranks must agree on under FSDP: the trained weights gathered from their shards, which parameters
are sharded, where the frozen ones live, and what the visualiser, the held-out evaluation and the
reward-hacking monitor computed (each rank runs their sharded forwards, on its share of the
samples, `evaluated`). Written to `<out>/rank<r>.pt` at the end of the fit; in `test`, the weights
the first test batch is generated with (the EMA's, when it is used for test) to
`<out>/test_rank<r>.pt`. List it after those callbacks in the config."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

from lightning_grpo.callbacks import HeldOutEvaluation, ODEVisualizer, RewardHackingMonitor


def gathered_weights(pl_module) -> dict[str, torch.Tensor]:
    """The trainable weights, full (every rank calls `full_tensor`, an all-gather, in the same order)."""
    trainable = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for name, p in trainable.items()}


class FSDPProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.evaluated = 0
        self._tested = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Count the samples `lightning_grpo.evaluation.evaluate` generates on this rank."""
        from lightning_grpo import evaluation

        if getattr(evaluation.ode_from, "counted_by", None) is self:
            return
        sample = evaluation.ode_from

        def counted(policy, sampler, x, *args, **kwargs):
            self.evaluated += len(x)
            return sample(policy, sampler, x, *args, **kwargs)

        counted.counted_by = self
        evaluation.ode_from = counted

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._tested:
            return
        self._tested = True
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": gathered_weights(pl_module)}, self.out / f"test_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module) -> None:
        def first(kind):
            return next((c for c in trainer.callbacks if isinstance(c, kind)), None)

        visualiser, heldout, monitor = first(ODEVisualizer), first(HeldOutEvaluation), first(RewardHackingMonitor)
        trainable = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        record = {
            "global_step": trainer.global_step,
            "weights": gathered_weights(pl_module),
            "evaluated": self.evaluated,
            "placements": {name: str(p.placements) if isinstance(p, DTensor) else None for name, p in trainable.items()},
            "frozen_sharded": sorted(n for n, p in pl_module.named_parameters() if not p.requires_grad and isinstance(p, DTensor)),
            "frozen_devices": sorted({str(p.device) for p in pl_module.parameters() if not p.requires_grad}),
            "ode_initial": None if visualiser is None else visualiser.initial,
            "heldout": {} if heldout is None else {when: dict(r.scores) for when, r in heldout.results.items()},
            "hacking": [] if monitor is None else [(o.step, dict(o.values)) for o in monitor.detector.history],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
