"""Stable Diffusion 3 / 3.5 as a GRPO policy (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.StableDiffusion3Pipeline` (SD 3.5 Medium / Large) so that, with the same
initial noise and steps, `FlowSDESampler(eta=0).ode_step` driven by this adapter reproduces the
pipeline's latents (the family contract test checks it):
    text:     the pipeline's `encode_prompt` over its three text encoders: CLIP-L and CLIP-G
              penultimate states, concatenated and zero-padded to T5's width, then T5-XXL's states
              along the sequence: [B, 77 + S, D_t5]; pooled: the two CLIP projections [B, D_l + D_g]
    latents:  VAE latents [B, 16, h, w], h, w = H/8, W/8 (the transformer patches them 2×2 itself)
    denoiser: transformer(x, timestep = σ·1000, text states, pooled); with CFG one pass over
              [uncond; cond], v = v_u + s·(v_c − v_u) in the transformer's dtype (the pipeline's)
    decode:   z = x / scaling_factor + shift_factor (`ScaleShift(shift=True)`), pixels =
              clamp(VAE.decode(z) / 2 + 0.5, 0, 1)
Schedule: the checkpoint's FlowMatchEulerDiscreteScheduler (SD 3.5: static shift 3) at N steps,
as the pipeline's `set_timesteps(N)` (the dynamic shift when its config asks for one). Latents
stay fp32 here; the pipeline keeps them in the text encoders' dtype (no difference in fp32).
Skip-layer guidance (SD 3.5 Medium's optional inference trick) is not used in training.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ConfigGeometry, FlowMatchingFamily, ScaleShift, scheduler_sigmas
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

SD3_SPEC = {
    "tokenizer": ("tokenizer", "transformers.CLIPTokenizer"),
    "tokenizer_2": ("tokenizer", "transformers.CLIPTokenizer"),
    "tokenizer_3": ("tokenizer", "transformers.T5TokenizerFast"),
    "text_encoder": ("model", "transformers.CLIPTextModelWithProjection"),
    "text_encoder_2": ("model", "transformers.CLIPTextModelWithProjection"),
    "text_encoder_3": ("model", "transformers.T5EncoderModel"),
    "vae": ("model", "diffusers.AutoencoderKL"),
    "transformer": ("model", "diffusers.SD3Transformer2DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders an SD 3 / 3.5 checkpoint must have: (what they hold, the class that loads them)."""


class StableDiffusion3Policy(FlowMatchingFamily):
    """SD 3 / 3.5 (SD3Transformer2DModel + AutoencoderKL + CLIP-L, CLIP-G and T5-XXL).

    The transformer (or its LoRA weights) is trained; the VAE and the three text encoders are
    frozen. Latents [B, C, h, w]; the condition is {"prompt_embeds": [B, L, D], "pooled_prompt_embeds":
    [B, P]} and, with CFG, the same for `negative_prompt` as "negative_*".
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout or a hub id, e.g.
            "stabilityai/stable-diffusion-3.5-medium".
        height, width: pixels, multiples of 16 (VAE factor 8 × the transformer's 2×2 patches).
        guidance_scale: classifier-free guidance scale s; > 1 runs the negative prompt too (one
            batched pass, as the pipeline) and GRPO then steps the optimizer once per rollout.
            Default 1 (no CFG; the pipeline's own default is 7).
        negative_prompt: the unconditional branch's prompt ("" as the pipeline's default).
        max_sequence_length: T5 tokens per prompt S (the pipeline's default 256).
        sampling_shift: the `build_sampler()` schedule: None, the checkpoint's scheduler at N steps
            (`pipeline_sigmas`); a number, the SD3 shift of linspace(1, 0, N + 1) with that value.
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "StableDiffusion3Pipeline"
    components = SD3_SPEC
    denoiser_name = "transformer"
    latent_multiple_from_patch_size = True  # the transformer's patch_size (config.json)
    latent_normalization = ScaleShift(shift=True)  # z = x / scaling_factor + shift_factor
    published_config = "stable-diffusion-3.5-medium"
    default_num_steps = 10  # Flow-GRPO's SD 3.5 recipes: 10 sampling steps, noise level 0.7
    default_eta = 0.7
    default_lora_targets = (  # Flow-GRPO scripts/train_sd3.py: the joint attention's image and text projections
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.sampling_shift = sampling_shift

    # -- geometry from configs ------------------------------------------------------------------

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["guidance_scale"]) > 1.0

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [C, h, w]; text states [77 + S, D_t5] (CLIP's positions, then T5's) and the
        pooled CLIP projections [P], twice with CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, den = int(args["height"]), int(args["width"]), configs[cls.denoiser_name]
        h, w = height // steps.vae_factor, width // steps.vae_factor
        clip_length = int(configs.get("text_encoder", {}).get("max_position_embeddings", 77))
        text = {"prompt_embeds": ((clip_length + int(args["max_sequence_length"]), int(den["joint_attention_dim"])), "embed"),
                "pooled_prompt_embeds": ((int(den["pooled_projection_dim"]),), "embed")}
        condition = {**text, **({f"negative_{k}": v for k, v in text.items()} if cfg else {})}
        return ConfigGeometry(height, width, 1, steps.vae_factor, (int(den["in_channels"]), h, w),
                              (int(configs["vae"]["latent_channels"]), h, w), condition)

    @property
    def latent_channels(self) -> int:
        """Channels C of the latent (the transformer's input; the VAE's latent channels)."""
        return int(self.transformer.config.in_channels)

    # -- sampler ----------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """StableDiffusion3Pipeline's schedule: `set_timesteps(N)` of the checkpoint's scheduler,
        with μ from the latent token count when the config asks for the dynamic shift."""
        config = self.scheduler_config
        mu = None
        if config.get("use_dynamic_shifting"):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = int(self.transformer.config.patch_size)
            h, w = self.latent_size
            mu = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return scheduler_sigmas(config, None, num_steps, mu)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        kwargs = {**super().pipeline_call_kwargs(num_prompts), "guidance_scale": self.guidance_scale,
                  "max_sequence_length": self.max_sequence_length}
        if self.uses_cfg:
            kwargs["negative_prompt"] = [self.negative_prompt] * num_prompts
        return kwargs

    # -- PolicyAdapter ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """StableDiffusion3Pipeline.encode_prompt (the same prompt to all three encoders, as the
        pipeline's default): states [B, L, D] and pooled [B, P], and the negative prompt's with CFG."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-image: it takes no images")
        prompts = list(prompts)
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_encoder.device,
            do_classifier_free_guidance=self.uses_cfg, negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length,
        )
        condition = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.uses_cfg:
            condition.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return condition

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, C, h, w] (fp32); `timesteps` = σ·1000, Tensor[B]. With CFG one pass over
        [uncond; cond] and v = v_u + s·(v_c − v_u), in the pipeline's order and dtype."""
        device, dtype = placement(self.transformer)
        batch = latents.shape[0]
        x = latents.to(device=device, dtype=dtype)  # [B, C, h, w]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)  # [B], fp32 as the pipeline
        branches = ["negative_", ""] if self.uses_cfg else [""]  # the pipeline's order: uncond first
        text = {k: torch.cat([condition[b + k] for b in branches]).to(device=device, dtype=dtype)
                for k in ("prompt_embeds", "pooled_prompt_embeds")}
        copies = len(branches)
        out = self.transformer(
            hidden_states=torch.cat([x] * copies), timestep=torch.cat([t] * copies),
            encoder_hidden_states=text["prompt_embeds"], pooled_projections=text["pooled_prompt_embeds"], return_dict=False,
        )[0]  # [B·n, C, h, w]
        if not self.uses_cfg:
            return out.float()
        uncond, cond = out.chunk(2)
        return (uncond + self.guidance_scale * (cond - uncond)).float()


__all__ = ["SD3_SPEC", "StableDiffusion3Policy"]
