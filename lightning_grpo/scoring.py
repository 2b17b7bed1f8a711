"""Asynchronous scoring: a rollout is scored in the background while the next one is rolled out.

`GRPOModule(async_scoring=True)` hands each rollout's decoded samples to `AsyncScoring.exchange`,
which starts scoring them on a background thread and returns the *previous* rollout with its
scores, which the step then trains on. Per training step n:

    rollout n, decode n  ─►  submit n for scoring  ─►  wait for the scores of n−1  ─►  update on n−1
                                  └──────── scoring n runs here, during the update and rollout n+1 ────────┘

so a step takes about max(rollout + decode + update, scoring) instead of their sum: the reward
model (often on another GPU or server, `RemoteReward`) no longer holds up the policy.

Staleness, made explicit: rollout n is drawn with the weights before update n, and trained at
step n+1, after update n. The log-probabilities the clipped ratio divides by are those of the
weights that drew the samples, so the update stays the PPO/GRPO estimate for one-step-old
samples (the first-update ratio is no longer 1: `ratio/first_update_max_dev` shows how far it
is). The first step only rolls out (no update); the last rollout of a run is never trained.

Exact resume: the pending rollout (trajectories, decoded pixels and, once they are in, its
scores) is written into every checkpoint by `state_dict` (which waits for the scores), and
`load_state_dict` puts it back, so a resumed run trains on exactly what the uninterrupted run
would have. Its size is one rollout (latents of every step, log-probs, the condition).

Several processes (DDP, FSDP): each rank has its own pending rollout; `checkpoint_entry` gathers
them to rank zero (which writes the checkpoint) and `rank_state` gives each rank its own back.

Why a thread and not a process: the work in the background is a reward call, which is either
I/O (a reward server) or a model forward that releases the GIL; the trajectories stay where
they are, nothing is copied between processes.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_grpo.types import Rollout

ScoreFn = Callable[[Rollout, Tensor], dict[str, Tensor]]


@dataclass
class Scored:
    """A rollout, its decoded samples [B, ...] and its scores {name: [B]}."""

    trajectories: Rollout
    pixels: Tensor
    scores: dict[str, Tensor]


class AsyncScoring:
    """Scores one rollout in the background while the caller goes on (see the module doc).

    Args:
        score: (trajectories, pixels) -> {name: scores [B]}, called on the background thread.
    """

    def __init__(self, score: ScoreFn) -> None:
        self._score = score
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Rollout, Tensor, Future] | None = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's pending rollout, on the CPU until used

    @property
    def pending(self) -> bool:
        """Whether a rollout is waiting to be trained on."""
        return self._pending is not None or self._restored is not None

    def exchange(self, trajectories: Rollout, pixels: Tensor) -> Scored | None:
        """Start scoring (`trajectories`, `pixels`) and return the previous rollout with its
        scores (waiting for them), or None on the first call. An exception of the scoring is
        raised here, on the caller's thread."""
        previous, restored = self._pending, self._restored
        self._pending, self._restored = (trajectories, pixels, self._pool().submit(self._score, trajectories, pixels)), None
        if restored is not None:
            return _from_state(restored, pixels.device)
        if previous is None:
            return None
        return Scored(previous[0], previous[1], previous[2].result())

    def state_dict(self) -> dict[str, Any]:
        """The pending rollout with its scores (waits for them), CPU tensors and plain containers
        only (a checkpoint loads with `weights_only=True`); {} when nothing is pending."""
        if self._restored is not None:  # saved again before it was used (e.g. validation-only checkpoint)
            return self._restored
        if self._pending is None:
            return {}
        trajectories, pixels, future = self._pending
        scores = future.result()
        fields_ = asdict_shallow(trajectories)
        return {
            "trajectories": _to_cpu(fields_),
            # tensors the rollout keeps on the CPU (sample keys, the SDE-step mask) go back there
            "cpu_fields": sorted(k for k, v in fields_.items() if isinstance(v, Tensor) and v.device.type == "cpu"),
            "pixels": pixels.detach().cpu(),
            "scores": {name: s.detach().cpu() for name, s in scores.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back the pending rollout of `state_dict` (its scores are in: nothing is rescored);
        it moves to the device of the next rollout when `exchange` returns it."""
        self.close()
        self._restored = dict(state) if state else None

    def close(self) -> None:
        """Forget the pending rollout (its scoring finishes in the background) and stop the thread."""
        self._pending = self._restored = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:  # one thread: rollouts are scored in order, one at a time
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-scoring")
        return self._executor


def checkpoint_entry(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint entry of this rank's `AsyncScoring.state_dict()`: {"world_size": W, "ranks":
    [state of rank 0, ...]}. Called on every rank (Lightning builds the checkpoint on all ranks,
    rank zero writes it): the states are gathered to rank zero only (other ranks get
    "ranks": None, and write nothing), so no rank holds more than its own rollout but rank zero."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"world_size": 1, "ranks": [state]}
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(state, gathered, dst=0)
    return {"world_size": world, "ranks": gathered}


def rank_state(entry: dict[str, Any] | None, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's pending rollout from a `checkpoint_entry` ({} when there is none). A checkpoint
    written by another number of processes cannot be split: its pending rollouts are dropped with
    a warning (the first step after the resume rolls out anew; the resume is not exact)."""
    if not entry:
        return {}
    if entry.get("world_size") != world_size:
        import warnings

        warnings.warn(
            f"the checkpoint's async_scoring state was written by {entry.get('world_size')} process(es), this run has "
            f"{world_size}: its pending rollouts are dropped and the first step rolls out anew (not an exact resume)",
            RuntimeWarning, stacklevel=2,
        )
        return {}
    return entry["ranks"][rank] or {}


def asdict_shallow(rollout: Rollout) -> dict[str, Any]:
    """The fields of a Rollout as a dict, without copying tensors (`dataclasses.asdict` deep-copies)."""
    return {f.name: getattr(rollout, f.name) for f in fields(rollout)}


def _from_state(state: dict[str, Any], device: torch.device) -> Scored:
    """A `state_dict` entry as a `Scored` on `device` (the rollout's CPU-side tensors stay there)."""
    cpu = set(state.get("cpu_fields", ()))
    trajectories = Rollout(**{k: v if k in cpu else _to_device(v, device) for k, v in state["trajectories"].items()})
    return Scored(trajectories, state["pixels"].to(device), {name: s.to(device) for name, s in state["scores"].items()})


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


__all__ = ["AsyncScoring", "Scored", "asdict_shallow", "checkpoint_entry", "decode", "decode_and_score", "rank_state", "score"]


# ---------------------------------------------------------------------------- decode and score
ASYNC_SCORING_KEY = "grpo_async_scoring"
"""Checkpoint entry of the rollout pending under `async_scoring` (see `AsyncScoring.state_dict`)."""


def chunks(num_samples: int, size: int, device: torch.device) -> tuple[Tensor, ...]:
    """Sample indices [0, num_samples) in chunks of `size` (the decode and score batches)."""
    return torch.arange(num_samples, device=device).split(size)


def decode(policy: Any, trajectories: Rollout, batch_size: int) -> Tensor:
    """The final latents decoded, `batch_size` at a time: pixels [B, C, H, W] or [B, F, C, H, W]."""
    final = trajectories.latents[:, -1]
    with torch.no_grad():
        return torch.cat([policy.decode(final[chunk]) for chunk in chunks(trajectories.batch_size, batch_size, final.device)])


def score(rewards: Any, trajectories: Rollout, pixels: Tensor, batch_size: int, allow_nonfinite: bool) -> dict[str, Tensor]:
    """{name: [B]} scores of every reward (`MultiReward`), `batch_size` samples at a time
    (non-finite kept with `allow_nonfinite`). Runs on the scoring thread with `async_scoring`: it
    must not log."""
    images, scores = trajectories.images, {}
    for chunk in chunks(trajectories.batch_size, batch_size, pixels.device):
        prompts = [trajectories.prompts[i] for i in chunk.tolist()]
        chunk_scores = rewards(pixels[chunk], prompts, None if images is None else images[chunk], allow_nonfinite=allow_nonfinite)
        for name, values in chunk_scores.items():
            scores.setdefault(name, []).append(values)
    return {name: torch.cat(values) for name, values in scores.items()}


def decode_and_score(policy: Any, trajectories: Rollout, batch_size: int, score_fn: ScoreFn, scoring: AsyncScoring | None,
                     timer: Any) -> Scored | None:
    """The rollout to train on, decoded and scored: this one (`score_fn` now), or with
    `scoring` (`async_scoring`) the previous one while this one is scored in the background (None
    on the first step). Each phase is timed by `timer` (`progress.PhaseTimer`)."""
    with timer("decode"):
        pixels = decode(policy, trajectories, batch_size)
    if scoring is None:
        with timer("reward"):
            return Scored(trajectories, pixels, score_fn(trajectories, pixels))
    with timer("reward_wait"):
        return scoring.exchange(trajectories, pixels)
