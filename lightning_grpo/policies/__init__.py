"""Policy adapters: one base-model family per file."""

from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.policies.stable_diffusion import StableDiffusionPolicy

__all__ = ["PolicyAdapter", "StableDiffusionPolicy"]
