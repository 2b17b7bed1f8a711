"""Which sampling steps of a rollout are stochastic (SDE, log-prob, trainable) and which are ODE.

DanceGRPO samples every step with the SDE and trains a random subset of all of them. Two later
methods make the SDE part, and so the trained part, small:

- **MixGRPO** (Li et al., arXiv 2507.21802, `SlidingWindow`): SDE steps only inside a window of
  `size` consecutive steps; ODE steps before and after it; only the window is trained. The
  window starts at the noisiest step and moves `stride` steps later every `shift_interval`
  training iterations (the official `progressive` strategy; defaults w = 4, τ = 25, s = 1 with
  25 sampling steps), returning to the start after the last position (`roll_back`).
- **Flow-GRPO-Fast** (Liu et al., arXiv 2505.05470, official code `sde_window_size` /
  `sde_window_range`, `RandomBranch`): ODE up to a random step, `num_sde_steps` SDE steps there
  (2 officially), ODE to the end; only those steps are trained. The start is drawn uniformly so
  that the SDE steps lie inside `[low, high)` (officially `(0, num_steps // 2)`).

A schedule returns a boolean mask over the T steps of one rollout; every sample of the rollout
shares it (both papers branch all samples at the same steps), so the G samples of a group still
start from shared noise and differ only through the SDE steps inside the mask. The module asks
for the mask once per rollout with the rollout's index, so the window follows training, and a
resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_grpo.samplers.base import Sampler

__all__ = ["AllSteps", "RandomBranch", "SlidingWindow", "StepSchedule", "trainable_policy_steps", "trainable_steps"]


class StepSchedule(ABC):
    """The SDE/ODE split of a rollout's steps, as a function of the training iteration."""

    @abstractmethod
    def sde_steps(self, num_steps: int, iteration: int, generator: torch.Generator | None = None) -> Tensor:
        """BoolTensor[T]: True where step i draws noise and is trainable, False where it is an ODE step.

        Args:
            num_steps: T, the sampler's steps per trajectory.
            iteration: index of the rollout in training (0 for the first).
            generator: CPU generator for the random schedules (the same on every rank).
        """


class AllSteps(StepSchedule):
    """Every step is an SDE step: today's (DanceGRPO) rollout."""

    def sde_steps(self, num_steps: int, iteration: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.ones(num_steps, dtype=torch.bool)

    def __repr__(self) -> str:
        return "AllSteps()"


def _window(num_steps: int, start: int, size: int) -> Tensor:
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start : start + size] = True
    return mask


@dataclass(frozen=True)
class SlidingWindow(StepSchedule):
    """MixGRPO's sliding window: SDE on steps [l, l + size), ODE elsewhere, l moving with training.

    Window start at iteration n (p = n // shift_interval, the number of shifts so far):
        l(n) = first + stride · (p mod P)      with roll_back (MixGRPO's setting)
        l(n) = first + stride · min(p, P − 1)  without
    where P is the number of positions before the window would pass `last_start` (default
    T − size, so the window always holds `size` steps). stride = 0 freezes the window at `first`
    (MixGRPO-Flash*'s `prog_overlap_step=0`).

    Departure from the official code: there, the window is cut at index T − 2 and shrinks near
    the end (it never reaches the last steps, whose log-prob the code ignores); here it stays
    full, and `GRPOModule(drop_last_timestep=True)` leaves the last step out if wanted.

    Args:
        size: w, steps in the window (MixGRPO: 4 of 25).
        shift_interval: τ, training iterations (rollouts) between two moves (MixGRPO 25,
            MixGRPO-Flash 20).
        stride: s, steps the window moves at each shift (MixGRPO 1).
        first: step index of the first window position (0: the noisiest step).
        last_start: largest window start; None = T − size.
        roll_back: after the last position return to `first` (MixGRPO) instead of staying there.
    """

    size: int = 4
    shift_interval: int = 25
    stride: int = 1
    first: int = 0
    last_start: int | None = None
    roll_back: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"SlidingWindow size must be >= 1, got {self.size}")
        if self.shift_interval < 1:
            raise ValueError(f"SlidingWindow shift_interval must be >= 1, got {self.shift_interval}")
        if self.stride < 0 or self.first < 0:
            raise ValueError(f"SlidingWindow stride and first must be >= 0, got stride={self.stride}, first={self.first}")
        if self.last_start is not None and self.last_start < self.first:
            raise ValueError(f"SlidingWindow last_start ({self.last_start}) must be >= first ({self.first})")

    def start(self, num_steps: int, iteration: int) -> int:
        """l(n), the window's first step at this iteration."""
        last = num_steps - self.size if self.last_start is None else self.last_start
        if self.size > num_steps or last + self.size > num_steps or self.first > last:
            raise ValueError(
                f"SlidingWindow(size={self.size}, first={self.first}, last_start={self.last_start}) "
                f"does not fit in {num_steps} sampling steps"
            )
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        positions = 1 if self.stride == 0 else (last - self.first) // self.stride + 1  # P
        shifts = iteration // self.shift_interval  # p
        position = shifts % positions if self.roll_back else min(shifts, positions - 1)
        return self.first + self.stride * position

    def sde_steps(self, num_steps: int, iteration: int, generator: torch.Generator | None = None) -> Tensor:
        return _window(num_steps, self.start(num_steps, iteration), self.size)


@dataclass(frozen=True)
class RandomBranch(StepSchedule):
    """Flow-GRPO-Fast's branching: ODE to a random step l, SDE on [l, l + num_sde_steps), ODE after.

    l is uniform on {low, ..., high − num_sde_steps}, drawn once per rollout from `generator`
    (the official code draws `random.randint(low, high − size)` per sampling call).

    Args:
        num_sde_steps: k, SDE (and trained) steps per rollout (official: 2).
        low, high: the SDE steps lie in [low, high); high = None means T // 2 (official range
            `(0, num_steps // 2)`: branching in the first, noisier half of the trajectory).
    """

    num_sde_steps: int = 2
    low: int = 0
    high: int | None = None

    def __post_init__(self) -> None:
        if self.num_sde_steps < 1:
            raise ValueError(f"RandomBranch num_sde_steps must be >= 1, got {self.num_sde_steps}")
        if self.low < 0:
            raise ValueError(f"RandomBranch low must be >= 0, got {self.low}")

    def bounds(self, num_steps: int) -> tuple[int, int]:
        """(low, high) for a T-step trajectory, validated."""
        high = num_steps // 2 if self.high is None else self.high
        if not self.low + self.num_sde_steps <= high <= num_steps:
            raise ValueError(
                f"RandomBranch(num_sde_steps={self.num_sde_steps}, low={self.low}, high={self.high}) "
                f"does not fit in {num_steps} sampling steps (range [{self.low}, {high}))"
            )
        return self.low, high

    def sde_steps(self, num_steps: int, iteration: int, generator: torch.Generator | None = None) -> Tensor:
        low, high = self.bounds(num_steps)
        start = int(torch.randint(low, high - self.num_sde_steps + 1, (), generator=generator))
        return _window(num_steps, start, self.num_sde_steps)


def trainable_steps(sampler: Sampler, sde_steps: Tensor | None = None, drop_last: bool = False) -> Tensor:
    """Indices of the steps an update may train on: LongTensor[T'].

    The sampler's stochastic steps (std > 0), restricted to the rollout's SDE steps (an ODE step
    has no density, and its successor is a function of its input), optionally without the last
    sampling step. The timestep subset (`timestep_fraction`) is then drawn from these.
    """
    candidates = sampler.stochastic_steps()
    if sde_steps is not None:
        if sde_steps.shape != (sampler.num_steps,):
            raise ValueError(f"sde_steps must be a mask of {sampler.num_steps} steps, got shape {tuple(sde_steps.shape)}")
        candidates = candidates[sde_steps.cpu()[candidates]]
    if drop_last:
        candidates = candidates[candidates != sampler.num_steps - 1]
    return candidates


def trainable_policy_steps(policy: Any, sampler: Sampler, candidates: Tensor) -> Tensor:
    """`candidates` (LongTensor[T'] of step indices) restricted to the steps whose timesteps the
    policy's trainable weights act at (`PolicyAdapter.trained_at`): with Wan 2.2 A14B training one
    expert, a step the frozen expert denoises has no gradient to give. ValueError when none is left."""
    acting = policy.trained_at(sampler.timesteps).cpu()  # [T]
    kept = candidates[acting[candidates.cpu()]]
    if kept.numel() == 0:
        raise ValueError(
            f"{type(policy).__name__}'s trainable weights act at none of the trainable steps {candidates.tolist()} "
            f"(timesteps {sampler.timesteps[candidates.cpu()].tolist()}): train another expert or change the schedule"
        )
    return kept
