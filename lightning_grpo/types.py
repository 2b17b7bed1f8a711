"""Typed containers passed between the rollout, the rewards and the update.

Shape legend used in comments: B = samples in the rollout (prompts × group size), T = sampling
steps, K = trained timesteps per sample, `*L` = the latent shape of one sample (e.g. C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

Condition = dict[str, Tensor]
"""Model conditioning (text embeddings, masks, image latents...): every tensor batch-first."""


def index_condition(condition: Condition, index: Tensor) -> Condition:
    """Select the rows `index` of every batch-first tensor of a condition."""
    return {key: value[index] for key, value in condition.items()}


@dataclass
class StepOutput:
    """One stochastic sampler step x_i -> x_{i+1}, with the Gaussian it was drawn from."""

    prev_sample: Tensor  # [B, *L] x_{i+1}
    mean: Tensor  # [B, *L] mean of p(x_{i+1} | x_i)
    std: Tensor  # [B, 1, ...] or scalar: std of p(x_{i+1} | x_i), broadcastable to mean
    log_prob: Tensor  # [B] log p(x_{i+1} | x_i), reduced over non-batch dims (fp32)


@dataclass
class Rollout:
    """A batch of sampled trajectories, everything the update needs and nothing more."""

    latents: Tensor  # [B, T+1, *L] x_0 (noise) ... x_T (clean); NaN where an ODE tail skipped the grid
    log_probs: Tensor  # [B, T] log p_old(x_{i+1} | x_i), fp32
    condition: Condition  # each [B, ...]
    prompts: list[str]  # [B]
    group_index: Tensor  # [B] long: which prompt (group) each sample belongs to
    images: Tensor | None = None  # [B, C, H, W] first frames for image-to-video, pixels in [0, 1]
    sde_steps: Tensor | None = None  # [T] bool, shared by all samples: SDE steps (None = all); the others were ODE steps
    sample_keys: Tensor | None = None  # [B, 2] long (global group, member): what the noise is keyed by

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def select(self, index: Tensor) -> Rollout:
        """The sub-rollout of samples `index` (used by best-of-n and mini-batching)."""
        index = index.to(self.latents.device)
        return replace(
            self,
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            condition=index_condition(self.condition, index),
            prompts=[self.prompts[i] for i in index.tolist()],
            group_index=self.group_index[index],
            images=None if self.images is None else self.images[index],
            sample_keys=None if self.sample_keys is None else self.sample_keys[index.cpu()],
        )


@dataclass
class GRPOStats:
    """Scalars of one inner update, averaged by the module before logging."""

    loss: Tensor
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    kl: Tensor = field(default_factory=lambda: torch.zeros(()))


@dataclass
class StepRecord:
    """What the last training step produced, kept on `GRPOModule.last_step` for callbacks (reward
    histograms, diversity). Detached tensors; replaced by every step and released at the start
    of the next one, so it costs no memory beyond what the step held anyway.

    Samples b and b' were drawn for the same prompt iff b // group_size == b' // group_size.
    """

    prompts: list[str]  # [B] prompt of each rolled-out sample
    group_size: int  # G
    latents: Tensor  # [B, *L] final latents x_T of every rolled-out sample
    pixels: Tensor  # [B, C, H, W] or [B, F, C, H, W] decoded samples in [0, 1]
    scores: dict[str, Tensor]  # name -> [B] raw reward of every rolled-out sample (before best-of-n)
    reward_advantages: dict[str, Tensor]  # name -> [B] that reward normalised within its group
    advantages: Tensor  # [B'] combined advantages of the trained samples (after best-of-n, B' <= B)

    @property
    def num_samples(self) -> int:
        """B; 0 for the record of a rank that trained nothing while other ranks did."""
        return len(self.prompts)

    @property
    def group_index(self) -> Tensor:
        """[B] long: the prompt (group) of each sample."""
        return torch.arange(len(self.prompts), device=self.latents.device) // self.group_size
