"""Wan as GRPO policies (rectified flow, velocity prediction, FlowSDESampler): Wan 2.1 text-to-video
(`WanT2VPolicy`), and two subclasses below it: Wan 2.1 image-to-video (`WanI2VPolicy`, mirroring
`WanImageToVideoPipeline`) and Wan 2.2 T2V A14B with its two experts (`WanA14BPolicy`, `WanPipeline`
with `transformer_2` and `boundary_ratio`). The text-to-video family:

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

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from lightning_grpo.policies.base import configured
from lightning_grpo.policies.family import ChannelMeanStd, ConfigGeometry, DiffusersPolicy, FlowMatchingFamily, resolve_class, scheduler_sigmas
from lightning_grpo.policies.loading import looks_local, placement
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
        return self.expert_velocity(self.transformer, self.guidance_scale, latents, timesteps, condition)

    def model_input(self, latents: Tensor, condition: Condition) -> Tensor:
        """What the transformer takes as `hidden_states`: the noisy latent itself (text-to-video)."""
        return latents

    def transformer_kwargs(self, condition: Condition, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """The transformer's arguments besides the latent, timestep and text (none for text-to-video)."""
        return {}

    def expert_velocity(self, transformer: torch.nn.Module, scale: float, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """One transformer's velocity [B, C, f, h, w] (fp32) with CFG scale `scale` when CFG is on:
        the pipeline's loop body for the model it chose (`current_model`, `current_guidance_scale`)."""
        device, dtype = placement(transformer)
        batch = latents.shape[0]
        x = self.model_input(latents, condition).to(device=device, dtype=dtype)  # [B, C', f, h, w]
        t = timesteps.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)  # [B], fp32 as the pipeline
        extra = self.transformer_kwargs(condition, device, dtype)

        def velocity(key: str) -> Tensor:
            text = condition[key].to(device=device, dtype=dtype)  # [B, S, D]
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False, **extra)[0]

        cond = velocity("prompt_embeds")
        if not self.uses_cfg:
            return cond.float()
        uncond = velocity("negative_prompt_embeds")
        return (uncond + scale * (cond - uncond)).float()




# -- Wan 2.2 A14B: two experts switched by noise level ------------------------------------------

EXPERTS = {"high": "transformer", "low": "transformer_2"}
"""Wan 2.2 A14B's experts by the noise they denoise: `transformer` for t ≥ boundary (high noise),
`transformer_2` below it (low noise), as `WanPipeline` names them."""

LOW_NOISE_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"
"""The file a LoRA export writes the low-noise expert's adapters to (diffusers' Wan LoRA format
holds one transformer per file; load it with `load_lora_weights(out, weight_name=LOW_NOISE_LORA_FILE,
load_into_transformer_2=True)`). The high-noise expert's go to the default file."""


class WanExperts(nn.Module):
    """The trained experts of a `WanA14BPolicy` seen as one denoiser (when both train): what the
    family layer asks of a denoiser (LoRA, gradient checkpointing, adapters on/off, FSDP block
    names, a deep copy for the KL reference) forwarded to each. The policy does not register it:
    the experts stay `policy.transformer` / `policy.transformer_2` for checkpoints and the pipeline."""

    def __init__(self, experts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, module in experts.items():
            self.add_module(name, module)
        self._no_split_modules = sorted({n for m in self.children() for n in (getattr(m, "_no_split_modules", None) or ())})

    def add_adapter(self, config: Any) -> None:
        for module in self.children():
            module.add_adapter(copy.deepcopy(config))

    def enable_gradient_checkpointing(self) -> None:
        for module in self.children():
            module.enable_gradient_checkpointing()

    def disable_adapters(self) -> None:
        for module in self.children():
            module.disable_adapters()

    def enable_adapters(self) -> None:
        for module in self.children():
            module.enable_adapters()


class WanA14BPolicy(WanT2VPolicy):
    """Wan 2.2 T2V A14B: two WanTransformer3DModel experts, `transformer` (high noise) and
    `transformer_2` (low noise), switched by the step's timestep exactly as `WanPipeline.__call__`:

        boundary = boundary_ratio · num_train_timesteps      (model_index.json's boundary_ratio;
                                                              0.875 · 1000 for the published T2V A14B)
        expert(t) = transformer    if t ≥ boundary          (guidance_scale)
                    transformer_2  otherwise                (guidance_scale_2, default guidance_scale)

    on the fp32 timestep t = σ·1000 the sampler hands `predict` (the scheduler's own values). In a
    GRPO update a micro-batch may hold samples at different steps: each sample goes to its own
    expert (the batch is split by expert, each part run once, the results put back in place).

    Which experts train (`trained_experts`): "high", "low" or "both". A trained expert is the
    denoiser (LoRA on it, or all its weights); the other is frozen like the text encoder: not in
    the optimizer, not in checkpoints (they hold trainable weights only), no KL copy. With "both"
    the denoiser is `WanExperts` (both, LoRA on each; full fine-tuning's KL reference copies both).
    Export: full fine-tuning writes the whole pipeline (both experts, boundary_ratio);
    LoRA writes the high-noise expert's adapters to `pytorch_lora_weights.safetensors` and the
    low-noise expert's to `LOW_NOISE_LORA_FILE` (see there how diffusers loads it).

    Everything else (text, CFG, VAE normalisation, the Euler schedule with the checkpoint's shift)
    is `WanT2VPolicy`'s, and so are the other arguments.

    Args:
        pretrained_model_name_or_path: a Wan 2.2 A14B folder in the diffusers layout (transformer/,
            transformer_2/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json with
            boundary_ratio), e.g. "Wan-AI/Wan2.2-T2V-A14B-Diffusers".
        trained_experts: "high", "low" or "both" (default "both").
        guidance_scale_2: the low-noise expert's CFG scale (None: guidance_scale, as the pipeline).
            CFG is on when guidance_scale > 1 (the pipeline's `do_classifier_free_guidance`).
        **kwargs: WanT2VPolicy's and DiffusersPolicy's arguments.
    """

    components = {**WAN_SPEC, "transformer_2": ("model", "diffusers.WanTransformer3DModel")}
    published_config = "Wan2.2-T2V-A14B-Diffusers"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        trained_experts: str = "both",
        guidance_scale: float = 1.0,
        guidance_scale_2: float | None = None,
        **kwargs: Any,
    ) -> None:
        if trained_experts not in ("high", "low", "both"):
            raise ValueError(f"trained_experts must be 'high', 'low' or 'both', got {trained_experts!r}")
        # read by `_load`, which the base constructor calls (before nn.Module state exists: a plain attribute)
        object.__setattr__(self, "trained_experts", trained_experts)
        super().__init__(pretrained_model_name_or_path, height, width, num_frames, guidance_scale=guidance_scale, **kwargs)
        boundary_ratio = pipeline_boundary_ratio(pretrained_model_name_or_path)
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.boundary_ratio = boundary_ratio
        self.boundary_timestep = boundary_ratio * int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.pipeline_extra_kwargs = {"boundary_ratio": boundary_ratio}

    # -- the experts -------------------------------------------------------------------------------

    @property
    def trained_names(self) -> list[str]:
        """Subfolders of the trained experts, high-noise first."""
        return [EXPERTS["high"], EXPERTS["low"]] if self.trained_experts == "both" else [EXPERTS[self.trained_experts]]

    def trains_component(self, subfolder: str) -> bool:
        """The trained experts load at `denoiser_dtype` and unfrozen (the base constructor then adds
        LoRA or makes all their weights trainable); the other expert loads frozen at `dtype`."""
        return subfolder in self.trained_names

    def check_components(self) -> None:
        super().check_components()
        first, second = (self.transformer.config, self.transformer_2.config)
        if int(first.in_channels) != int(second.in_channels) or int(first.out_channels) != int(second.out_channels):
            raise ValueError(f"{self.pretrained_model_name_or_path!r}: the two experts take different latents "
                             f"({first.in_channels} and {second.in_channels} channels)")

    @property
    def denoiser(self) -> nn.Module:
        """The trained expert, or with "both" the two as one `WanExperts` (built on each access)."""
        names = self.trained_names
        if len(names) == 1:
            return getattr(self, names[0])
        return WanExperts({name: getattr(self, name) for name in names})

    def fsdp_roots(self, reference: nn.Module | None) -> list[nn.Module]:
        """Each trained expert (FSDP's roots, their blocks the units), and their KL copies."""
        experts = [getattr(self, name) for name in self.trained_names]
        if reference is None:
            return experts
        return experts + (list(reference.children()) if isinstance(reference, WanExperts) else [reference])

    @contextmanager
    def _as_reference(self, reference: nn.Module | None) -> Iterator[None]:
        """LoRA: adapters off on the trained experts (the base's); full fine-tuning: the frozen
        copies swapped in for the trained experts, restored on exit."""
        if reference is None:
            with super()._as_reference(None):
                yield
            return
        names = self.trained_names
        copies = dict(reference.named_children()) if isinstance(reference, WanExperts) else {names[0]: reference}
        trained = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, copies[name])
        try:
            yield
        finally:
            for name, module in trained.items():
                setattr(self, name, module)

    # -- prediction ----------------------------------------------------------------------------------

    def expert_index(self, timesteps: Tensor) -> Tensor:
        """Per sample, 0 for the high-noise expert (t ≥ boundary) and 1 for the low-noise one:
        `WanPipeline`'s comparison on the same fp32 timesteps, Tensor[B] (int64)."""
        t = timesteps.to(dtype=torch.float32).reshape(-1)
        return (t < self.boundary_timestep).long()

    def trained_at(self, timesteps: Tensor) -> Tensor:
        """BoolTensor[T]: the steps a trained expert denoises (GRPO trains only those: the frozen
        expert's steps have no gradient)."""
        index = self.expert_index(timesteps)
        trained = torch.tensor([EXPERTS[level] in self.trained_names for level in ("high", "low")], device=index.device)
        return trained[index]

    def predict(self, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        """Velocity [B, C, f, h, w] (fp32) of each sample's expert at its timestep (`expert_index`),
        with that expert's CFG scale."""
        batch = latents.shape[0]
        t = timesteps.reshape(-1).expand(batch)  # [B]
        if self.transformer_2 is self.transformer:  # the memory estimate's stand-in: one module in both slots
            return self.expert_velocity(self.transformer, self.guidance_scale, latents, t, condition)
        choice = self.expert_index(t).to(latents.device)  # [B]
        low_scale = self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        experts = ((self.transformer, self.guidance_scale), (self.transformer_2, low_scale))
        if bool((choice == choice[0]).all()):  # one expert for the whole batch: one call, as the pipeline
            model, scale = experts[int(choice[0])]
            return self.expert_velocity(model, scale, latents, t, condition)
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for index, (model, scale) in enumerate(experts):
            rows = (choice == index).nonzero().flatten()
            part = {key: value[rows.to(value.device)] for key, value in condition.items()}
            out[rows] = self.expert_velocity(model, scale, latents[rows], t[rows.to(t.device)], part).to(out.device)
        return out

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        kwargs = super().pipeline_call_kwargs(num_prompts)
        if self.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = self.guidance_scale_2
        return kwargs

    @classmethod
    def estimate_predictor(cls, denoiser: nn.Module, init_args: Mapping[str, Any], geometry: ConfigGeometry) -> DiffusersPolicy:
        """WanT2VPolicy's, with both expert slots on the one measured denoiser (same architecture)."""
        policy = super().estimate_predictor(denoiser, init_args, geometry)
        policy.transformer_2 = denoiser  # `predict` then makes one call, on it (no data-dependent routing under FakeTensorMode)
        return policy

    # -- export ----------------------------------------------------------------------------------------

    def export(self, out: str | Path) -> Path:
        """Full fine-tuning: the pipeline folder (both experts, boundary_ratio). LoRA: the
        high-noise expert's adapters as `pytorch_lora_weights.safetensors`, the low-noise
        expert's as `LOW_NOISE_LORA_FILE` (alpha/rank folded into B, as the base)."""
        out = Path(out)
        if self.lora_rank == 0:
            return super().export(out)
        from peft.utils import get_peft_model_state_dict

        scale = self.lora_alpha / self.lora_rank
        pipeline_type = resolve_class(f"diffusers.{self.pipeline_class}")
        for name in self.trained_names:
            state = get_peft_model_state_dict(getattr(self, name))
            state = {k: (v * scale if "lora_B" in k else v).detach().cpu().contiguous() for k, v in state.items()}
            weight_name = LOW_NOISE_LORA_FILE if name == EXPERTS["low"] else None
            pipeline_type.save_lora_weights(out, transformer_lora_layers=state, weight_name=weight_name, safe_serialization=True)
        return out


def pipeline_boundary_ratio(pretrained_model_name_or_path: str) -> float:
    """`boundary_ratio` of a Wan 2.2 A14B pipeline's model_index.json (a local folder, or a hub id
    through diffusers' `load_config`, which honours the offline cache). Refuses a folder without one
    (Wan 2.1 / TI2V-5B: one transformer, use `WanT2VPolicy`)."""
    path = Path(str(pretrained_model_name_or_path)).expanduser()
    if looks_local(str(pretrained_model_name_or_path)):
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no model_index.json (a Wan 2.2 A14B pipeline folder states boundary_ratio there)")
        config = json.loads(index.read_text())
    else:
        from diffusers import DiffusionPipeline

        config = DiffusionPipeline.load_config(str(pretrained_model_name_or_path))
    ratio = config.get("boundary_ratio")
    if ratio is None:
        raise ValueError(f"{pretrained_model_name_or_path!r}: model_index.json has no boundary_ratio: not a two-expert Wan 2.2 A14B "
                         "pipeline (one transformer: use WanT2VPolicy)")
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"{pretrained_model_name_or_path!r}: boundary_ratio must lie in (0, 1), got {ratio}")
    return ratio


# -- Wan 2.1 image-to-video: first-frame conditioning -----------------------------------------------

WAN_I2V_SPEC = {
    **WAN_SPEC,
    "image_encoder": ("model", "transformers.CLIPVisionModel"),
    "image_processor": ("image_processor", "transformers.CLIPImageProcessor"),
}
"""Subfolders of a Wan 2.1 image-to-video checkpoint (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers): the
text-to-video ones plus the CLIP vision tower and its image processor."""


class WanI2VPolicy(WanT2VPolicy):
    """Wan 2.1 image-to-video (14B 480P / 720P): `WanT2VPolicy` conditioned on a first frame as
    `WanImageToVideoPipeline` does it (its `encode_image` and `prepare_latents`):

        hidden_states = cat([x, M, Z], dim=1)  [B, C + t + C, f, h, w] (36 = 16 + 4 + 16 published)
        Z = (mode(VAE.encode(cat([frame, 0, …, 0], dim=time))) − μ_c)·(1/σ_c)
                                               the first frame followed by F − 1 black frames, its
                                               posterior mode, normalised per channel (ChannelMeanStd)
        M                                      the first-frame mask: 1 on the first pixel frame, 0 on
                                               the others, the first repeated t = 4 times (the VAE's
                                               time factor) and folded into t channels per latent frame
        encoder_hidden_states_image = CLIP(frame).hidden_states[−2]   [B, 257, 1280] published

    The transformer predicts the velocity of x alone [B, C, f, h, w]; the CFG pass differs in text
    only (the same M, Z and image states), as the pipeline. M ⊕ Z is built by the pipeline's own
    `prepare_latents` and the frame resized by its `video_processor`, so neither is restated.

    Differences from calling the pipeline, and why:
      - first frames arrive as the framework's [P, 3, H, W] float tensors in [0, 1]. The CLIP image
        processor expects 0–255 values by default (`do_rescale`, factor 1/255: what a PIL image
        gives), so the family hands it the floats with `do_rescale=False`: the pixel values the
        pipeline's processor makes of the same frame given as a PIL image (without uint8 rounding).
      - `WanImageToVideoPipeline` conditions one call on one image: with P images it repeats each
        image's latents and CLIP states P times (diffusers 0.42.1 `prepare_latents`
        `latent_condition.repeat(batch_size, ...)`, `__call__` `image_embeds.repeat(batch_size, 1, 1)`)
        and fails. The family encodes each first frame as the pipeline encodes its one image and
        stacks them, so a batch of P prompts with P frames equals P pipeline calls of one each.

    Args:
        pretrained_model_name_or_path: a Wan 2.1 I2V folder in the diffusers layout (transformer/,
            vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/, scheduler/).
        height, width, num_frames, guidance_scale, negative_prompt, max_sequence_length,
            sampling_shift: as `WanT2VPolicy` (480×832 × 81 frames: the 480P checkpoint's size).
        **kwargs: DiffusersPolicy's arguments.
    """

    pipeline_class = "WanImageToVideoPipeline"
    components = WAN_I2V_SPEC
    conditions_on_images = True
    pipeline_one_image_per_call = True  # WanImageToVideoPipeline: one image per call (class docstring)
    published_config = "Wan2.1-I2V-14B-480P-Diffusers"

    def check_components(self) -> None:
        """An image-to-video transformer takes C + t + C channels (noise, mask, first-frame
        latent) and CLIP image states (`image_dim`)."""
        config, z_dim = self.transformer.config, int(self.vae.config.z_dim)
        expected = 2 * z_dim + self.frame_ratio_of_vae()
        if int(config.in_channels) != expected or int(config.out_channels) != z_dim:
            raise ValueError(
                f"{type(self).__name__}: the transformer must take {expected} channels (noise {z_dim} + mask "
                f"{expected - 2 * z_dim} + first frame {z_dim}) and return {z_dim}; it takes {config.in_channels} and returns "
                f"{config.out_channels}: a text-to-video checkpoint?"
            )
        if self.uses_clip and config.image_dim is None:
            raise ValueError(f"{type(self).__name__}: the transformer takes no CLIP image states (image_dim is None): "
                             "a Wan 2.2 I2V checkpoint? (WanA14BI2VPolicy)")
        if not self.uses_clip and config.image_dim is not None:
            raise ValueError(f"{type(self).__name__}: the transformer takes CLIP image states (image_dim {config.image_dim}) "
                             "and the family loads no image encoder: a Wan 2.1 I2V checkpoint? (WanI2VPolicy)")

    @classmethod
    def clip_in(cls) -> bool:
        """Whether the checkpoint has a CLIP image encoder (Wan 2.1 I2V; Wan 2.2 I2V has none)."""
        return "image_encoder" in cls.components

    @property
    def uses_clip(self) -> bool:
        return self.clip_in()

    def frame_ratio_of_vae(self) -> int:
        return self.vae_compression(self.vae.config)[1]

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """Latents [C, f, h, w] (C = out_channels); UMT5 states [S, D] (twice with CFG); the mask and
        first-frame latent [t + C, f, h, w]; CLIP image states [(image_size/patch)² + 1, image_dim]."""
        geometry = super().config_geometry(init_args, configs, cfg)
        den = configs[cls.denoiser_name]
        channels = int(den["out_channels"])
        latent = (channels, *geometry.latent[1:])
        geometry.latent = geometry.vae_latent = latent
        geometry.condition["image_condition"] = ((int(den["in_channels"]) - channels, *latent[1:]), "latent")
        if cls.clip_in():
            vision = configs["image_encoder"]
            tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
            geometry.condition["image_embeds"] = ((tokens, int(vision["hidden_size"])), "embed")
        return geometry

    @property
    def latent_channels(self) -> int:
        """Channels C of the noisy latent: the transformer's output (its input adds mask and frame)."""
        return int(self.transformer.config.out_channels)

    @torch.no_grad()
    def first_frame_condition(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(M ⊕ Z [P, t + C, f, h, w], CLIP image states [P, T, D] or None without CLIP) of first frames [P, 3, H, W] in
        [0, 1]: per frame, the pipeline's `video_processor.preprocess` (resize to H×W, [−1, 1]) and
        `prepare_latents` (VAE mode, normalisation, mask); the CLIP states as its `encode_image`, with
        the processor told the values are already in [0, 1] (see the class docstring)."""
        pipe, device = self.pipeline, placement(self.transformer)[0]
        frames = pipe.video_processor.preprocess(images, height=self.height, width=self.width).to(device, torch.float32)
        unused_noise = torch.zeros((1, *self.latent_shape), device=device)  # given, so none is drawn
        conditions = [
            pipe.prepare_latents(frame[None], 1, self.latent_channels, self.height, self.width, self.num_frames,
                                 torch.float32, device, None, unused_noise)[1]
            for frame in frames
        ]
        if not self.uses_clip:
            return torch.cat(conditions), None
        # the pipeline's `encode_image`, restated for `do_rescale=False` (its call passes no processor options)
        pixels = self.image_processor(images=images.float().cpu(), do_rescale=False, return_tensors="pt").pixel_values
        encoder = self.image_encoder
        states = encoder(pixel_values=pixels.to(encoder.device, encoder.dtype), output_hidden_states=True).hidden_states[-2]
        return torch.cat(conditions), states  # [P, t + C, f, h, w], [P, T, D]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], images: Tensor | None = None) -> Condition:
        """WanT2VPolicy's text condition plus "image_condition" (M ⊕ Z) and "image_embeds" (CLIP)."""
        prompts = list(prompts)
        self.check_first_frames(prompts, images)
        condition = WanT2VPolicy.encode_prompts(self, prompts)
        condition["image_condition"], states = self.first_frame_condition(images)
        if states is not None:
            condition["image_embeds"] = states
        return condition

    def model_input(self, latents: Tensor, condition: Condition) -> Tensor:
        """cat([x, M ⊕ Z], dim=1): [B, 2C + t, f, h, w], as the pipeline feeds its transformer."""
        return torch.cat([latents, condition["image_condition"].to(latents)], dim=1)

    def transformer_kwargs(self, condition: Condition, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """The CLIP image states, in the transformer's dtype (the pipeline's `image_embeds`; none without CLIP)."""
        if "image_embeds" not in condition:
            return {}
        return {"encoder_hidden_states_image": condition["image_embeds"].to(device=device, dtype=dtype)}


class WanA14BI2VPolicy(WanA14BPolicy, WanI2VPolicy):
    """Wan 2.2 I2V A14B: `WanI2VPolicy`'s first-frame conditioning (mask ⊕ VAE latent of the frame
    on the channel axis; no CLIP image encoder: the Wan 2.2 transformers take no image states) on
    `WanA14BPolicy`'s two experts, switched by the step's timestep as `WanImageToVideoPipeline`
    does it (`transformer` for t ≥ boundary_ratio·1000, 0.9 for the published I2V A14B, else
    `transformer_2` with `guidance_scale_2`). `trained_experts`, the frozen expert, the trained
    steps (`trained_at`) and the LoRA export: `WanA14BPolicy`'s; the first frames, one per pipeline
    call: `WanI2VPolicy`'s.

    Args:
        pretrained_model_name_or_path: a Wan 2.2 I2V A14B folder in the diffusers layout
            (transformer/, transformer_2/, vae/, text_encoder/, tokenizer/, scheduler/,
            model_index.json with boundary_ratio), e.g. "Wan-AI/Wan2.2-I2V-A14B-Diffusers".
        **kwargs: WanA14BPolicy's (trained_experts, guidance_scale_2), WanT2VPolicy's and
            DiffusersPolicy's arguments.
    """

    pipeline_class = "WanImageToVideoPipeline"
    components = {**WAN_SPEC, "transformer_2": ("model", "diffusers.WanTransformer3DModel")}
    published_config = "Wan2.2-I2V-A14B-Diffusers"


__all__ = [
    "EXPERTS", "LOW_NOISE_LORA_FILE", "WAN_I2V_SPEC", "WAN_SPEC", "WanA14BI2VPolicy", "WanA14BPolicy", "WanExperts", "WanI2VPolicy",
    "WanT2VPolicy", "euler_scheduler_config", "pipeline_boundary_ratio",
]
