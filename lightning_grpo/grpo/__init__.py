"""The GRPO algorithm pieces: advantages, the clipped loss, best-of-n and timestep selection."""

from lightning_grpo.grpo.advantages import (
    GRPOAdvantages,
    binarize,
    combine_advantages,
    effective_advantages,
    group_advantages,
    grpo_advantages,
    multi_reward_advantages,
    reward_advantages,
    weighted_sum,
    zero_variance_fraction,
)
from lightning_grpo.grpo.loss import clipped_surrogate_loss, gaussian_kl
from lightning_grpo.grpo.selection import best_of_n_indices, sample_timestep_indices

__all__ = [
    "GRPOAdvantages",
    "best_of_n_indices",
    "binarize",
    "clipped_surrogate_loss",
    "combine_advantages",
    "effective_advantages",
    "gaussian_kl",
    "group_advantages",
    "grpo_advantages",
    "multi_reward_advantages",
    "reward_advantages",
    "weighted_sum",
    "sample_timestep_indices",
    "zero_variance_fraction",
]
