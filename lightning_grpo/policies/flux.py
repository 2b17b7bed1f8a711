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

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

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

FLUX_COMPONENTS = {
    "transformer": "model",
    "vae": "model",
    "text_encoder": "model",
    "tokenizer": "tokenizer",
    "text_encoder_2": "model",
    "tokenizer_2": "tokenizer",
    "scheduler": "scheduler",
}
"""Subfolders (and what they hold) a FLUX.1 checkpoint must have."""

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Transformer attention projections, the usual LoRA targets for FLUX."""


def flux_pipeline_sigmas(scheduler_config: Mapping[str, Any], num_steps: int, image_seq_len: int) -> list[float]:
    """The N + 1 sigmas FluxPipeline samples with, for `FlowSDESampler(sigmas=...)`.

    FluxPipeline (diffusers) builds its schedule as:
        σ̃_i = linspace(1, 1/N, N)                                     (pipeline_flux.py, step 5)
        μ   = base_shift + (max_shift − base_shift)·(L − L_base)/(L_max − L_base)
              with L = image_seq_len, the number of packed latent tokens   (`calculate_shift`)
        σ_i = e^μ / (e^μ + (1/σ̃_i − 1))   (dynamic "exponential" shift; or the static
              shift·σ̃/(1 + (shift − 1)·σ̃) when use_dynamic_shifting is false)
        then append σ_N = 0.
    The shift itself is done by a real `FlowMatchEulerDiscreteScheduler` built from
    `scheduler_config`, so every option of that config (shift type, shift_terminal, ...) is
    honoured and the float32 values are bit-identical to the pipeline's. The sampler's
    timesteps σ_i·1000 are then the pipeline's timesteps too.

    Args:
        scheduler_config: the checkpoint's scheduler/scheduler_config.json (FluxPolicy.scheduler_config).
        num_steps: sampling steps N.
        image_seq_len: packed latent tokens (h/2)·(w/2) (FluxPolicy.image_seq_len); 4096 at 1024².
    Returns:
        list of N + 1 floats from ≈1 down to 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if config.get("use_flow_sigmas", False):  # the pipeline drops its sigmas in this case
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.tolist()  # [N + 1]


class FluxPolicy(PolicyAdapter):
    """FLUX.1 (FluxTransformer2DModel + AutoencoderKL + CLIP-L pooled + T5 sequence embeddings).

    The transformer (or its LoRA weights) is trained; VAE and both text encoders are frozen.
    Latents are packed, [B, (h/2)·(w/2), 4C] with h, w = H/8, W/8 (see the module docstring).
    The condition is {"prompt_embeds": [B, S, D_t5], "pooled_prompt_embeds": [B, D_clip]}; the
    text/image position ids are not batch-first and are rebuilt inside predict().
    No classifier-free guidance (DanceGRPO trains FLUX.1-dev with its distilled guidance only).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (transformer/, vae/,
            text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/) or a hub id,
            e.g. "black-forest-labs/FLUX.1-dev".
        height: image height in pixels (multiple of 16: VAE factor 8 × 2×2 packing).
        width: image width in pixels (multiple of 16).
        guidance: distilled guidance value fed to the transformer's guidance embedding
            (FLUX.1-dev: 3.5); ignored when the transformer has no guidance embedding (schnell).
        max_sequence_length: T5 tokens per prompt (FluxPipeline default 512; smaller saves memory).
        dtype: dtype of the frozen VAE and text encoders ("float32", "bfloat16", "float16").
        denoiser_dtype: dtype of the transformer weights.
        lora_rank: 0 trains the whole transformer; > 0 freezes it and trains a peft LoRA.
        lora_alpha: LoRA alpha (scale alpha/rank); None means alpha = rank.
        lora_target_modules: transformer module names LoRA is applied to.
        gradient_checkpointing: recompute transformer activations in backward to save memory.
    """

    paradigm = "flow"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 720,
        width: int = 720,
        guidance: float = 3.5,
        max_sequence_length: int = 512,
        dtype: str = "float32",
        denoiser_dtype: str = "float32",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.height, self.width = int(height), int(width)
        self.guidance = float(guidance)
        self.max_sequence_length = int(max_sequence_length)
        frozen_dtype, transformer_dtype = parse_dtype(dtype), parse_dtype(denoiser_dtype)

        path = self.pretrained_model_name_or_path
        check_pretrained_folder(path, FLUX_COMPONENTS)
        self.tokenizer = load_tokenizer(CLIPTokenizer, path, "tokenizer")
        self.tokenizer_2 = load_tokenizer(T5TokenizerFast, path, "tokenizer_2")
        self.text_encoder = freeze(load_component(CLIPTextModel.from_pretrained, path, "text_encoder", dtype=frozen_dtype))
        self.text_encoder_2 = freeze(
            load_component(T5EncoderModel.from_pretrained, path, "text_encoder_2", dtype=frozen_dtype)
        )
        self.vae = freeze(load_component(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=frozen_dtype))
        self.transformer = load_component(
            FluxTransformer2DModel.from_pretrained, path, "transformer", torch_dtype=transformer_dtype
        )
        # scheduler/scheduler_config.json as a dict, for `flux_pipeline_sigmas` / `pipeline_sigmas`.
        self.scheduler_config: dict[str, Any] = dict(
            load_component(FlowMatchEulerDiscreteScheduler.load_config, path, "scheduler")
        )

        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        multiple = 2 * self.vae_scale_factor
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {self.height}×{self.width}")
        if lora_rank > 0:
            add_lora(self.transformer, lora_rank, lora_alpha, lora_target_modules)
        else:
            self.transformer.requires_grad_(True)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # -- nn.Module --------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FluxPolicy:
        """Switch the transformer's mode; the frozen VAE and text encoders always stay in eval
        (T5 has dropout, which would make the conditioning random)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        self.text_encoder_2.eval()
        return self

    # -- geometry -----------------------------------------------------------------------------

    @property
    def latent_size(self) -> tuple[int, int]:
        """Unpacked latent (h, w) = (H/8, W/8), both even."""
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

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

    # -- PolicyAdapter ----------------------------------------------------------------------

    @torch.no_grad()
    def _encode_clip_pooled(self, prompts: list[str]) -> Tensor:
        """CLIP pooled output [B, D_clip] of prompts padded to the CLIP tokenizer's length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        output = self.text_encoder(tokens.input_ids.to(self.text_encoder.device), output_hidden_states=False)
        return output.pooler_output  # [B, D_clip]

    @torch.no_grad()
    def _encode_t5(self, prompts: list[str]) -> Tensor:
        """T5 last hidden state [B, S, D_t5], S = max_sequence_length (padded, no mask, as FLUX)."""
        tokens = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder_2(tokens.input_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        if images is not None:
            raise ValueError("FluxPolicy is text-to-image: it takes no images")
        prompts = list(prompts)
        return {
            "prompt_embeds": self._encode_t5(prompts),  # [B, S, D_t5]
            "pooled_prompt_embeds": self._encode_clip_pooled(prompts),  # [B, D_clip]
        }

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise, packed: [B, seq, 4C].

        Drawn unpacked [B, C, h, w] with diffusers' `randn_tensor` and then packed, exactly as
        FluxPipeline.prepare_latents, so a given generator yields the pipeline's own latents.
        """
        from diffusers import FluxPipeline
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_size
        shape = (batch_size, self.latent_channels, h, w)
        noise = randn_tensor(shape, generator=generator, device=placement(self.transformer)[0], dtype=torch.float32)  # [B, C, h, w]
        # FluxPipeline._pack_latents is a public-enough staticmethod; reuse rather than restate.
        return FluxPipeline._pack_latents(noise, batch_size, self.latent_channels, h, w)  # [B, seq, 4C]

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

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed [B, seq, 4C] → VAE latents [B, C, h, w] (FluxPipeline._unpack_latents)."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, self.height, self.width, self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [0, 1] from packed latents [B, seq, 4C]."""
        z = self.unpack(latents.to(device=self.vae.device, dtype=self.vae.dtype))  # [B, C, h, w]
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)


__all__ = ["FluxPolicy", "flux_pipeline_sigmas"]
