"""Group-relative advantages (GRPO): each sample is judged against the other samples of its prompt.

Samples of one prompt form a group; groups are contiguous blocks of `group_size` samples
(the rollout repeats each prompt G times with `repeat_interleave`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

from lightning_grpo.grpo.selection import best_of_n_indices

StdMode = Literal["group", "global"]
# "sum": A = clamp(Σ_k w_k·A_k) and one clipped loss (our original form);
# "per_reward": A_k = clamp(A_k) and Σ_k w_k·loss_k (DanceGRPO train_grpo_hunyuan.py)
MultiRewardForm = Literal["sum", "per_reward"]
# "group": advantages over the full group, then select (DanceGRPO); "kept": re-normalise the kept
BestOfNAdvantages = Literal["group", "kept"]


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
    per_reward = reward_advantages(rewards, weights, group_size, std_mode=std_mode, eps=eps, unbiased=unbiased)
    return combine_advantages(per_reward, weights, "sum", clip_max), per_reward


def reward_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_size: int,
    std_mode: StdMode = "group",
    eps: float = 1e-8,
    unbiased: bool = True,
) -> dict[str, Tensor]:
    """{name: A_k Tensor[B]}: each reward normalised within its group (`group_advantages`), unclamped.

    `weights` only checks that both mappings name the same rewards."""
    missing = set(rewards) ^ set(weights)
    if missing:
        raise ValueError(f"rewards and weights name different rewards: {sorted(missing)}")
    return {
        name: group_advantages(r, group_size, std_mode=std_mode, eps=eps, unbiased=unbiased) for name, r in rewards.items()
    }


def weighted_sum(per_reward: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ_k w_k·A_k, Tensor[B] (DanceGRPO's best-of-n ranking score `total_scores`)."""
    return sum(weights[name] * adv for name, adv in per_reward.items())


def combine_advantages(
    per_reward: Mapping[str, Tensor], weights: Mapping[str, float], form: MultiRewardForm, clip_max: float | None
) -> Tensor:
    """The advantages the loss consumes, in the multi-reward `form`.

    "sum": Tensor[B] = clamp(Σ_k w_k·A_k, ±clip_max), one clipped loss on it.
    "per_reward": Tensor[B, K] with column k = clamp(A_k, ±clip_max), in `per_reward`'s order;
        the loss applies the clipped surrogate per column and sums the losses with the weights
        (`clipped_surrogate_loss(..., reward_weights=...)`), as DanceGRPO's HunyuanVideo script
        (`vq_loss`, `mq_loss`, `final_loss = vq_coef·vq_loss + mq_coef·mq_loss`).
    """
    if form == "sum":
        total = weighted_sum(per_reward, weights)
        return total if clip_max is None else total.clamp(-clip_max, clip_max)
    if form == "per_reward":
        columns = torch.stack(list(per_reward.values()), dim=1)  # [B, K]
        return columns if clip_max is None else columns.clamp(-clip_max, clip_max)
    raise ValueError(f"multi_reward must be 'sum' or 'per_reward', got {form!r}")


def effective_advantages(advantages: Tensor, weights: Tensor | None) -> Tensor:
    """Tensor[B]: the advantage each sample is pushed by: the sum-form advantages themselves, or
    Σ_k w_k·clamp(A_k) for the per-reward form (equal to the loss gradient's weight while no ratio
    is clipped). Used for logging and `StepRecord.advantages`."""
    if advantages.ndim == 1:
        return advantages
    if weights is None:
        raise ValueError("per-reward advantages [B, K] need their reward weights [K]")
    return advantages @ weights.to(advantages)


@dataclass(frozen=True)
class GRPOAdvantages:
    """Outcome of `grpo_advantages`.

    Attributes:
        advantages: Tensor[B'] ("sum") or Tensor[B', K] ("per_reward") of the trained samples.
        chosen: LongTensor[B'] indices of the trained samples into the rollout (best-of-n), or
            None when every sample is trained.
    """

    advantages: Tensor
    chosen: Tensor | None


def grpo_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float],
    group_size: int,
    form: MultiRewardForm = "sum",
    best_of_n: tuple[int, int] | None = None,
    best_of_n_advantages: BestOfNAdvantages = "group",
    std_mode: StdMode = "group",
    clip_max: float | None = None,
) -> GRPOAdvantages:
    """Step 4 of GRPO: per-reward group advantages, optional best-of-n, the multi-reward form.

    Best-of-n (keep_top, keep_bottom) ranks each group's samples by Σ_k w_k·A_k (unclamped, over
    the full group) and keeps the best and worst (DanceGRPO train_grpo_hunyuan.py: `total_scores`,
    `argsort`, top/bottom `bestofn // 2`). `best_of_n_advantages="group"` trains on the advantages
    computed over the full group, as the official code; "kept" re-normalises every reward within
    the kept samples (groups of keep_top + keep_bottom) before combining.
    """
    per_reward = reward_advantages(rewards, weights, group_size, std_mode=std_mode)
    if best_of_n is None:
        return GRPOAdvantages(combine_advantages(per_reward, weights, form, clip_max), None)
    if best_of_n_advantages not in ("group", "kept"):
        raise ValueError(f"best_of_n_advantages must be 'group' or 'kept', got {best_of_n_advantages!r}")
    chosen = best_of_n_indices(weighted_sum(per_reward, weights), group_size, *best_of_n)
    if best_of_n_advantages == "kept":
        kept = {name: r[chosen.to(r.device)] for name, r in rewards.items()}
        per_reward = reward_advantages(kept, weights, sum(best_of_n), std_mode=std_mode)
    else:
        per_reward = {name: a[chosen.to(a.device)] for name, a in per_reward.items()}
    return GRPOAdvantages(combine_advantages(per_reward, weights, form, clip_max), chosen)


def binarize(rewards: Tensor, threshold: float) -> Tensor:
    """1 where reward > threshold, else 0 (the paper's binary reward, e.g. HPS > 0.28)."""
    return (rewards > threshold).float()


def zero_variance_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Share of groups whose rewards are all equal (they give no learning signal)."""
    groups = _as_groups(rewards, group_size)
    return (groups == groups[:, :1]).all(dim=1).float().mean()
