"""A test probe for multi-process CLI runs: what each rank holds, which a checkpoint cannot show
(Lightning writes rank zero's state only).

Added to a real `lightning-grpo` run beside the default callbacks, e.g.
`--trainer.callbacks+=rank_probe.RankWeights --trainer.callbacks.out=DIR` (with this folder on
PYTHONPATH): when `fit` ends, and when `test` starts, every rank writes `DIR/<stage>_rank<r>.pt`
with its global step and the policy's trainable weights, the rewards of its trained samples at
each rollout (`scores`), the number of samples its evaluations generated (`evaluated`), and, under DDP, what the DistributedDataParallel wrapper synchronises
(`ddp`). It writes nothing into the run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_grpo.rewards.base import Reward


def trainable_weights(pl_module: LightningModule) -> dict[str, torch.Tensor]:
    """The policy's trainable parameters by name, detached CPU copies."""
    trainable = {id(p) for p in pl_module.policy.trainable_parameters()}
    return {name: p.detach().cpu().clone() for name, p in pl_module.policy.named_parameters() if id(p) in trainable}


def ddp_sync(wrapped: object, pl_module: LightningModule) -> dict | None:
    """What a DistributedDataParallel wrapper synchronises (None when the model is not wrapped):
    the buffers it broadcasts from rank zero in every forward (with `broadcast_buffers`), the
    module's frozen parameters and how many of them it broadcast when wrapping, and the
    trainable parameters it broadcast and all-reduces."""
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return None
    frozen = {name for name, p in pl_module.named_parameters() if not p.requires_grad}
    ignored = set(wrapped.parameters_to_ignore)
    return {
        "buffers": len(wrapped.modules_buffers) if wrapped.broadcast_buffers else 0,
        "frozen": len(frozen), "frozen_synced": len(frozen - ignored),
        "trainable_synced": sum(1 for name, p in pl_module.named_parameters() if p.requires_grad and name not in ignored),
    }


class RankWeights(Callback):
    """Every rank saves {"rank", "world_size", "global_step", "weights"} to `out/<stage>_rank<r>.pt`.

    Args:
        out: folder of the files (created if missing).
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.scores: list[dict[str, Tensor]] = []  # per rollout: this rank's trained samples' rewards
        self.evaluated = 0  # samples this rank generated in evaluations (held-out, monitor, test)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Count the samples `lightning_grpo.evaluation.evaluate` generates in this process (its ODE
        sampling, wrapped): how the evaluations' work is shared out over the ranks."""
        from lightning_grpo import evaluation

        if getattr(evaluation.ode_from, "counted_by", None) is self:
            return
        sample = evaluation.ode_from

        def counted(policy, sampler, x, *args, **kwargs):
            self.evaluated += len(x)
            return sample(policy, sampler, x, *args, **kwargs)

        counted.counted_by = self
        evaluation.ode_from = counted

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        record = getattr(pl_module, "last_step", None)
        self.scores.append({} if record is None else {k: v.detach().cpu() for k, v in record.scores.items()})

    def _save(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "global_step": trainer.global_step, "weights": trainable_weights(pl_module),
            "ddp": ddp_sync(trainer.strategy.model, pl_module), "scores": list(self.scores),
            "evaluated": self.evaluated,
        }
        torch.save(record, self.out / f"{stage}_rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save("fit", trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save("test", trainer, pl_module)


class NaNOnRank(Reward):
    """Test stand-in reward: the mean pixel value, but NaN for every sample of rank `rank` in its
    first `calls` calls (with `reward_failure="drop_group"` that rank drops all its groups then,
    while the other ranks train)."""

    default_name = "brightness"

    def __init__(self, rank: int = 1, calls: int = 1, name: str | None = None, weight: float = 1.0) -> None:
        super().__init__(name, weight)
        self.rank, self.calls, self.seen = rank, calls, 0

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        scores = pixels.float().flatten(1).mean(1)
        self.seen += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return torch.full_like(scores, float("nan")) if rank == self.rank and self.seen <= self.calls else scores
