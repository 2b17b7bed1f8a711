"""Stable Diffusion 1.x as a GRPO policy (diffusion paradigm, ε- or v-prediction, DDIM-SDE sampler).

Mirrors `diffusers.StableDiffusionPipeline` step by step so that, with the same initial noise,
`DDIMSDESampler(eta=0).ode_step` driven by this adapter reproduces the pipeline's DDIM output
(tests/families checks it on a tiny random pipeline):
    text:    StableDiffusionPipeline.encode_prompt (CLIP last hidden state, padded to max length)
    CFG:     one UNet pass over [uncond; cond], ε = ε_u + s·(ε_c − ε_u)
    decode:  x = VAE.decode(z / scaling_factor);  pixels = clamp(x / 2 + 0.5, 0, 1)  (DiffusersPolicy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ConfigGeometry, DiffusersPolicy
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

if TYPE_CHECKING:
    from lightning_grpo.samplers.base import Sampler

SD_SPEC = {
    "tokenizer": ("tokenizer", "transformers.CLIPTokenizer"),
    "text_encoder": ("model", "transformers.CLIPTextModel"),
    "vae": ("model", "diffusers.AutoencoderKL"),
    "unet": ("model", "diffusers.UNet2DConditionModel"),
    "scheduler": ("scheduler", "diffusers.DDIMScheduler"),
}
"""Subfolders a Stable Diffusion checkpoint must have: (what they hold, the class that loads them)."""


class StableDiffusionPolicy(DiffusersPolicy):
    """Stable Diffusion 1.x (UNet2DConditionModel + AutoencoderKL + CLIP text encoder).

    The UNet (or its LoRA weights) is trained; VAE and text encoder are frozen. Latents are
    [B, 4, H/8, W/8] (the VAE's down-sampling factor, read from its config). The condition is
    {"prompt_embeds": [B, S, D]} plus {"negative_prompt_embeds": [B, S, D]} when CFG is on.
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (unet/, vae/,
            text_encoder/, tokenizer/, scheduler/) or a hub id, e.g. "CompVis/stable-diffusion-v1-4".
        height, width: image size in pixels (multiples of the VAE factor, 8 for SD).
        guidance_scale: classifier-free guidance scale s; CFG is on when s > 1 (DanceGRPO SD 1.4: 5).
        negative_prompt: the unconditional prompt for CFG ("" as the pipeline's default).
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype — keep
            "float32" for full fine-tuning with mixed precision —, lora_rank, lora_alpha,
            lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    paradigm = "diffusion"
    pipeline_class = "StableDiffusionPipeline"
    components = SD_SPEC
    denoiser_name = "unet"
    default_num_steps = 50  # DanceGRPO SD 1.4 recipe: 50 DDIM steps, eta 1.0
    default_eta = 1.0
    pipeline_extra_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    published_config = "stable-diffusion-v1-4"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt

    def check_components(self) -> None:
        if self.unet.config.time_cond_proj_dim is not None:
            raise NotImplementedError("UNets with a guidance-scale embedding (time_cond_proj_dim, LCM) are not supported")

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["guidance_scale"]) > 1.0

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [C, h, w]; CLIP states [L, D], L the text encoder's positions (77: prompts are
        padded to the tokenizer's maximum), twice with CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, unet = int(args["height"]), int(args["width"]), configs[cls.denoiser_name]
        h, w = height // steps.vae_factor, width // steps.vae_factor
        length = int(configs.get("text_encoder", {}).get("max_position_embeddings", 77))
        text = ((length, int(unet["cross_attention_dim"])), "embed")
        condition = {"prompt_embeds": text, **({"negative_prompt_embeds": text} if cfg else {})}
        return ConfigGeometry(height, width, 1, steps.vae_factor, (int(unet["in_channels"]), h, w),
                              (int(configs["vae"]["latent_channels"]), h, w), condition)

    def build_sampler(self, num_steps: int | None = None, eta: float | None = None) -> Sampler:
        """DDIMSDESampler from the checkpoint's own scheduler config (betas, prediction type, offset)."""
        from diffusers import DDIMScheduler

        from lightning_grpo.samplers import DDIMSDESampler

        steps, eta = self.sampler_defaults(num_steps, eta)
        return DDIMSDESampler(num_steps=steps, eta=eta, scheduler=DDIMScheduler.from_config(self.scheduler_config))

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        return {**super().pipeline_call_kwargs(num_prompts), "guidance_scale": self.guidance_scale, "negative_prompt": [self.negative_prompt] * num_prompts}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """StableDiffusionPipeline.encode_prompt: CLIP last hidden states [B, S, D] of the prompts
        (and of the negative prompt when CFG is on)."""
        if images is not None:
            raise ValueError("StableDiffusionPolicy is text-to-image: it takes no images")
        prompts = list(prompts)
        embeds, negative = self.pipeline.encode_prompt(
            prompts, self.text_encoder.device, 1, self.uses_cfg,
            negative_prompt=[self.negative_prompt] * len(prompts) if self.uses_cfg else None,
        )
        condition = {"prompt_embeds": embeds}  # [B, S, D]
        if self.uses_cfg:
            condition["negative_prompt_embeds"] = negative  # [B, S, D]
        return condition

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Model output (ε or v, as the scheduler's prediction_type) [B, C, h, w] in fp32, guided
        when CFG is on. `timesteps`: DDPM steps [B]."""
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


__all__ = ["StableDiffusionPolicy"]
