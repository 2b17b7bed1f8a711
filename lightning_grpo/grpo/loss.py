"""The clipped GRPO surrogate (PPO-style, no value function), with an optional KL penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_grpo.types import GRPOStats


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std²) ‖ N(ref_mean, std²)) = ‖mean − ref_mean‖² / (2·std²), averaged per sample.

    The policy and the reference share the step's std, so their per-step KL is this closed form
    (Flow-GRPO's KL term). Returns Tensor[B].
    """
    kl = (mean.float() - ref_mean.float()) ** 2 / (2 * torch.as_tensor(std).float() ** 2)
    return kl.flatten(1).mean(dim=1)


def clipped_surrogate_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip_max: float | None = None,
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
    reward_weights: Tensor | None = None,
) -> tuple[Tensor, GRPOStats]:
    """mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))) + β·mean(KL),  ρ = exp(log p_new − log p_old).

    With per-reward advantages A [B, K] and weights w [K] (DanceGRPO HunyuanVideo form):
        Σ_k w_k · mean_b(max(−A_bk·ρ_b, −A_bk·clip(ρ_b, 1 − ε, 1 + ε))) + β·mean(KL)
    which equals the one-loss form on A = Σ_k w_k·A_k only while every ratio is inside the clip
    range or the A_k agree in sign.

    Args:
        log_prob: Tensor[B] log p_θ(x_{i+1} | x_i) with gradient.
        old_log_prob: Tensor[B] the same under the rollout policy (no gradient).
        advantages: Tensor[B], or Tensor[B, K] per-reward advantages (then `reward_weights`).
        clip_range: ε (DanceGRPO FLUX: 1e-4).
        adv_clip_max: clamp A to ±adv_clip_max first (DanceGRPO: 5); None keeps A.
        kl: Tensor[B] per-sample KL to the reference policy (see `gaussian_kl`); needed if β > 0.
        kl_beta: β; 0 (default) is GRPO without KL, as the paper.
        reward_weights: Tensor[K] weights of the per-reward losses; needed iff advantages is 2-D.

    The caller divides the loss by its accumulation count (samples × timesteps per optimizer step).
    """
    if kl_beta > 0 and kl is None:
        raise ValueError("kl_beta > 0 needs the per-sample KL to the reference policy")
    if (advantages.ndim == 2) != (reward_weights is not None):
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)}: per-reward advantages [B, K] need reward_weights [K], "
            "and only they take them"
        )
    if reward_weights is not None and reward_weights.numel() != advantages.shape[1]:
        raise ValueError(f"{reward_weights.numel()} reward weights for {advantages.shape[1]} per-reward advantage columns")
    advantages = advantages.float().to(log_prob.device)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float().detach()
    ratio = torch.exp(log_ratio)
    per_sample_ratio = ratio if advantages.ndim == 1 else ratio.unsqueeze(1)  # [B] or [B, 1]
    unclipped = -advantages * per_sample_ratio
    clipped = -advantages * torch.clamp(per_sample_ratio, 1.0 - clip_range, 1.0 + clip_range)
    surrogate = torch.maximum(unclipped, clipped).mean(dim=0)  # [] or [K]
    loss = surrogate if reward_weights is None else (reward_weights.float().to(surrogate.device) * surrogate).sum()
    kl_mean = torch.zeros((), device=loss.device)
    if kl is not None:
        kl_mean = kl.float().mean()
        if kl_beta > 0:
            loss = loss + kl_beta * kl_mean
    with torch.no_grad():
        stats = GRPOStats(
            loss=loss.detach(),
            ratio_mean=ratio.mean().detach(),
            ratio_min=ratio.min().detach(),
            ratio_max=ratio.max().detach(),
            clip_fraction=((ratio - 1.0).abs() > clip_range).float().mean(),
            approx_kl=0.5 * (log_ratio.detach() ** 2).mean(),  # DDPO/PPO's k2 estimator
            kl=kl_mean.detach(),
        )
    return loss, stats
