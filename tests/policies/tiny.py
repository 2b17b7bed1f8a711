"""Test helpers over the tiny stand-in pipelines (built by `lightning_grpo.testing.stand_ins`).

Kept importable as `tiny` (tests/policies on sys.path) for the policy tests.
"""

from __future__ import annotations

import os

import torch

from lightning_grpo.testing.stand_ins import (  # noqa: F401  (re-exported for the tests)
    IMAGE_SIZE,
    TEXT_HIDDEN,
    TEXT_MAX_LENGTH,
    WORDS,
    build_tiny_flux,
    build_tiny_sd,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
    tiny_vae,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests


@torch.no_grad()
def ode_sample(policy, sampler, prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """Deterministic sampling loop through the adapter contract; returns the final latents.

    encode_prompts → for i: out = predict(x, timesteps[i] as [B], condition); x = ode_step(out, x, i).
    `latents` are the initial noise from `policy.prepare_latents` (the same as a pipeline's).
    """
    condition = policy.encode_prompts(prompts)
    x = latents
    for i in range(sampler.num_steps):
        t = sampler.timesteps[i].expand(x.shape[0])  # [B]
        x = sampler.ode_step(policy.predict(x, t, condition), x, i)
    return x
