"""Rollout noise keyed by sample identity, not by batch position.

A sample is identified by its key (g, j): g the global index of its group (prompt) in this
step's union over ranks, j its member index within the group (0 ≤ j < G). Every sample draws
its initial noise and all its SDE step noise from its own generator, seeded by
`sample_seed(base, g, j)`; with shared initial noise the G members of a group take x_0 from the
group's generator, seeded by `sample_seed(base, g, -1)`. Consequences:

- chunking the rollout (`rollout_batch_size`) cannot change any sample: its generator only ever
  draws for it, in step order;
- ranks draw different noise (their groups have different g) while a single process rolling
  out the union of the ranks' prompts draws exactly the same noise, which is what the 2-process
  DDP test compares against;
- groups spanning ranks (each rank holds some members j of every group) still share x_0.

The cost is one small `randn` per sample and step instead of one per step: negligible next to a
denoiser forward (measured by bench/rollout_overhead.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lightning_grpo.grpo.selection import sample_timestep_indices

INITIAL = -1
"""Member index of a group's own stream, which draws the shared initial noise."""


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for sample j of prompt i: a stable hash of (seed, i, j), so no two samples
    share noise (unlike seed + i·S + j, which collides across seeds)."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def step_seed(seed: int, counter: int, rank: int = 0, offset: int = 0) -> int:
    """The seed of one of a training step's generators: (seed, counter, rank, offset) mixed as
    seed·1_000_003 + counter·1_009 + rank·101 + offset, mod 2^63. `counter` is the global step or
    the rollout's index in training; `offset` names the stream (0 the rollout, 1 the update's
    choices, 7 the asynchronous rollout, 17 the step schedule). These streams only seed the base
    of a rollout and the update's draws, whose per-sample draws then go through `sample_seed`'s
    hash; the linear mix is kept (not replaced by the hash) because every stored run and every
    checkpoint's resumed stream was made with it (tests/training/test_grpo_reference.py)."""
    return (seed * 1_000_003 + counter * 1_009 + rank * 101 + offset) % (2**63)


@dataclass(frozen=True)
class StepStreams:
    """The step-level random streams of a training run, each seeded by `step_seed`: the one
    scheme of `GRPOModule`'s generators (per-sample draws then key `sample_seed` by them).

    Args:
        seed: the run's seed (`GRPOModule(seed=...)`).
        global_step: optimizer steps made (restored on resume).
        rank: this process's global rank.
    """

    seed: int
    global_step: int = 0
    rank: int = 0

    def rollout(self, iteration: int | None, device: torch.device | str) -> torch.Generator:
        """The rollout's base generator, the rank left out (its noise is keyed by sample): by the
        global step, or by the rollout's index in training `iteration` (async scoring, whose first
        two rollouts share global step 0)."""
        seed = step_seed(self.seed, self.global_step) if iteration is None else step_seed(self.seed, iteration, offset=7)
        return torch.Generator(device=device).manual_seed(seed)

    def order_seed(self) -> int:
        """The update's order of this rank's samples."""
        return step_seed(self.seed, self.global_step, self.rank, offset=1)

    def column_seed(self) -> int:
        """The update's per-sample choices (an objective's columns), keyed by sample: no rank."""
        return step_seed(self.seed, self.global_step, offset=1)

    def schedule(self, iteration: int) -> torch.Generator:
        """The step schedule's draw of rollout `iteration` (the same on every rank)."""
        return torch.Generator().manual_seed(step_seed(self.seed, iteration, offset=17))


def base_seed(generator: torch.Generator | None) -> int:
    """One 62-bit draw from `generator` (the global CPU generator when None): the base seed of a
    rollout's per-sample streams, so the same generator state gives the same rollout."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def sample_keys(first_group: int, num_groups: int, members: Sequence[int]) -> Tensor:
    """Keys [P·M, 2] = (global group, member) of groups first_group.. × members, group-major."""
    groups = torch.arange(first_group, first_group + num_groups).repeat_interleave(len(members))
    member = torch.as_tensor(list(members), dtype=torch.long).repeat(num_groups)
    return torch.stack([groups, member], dim=1)


@dataclass
class SampleNoise:
    """The noise streams of a set of samples (a chunk of a rollout).

    Args:
        seed: base seed of the rollout (`base_seed`).
        keys: LongTensor[b, 2] (global group, member) of the samples, in batch order.
        shared_initial: members of a group start from the same x_0 (drawn from the group stream).
        device: device of the generators (the policy's).
    """

    seed: int
    keys: Tensor
    shared_initial: bool
    device: torch.device

    def __post_init__(self) -> None:
        self._generators = [self._generator(int(g), int(j)) for g, j in self.keys.tolist()]

    def _generator(self, group: int, member: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, group, member))

    def initial(self, policy) -> Tensor:
        """x_0 [b, *L] from `policy.prepare_latents(1, generator)` per group (shared) or per sample."""
        if not self.shared_initial:
            return torch.cat([policy.prepare_latents(1, g) for g in self._generators])
        per_group: dict[int, Tensor] = {}
        for g in self.keys[:, 0].tolist():
            if g not in per_group:
                per_group[g] = policy.prepare_latents(1, self._generator(g, INITIAL))
        return torch.cat([per_group[g] for g in self.keys[:, 0].tolist()])

    def standard_normal(self, like: Tensor) -> Tensor:
        """ε [b, *L] (fp32): the next draw of every sample's stream, shaped like `like`."""
        shape = (1, *like.shape[1:])
        return torch.cat([torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in self._generators])


def keyed_timestep_indices(keys: Tensor, candidates: Tensor, fraction: float, seed: int) -> Tensor:
    """Per-sample random timestep subsets [B, K], each drawn from the sample's own key (see
    `sample_timestep_indices`), so they do not depend on the rank or on which other samples
    are in the batch."""
    rows = [
        sample_timestep_indices(1, candidates, fraction, torch.Generator().manual_seed(sample_seed(seed, g, j)))
        for g, j in keys.tolist()
    ]
    if not rows:  # no sample on this rank: the right width, no row
        return sample_timestep_indices(1, candidates, fraction)[:0]
    return torch.cat(rows)  # [B, K]


__all__ = ["SampleNoise", "base_seed", "keyed_timestep_indices", "sample_keys", "sample_seed", "step_seed", "StepStreams"]
