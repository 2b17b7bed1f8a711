"""Policy adapters: one base-model family per file."""

from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.policies.flux import FluxPolicy, flux_pipeline_sigmas
from lightning_grpo.policies.stable_diffusion import StableDiffusionPolicy

__all__ = ["FluxPolicy", "PolicyAdapter", "StableDiffusionPolicy", "flux_pipeline_sigmas"]
