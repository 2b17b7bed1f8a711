"""Policy adapters: one base-model family per file, on the shared family layer (`family.py`)."""

from lightning_grpo.policies.base import PolicyAdapter, check_sampler_matches
from lightning_grpo.policies.family import DiffusersPolicy
from lightning_grpo.policies.flux import FluxPolicy, flux_pipeline_sigmas
from lightning_grpo.policies.hunyuan_video import HunyuanVideoPolicy
from lightning_grpo.policies.registry import FAMILIES, Family, register_family
from lightning_grpo.policies.skyreels_i2v import SkyReelsI2VPolicy
from lightning_grpo.policies.stable_diffusion import StableDiffusionPolicy

__all__ = [
    "FAMILIES",
    "DiffusersPolicy",
    "Family",
    "FluxPolicy",
    "HunyuanVideoPolicy",
    "PolicyAdapter",
    "SkyReelsI2VPolicy",
    "StableDiffusionPolicy",
    "check_sampler_matches",
    "flux_pipeline_sigmas",
    "register_family",
]
