"""The policy-adapter contract: one base-model family per adapter, nothing of GRPO inside.

An adapter owns its diffusers components (text encoders, denoiser, VAE) and exposes the five
operations the rollout and the update need. GRPOModule never looks inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_grpo.types import Condition

Paradigm = Literal["flow", "diffusion"]


class PolicyAdapter(nn.Module, ABC):
    """A generator seen as a policy over denoising steps.

    Class attributes:
        paradigm: "flow" (velocity prediction, use FlowSDESampler) or "diffusion" (use DDIMSDESampler).
    """

    paradigm: ClassVar[Paradigm]

    @abstractmethod
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """Conditioning for a batch of prompts (and first frames [B, C, H, W] in [0, 1] for I2V).

        Every tensor is batch-first with B = len(prompts); it includes the unconditional branch
        when classifier-free guidance is on. Runs under no_grad (text encoders are frozen).
        """

    @abstractmethod
    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Initial noise x_0: Tensor[batch_size, *L] on the adapter's device, fp32."""

    @abstractmethod
    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Model output (velocity, ε, v or x0 as the sampler expects) for latents [B, *L].

        `timesteps` is Tensor[B] of the sampler's model-facing timesteps. Guidance (CFG) is
        applied inside when the adapter's guidance scale is > 1; the result is [B, *L].
        """

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [0, 1]: [B, C, H, W] for images, [B, F, C, H, W] for video. No gradient."""

    @property
    def uses_cfg(self) -> bool:
        """True when predict() runs classifier-free guidance (GRPO then steps once per rollout)."""
        return False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (the denoiser, or its LoRA weights)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
