"""FLUX.1 as a GRPO policy (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.FluxPipeline` so that, with the same initial noise and the sigmas of
`flux_pipeline_sigmas`, `FlowSDESampler(eta=0).ode_step` driven by this adapter reproduces the
pipeline's output (tests/policies/test_flux.py checks it on a tiny random pipeline):
    text:     CLIP pooled output [B, D_clip] and T5 last hidden state [B, S, D_t5]
    latents:  VAE latents [B, C, h, w] cut into 2×2 patches, PACKED to [B, h/2·w/2, 4C]
    denoiser: transformer(x, timestep = t / 1000, guidance (dev only), pooled, T5, text/image ids)
    decode:   z = unpack(x) / scaling_factor + shift_factor;  pixels = clamp(VAE.decode(z) / 2 + 0.5, 0, 1)

Latent layout: the adapter keeps latents PACKED, [B, seq, 4C] with seq = (h/2)·(w/2), from
`prepare_latents` to `decode`. That is the transformer's own input layout and the pipeline's, so
predict() needs no reshaping; the flow sampler's math is element-wise and its log-prob a mean
over all non-batch elements, so the layout changes nothing there. Only `decode` unpacks.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ConfigGeometry, FlowMatchingFamily, ScaleShift, scheduler_sigmas
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

FLUX_SPEC = {
    "tokenizer": ("tokenizer", "transformers.CLIPTokenizer"),
    "tokenizer_2": ("tokenizer", "transformers.T5TokenizerFast"),
    "text_encoder": ("model", "transformers.CLIPTextModel"),
    "text_encoder_2": ("model", "transformers.T5EncoderModel"),
    "vae": ("model", "diffusers.AutoencoderKL"),
    "transformer": ("model", "diffusers.FluxTransformer2DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a FLUX.1 checkpoint must have: (what they hold, the class that loads them)."""


def flux_pipeline_sigmas(scheduler_config: Mapping[str, Any], num_steps: int, image_seq_len: int) -> list[float]:
    """The N + 1 sigmas FluxPipeline samples with, for `FlowSDESampler(sigmas=...)`.

    FluxPipeline (diffusers) builds its schedule as:
        σ̃_i = linspace(1, 1/N, N)                                     (pipeline_flux.py, step 5)
        μ   = base_shift + (max_shift − base_shift)·(L − L_base)/(L_max − L_base)
              with L = image_seq_len, the number of packed latent tokens   (`calculate_shift`)
        σ_i = e^μ / (e^μ + (1/σ̃_i − 1))   (dynamic "exponential" shift; or the static
              shift·σ̃/(1 + (shift − 1)·σ̃) when use_dynamic_shifting is false)
        then append σ_N = 0.
    The shift itself is done by a real scheduler (`scheduler_sigmas`), so the values are
    bit-identical to the pipeline's and its timesteps σ_i·1000 are the sampler's too.

    Args:
        scheduler_config: the checkpoint's scheduler/scheduler_config.json (FluxPolicy.scheduler_config).
        num_steps: sampling steps N.
        image_seq_len: packed latent tokens (h/2)·(w/2) (FluxPolicy.image_seq_len); 4096 at 1024².
    Returns:
        list of N + 1 floats from ≈1 down to 0.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(scheduler_config)
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    # the pipeline drops its own sigmas when the config sets use_flow_sigmas
    base = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    return scheduler_sigmas(config, base, num_steps, mu)  # [N + 1]


class FluxPolicy(FlowMatchingFamily):
    """FLUX.1 (FluxTransformer2DModel + AutoencoderKL + CLIP-L pooled + T5 sequence embeddings).

    The transformer (or its LoRA weights) is trained; VAE and both text encoders are frozen.
    Latents are packed, [B, (h/2)·(w/2), 4C] with h, w = H/8, W/8 (see the module docstring).
    The condition is {"prompt_embeds": [B, S, D_t5], "pooled_prompt_embeds": [B, D_clip]}; the
    text/image position ids are not batch-first and are rebuilt inside predict().
    No classifier-free guidance (DanceGRPO trains FLUX.1-dev with its distilled guidance only).
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (transformer/, vae/,
            text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/) or a hub id,
            e.g. "black-forest-labs/FLUX.1-dev".
        height, width: image size in pixels (multiples of 16: VAE factor 8 × 2×2 packing).
        guidance: distilled guidance value fed to the transformer's guidance embedding
            (FLUX.1-dev: 3.5); ignored when the transformer has no guidance embedding (schnell).
        max_sequence_length: T5 tokens per prompt (FluxPipeline default 512; smaller saves memory).
        sampling_shift: the `build_sampler()` schedule: None uses the pipeline's own sigmas at
            this resolution (`pipeline_sigmas`); a number, the SD3 shift (DanceGRPO recipe: 3).
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "FluxPipeline"
    components = FLUX_SPEC
    denoiser_name = "transformer"
    latent_normalization = ScaleShift(shift=True)  # z = x / scaling_factor + shift_factor
    latent_multiple = 2  # 2×2 packing
    published_config = "FLUX.1-dev"
    default_num_steps = 16  # DanceGRPO FLUX recipe: 16 steps, eta 0.3
    default_eta = 0.3

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 720,
        width: int = 720,
        guidance: float = 3.5,
        max_sequence_length: int = 512,
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.guidance = float(guidance)
        self.max_sequence_length = int(max_sequence_length)
        self.sampling_shift = sampling_shift

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        """Never: FLUX.1 runs its distilled guidance embedding, no second branch."""
        return False

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Packed latents [(h/2)·(w/2), 4C]; T5 states [S, D_t5] and the CLIP pooled vector."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, den = int(args["height"]), int(args["width"]), configs[cls.denoiser_name]
        h, w = height // steps.vae_factor, width // steps.vae_factor
        condition = {"prompt_embeds": ((int(args["max_sequence_length"]), int(den["joint_attention_dim"])), "embed"),
                     "pooled_prompt_embeds": ((int(den["pooled_projection_dim"]),), "embed")}
        return ConfigGeometry(height, width, 1, steps.vae_factor, ((h // 2) * (w // 2), int(den["in_channels"])),
                              (int(configs["vae"]["latent_channels"]), h, w), condition)

    # -- geometry -----------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """Unpacked latent channels C (the transformer takes 4C after 2×2 packing)."""
        return self.transformer.config.in_channels // 4

    @property
    def image_seq_len(self) -> int:
        """Packed latent tokens (h/2)·(w/2): the `seq` of [B, seq, 4C] and FLUX's shift input."""
        h, w = self.latent_size
        return (h // 2) * (w // 2)

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """FluxPipeline's sigma schedule at this resolution (see `flux_pipeline_sigmas`)."""
        return flux_pipeline_sigmas(self.scheduler_config, num_steps, self.image_seq_len)

    def pack_latents(self, z: Tensor) -> Tensor:
        """[B, C, h, w] → packed [B, h/2·w/2, 4C] (FluxPipeline._pack_latents, reused rather than restated)."""
        from diffusers import FluxPipeline

        b, c, h, w = z.shape
        return FluxPipeline._pack_latents(z, b, c, h, w)

    def unpack_latents(self, latents: Tensor) -> Tensor:
        """Packed [B, seq, 4C] → VAE latents [B, C, h, w] (FluxPipeline._unpack_latents)."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)

    unpack = unpack_latents  # the name earlier code used

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        return {**super().pipeline_call_kwargs(num_prompts), "guidance_scale": self.guidance, "max_sequence_length": self.max_sequence_length}

    # -- PolicyAdapter ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """FluxPipeline.encode_prompt: T5 last hidden state [B, S, D_t5] padded to
        max_sequence_length (no mask), CLIP pooled output [B, D_clip]."""
        if images is not None:
            raise ValueError("FluxPolicy is text-to-image: it takes no images")
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), prompt_2=None, device=self.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}  # [B, S, D_t5], [B, D_clip]

    def _image_ids(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Position ids [seq, 3] of the packed latent tokens: (0, row, col), as FluxPipeline."""
        from diffusers import FluxPipeline

        h, w = self.latent_size
        return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)  # [seq, 3]

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, seq, 4C] (fp32) for packed latents; `timesteps` = σ·1000, Tensor[B]."""
        device, dtype = placement(self.transformer)
        x = latents.to(device=device, dtype=dtype)  # [B, seq, 4C]
        batch = x.shape[0]
        t = timesteps.to(device=device, dtype=dtype).reshape(-1).expand(batch) / 1000  # [B] σ, as the pipeline
        embeds = condition["prompt_embeds"].to(device=device, dtype=dtype)  # [B, S, D_t5]
        pooled = condition["pooled_prompt_embeds"].to(device=device, dtype=dtype)  # [B, D_clip]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)  # [B]
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)  # [S, 3]
        out = self.transformer(
            hidden_states=x,
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=self._image_ids(device, dtype),
            return_dict=False,
        )[0]
        return out.float()  # [B, seq, 4C]


__all__ = ["FluxPolicy", "flux_pipeline_sigmas"]
