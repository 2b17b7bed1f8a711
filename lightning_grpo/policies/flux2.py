"""FLUX.2 [klein] and [dev] as GRPO policies (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.Flux2KleinPipeline` (FLUX.2 [klein] 4B / 9B and their undistilled "base"
checkpoints: Flux2Transformer2DModel, AutoencoderKLFlux2, a Qwen3 text encoder) so that, with the
same initial noise and steps, `FlowSDESampler(eta=0).ode_step` driven by this adapter reproduces
the pipeline's denoising loop:
    text:     the pipeline's `encode_prompt`: Qwen3 hidden states 9, 18 and 27 side by side
              [B, S, 3·D] over the prompt in the chat template, padded to S = max_sequence_length
              (the transformer sees the padding too, as in the pipeline: no mask)
    latents:  VAE latents [B, C, h, w] normalised by the VAE's batch-norm running statistics over
              2×2 patches (`PatchBatchNorm`) and patchified to [B, 4C, h/2, w/2]: the layout the
              pipeline's `latents` argument takes; the transformer gets them as tokens [B, h/2·w/2, 4C]
    denoiser: transformer(tokens, timestep = σ, states, text / image position ids); with CFG
              (undistilled checkpoints only) a second pass on "" , v = v_u + s·(v_c − v_u)
    decode:   z = unpatchify(x·sqrt(var + eps) + mean), pixels = clamp(VAE.decode(z) / 2 + 0.5, 0, 1)
Schedule: linspace(1, 1/N, N) through the checkpoint's FlowMatchEulerDiscreteScheduler with the
pipeline's `compute_empirical_mu` of the token count and N.

The pipeline's `output_type="latent"` returns z (unpatchified, denormalised), not the layout its
`latents` argument takes: `pipeline_latents` maps a policy sample to what the pipeline returns.

FLUX.2 [dev] (`Flux2DevPolicy`) mirrors `diffusers.Flux2Pipeline` on the same code (`Flux2Family`:
latent layout, normalisation, schedule, transformer call): its text encoder is Mistral Small 3.1
(`Mistral3ForConditionalGeneration`) behind a `PixtralProcessor` chat template with the
pipeline's system message, hidden states 10, 20 and 30 side by side; the checkpoint is
guidance-distilled, so the guidance scale goes into the transformer's guidance embedding (one
pass, no CFG); and its `output_type="latent"` returns the packed tokens [B, h/2·w/2, 4C].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ConfigGeometry, FlowMatchingFamily, LatentNormalization, resolve_class, scheduler_sigmas
from lightning_grpo.policies.loading import load_component, placement
from lightning_grpo.types import Condition

FLUX2_KLEIN_SPEC = {
    "tokenizer": ("tokenizer", "transformers.Qwen2Tokenizer"),
    "text_encoder": ("model", "transformers.Qwen3ForCausalLM"),
    "vae": ("model", "diffusers.AutoencoderKLFlux2"),
    "transformer": ("model", "diffusers.Flux2Transformer2DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a FLUX.2 [klein] checkpoint must have: (what they hold, the class that loads them)."""

FLUX2_DEV_SPEC = {
    "tokenizer": ("processor", "transformers.PixtralProcessor"),
    "text_encoder": ("model", "transformers.Mistral3ForConditionalGeneration"),
    "vae": ("model", "diffusers.AutoencoderKLFlux2"),
    "transformer": ("model", "diffusers.Flux2Transformer2DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a FLUX.2 [dev] checkpoint must have (black-forest-labs/FLUX.2-dev's model_index.json:
the tokenizer folder holds a PixtralProcessor, the text encoder is Mistral Small 3.1)."""


class PatchBatchNorm(LatentNormalization):
    """FLUX.2's VAE normalisation: per channel of the 2×2-patchified latents, p = patchify(z)
    [B, 4C, h/2, w/2], x = (p − μ)/σ with μ, σ² the VAE's `bn` running mean / variance (+ its
    `batch_norm_eps`), in the pipelines' own order (`Flux2KleinPipeline._encode_vae_image` and its
    decode) and with their patchify functions. Both directions take and give the VAE's layout
    [B, C, h, w] (the patches are unfolded again: one statistic per channel and 2×2 position);
    the family's `pack_latents` patchifies."""

    def _stats(self, x: Tensor, vae: nn.Module) -> tuple[Tensor, Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        return mean, std

    def normalize(self, z: Tensor, vae: nn.Module) -> Tensor:
        from diffusers import Flux2KleinPipeline

        patches = Flux2KleinPipeline._patchify_latents(z)  # [B, 4C, h/2, w/2]
        mean, std = self._stats(patches, vae)
        return Flux2KleinPipeline._unpatchify_latents((patches - mean) / std)  # [B, C, h, w]

    def denormalize(self, x: Tensor, vae: nn.Module) -> Tensor:
        from diffusers import Flux2KleinPipeline

        patches = Flux2KleinPipeline._patchify_latents(x)  # [B, 4C, h/2, w/2]
        mean, std = self._stats(patches, vae)
        return Flux2KleinPipeline._unpatchify_latents(patches * std + mean)  # [B, C, h, w]

    def __repr__(self) -> str:
        return "PatchBatchNorm()"


class Flux2Family(FlowMatchingFamily):
    """What FLUX.2 [klein] and [dev] share (Flux2Transformer2DModel + AutoencoderKLFlux2): the
    latent layout [B, 4C, h/2, w/2] (2×2 patches, `PatchBatchNorm`), the noise, the schedule
    (`compute_empirical_mu`), the transformer call on tokens with 4-axis position ids, the text
    encoding through the pipeline's `encode_prompt` and the LoRA targets. A variant names its
    pipeline and components and says how it guides (`_guidance`, `uses_cfg`).

    The transformer (or its LoRA weights) is trained; the VAE and the text encoder are frozen.
    """

    denoiser_name = "transformer"
    latent_normalization = PatchBatchNorm()
    latent_multiple = 2  # 2×2 patches
    default_lora_targets = (  # Flow-Factory Flux2KleinAdapter / Flux2Adapter.default_target_modules (one list; "attn.to_out.0" matches the double blocks only)
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
        "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj",
    )
    guidance_scale: float = 1.0  # the variant's __init__ sets it
    max_sequence_length: int = 512
    text_encoder_out_layers: tuple[int, ...] = ()

    def _init_text(self, guidance_scale: float, max_sequence_length: int, text_encoder_out_layers: Sequence[int], sampling_shift: float | None) -> None:
        """Store the arguments every variant takes, checking the hidden-state indices against the
        loaded text encoder (its text model's layer count: Mistral3 nests it in `text_config`)."""
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.text_encoder_out_layers = tuple(int(i) for i in text_encoder_out_layers)
        self.sampling_shift = sampling_shift
        config = self.text_encoder.config
        layers = int(getattr(config, "text_config", config).num_hidden_layers)
        if not self.text_encoder_out_layers or max(self.text_encoder_out_layers) > layers:
            raise ValueError(f"text_encoder_out_layers {self.text_encoder_out_layers} must name hidden states 0..{layers} of the text encoder")

    def check_components(self) -> None:
        """The transformer takes 2×2 patches of the VAE's latents (in_channels = 4 × latent_channels)."""
        channels, latent = int(self.transformer.config.in_channels), int(self.vae.config.latent_channels)
        if channels != 4 * latent:
            raise ValueError(f"the transformer takes {channels} channels, not 4 × the VAE's {latent} latent channels")

    # -- geometry from configs ------------------------------------------------------------------

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [4C, h/2, w/2]; text states [S, 3·D], twice with CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, den = int(args["height"]), int(args["width"]), configs[cls.denoiser_name]
        h, w = height // steps.vae_factor, width // steps.vae_factor
        text = ((int(args["max_sequence_length"]), int(den["joint_attention_dim"])), "embed")
        condition = {"prompt_embeds": text, **({"negative_prompt_embeds": text} if cfg else {})}
        return ConfigGeometry(height, width, 1, steps.vae_factor, (int(den["in_channels"]), h // 2, w // 2),
                              (int(configs["vae"]["latent_channels"]), h, w), condition)

    # -- latents ----------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels C (the transformer takes 4C: 2×2 patches)."""
        return int(self.transformer.config.in_channels) // 4

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-sample latent shape (4C, h/2, w/2): the pipelines' `prepare_latents` draw exactly this."""
        h, w = self.latent_size
        return (4 * self.latent_channels, h // 2, w // 2)

    def pack_latents(self, z: Tensor) -> Tensor:
        """[B, C, h, w] → 2×2 patches [B, 4C, h/2, w/2] (the pipelines' `_patchify_latents`)."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._patchify_latents(z)

    def unpack_latents(self, latents: Tensor) -> Tensor:
        """[B, 4C, h/2, w/2] → [B, C, h, w] (the pipelines' `_unpatchify_latents`)."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._unpatchify_latents(latents)

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise [B, 4C, h/2, w/2], fp32, drawn in that shape with diffusers'
        `randn_tensor` as both pipelines' `prepare_latents` draw it (already patchified, so a given
        generator yields the pipeline's own latents)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((batch_size, *self.latent_shape), generator=generator, device=placement(self.denoiser)[0], dtype=torch.float32)

    # -- sampler ----------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """The pipelines' schedule: linspace(1, 1/N, N) (none when the config sets
        `use_flow_sigmas`) through the checkpoint's scheduler with μ = `compute_empirical_mu`
        (the pipelines' own function, the same in both) of the token count and N."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        h, w = self.latent_size
        mu = compute_empirical_mu(image_seq_len=(h // 2) * (w // 2), num_steps=num_steps)
        config = self.scheduler_config
        base = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return scheduler_sigmas(config, base, num_steps, mu)

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        return {**super().pipeline_call_kwargs(num_prompts), "guidance_scale": self.guidance_scale,
                "max_sequence_length": self.max_sequence_length, "text_encoder_out_layers": self.text_encoder_out_layers}

    # -- PolicyAdapter ----------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> Tensor:
        """The pipeline's `encode_prompt`: the chosen hidden states side by side, [B, S, 3·D]."""
        embeds, _ = self.pipeline.encode_prompt(prompts, device=self.text_encoder.device, max_sequence_length=self.max_sequence_length,
                                                text_encoder_out_layers=self.text_encoder_out_layers)
        return embeds  # the text position ids are rebuilt in predict

    def _guidance(self, batch: int, device: torch.device) -> Tensor | None:
        """The transformer's `guidance` argument: None, or the embedded guidance scale [B]."""
        return None

    def _velocity(self, tokens: Tensor, image_ids: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
        """One transformer pass on tokens [B, N, 4C] → velocity tokens [B, N, 4C], as the pipelines call it."""
        from diffusers import Flux2KleinPipeline

        text_ids = Flux2KleinPipeline._prepare_text_ids(embeds).to(tokens.device)  # [B, S, 4]
        return self.transformer(hidden_states=tokens, timestep=t, guidance=self._guidance(tokens.shape[0], tokens.device),
                                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, 4C, h/2, w/2] (fp32); `timesteps` = σ·1000, Tensor[B]. The latents go in as
        the pipeline's tokens [B, h/2·w/2, 4C] with its position ids; with CFG two passes,
        v = v_u + s·(v_c − v_u) in the transformer's dtype, as the pipeline."""
        from diffusers import Flux2KleinPipeline

        device, dtype = placement(self.transformer)
        batch, channels, h, w = latents.shape
        x = latents.to(device=device, dtype=dtype)  # [B, 4C, h/2, w/2]
        tokens = Flux2KleinPipeline._pack_latents(x)  # [B, h/2·w/2, 4C]
        image_ids = Flux2KleinPipeline._prepare_latent_ids(x).to(device)  # [B, h/2·w/2, 4]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch) / 1000  # [B] σ, as the pipeline
        out = self._velocity(tokens, image_ids, t, condition["prompt_embeds"].to(device=device, dtype=dtype))
        if self.uses_cfg:
            uncond = self._velocity(tokens, image_ids, t, condition["negative_prompt_embeds"].to(device=device, dtype=dtype))
            out = uncond + self.guidance_scale * (out - uncond)
        return out.permute(0, 2, 1).reshape(batch, channels, h, w).float()  # back to [B, 4C, h/2, w/2]


class Flux2KleinPolicy(Flux2Family):
    """FLUX.2 [klein] (Flux2Transformer2DModel + AutoencoderKLFlux2 + Qwen3).

    Latents [B, 4C, h/2, w/2] (patchified, normalised: the pipeline's `latents` layout); the
    condition is {"prompt_embeds": [B, S, 3·D]} and, with CFG, {"negative_prompt_embeds": ...} of "".
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout or a hub id, e.g.
            "black-forest-labs/FLUX.2-klein-9B".
        height, width: pixels, multiples of 16 (VAE factor 8 × 2×2 patches).
        guidance_scale: classifier-free guidance scale s of the undistilled ("base") checkpoints;
            > 1 runs the empty prompt too (the pipeline's) and GRPO then steps the optimizer once
            per rollout. Refused > 1 for a step-distilled checkpoint (the pipeline ignores it
            there). Default 1 (no CFG; the pipeline's own default is 4).
        max_sequence_length: text tokens per prompt S, chat template included (pipeline default 512).
        text_encoder_out_layers: the Qwen3 hidden states stacked into the text condition (the
            pipeline's default (9, 18, 27)).
        sampling_shift: the `build_sampler()` schedule: None uses the pipeline's own sigmas
            (`pipeline_sigmas`); a number, the SD3 shift with that value.
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "Flux2KleinPipeline"
    components = FLUX2_KLEIN_SPEC
    published_config = "FLUX.2-klein-9B"
    default_num_steps = 4  # Flow-Factory examples/grpo/lora/flux2_klein/default.yaml: 4 steps (klein is step-distilled), noise 0.5
    default_eta = 0.5

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 1.0,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (9, 18, 27),
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        # model_index.json's flag: a step-distilled checkpoint (klein 4B / 9B) or an undistilled base
        index = load_component(resolve_class(f"diffusers.{self.pipeline_class}").load_config, self.pretrained_model_name_or_path, None)
        self.is_distilled = bool(index.get("is_distilled", False))
        self._init_text(guidance_scale, max_sequence_length, text_encoder_out_layers, sampling_shift)
        if self.uses_cfg and self.is_distilled:
            raise ValueError(f"guidance_scale={guidance_scale}: {pretrained_model_name_or_path} is step-distilled (model_index.json "
                             "is_distilled), Flux2KleinPipeline runs no CFG on it; use 1.0 or an undistilled 'base' checkpoint")

    @property
    def pipeline_extra_kwargs(self) -> dict[str, Any]:
        """The pipeline built on the policy's modules keeps the checkpoint's `is_distilled` (and
        exports it in model_index.json)."""
        return {"is_distilled": self.is_distilled}

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["guidance_scale"]) > 1.0

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def pipeline_latents(self, latents: Tensor) -> Tensor:
        """What `Flux2KleinPipeline(..., output_type="latent")` returns for the policy's final
        latents: the VAE latents z [B, C, h, w] (denormalised, unpatchified)."""
        return self.latent_normalization.denormalize(self.unpack_latents(latents), self.vae)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """Flux2KleinPipeline.encode_prompt: states [B, S, 3·D], and the empty prompt's with CFG
        (the pipeline's fixed negative prompt)."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-image here: it takes no reference images")
        prompts = list(prompts)
        condition = {"prompt_embeds": self._encode(prompts)}
        if self.uses_cfg:
            condition["negative_prompt_embeds"] = self._encode([""] * len(prompts))
        return condition


class Flux2DevPolicy(Flux2Family):
    """FLUX.2 [dev] (Flux2Transformer2DModel with a guidance embedding + AutoencoderKLFlux2 +
    Mistral Small 3.1 behind a PixtralProcessor), mirroring `diffusers.Flux2Pipeline`.

    Latents [B, 4C, h/2, w/2] as [klein]'s (the layout the pipeline's `latents` argument takes);
    the condition is {"prompt_embeds": [B, S, 3·D]}: Mistral hidden states 10, 20, 30 over the
    pipeline's system message and the prompt in the processor's chat template. The checkpoint is
    guidance-distilled: `guidance_scale` is embedded (the transformer's `guidance` input), one pass
    per step, no unconditional branch, so GRPO keeps its usual optimizer-step rule.

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout or a hub id, e.g.
            "black-forest-labs/FLUX.2-dev".
        height, width: pixels, multiples of 16 (VAE factor 8 × 2×2 patches).
        guidance_scale: the embedded guidance scale (the pipeline's default 4; Flow-Factory's
            FLUX.2 recipes train at 4).
        max_sequence_length: text tokens per prompt S, system message and chat template included
            (pipeline default 512).
        text_encoder_out_layers: the Mistral hidden states stacked into the text condition (the
            pipeline's default (10, 20, 30)).
        sampling_shift: the `build_sampler()` schedule: None uses the pipeline's own sigmas
            (`pipeline_sigmas`); a number, the SD3 shift with that value.
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "Flux2Pipeline"
    components = FLUX2_DEV_SPEC
    published_config = "FLUX.2-dev"
    default_num_steps = 8  # Flow-Factory examples/grpo/lora/flux2/t2i.yaml: num_inference_steps 8, noise_level 1.0 (Flow-SDE)
    default_eta = 1.0

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 512,
        width: int = 512,
        guidance_scale: float = 4.0,
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] = (10, 20, 30),
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self._init_text(guidance_scale, max_sequence_length, text_encoder_out_layers, sampling_shift)

    def check_components(self) -> None:
        """[klein]'s check, and a guidance embedding in the transformer: the pipeline passes
        `guidance` on every step and a transformer without the embedder would ignore it."""
        super().check_components()
        if not self.transformer.config.guidance_embeds:
            raise ValueError("the transformer has no guidance embedding (guidance_embeds false): a FLUX.2 [klein] transformer? "
                             "Flux2DevPolicy drives the guidance-distilled FLUX.2 [dev]; use Flux2KleinPolicy")

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return False  # the guidance is embedded: one pass whatever the scale

    def pipeline_latents(self, latents: Tensor) -> Tensor:
        """What `Flux2Pipeline(..., output_type="latent")` returns for the policy's final latents:
        the packed tokens [B, h/2·w/2, 4C] (still normalised)."""
        from diffusers import Flux2Pipeline

        return Flux2Pipeline._pack_latents(latents)

    def _guidance(self, batch: int, device: torch.device) -> Tensor:
        """The pipeline's guidance input: the scale, fp32, one per sample [B] (the transformer
        scales it by 1000 and embeds it beside the timestep)."""
        return torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """Flux2Pipeline.encode_prompt (system message, chat template, Mistral hidden states):
        {"prompt_embeds": [B, S, 3·D]}. No negative prompt: the guidance is embedded."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-image here: it takes no reference images")
        return {"prompt_embeds": self._encode(list(prompts))}


__all__ = ["FLUX2_DEV_SPEC", "FLUX2_KLEIN_SPEC", "Flux2DevPolicy", "Flux2Family", "Flux2KleinPolicy", "PatchBatchNorm"]
