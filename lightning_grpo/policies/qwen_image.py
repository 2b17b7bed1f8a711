"""Qwen-Image as a GRPO policy (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.QwenImagePipeline` so that, with the same initial noise and steps,
`FlowSDESampler(eta=0).ode_step` driven by this adapter reproduces the pipeline's latents (the
family contract test checks it):
    text:     the pipeline's `encode_prompt`: Qwen2.5-VL's last hidden state over the prompt in its
              chat template, the template's first 34 tokens dropped, each prompt's states up to
              its length [B, L, D] with mask [B, L]; here zero-padded to S = max_sequence_length
              with mask 0 (DanceGRPO's preprocessing pads to 1024 the same way), so every batch's
              condition has one shape; the transformer never attends to masked tokens
    latents:  VAE latents [B, C, 1, h, w], h, w = H/8, W/8, PACKED 2×2 to [B, h/2·w/2, 4C] (as FLUX)
    denoiser: transformer(x, timestep = σ, states, mask, img_shapes); with true CFG a second pass
              on the negative prompt, v = v_u + s·(v_c − v_u) rescaled per token to the norm of
              v_c (the pipeline's `comb_pred · ‖v_c‖ / ‖comb_pred‖`)
    decode:   z = x·σ_c + μ_c per latent channel c (the VAE config's `latents_std` /
              `latents_mean`, `ChannelMeanStd`, as Wan), pixels = clamp(VAE.decode(z)[:, :, 0] / 2 + 0.5, 0, 1)
Schedule: linspace(1, 1/N, N) through the checkpoint's FlowMatchEulerDiscreteScheduler with the
dynamic shift μ of the packed token count (Qwen-Image: exponential shift, `shift_terminal` 0.02),
as the pipeline; or, with `sampling_shift`, the SD3 shift of DanceGRPO's Qwen-Image script.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ChannelMeanStd, ConfigGeometry, FlowMatchingFamily, scheduler_sigmas
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

QWEN_IMAGE_SPEC = {
    "tokenizer": ("tokenizer", "transformers.Qwen2Tokenizer"),
    "text_encoder": ("model", "transformers.Qwen2_5_VLForConditionalGeneration"),
    "vae": ("model", "diffusers.AutoencoderKLQwenImage"),
    "transformer": ("model", "diffusers.QwenImageTransformer2DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a Qwen-Image checkpoint must have: (what they hold, the class that loads them)."""


class QwenImagePolicy(FlowMatchingFamily):
    """Qwen-Image (QwenImageTransformer2DModel + AutoencoderKLQwenImage + Qwen2.5-VL text encoder).

    The transformer (or its LoRA weights) is trained; the VAE and the text encoder are frozen.
    Latents are packed, [B, (h/2)·(w/2), 4C]; the condition is {"prompt_embeds": [B, S, D],
    "prompt_embeds_mask": [B, S]} and, with true CFG, the same for `negative_prompt` as "negative_*".
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (transformer/, vae/,
            text_encoder/, tokenizer/, scheduler/) or a hub id, e.g. "Qwen/Qwen-Image".
        height, width: pixels, multiples of 16 (VAE factor 8 × 2×2 packing).
        true_cfg_scale: true classifier-free guidance scale s; > 1 runs the negative prompt too
            (two passes, as the pipeline) and GRPO then steps the optimizer once per rollout.
            Default 1 (no CFG; the pipeline's own default is 4 with a negative prompt).
        negative_prompt: the unconditional branch's prompt (" ", as the Qwen-Image model card's
            example: "using an empty string if you do not have specific concept to remove").
        max_sequence_length: text tokens per prompt S after the template (the pipeline's cap is
            1024; its call default 512): longer prompts are cut, shorter ones zero-padded, masked.
        sampling_shift: the `build_sampler()` schedule: None uses the pipeline's own sigmas at
            this resolution (`pipeline_sigmas`); a number, the SD3 shift (DanceGRPO's script: 3).
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "QwenImagePipeline"
    components = QWEN_IMAGE_SPEC
    denoiser_name = "transformer"
    latent_normalization = ChannelMeanStd()  # z = x·σ_c + μ_c from the VAE config, as the pipeline's decode
    latent_multiple = 2  # 2×2 packing
    published_config = "Qwen-Image"
    default_num_steps = 20  # DanceGRPO scripts/finetune/finetune_qwenimage_grpo.sh: --sampling_steps 20 --eta 0.3
    default_eta = 0.3

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 720,
        width: int = 720,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = " ",
        max_sequence_length: int = 512,
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        if not 1 <= int(max_sequence_length) <= 1024:
            raise ValueError(f"max_sequence_length must be in [1, 1024] (QwenImagePipeline's cap), got {max_sequence_length}")
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.sampling_shift = sampling_shift

    def check_components(self) -> None:
        """Qwen-Image's transformer has no guidance embedding (the pipeline then needs a
        `guidance_scale` this family does not take), and the text encoder's width must be the
        transformer's `joint_attention_dim`."""
        config = self.transformer.config
        if config.guidance_embeds:
            raise ValueError(f"{type(self).__name__} drives Qwen-Image's transformer without a guidance embedding; this one has guidance_embeds=True")
        width = int(self.text_encoder.config.get_text_config().hidden_size)
        if width != int(config.joint_attention_dim):
            raise ValueError(f"the text encoder's hidden size {width} is not the transformer's joint_attention_dim {config.joint_attention_dim}")

    # -- geometry from configs ------------------------------------------------------------------

    @classmethod
    def vae_compression(cls, vae_config: Mapping[str, Any]) -> tuple[int, int]:
        """AutoencoderKLQwenImage halves the image once per entry of `temperal_downsample` (the
        pipeline's `vae_scale_factor = 2 ** len(temperal_downsample)`: 8 for the published VAE);
        images only, so no time compression."""
        return 2 ** len(vae_config["temperal_downsample"]), 1

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["true_cfg_scale"]) > 1.0

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Packed latents [(h/2)·(w/2), 4C] (VAE latents [C, 1, h, w]); text states [S, D] and
        their mask [S], twice with CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, den = int(args["height"]), int(args["width"]), configs[cls.denoiser_name]
        h, w, length = height // steps.vae_factor, width // steps.vae_factor, int(args["max_sequence_length"])
        text = {"prompt_embeds": ((length, int(den["joint_attention_dim"])), "embed"), "prompt_embeds_mask": ((length,), "mask")}
        condition = {**text, **({f"negative_{k}": v for k, v in text.items()} if cfg else {})}
        return ConfigGeometry(height, width, 1, steps.vae_factor, ((h // 2) * (w // 2), int(den["in_channels"])),
                              (int(configs["vae"]["z_dim"]), 1, h, w), condition)

    # -- latents ----------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """Unpacked latent channels C (the transformer takes 4C after 2×2 packing)."""
        return int(self.transformer.config.in_channels) // 4

    @property
    def image_seq_len(self) -> int:
        """Packed latent tokens (h/2)·(w/2): the dynamic shift's input."""
        h, w = self.latent_size
        return (h // 2) * (w // 2)

    def pack_latents(self, z: Tensor) -> Tensor:
        """VAE latents [B, C, h, w] or [B, C, 1, h, w] → packed [B, h/2·w/2, 4C]
        (QwenImagePipeline._pack_latents, reused rather than restated)."""
        from diffusers import QwenImagePipeline

        if z.ndim == 5:  # the VAE's image latents carry a frame axis of 1
            z = z[:, :, 0]
        b, c, h, w = z.shape
        return QwenImagePipeline._pack_latents(z, b, c, h, w)

    def unpack_latents(self, latents: Tensor) -> Tensor:
        """Packed [B, seq, 4C] → VAE latents [B, C, 1, h, w] (QwenImagePipeline._unpack_latents)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)

    def pixels_to_vae(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] → [B, 3, 1, H, W]: the Qwen-Image VAE is a one-frame video VAE."""
        return pixels.unsqueeze(2)

    def pixels_from_vae(self, decoded: Tensor) -> Tensor:
        """[B, 3, 1, H, W] → [B, 3, H, W] (the pipeline's `[:, :, 0]`)."""
        return decoded[:, :, 0]

    # -- sampler ----------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """QwenImagePipeline's schedule: linspace(1, 1/N, N) through the checkpoint's scheduler
        with μ = `calculate_shift` of the packed token count (the pipeline's own function)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self.scheduler_config
        mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return scheduler_sigmas(config, np.linspace(1.0, 1 / num_steps, num_steps), num_steps, mu)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        kwargs = {**super().pipeline_call_kwargs(num_prompts), "true_cfg_scale": self.true_cfg_scale,
                  "max_sequence_length": self.max_sequence_length}
        if self.uses_cfg:
            kwargs["negative_prompt"] = [self.negative_prompt] * num_prompts
        return kwargs

    # -- PolicyAdapter ----------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """QwenImagePipeline.encode_prompt, then zero-padded to S: states [B, S, D], mask [B, S] (int64)."""
        embeds, mask = self.pipeline.encode_prompt(prompts, device=self.text_encoder.device, max_sequence_length=self.max_sequence_length)
        batch, length, _ = embeds.shape  # [B, L, D], L = the longest prompt's length (≤ S)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        pad = self.max_sequence_length - length
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))  # [B, S, D]
        mask = torch.nn.functional.pad(mask.long(), (0, pad))  # [B, S]
        return embeds, mask

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """States [B, S, D] and mask [B, S] of the pipeline's `encode_prompt` (see the module
        docstring), and the negative prompt's with true CFG."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-image: it takes no images")
        prompts = list(prompts)
        embeds, mask = self._encode(prompts)
        condition = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if self.uses_cfg:
            negative, negative_mask = self._encode([self.negative_prompt] * len(prompts))
            condition.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
        return condition

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, seq, 4C] (fp32) for packed latents; `timesteps` = σ·1000, Tensor[B]. With
        true CFG two passes and the pipeline's norm-preserving combination."""
        device, dtype = placement(self.transformer)
        batch = latents.shape[0]
        x = latents.to(device=device, dtype=dtype)  # [B, seq, 4C]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch) / 1000  # [B] σ, as the pipeline
        h, w = self.latent_size
        shapes = [[(1, h // 2, w // 2)]] * batch  # the pipeline's img_shapes (RoPE of the packed grid)

        def velocity(prefix: str) -> Tensor:
            return self.transformer(
                hidden_states=x, timestep=t, guidance=None,
                encoder_hidden_states=condition[f"{prefix}prompt_embeds"].to(device=device, dtype=dtype),  # [B, S, D]
                encoder_hidden_states_mask=condition[f"{prefix}prompt_embeds_mask"].to(device),  # [B, S]
                img_shapes=shapes, return_dict=False,
            )[0]  # [B, seq, 4C]

        cond = velocity("")
        if not self.uses_cfg:
            return cond.float()
        uncond = velocity("negative_")
        combined = uncond + self.true_cfg_scale * (cond - uncond)
        rescale = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)  # QwenImagePipeline's
        return (combined * rescale).float()


__all__ = ["QWEN_IMAGE_SPEC", "QwenImagePolicy"]
