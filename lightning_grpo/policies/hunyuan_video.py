"""HunyuanVideo text-to-video as a GRPO policy (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.HunyuanVideoPipeline` so that, with the same initial noise and the sigmas of
`pipeline_sigmas`, `FlowSDESampler(eta=0).ode_step` driven by this adapter reproduces the
pipeline's output (tests/families checks it on a tiny random pipeline of the real classes):
    text:     `HunyuanVideoPipeline.encode_prompt`: the prompt put into the pipeline's template
              (DEFAULT_PROMPT_TEMPLATE), Llama hidden state 3 from the top with its attention mask,
              the template's `crop_start` tokens cut off [B, S, D]; CLIP pooled output [B, D_clip]
    latents:  [B, C, f, h, w], f = (F − 1)/4 + 1 (the VAE's causal temporal compression, so
              F = 4k + 1 frames), h, w = H/8, W/8: the transformer's own input layout
    denoiser: transformer(x, timestep = σ·1000, guidance = g·1000 (distilled guidance embedding),
              Llama states + mask, CLIP pooled)
    CFG:      optional true classifier-free guidance on a negative prompt, v = v_u + s·(v_c − v_u)
              (the pipeline's `true_cfg_scale`); GRPO then steps once per rollout
    decode:   z = x / scaling_factor;  pixels = clamp(VAE.decode(z) / 2 + 0.5, 0, 1), returned as
              [B, F, 3, H, W] (the framework's video layout; the VAE's is [B, 3, F, H, W])

The latents stay in the transformer's layout from `prepare_latents` to `decode`; the flow
sampler's math is element-wise and its log-prob a mean over every non-batch element, so 5-D
latents need no change there.

`SkyReelsI2VPolicy` (skyreels_i2v.py) is this family with the first frame's latent
concatenated to the noisy latent on the channel axis (`model_input`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ConfigGeometry, FlowMatchingFamily, scheduler_sigmas
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

HUNYUAN_VIDEO_SPEC = {
    "tokenizer": ("tokenizer", "transformers.LlamaTokenizerFast"),
    "text_encoder": ("model", "transformers.LlamaModel"),
    "tokenizer_2": ("tokenizer", "transformers.CLIPTokenizer"),
    "text_encoder_2": ("model", "transformers.CLIPTextModel"),
    "vae": ("model", "diffusers.AutoencoderKLHunyuanVideo"),
    "transformer": ("model", "diffusers.HunyuanVideoTransformer3DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a HunyuanVideo checkpoint (diffusers layout, e.g. hunyuanvideo-community/HunyuanVideo)
must have: (what they hold, the class that loads them)."""


def template_crop_start(tokenizer, template: str) -> int:
    """Tokens of `template` before its "{}" placeholder (BOS included): what the pipeline cuts off
    the Llama states so that only the prompt's own tokens remain.

    The pipeline's DEFAULT_PROMPT_TEMPLATE states 95 for the Llama-3 tokenizer of HunyuanVideo; a
    template without a `crop_start` (another tokenizer, a toy one) gets it counted here, because
    the pipeline's own fallback counts the template padded to the tokenizer's maximum length.
    """
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' placeholder, got {template!r}")
    return len(tokenizer(template.split("{}")[0], add_special_tokens=True)["input_ids"])


class HunyuanVideoPolicy(FlowMatchingFamily):
    """HunyuanVideo (HunyuanVideoTransformer3DModel + AutoencoderKLHunyuanVideo + Llama + CLIP).

    The transformer (or its LoRA weights) is trained; VAE and both text encoders are frozen.
    Latents are [B, C, f, h, w] (see the module docstring). The condition is
    {"prompt_embeds": [B, S, D], "prompt_attention_mask": [B, S], "pooled_prompt_embeds":
    [B, D_clip]}, plus the same three with "negative_" in front when true CFG is on.
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (transformer/, vae/,
            text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/) or a hub id,
            e.g. "hunyuanvideo-community/HunyuanVideo".
        height, width: frame size in pixels (multiples of 16: VAE factor 8 × patch 2).
        num_frames: frames F per clip, 4k + 1 (the VAE's temporal compression; DanceGRPO: 53).
        guidance: distilled guidance value g fed to the guidance embedding as g·1000 (the
            pipeline's `guidance_scale`, default 6.0; DanceGRPO feeds 6018, i.e. g = 6.018).
        true_cfg_scale: true classifier-free guidance s (on when > 1), on `negative_prompt`.
        negative_prompt: the unconditional prompt of true CFG ("" as DanceGRPO's empty prompt).
        max_sequence_length: Llama tokens per prompt after the template (pipeline default 256).
        prompt_template: {"template": "...{}...", "crop_start": int}; None: the pipeline's
            DEFAULT_PROMPT_TEMPLATE. A template without "crop_start" gets it counted
            (`template_crop_start`).
        sampling_shift: the `build_sampler()` schedule: None uses the pipeline's own sigmas (the
            checkpoint scheduler's static shift, 7 for HunyuanVideo); a number, the SD3 shift
            (DanceGRPO recipe: 5).
        vae_tiling: decode in spatial/temporal tiles (`AutoencoderKLHunyuanVideo.enable_tiling`):
            True for the VAE's default tiles, or a dict of its tile arguments
            (tile_sample_min_height, ..._stride_num_frames). Saves memory on long clips.
        vae_slicing: decode one clip of the batch at a time (`enable_slicing`).
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "HunyuanVideoPipeline"
    components = HUNYUAN_VIDEO_SPEC
    denoiser_name = "transformer"
    latent_multiple_from_patch_size = True  # the transformer's patch_size (config.json)
    geometry_arguments = ("height", "width", "num_frames")
    published_config = "HunyuanVideo"
    default_num_steps = 16  # DanceGRPO HunyuanVideo recipe: 16 steps, eta 0.25
    default_eta = 0.25

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 480,
        width: int = 480,
        num_frames: int = 53,
        guidance: float = 6.0,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int = 256,
        prompt_template: dict[str, Any] | None = None,
        sampling_shift: float | None = None,
        vae_tiling: bool | dict[str, Any] = False,
        vae_slicing: bool = False,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.check_frames(num_frames)
        self.num_frames = int(num_frames)
        self.guidance = float(guidance)
        self.true_cfg_scale = float(true_cfg_scale)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.prompt_template = self._resolve_template(prompt_template)
        self.sampling_shift = sampling_shift
        if vae_tiling:
            self.vae.enable_tiling(**(vae_tiling if isinstance(vae_tiling, dict) else {}))
        if vae_slicing:
            self.vae.enable_slicing()

    def _resolve_template(self, template: dict[str, Any] | None) -> dict[str, Any]:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        if template is None:
            return dict(DEFAULT_PROMPT_TEMPLATE)
        if "template" not in template:
            raise ValueError(f"prompt_template needs a 'template' key, got keys {sorted(template)}")
        crop = template.get("crop_start")
        if crop is None:
            crop = template_crop_start(self.tokenizer, template["template"])
        return {"template": template["template"], "crop_start": int(crop)}

    # -- geometry -----------------------------------------------------------------------------

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["true_cfg_scale"]) > 1.0

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [C, f, h, w]; Llama states [S, D] with their mask [S] and the CLIP pooled
        vector, twice with true CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, frames, den = int(args["height"]), int(args["width"]), int(args["num_frames"]), configs[cls.denoiser_name]
        latent = (int(den["out_channels"] or den["in_channels"]), (frames - 1) // steps.frame_ratio + 1,
                  height // steps.vae_factor, width // steps.vae_factor)
        length = int(args["max_sequence_length"])
        text = {"prompt_embeds": ((length, int(den["text_embed_dim"])), "embed"), "prompt_attention_mask": ((length,), "mask"),
                "pooled_prompt_embeds": ((int(den["pooled_projection_dim"]),), "embed")}
        condition = {**text, **({f"negative_{k}": v for k, v in text.items()} if cfg else {})}
        return ConfigGeometry(height, width, frames, steps.vae_factor, latent, latent, condition)

    @property
    def latent_channels(self) -> int:
        """Channels C of the noisy latent (all of the transformer's input for text-to-video)."""
        return int(self.transformer.config.in_channels)

    @property
    def latent_frames(self) -> int:
        """f = (F − 1) / t + 1 latent frames (t = 4: the VAE's temporal compression)."""
        return (self.num_frames - 1) // int(self.vae.temporal_compression_ratio) + 1

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Per-sample latent shape (C, f, h, w): the pipeline's and the transformer's layout."""
        return (self.latent_channels, self.latent_frames, *self.latent_size)

    def pixels_to_vae(self, pixels: Tensor) -> Tensor:
        """[B, F, 3, H, W] → [B, 3, F, H, W] (the VAE's layout)."""
        return pixels.permute(0, 2, 1, 3, 4)

    def pixels_from_vae(self, decoded: Tensor) -> Tensor:
        """[B, 3, F, H, W] → [B, F, 3, H, W] (the framework's video layout)."""
        return decoded.permute(0, 2, 1, 3, 4)

    # -- sampler ------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """HunyuanVideoPipeline's schedule: the scheduler's shift of linspace(1, 0, N + 1)[:-1]."""
        return scheduler_sigmas(self.scheduler_config, np.linspace(1.0, 0.0, num_steps + 1)[:-1], num_steps)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        kwargs = {
            **super().pipeline_call_kwargs(num_prompts),
            "num_frames": self.num_frames,
            "guidance_scale": self.guidance,
            "max_sequence_length": self.max_sequence_length,
            "prompt_template": self.prompt_template,
        }
        if self.uses_cfg:
            kwargs.update(true_cfg_scale=self.true_cfg_scale, negative_prompt=[self.negative_prompt] * num_prompts)
        return kwargs

    # -- PolicyAdapter ----------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> Condition:
        """HunyuanVideoPipeline.encode_prompt: Llama states [B, S, D] and mask [B, S] after the
        template's crop, CLIP pooled output [B, D_clip]."""
        embeds, pooled, mask = self.pipeline.encode_prompt(
            prompts, prompt_template=self.prompt_template, device=self.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """The text condition (and the negative prompt's, as "negative_*", when true CFG is on)."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-video: it takes no images (SkyReelsI2VPolicy takes first frames)")
        return self._text_condition(list(prompts))

    def _text_condition(self, prompts: list[str]) -> Condition:
        condition = self._encode_text(prompts)
        if self.uses_cfg:
            negative = self._encode_text([self.negative_prompt] * len(prompts))
            condition.update({f"negative_{k}": v for k, v in negative.items()})
        return condition

    def model_input(self, latents: Tensor, condition: Condition) -> Tensor:
        """The transformer's `hidden_states` for noisy latents [B, C, f, h, w] (themselves here)."""
        return latents

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, C, f, h, w] (fp32); `timesteps` = σ·1000, Tensor[B]. With true CFG one
        transformer pass over [cond; uncond], v = v_u + s·(v_c − v_u) (the pipeline's formula)."""
        device, dtype = placement(self.transformer)
        batch = latents.shape[0]
        x = self.model_input(latents.to(device=device, dtype=torch.float32), condition).to(dtype)  # [B, C', f, h, w]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)  # [B], fp32 as the pipeline
        branches = ["", "negative_"] if self.uses_cfg else [""]
        text = {k: torch.cat([condition[b + k] for b in branches]).to(device=device, dtype=dtype)
                for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")}
        copies = len(branches)
        # g in the transformer's dtype, then ×1000, in that order as the pipeline (bf16 rounds differently otherwise)
        guidance = torch.full((batch * copies,), self.guidance, device=device, dtype=dtype) * 1000.0  # [B·n]
        out = self.transformer(
            hidden_states=torch.cat([x] * copies),
            timestep=torch.cat([t] * copies),
            encoder_hidden_states=text["prompt_embeds"],
            encoder_attention_mask=text["prompt_attention_mask"],
            pooled_projections=text["pooled_prompt_embeds"],
            guidance=guidance,
            return_dict=False,
        )[0].float()  # [B·n, C, f, h, w]
        if not self.uses_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.true_cfg_scale * (cond - uncond)


__all__ = ["HUNYUAN_VIDEO_SPEC", "HunyuanVideoPolicy", "template_crop_start"]
