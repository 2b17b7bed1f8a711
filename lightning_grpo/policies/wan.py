"""Wan 2.1 text-to-video as a GRPO policy (rectified flow, velocity prediction, FlowSDESampler).

Mirrors `diffusers.WanPipeline` (Wan 2.1 T2V 1.3B / 14B, one transformer) so that, with the same
initial noise and the same flow-matching Euler schedule, `FlowSDESampler(eta=0).ode_step` driven
by this adapter reproduces the pipeline's latents (the family contract test checks it):
    text:     UMT5 last hidden state [B, S, D] of the pipeline's `encode_prompt` (prompts cleaned,
              padded to S = max_sequence_length, states past each prompt's length zeroed)
    latents:  VAE latents [B, C, f, h, w], f = (F − 1)/4 + 1, h, w = H/8, W/8 (the published VAE)
    denoiser: transformer(x, timestep = σ·1000, UMT5 states); with CFG a second pass on the
              negative prompt's states, v = v_u + s·(v_c − v_u) (the pipeline's two calls)
    decode:   z = x·σ_c + μ_c per latent channel c (the VAE config's `latents_std` / `latents_mean`,
              `ChannelMeanStd`), pixels = clamp(VAE.decode(z) / 2 + 0.5, 0, 1)

Schedule. The published checkpoints ship a `UniPCMultistepScheduler` (multistep, `flow_shift` 3
for 480p, 5 for 720p); GRPO needs a one-step SDE, so the family samples on the flow-matching Euler
schedule with the checkpoint's shift: `FlowMatchEulerDiscreteScheduler(shift=flow_shift)`, the
scheduler `WanPipeline` is given in diffusers' own Wan examples for Euler sampling. A folder whose
scheduler is already a `FlowMatchEulerDiscreteScheduler` (the stand-in's) is used as it is.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ChannelMeanStd, ConfigGeometry, FlowMatchingFamily, scheduler_sigmas
from lightning_grpo.policies.loading import placement
from lightning_grpo.types import Condition

WAN_SPEC = {
    "tokenizer": ("tokenizer", "transformers.AutoTokenizer"),
    "text_encoder": ("model", "transformers.UMT5EncoderModel"),
    "vae": ("model", "diffusers.AutoencoderKLWan"),
    "transformer": ("model", "diffusers.WanTransformer3DModel"),
    "scheduler": ("scheduler", "diffusers.FlowMatchEulerDiscreteScheduler"),
}
"""Subfolders a Wan 2.1 text-to-video checkpoint must have: (what they hold, the class that loads
them). The scheduler's config is read whatever its class (UniPC in the published folders)."""


def euler_scheduler_config(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The flow-matching Euler scheduler config the family samples with, from a checkpoint's
    scheduler config: itself when it is one; for the published UniPC config
    (`prediction_type` "flow_prediction", `use_flow_sigmas`, `flow_shift`) the Euler scheduler with
    shift = `flow_shift` and the same number of training timesteps."""
    config = dict(scheduler_config)
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return config
    if "flow_shift" not in config:
        raise ValueError(
            f"the Wan family samples with flow matching; the checkpoint's scheduler {config.get('_class_name')!r} "
            "states no flow_shift (expected UniPCMultistepScheduler with use_flow_sigmas, or FlowMatchEulerDiscreteScheduler)"
        )
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "shift": float(config["flow_shift"])}


class WanT2VPolicy(FlowMatchingFamily):
    """Wan 2.1 text-to-video (WanTransformer3DModel + AutoencoderKLWan + UMT5-XXL).

    The transformer (or its LoRA weights) is trained; the VAE and the text encoder are frozen.
    Latents [B, C, f, h, w] (the transformer's layout); the condition is {"prompt_embeds":
    [B, S, D]} and, with CFG, {"negative_prompt_embeds": [B, S, D]} of `negative_prompt`.
    Loading, LoRA, checkpointing, decode, export: `DiffusersPolicy` (its arguments too).

    Args:
        pretrained_model_name_or_path: local folder in the diffusers layout (transformer/, vae/,
            text_encoder/, tokenizer/, scheduler/) or a hub id, e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers".
        height, width: frame size in pixels (multiples of 16: VAE factor 8 × 2×2 patches).
        num_frames: frames F per clip, 4k + 1 (the VAE compresses time 4×, keeping the first).
        guidance_scale: classifier-free guidance scale s; > 1 runs the negative prompt too and
            GRPO then steps the optimizer once per rollout. Default 1 (no CFG; the pipeline's own
            default is 5).
        negative_prompt: the unconditional branch's prompt ("" as the pipeline's default).
        max_sequence_length: UMT5 tokens per prompt S (WanPipeline's default 512).
        sampling_shift: the `build_sampler()` schedule: None, the checkpoint's flow-matching
            Euler schedule (`pipeline_sigmas`); a number, the SD3 shift with that value.
        **kwargs: the shared arguments of `DiffusersPolicy` (dtype, denoiser_dtype, lora_rank,
            lora_alpha, lora_target_modules, gradient_checkpointing, num_sampling_steps, sampling_eta,
            sampling_noise_form).
    """

    pipeline_class = "WanPipeline"
    components = WAN_SPEC
    denoiser_name = "transformer"
    latent_multiple_from_patch_size = True  # the transformer's patch_size (config.json)
    latent_normalization = ChannelMeanStd()
    geometry_arguments = ("height", "width", "num_frames")
    published_config = "Wan2.1-T2V-1.3B-Diffusers"
    default_num_steps = 50  # Pref-GRPO's DanceGRPO-based Wan 2.1 script: --sampling_steps 50 --eta 0.7
    default_eta = 0.7

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        max_sequence_length: int = 512,
        sampling_shift: float | None = None,
        **kwargs: Any,
    ) -> None:
        # the shared arguments (dtype, LoRA, checkpointing, sampling) are DiffusersPolicy's;
        # LightningCLI (jsonargparse) follows **kwargs into its signature for configs and --help
        super().__init__(pretrained_model_name_or_path, height, width, **kwargs)
        self.check_frames(num_frames)
        self.num_frames = int(num_frames)
        self.frame_ratio = self.geometry_steps(self.component_configs()).frame_ratio  # the VAE's time compression
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.sampling_shift = sampling_shift
        euler_scheduler_config(self.scheduler_config)  # refuse a scheduler without a flow shift now

    def check_components(self) -> None:
        """A text-to-video transformer takes the noisy latent alone: in_channels = the VAE's z_dim
        (Wan's image-to-video transformers take 36 = 16 + 4 mask + 16 image channels)."""
        channels, z_dim = int(self.transformer.config.in_channels), int(self.vae.config.z_dim)
        if channels != z_dim:
            raise ValueError(
                f"{type(self).__name__} is text-to-video: its transformer must take the VAE's {z_dim} latent channels, "
                f"this one takes {channels}: an image-to-video checkpoint?"
            )

    # -- geometry from configs ------------------------------------------------------------------

    @classmethod
    def vae_compression(cls, vae_config: Mapping[str, Any]) -> tuple[int, int]:
        """AutoencoderKLWan's factors as `WanPipeline` reads them (`scale_factor_spatial`,
        `scale_factor_temporal`); a config written before diffusers stated them (the published
        Wan 2.1 folders) gets them from its architecture: ×2 per block after the first
        (`dim_mult`), ×2 in time per `temperal_downsample` (8 and 4 for the published VAE)."""
        spatial = vae_config.get("scale_factor_spatial") or 2 ** (len(vae_config["dim_mult"]) - 1)
        temporal = vae_config.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in vae_config["temperal_downsample"])
        return int(spatial), int(temporal)

    @classmethod
    def uses_cfg_with(cls, init_args: Mapping[str, Any]) -> bool:
        return float(configured(cls, init_args)["guidance_scale"]) > 1.0

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [C, f, h, w]; UMT5 states [S, D], twice with CFG."""
        args, steps = configured(cls, init_args), cls.geometry_steps(configs)
        height, width, frames, den = int(args["height"]), int(args["width"]), int(args["num_frames"]), configs[cls.denoiser_name]
        latent = (int(den["in_channels"]), (frames - 1) // steps.frame_ratio + 1, height // steps.vae_factor, width // steps.vae_factor)
        text = ((int(args["max_sequence_length"]), int(den["text_dim"])), "embed")
        condition = {"prompt_embeds": text, **({"negative_prompt_embeds": text} if cfg else {})}
        return ConfigGeometry(height, width, frames, steps.vae_factor, latent, latent, condition)

    # -- latents ----------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """Channels C of the noisy latent (the transformer's input)."""
        return int(self.transformer.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Per-sample latent shape (C, f, h, w), f = (F − 1)/t + 1: the pipeline's layout."""
        return (self.latent_channels, (self.num_frames - 1) // self.frame_ratio + 1, *self.latent_size)

    def pixels_to_vae(self, pixels: Tensor) -> Tensor:
        """[B, F, 3, H, W] → [B, 3, F, H, W] (the VAE's layout)."""
        return pixels.permute(0, 2, 1, 3, 4)

    def pixels_from_vae(self, decoded: Tensor) -> Tensor:
        """[B, 3, F, H, W] → [B, F, 3, H, W] (the framework's video layout)."""
        return decoded.permute(0, 2, 1, 3, 4)

    # -- sampler ----------------------------------------------------------------------------------

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """WanPipeline's schedule given the Euler scheduler: `set_timesteps(N)` with no sigmas of
        its own (the scheduler's spacing, then its static shift)."""
        return scheduler_sigmas(euler_scheduler_config(self.scheduler_config), None, num_steps)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        kwargs = {
            **super().pipeline_call_kwargs(num_prompts),
            "num_frames": self.num_frames,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }
        if self.uses_cfg:
            kwargs["negative_prompt"] = [self.negative_prompt] * num_prompts
        return kwargs

    # -- PolicyAdapter ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """WanPipeline.encode_prompt: UMT5 states [B, S, D] (and the negative prompt's with CFG)."""
        if images is not None:
            raise ValueError(f"{type(self).__name__} is text-to-video: it takes no images")
        prompts = list(prompts)
        embeds, negative = self.pipeline.encode_prompt(
            prompts, negative_prompt=[self.negative_prompt] * len(prompts), do_classifier_free_guidance=self.uses_cfg,
            max_sequence_length=self.max_sequence_length, device=self.text_encoder.device,
        )
        condition = {"prompt_embeds": embeds}
        if self.uses_cfg:
            condition["negative_prompt_embeds"] = negative
        return condition

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, C, f, h, w] (fp32); `timesteps` = σ·1000, Tensor[B]. With CFG two
        transformer passes, v = v_u + s·(v_c − v_u) in the transformer's dtype, as the pipeline."""
        device, dtype = placement(self.transformer)
        batch = latents.shape[0]
        x = latents.to(device=device, dtype=dtype)  # [B, C, f, h, w]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)  # [B], fp32 as the pipeline

        def velocity(key: str) -> Tensor:
            text = condition[key].to(device=device, dtype=dtype)  # [B, S, D]
            return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

        cond = velocity("prompt_embeds")
        if not self.uses_cfg:
            return cond.float()
        uncond = velocity("negative_prompt_embeds")
        return (uncond + self.guidance_scale * (cond - uncond)).float()


__all__ = ["WAN_SPEC", "WanT2VPolicy", "euler_scheduler_config"]
