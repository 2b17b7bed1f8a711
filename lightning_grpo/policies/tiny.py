"""A tiny, weight-free policy for tests and smoke runs: a small conv denoiser on 3-channel "latents".

It follows the adapter contract exactly (text condition, noise, prediction, decode, CFG) with no
pretrained component, so the training system can be exercised in seconds on a CPU.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_grpo.policies.base import Paradigm, PolicyAdapter, configured
from lightning_grpo.types import Condition


class TinyPolicy(PolicyAdapter):
    """Conv denoiser conditioned on hashed prompt words and the timestep.

    Args:
        paradigm: "flow" (predicts a velocity) or "diffusion" (predicts ε).
        resolution: side of the square latent, which is also the image (3 channels).
        hidden: conv width.
        embed_dim: size of the prompt embedding (words hashed into `vocab_buckets` rows).
        vocab_buckets: rows of the word-hash embedding table.
        guidance_scale: classifier-free guidance scale; > 1 runs an unconditional branch too.
        seed: initialisation seed of the weights.
    """

    paradigm: Paradigm = "flow"  # type: ignore[misc]
    geometry_arguments = ("resolution",)

    def __init__(
        self,
        paradigm: Paradigm = "flow",
        resolution: int = 8,
        hidden: int = 16,
        embed_dim: int = 16,
        vocab_buckets: int = 64,
        guidance_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if paradigm not in ("flow", "diffusion"):
            raise ValueError(f"paradigm must be 'flow' or 'diffusion', got {paradigm!r}")
        self.paradigm = paradigm
        self.resolution = resolution
        self.vocab_buckets = vocab_buckets
        self.guidance_scale = float(guidance_scale)
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's random stream is left as it was
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(vocab_buckets, embed_dim)
            self.embedding.requires_grad_(False)  # the "text encoder" is frozen, as in real adapters
            self.film = nn.Linear(embed_dim + 1, 2 * hidden)
            self.conv_in = nn.Conv2d(3, hidden, 3, padding=1)
            self.conv_out = nn.Conv2d(hidden, 3, 3, padding=1)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["guidance_scale"]) > 1.0

    def _embed(self, prompts: list[str]) -> Tensor:
        rows = []
        for prompt in prompts:
            ids = [zlib.crc32(word.encode()) % self.vocab_buckets for word in prompt.lower().split()] or [0]
            rows.append(self.embedding(torch.tensor(ids, device=self.device)).mean(dim=0))
        return torch.stack(rows)  # [B, D]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        embeds = self._embed(prompts)  # [B, D]
        condition = {"text_embeds": embeds}
        if self.uses_cfg:
            condition["negative_text_embeds"] = torch.zeros_like(embeds)
        return condition

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        shape = (batch_size, 3, self.resolution, self.resolution)
        return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _denoise(self, latents: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
        t = (timesteps.float() / 1000.0).view(-1, 1)  # [B, 1]
        scale, shift = self.film(torch.cat([embeds, t], dim=1)).chunk(2, dim=1)  # [B, hidden] each
        h = torch.nn.functional.silu(self.conv_in(latents))  # [B, hidden, H, W]
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.conv_out(h)  # [B, 3, H, W]

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        cond = self._denoise(latents, timesteps, condition["text_embeds"])
        if not self.uses_cfg:
            return cond
        uncond = self._denoise(latents, timesteps, condition["negative_text_embeds"])
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
