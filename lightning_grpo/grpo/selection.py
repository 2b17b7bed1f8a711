"""Best-of-n trajectory selection and the random timestep subset, both per group / per sample."""

from __future__ import annotations

import torch
from torch import Tensor


def best_of_n_indices(scores: Tensor, group_size: int, keep_top: int, keep_bottom: int) -> Tensor:
    """Indices of the `keep_top` best and `keep_bottom` worst samples of every group.

    DanceGRPO (HunyuanVideo) trains on the top 4 and bottom 4 of each group of samples of one
    prompt. Selection is strictly within a group: the result keeps groups contiguous, in group
    order, each block sorted best → worst, so it forms groups of size keep_top + keep_bottom.

    Args:
        scores: Tensor[B] (e.g. the reward or summed advantage), groups contiguous.
        group_size: G.
        keep_top, keep_bottom: counts per group, keep_top + keep_bottom <= G.

    Returns:
        LongTensor[P * (keep_top + keep_bottom)] of indices into the batch.
    """
    if scores.ndim != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    if keep_top < 0 or keep_bottom < 0 or keep_top + keep_bottom < 1 or keep_top + keep_bottom > group_size:
        raise ValueError(
            f"best-of-n needs 1 <= keep_top + keep_bottom <= group_size, got top={keep_top}, "
            f"bottom={keep_bottom}, group_size={group_size}"
        )
    groups = scores.view(-1, group_size)  # [P, G]
    # stable sort: ties keep their original order, so the selection is deterministic
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices  # [P, G]
    chosen = torch.cat([order[:, :keep_top], order[:, group_size - keep_bottom :]], dim=1)  # [P, k]
    offsets = torch.arange(groups.shape[0], device=scores.device).unsqueeze(1) * group_size  # [P, 1]
    return (chosen + offsets).flatten()


def sample_timestep_indices(
    batch_size: int,
    candidates: Tensor,
    fraction: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random subset of the trainable steps for every sample: LongTensor[B, K].

    DanceGRPO trains on K = int(T · fraction) of the T sampling steps, a fresh random
    permutation per sample (official `timestep_fraction`, 0.6 for the flow models).

    Args:
        batch_size: B.
        candidates: LongTensor[T'] of the step indices that may be trained (the sampler's
            stochastic steps, optionally without the last one).
        fraction: share of the candidates kept per sample, in (0, 1]; at least one is kept.
        generator: CPU generator for a reproducible choice.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    num = candidates.numel()
    if num == 0:
        raise ValueError("no trainable timesteps: the sampler has no stochastic step (eta = 0?)")
    k = max(1, int(num * fraction))
    perms = torch.stack([torch.randperm(num, generator=generator) for _ in range(batch_size)])  # [B, T']
    return candidates.cpu()[perms[:, :k]]  # [B, K]
