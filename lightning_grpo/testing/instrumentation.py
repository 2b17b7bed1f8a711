"""Test instrumentation: counting what a run does, for tests and benches (not used in training).

- `CommHookCounter` + `count_allreduce_hook`: a DDP communication hook that counts gradient
  all-reduces (tests/distributed/ddp_run.py: one all-reduce per optimizer step, none per
  accumulated micro-batch; docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CommHookCounter:
    """State of `count_allreduce_hook`: gradient buckets all-reduced so far, by bucket index.

    Register with `DDPStrategy(ddp_comm_state=counter, ddp_comm_hook=count_allreduce_hook)` on
    CUDA; Lightning registers comm hooks on CUDA only, so on CPU call
    `trainer.strategy.model.register_comm_hook(counter, count_allreduce_hook)` (e.g. at train start)."""

    process_group: Any = None
    calls: int = 0
    buckets: list[int] = field(default_factory=list)


def count_allreduce_hook(state: CommHookCounter, bucket):  # (state, dist.GradBucket) -> Future[Tensor]
    """DDP communication hook: count, then all-reduce the bucket as DDP's default does.

    Unannotated on purpose: DDP checks the annotations of a hook and rejects the strings that
    `from __future__ import annotations` makes of them."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    state.buckets.append(bucket.index())
    return allreduce_hook(state.process_group, bucket)


__all__ = ["CommHookCounter", "count_allreduce_hook"]
