"""Group-relative advantages (GRPO): each sample is judged against the other samples of its prompt.

Samples of one prompt form a group; groups are contiguous blocks of `group_size` samples
(the rollout repeats each prompt G times with `repeat_interleave`).
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import Tensor

StdMode = Literal["group", "global"]


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)  # [P, G]


def group_advantages(
    rewards: Tensor,
    group_size: int,
    std_mode: StdMode = "group",
    eps: float = 1e-8,
    clip_max: float | None = None,
    unbiased: bool = True,
) -> Tensor:
    """A = (r − mean_g) / (std + eps), per group; Tensor[B] like `rewards`.

    Args:
        rewards: Tensor[B], groups contiguous.
        group_size: G, samples per prompt.
        std_mode: "group" divides by each group's std (DanceGRPO); "global" by the std of the whole
            batch (the group mean is still subtracted), which keeps low-variance groups small.
        eps: added to the std (DanceGRPO: 1e-8).
        clip_max: clamp advantages to ±clip_max (DanceGRPO adv_clip_max: 5); None keeps them.
        unbiased: Bessel-corrected std (torch's default, as DanceGRPO); False for the population std.

    A group whose rewards are all equal carries no signal and gets exactly A = 0 (never NaN, and
    never the float noise of (r − mean) / eps). A group of one sample also gets 0.
    """
    groups = _as_groups(rewards, group_size)  # [P, G]
    centred = groups - groups.mean(dim=1, keepdim=True)  # [P, G]
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    if std_mode == "group":
        std = groups.std(dim=1, keepdim=True, unbiased=unbiased)  # [P, 1]
    elif std_mode == "global":
        std = groups.flatten().std(unbiased=unbiased).expand(groups.shape[0], 1)  # [P, 1]
    else:
        raise ValueError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    advantages = centred / (std + eps)
    constant = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # [P, 1] zero-variance groups
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages.flatten()


def multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_size: int,
    std_mode: StdMode = "group",
    eps: float = 1e-8,
    clip_max: float | None = None,
    unbiased: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A = Σ_k w_k·A_k with each reward normalised within its group first (DanceGRPO multi-reward).

    Normalising each reward separately makes rewards of different scales (HPS ≈ 0.3, CLIP ≈ 0.3,
    VideoAlign ≈ ±2) count by their weights only. The clamp to ±clip_max applies to the sum.

    Returns:
        (advantages Tensor[B], per-reward normalised advantages {name: Tensor[B]}).
    """
    missing = set(rewards) ^ set(weights)
    if missing:
        raise ValueError(f"rewards and weights name different rewards: {sorted(missing)}")
    per_reward = {
        name: group_advantages(r, group_size, std_mode=std_mode, eps=eps, unbiased=unbiased) for name, r in rewards.items()
    }
    total = sum(weights[name] * adv for name, adv in per_reward.items())
    if clip_max is not None:
        total = total.clamp(-clip_max, clip_max)
    return total, per_reward


def binarize(rewards: Tensor, threshold: float) -> Tensor:
    """1 where reward > threshold, else 0 (the paper's binary reward, e.g. HPS > 0.28)."""
    return (rewards > threshold).float()


def zero_variance_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Share of groups whose rewards are all equal (they give no learning signal)."""
    groups = _as_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean()
