"""Dropping whole groups whose rewards are not finite (the `reward_failure="drop_group"` option).

A group's advantages compare its samples with each other, so one NaN reward poisons the group
mean and std, i.e. every advantage of that group; the other groups are unaffected. Dropping the
affected groups keeps the update clean without throwing away the rest of the rollout. Samples of a
group are contiguous (the rollout repeats each prompt G times), so keeping whole groups keeps the
layout that `group_advantages` expects.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupFilter:
    """The outcome of `filter_nonfinite_groups`.

    Attributes:
        keep: LongTensor[K·G], indices of the samples of the kept groups, in batch order.
        kept_groups: BoolTensor[P], True for a group whose every reward is finite on every sample.
        nonfinite_samples: {reward name: number of samples it scored non-finite}, only rewards
            with at least one such sample.
    """

    keep: Tensor
    kept_groups: Tensor
    nonfinite_samples: dict[str, int]

    @property
    def num_groups(self) -> int:
        """P, groups in the batch."""
        return self.kept_groups.numel()

    @property
    def dropped_groups(self) -> int:
        """Groups dropped because at least one of their samples has a non-finite reward."""
        return int((~self.kept_groups).sum())

    def warning(self, step: int) -> str:
        """The warning of a step that dropped groups: each failing reward with its count, the outcome."""
        counts = ", ".join(f"{name!r} on {n} sample(s)" for name, n in self.nonfinite_samples.items())
        outcome = "skipping this update" if self.keep.numel() == 0 else "training on the others"
        return f"non-finite reward from {counts}: dropping {self.dropped_groups} of {self.num_groups} groups at step {step}, {outcome}"

    def report(self, log: Any, num_samples: int, step: int) -> GroupFilter:
        """Log `train/reward/dropped_groups` through a LightningModule's `log` and, when a group
        was dropped, warn naming each failing reward (`warning`); returns itself."""
        log("train/reward/dropped_groups", float(self.dropped_groups), on_step=True, batch_size=max(num_samples, 1))
        if self.dropped_groups:
            warnings.warn(self.warning(step), RuntimeWarning, stacklevel=5)
        return self


def filter_nonfinite_groups(scores: Mapping[str, Tensor], group_size: int) -> GroupFilter:
    """Keep the groups in which every reward is finite on every sample.

    Args:
        scores: {reward name: Tensor[B]}, groups contiguous blocks of `group_size` samples.
        group_size: G.

    Example (G = 2): scores {"a": [1, nan, 2, 3], "b": [0, 0, inf, 1]} → group 0 has a NaN (a),
    group 1 an inf (b): both dropped, keep = []; with "b" = [0, 0, 0, 1] only group 0 is dropped
    and keep = [2, 3].
    """
    if not scores:
        raise ValueError("no reward scores to filter")
    finite = None
    counts: dict[str, int] = {}
    for name, values in scores.items():
        if values.ndim != 1 or group_size < 1 or values.numel() % group_size:
            raise ValueError(f"scores of {name!r} with shape {tuple(values.shape)} do not split into groups of {group_size}")
        ok = torch.isfinite(values)  # [B]
        if finite is not None and ok.shape != finite.shape:
            raise ValueError(f"rewards score different numbers of samples: {name!r} has {values.numel()}")
        bad = int((~ok).sum())
        if bad:
            counts[name] = bad
        finite = ok if finite is None else finite & ok
    kept_groups = finite.view(-1, group_size).all(dim=1)  # [P]
    keep = torch.nonzero(kept_groups.repeat_interleave(group_size)).flatten()  # [K·G]
    return GroupFilter(keep=keep, kept_groups=kept_groups, nonfinite_samples=counts)
