"""Stable Diffusion 1.x as a GRPO policy (diffusion paradigm, ε-prediction, DDIM-SDE sampler).

Mirrors `diffusers.StableDiffusionPipeline` step by step so that, with the same initial noise,
`DDIMSDESampler(eta=0).ode_step` driven by this adapter reproduces the pipeline's DDIM output
(tests/policies/test_stable_diffusion.py checks it on a tiny random pipeline):
    text:    CLIP last hidden state of the prompt padded to the tokenizer's max length
    CFG:     one UNet pass over [uncond; cond], ε = ε_u + s·(ε_c − ε_u)
    decode:  x = VAE.decode(z / scaling_factor);  pixels = clamp(x / 2 + 0.5, 0, 1)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_grpo.policies.base import PolicyAdapter
from lightning_grpo.policies.loading import (
    add_lora,
    check_pretrained_folder,
    freeze,
    load_component,
    load_tokenizer,
    parse_dtype,
    placement,
)
from lightning_grpo.types import Condition

SD_COMPONENTS = {"unet": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer", "scheduler": "scheduler"}
"""Subfolders (and what they hold) a Stable Diffusion checkpoint must have."""

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""UNet attention projections, the usual LoRA targets for SD."""


class StableDiffusionPolicy(PolicyAdapter):
    """Stable Diffusion 1.x (UNet2DConditionModel + AutoencoderKL + CLIP text encoder).

    The UNet (or its LoRA weights) is trained; VAE and text encoder are frozen. Latents are
    [B, 4, H/8, W/8] (the VAE's down-sampling factor, read from its config). The condition is
    {"prompt_embeds": [B, S, D]} plus {"negative_prompt_embeds": [B, S, D]} when CFG is on.

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (unet/, vae/,
            text_encoder/, tokenizer/, scheduler/) or a hub id, e.g. "CompVis/stable-diffusion-v1-4".
        height: image height in pixels (multiple of the VAE factor, 8 for SD).
        width: image width in pixels.
        guidance_scale: classifier-free guidance scale s; CFG is on when s > 1 (DanceGRPO SD 1.4: 5).
        negative_prompt: the unconditional prompt for CFG ("" as the pipeline's default).
        dtype: dtype of the frozen VAE and text encoder ("float32", "bfloat16", "float16").
        denoiser_dtype: dtype of the UNet weights (keep "float32" for full fine-tuning with
            mixed precision; "bfloat16" to save memory, e.g. with LoRA).
        lora_rank: 0 trains the whole UNet; > 0 freezes it and trains a peft LoRA of this rank.
        lora_alpha: LoRA alpha (scale alpha/rank); None means alpha = rank.
        lora_target_modules: UNet module names LoRA is applied to.
        gradient_checkpointing: recompute UNet activations in backward to save memory.
    """

    paradigm = "diffusion"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        dtype: str = "float32",
        denoiser_dtype: str = "float32",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.height, self.width = int(height), int(width)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        frozen_dtype, unet_dtype = parse_dtype(dtype), parse_dtype(denoiser_dtype)

        path = self.pretrained_model_name_or_path
        check_pretrained_folder(path, SD_COMPONENTS)
        self.tokenizer = load_tokenizer(CLIPTokenizer, path, "tokenizer")
        self.text_encoder = freeze(load_component(CLIPTextModel.from_pretrained, path, "text_encoder", dtype=frozen_dtype))
        self.vae = freeze(load_component(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=frozen_dtype))
        self.unet = load_component(UNet2DConditionModel.from_pretrained, path, "unet", torch_dtype=unet_dtype)
        # scheduler/scheduler_config.json as a dict, for the sampler:
        # DDIMSDESampler(scheduler=DDIMScheduler.from_config(policy.scheduler_config)).
        self.scheduler_config: dict[str, Any] = dict(load_component(DDIMScheduler.load_config, path, "scheduler"))

        if self.unet.config.time_cond_proj_dim is not None:
            raise NotImplementedError("UNets with a guidance-scale embedding (time_cond_proj_dim, LCM) are not supported")
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.height % self.vae_scale_factor or self.width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {self.height}×{self.width}")
        if lora_rank > 0:
            add_lora(self.unet, lora_rank, lora_alpha, lora_target_modules)
        else:
            self.unet.requires_grad_(True)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    # -- nn.Module --------------------------------------------------------------------------

    def train(self, mode: bool = True) -> StableDiffusionPolicy:
        """Switch the UNet's mode; the frozen VAE and text encoder always stay in eval."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    # -- PolicyAdapter ----------------------------------------------------------------------

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-sample latent shape (C, H/f, W/f)."""
        f = self.vae_scale_factor
        return (self.unet.config.in_channels, self.height // f, self.width // f)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> Tensor:
        """CLIP last hidden state [B, S, D] of prompts padded/truncated to the tokenizer's length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # [B, S, D]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        if images is not None:
            raise ValueError("StableDiffusionPolicy is text-to-image: it takes no images")
        condition = {"prompt_embeds": self._encode_text(list(prompts))}  # [B, S, D]
        if self.uses_cfg:
            negative = self._encode_text([self.negative_prompt])  # [1, S, D]
            condition["negative_prompt_embeds"] = negative.repeat(len(prompts), 1, 1)  # [B, S, D]
        return condition

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise [B, C, H/f, W/f] (DDIM's init_noise_sigma is 1).

        Drawn with diffusers' `randn_tensor`, like the pipeline, so a given generator yields the
        pipeline's own initial latents.
        """
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, *self.latent_shape)
        return randn_tensor(shape, generator=generator, device=placement(self.unet)[0], dtype=torch.float32)  # [B, C, h, w]

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """ε-prediction [B, C, h, w] (fp32), guided when CFG is on. `timesteps`: DDPM steps [B]."""
        device, dtype = placement(self.unet)
        x = latents.to(device=device, dtype=dtype)  # [B, C, h, w]
        t = timesteps.to(device).reshape(-1).expand(x.shape[0])  # [B]
        embeds = condition["prompt_embeds"].to(device=device, dtype=dtype)  # [B, S, D]
        if not self.uses_cfg:
            return self.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0].float()
        negative = condition["negative_prompt_embeds"].to(device=device, dtype=dtype)  # [B, S, D]
        eps = self.unet(
            torch.cat([x, x]),  # [2B, C, h, w]
            torch.cat([t, t]),  # [2B]
            encoder_hidden_states=torch.cat([negative, embeds]),  # [2B, S, D]
            return_dict=False,
        )[0].float()
        eps_uncond, eps_cond = eps.chunk(2)  # [B, C, h, w] each
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [0, 1] from latents [B, C, h, w]."""
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["StableDiffusionPolicy"]
