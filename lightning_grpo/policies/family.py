"""The family layer: one base for every diffusers-backed policy (FLUX, SD, and the video families).

A family file subclasses `DiffusersPolicy` and declares, as class attributes, what differs
between base models:

    pipeline_class   the diffusers pipeline the family mirrors ("FluxPipeline")
    components       {subfolder: (kind, "library.Class")}: what the checkpoint folder holds
    denoiser_name    the one trainable module ("transformer", "unet")
    latent_normalization  how VAE latents become the denoiser's (`ScaleShift`, `ChannelMeanStd`)
    latent_multiple (or latent_multiple_from_patch_size), default_num_steps, default_eta, default_lora_targets, published_config

and implements `predict`, `encode_prompts` (through the pipeline's own `encode_prompt`),
`latent_channels`, `pipeline_call_kwargs`, `uses_cfg_with` and `config_geometry`. Everything
else is here, once:

    loading        pre-flight folder check, then `from_pretrained` of every component at its dtype
    freezing       frozen components (text encoders, VAE) kept in eval mode whatever `train()` says
    training mode  LoRA (peft, via diffusers' `add_adapter`) or full fine-tuning of the denoiser
    memory         gradient checkpointing; the denoiser's FSDP block classes (`no_split_modules`)
                   and the modules FSDP shards (`fsdp_roots`)
    geometry       `geometry_steps` from the components' configs: the VAE's factors and the
                   latent multiple, checked at construction and, from the folder's config.json
                   files, by the start-up validation before anything loads
    latents        seeded noise as the pipeline draws it; `encode_pixels` / `decode` (VAE, [0, 1])
    sampler        `build_sampler`: the family's matching sampler with its default schedule
                   (flow families subclass `FlowMatchingFamily`: the pipeline's sigmas or a shift)
    KL reference   adapters disabled (LoRA) or a frozen copy of the denoiser only (full FT)
    export         a diffusers pipeline folder (full FT) or `load_lora_weights` files (LoRA)
    estimate       `config_geometry` and `estimate_predictor`: what `lightning-grpo estimate`
                   needs to build and run the denoiser on fake tensors from configs alone
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_grpo.policies.base import PolicyAdapter, configured
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

if TYPE_CHECKING:
    from lightning_grpo.samplers.base import Sampler

ComponentSpec = dict[str, tuple[str, str]]
"""{subfolder: (kind, "library.ClassName")}, kind one of "model", "tokenizer", "processor" (holds a tokenizer),
"image_processor", "scheduler"."""


# -- latent normalisation ------------------------------------------------------------------------

class LatentNormalization:
    """How a family's pipeline maps VAE latents z to the denoiser's latents x, and back.

    `normalize` is what the pipeline applies to an encoded image (x from z), `denormalize` what it
    applies before `vae.decode` (z from x); both read their constants from the VAE's config. Each
    family names one (`DiffusersPolicy.latent_normalization`)."""

    def normalize(self, z: Tensor, vae: nn.Module) -> Tensor:
        raise NotImplementedError

    def denormalize(self, x: Tensor, vae: nn.Module) -> Tensor:
        raise NotImplementedError


class ScaleShift(LatentNormalization):
    """x = (z − shift_factor)·scaling_factor, z = x / scaling_factor + shift_factor: one scalar of
    each from the VAE's config (`shift=False`: no shift; SD and HunyuanVideo; FLUX shifts)."""

    def __init__(self, shift: bool = False) -> None:
        self.shift = shift

    def normalize(self, z: Tensor, vae: nn.Module) -> Tensor:
        if self.shift:
            z = z - vae.config.shift_factor
        return z * vae.config.scaling_factor

    def denormalize(self, x: Tensor, vae: nn.Module) -> Tensor:
        z = x / vae.config.scaling_factor
        if self.shift:
            z = z + vae.config.shift_factor
        return z

    def __repr__(self) -> str:
        return f"ScaleShift(shift={self.shift})"


class ChannelMeanStd(LatentNormalization):
    """Per latent channel c: x = (z − μ_c)·(1/σ_c), z = x / (1/σ_c) + μ_c, with μ, σ the VAE
    config's `latents_mean` / `latents_std` (Wan's VAE). Computed in the pipelines' own order (the
    reciprocal of σ first, then a product or a quotient: `WanImageToVideoPipeline.prepare_latents`
    and `WanPipeline`'s decode), so the values are theirs to the bit."""

    def _stats(self, x: Tensor, vae: nn.Module) -> tuple[Tensor, Tensor]:
        channels = int(vae.config.z_dim)
        view = (1, channels) + (1,) * (x.ndim - 2)  # broadcast over [B, C, (f,) h, w]
        mean = torch.tensor(vae.config.latents_mean).view(view).to(x.device, x.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(x.device, x.dtype)
        return mean, inverse_std

    def normalize(self, z: Tensor, vae: nn.Module) -> Tensor:
        mean, inverse_std = self._stats(z, vae)
        return (z - mean) * inverse_std

    def denormalize(self, x: Tensor, vae: nn.Module) -> Tensor:
        mean, inverse_std = self._stats(x, vae)
        return x / inverse_std + mean

    def __repr__(self) -> str:
        return "ChannelMeanStd()"


# -- geometry from configs -----------------------------------------------------------------------

@dataclass(frozen=True)
class GeometrySteps:
    """What the resolution and the clip length must be multiples of, read from the components'
    configs (no weights): height and width multiples of `vae_factor`·`latent_multiple`, frames of
    the form `frame_ratio`·k + 1 (video VAEs compress time, keeping the first frame; 1: images)."""

    vae_factor: int
    latent_multiple: int = 1
    multiple_source: str = ""  # why the latent multiple (": FluxPolicy packs 2×2 latents ...")
    frame_ratio: int = 1

    @property
    def spatial(self) -> int:
        return self.vae_factor * self.latent_multiple


@dataclass
class ConfigGeometry:
    """One sample's shapes, from a config's arguments and the components' configs alone: what
    `lightning-grpo estimate` builds fake tensors of.

    Attributes:
        height, width, num_frames: the policy's resolution and clip length (1 frame for images).
        vae_factor: pixels per latent along height and width.
        latent: the policy's latent shape (its layout: packed for FLUX, [C, f, h, w] for video).
        vae_latent: the latent shape `vae.decode` takes ([C, h, w] or [C, f, h, w]).
        condition: {key of `encode_prompts`' condition: (shape per sample, kind)} with kind
            "embed" (in the frozen components' dtype), "mask" (int64) or "latent" (fp32).
    """

    height: int
    width: int
    num_frames: int
    vae_factor: int
    latent: tuple[int, ...]
    vae_latent: tuple[int, ...]
    condition: dict[str, tuple[tuple[int, ...], str]]


def resolve_class(dotted: str) -> type:
    """"diffusers.AutoencoderKL" → the class (imported lazily: diffusers is slow to import)."""
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _FirstTruncationOnly(logging.Filter):
    """A pipeline's `encode_prompt` "part of your input was truncated" warning, once and short.

    diffusers reports truncation per call, listing for *every* prompt of the batch the decoded
    tokens past the limit, padding included (a 3 KB line of `<|endoftext|>` for 32 prompts of
    which two lost "of the image"). GRPO encodes the same prompts every step, so the repeats are
    dropped, and the first report keeps only the distinct cut texts without special tokens; a
    report that cut nothing but padding is dropped (no prompt lost a word)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "truncated" not in message:
            return True
        if self.seen:
            return False
        head, _, listed = message.partition(": [")
        if listed:
            cut = _cut_texts("[" + listed)
            if cut is not None:
                if not cut:
                    return False  # only padding was past the limit
                message = f"{head}: {', '.join(repr(t) for t in cut)}"
        self.seen = True
        record.msg, record.args = f"{message} (shown once; later truncations are not reported)", ()
        return True


def _cut_texts(listed: str) -> list[str] | None:
    """The distinct non-empty texts of a printed list of decoded token strings, special tokens
    (`<|endoftext|>`, `<pad>`, `</s>`) removed; None when `listed` is not such a list."""
    try:
        texts = ast.literal_eval(listed)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return None
    cleaned = (" ".join(re.sub(r"<\|?/?[A-Za-z_]+\|?>", " ", t).split()) for t in texts)
    return list(dict.fromkeys(t for t in cleaned if t))


class DiffusersPolicy(PolicyAdapter):
    """A diffusers base model as a GRPO policy: the shared part of every family.

    Args (every family takes these; family files add their own, e.g. guidance):
        pretrained_model_name_or_path: local folder in the diffusers layout or a hub id.
        height, width: pixels; multiples of the VAE factor × `latent_multiple`.
        dtype: dtype of the frozen components ("float32", "bfloat16", "float16").
        denoiser_dtype: dtype of the trainable denoiser.
        lora_rank: 0 trains the whole denoiser; > 0 freezes it and trains a peft LoRA.
        lora_alpha: LoRA alpha (scale alpha/rank); None means alpha = rank.
        lora_target_modules: denoiser module names LoRA is applied to (None: the family default).
        gradient_checkpointing: recompute the denoiser's activations in backward.
        num_sampling_steps, sampling_eta: the sampler `build_sampler()` makes (GRPOModule uses it
            when no sampler is configured); None: the family's recipe default.
        sampling_noise_form: the flow families' SDE noise form for `build_sampler()`: "dance_grpo"
            (default) or "flow_grpo" (`FlowSDESampler`'s `noise_form`; the diffusion family ignores it).
    """

    pipeline_class: ClassVar[str]
    components: ClassVar[ComponentSpec]
    denoiser_name: ClassVar[str]
    latent_normalization: ClassVar[LatentNormalization] = ScaleShift()  # VAE latents ↔ the denoiser's
    latent_multiple: ClassVar[int] = 1  # extra down-sampling after the VAE (FLUX's 2×2 packing: 2)
    latent_multiple_from_patch_size: ClassVar[bool] = False  # read it from the denoiser's patch_size instead
    default_num_steps: ClassVar[int]
    default_eta: ClassVar[float]
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_extra_kwargs: ClassVar[dict[str, Any]] = {}  # other pipeline __init__ arguments
    geometry_arguments: ClassVar[tuple[str, ...]] = ("height", "width")
    published_config: ClassVar[str | None] = None
    """The folder under configs/models/ holding the published architecture configs `lightning-grpo
    estimate` uses when a recipe names neither a local folder nor a shipped hub id."""

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        height: int,
        width: int,
        dtype: str = "float32",
        denoiser_dtype: str = "float32",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
        num_sampling_steps: int | None = None,
        sampling_eta: float | None = None,
        sampling_noise_form: str = "dance_grpo",
    ) -> None:
        super().__init__()
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        self.height, self.width = int(height), int(width)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else float(self.lora_rank)
        self.num_sampling_steps = num_sampling_steps
        self.sampling_eta = sampling_eta
        if sampling_noise_form not in ("dance_grpo", "flow_grpo"):
            raise ValueError(f"sampling_noise_form must be 'dance_grpo' or 'flow_grpo', got {sampling_noise_form!r}")
        self.sampling_noise_form = sampling_noise_form
        self._load(parse_dtype(dtype), parse_dtype(denoiser_dtype))
        steps = self.geometry_steps(self.component_configs())
        self.vae_scale_factor = steps.vae_factor
        if self.height % steps.spatial or self.width % steps.spatial:
            raise ValueError(f"height and width must be multiples of {steps.spatial}, got {self.height}×{self.width}")
        self.check_components()
        if self.lora_rank > 0:
            add_lora(self.denoiser, self.lora_rank, lora_alpha, lora_target_modules or self.default_lora_targets)
        else:
            self.denoiser.requires_grad_(True)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    # -- loading ------------------------------------------------------------------------------

    def _load(self, frozen_dtype: torch.dtype, denoiser_dtype: torch.dtype) -> None:
        """Check the folder, then load every component of `components`; all but the denoiser frozen.

        The scheduler is kept as its config dict (`scheduler_config`): samplers and exports build
        schedulers from it.
        """
        path = self.pretrained_model_name_or_path
        check_pretrained_folder(path, {sub: kind for sub, (kind, _) in self.components.items()})
        for subfolder, (kind, class_name) in self.components.items():
            cls = resolve_class(class_name)
            if kind in ("tokenizer", "processor"):  # a processor is checked by the tokenizer it holds
                setattr(self, subfolder, load_tokenizer(cls, path, subfolder))
            elif kind == "image_processor":
                setattr(self, subfolder, load_component(cls.from_pretrained, path, subfolder))
            elif kind == "scheduler":
                self.scheduler_config: dict[str, Any] = dict(load_component(cls.load_config, path, subfolder))
            else:
                is_denoiser = self.trains_component(subfolder)
                # transformers names the argument `dtype`, diffusers `torch_dtype`
                key = "dtype" if cls.__module__.startswith("transformers") else "torch_dtype"
                module = load_component(cls.from_pretrained, path, subfolder, **{key: denoiser_dtype if is_denoiser else frozen_dtype})
                setattr(self, subfolder, module if is_denoiser else freeze(module))

    def trains_component(self, subfolder: str) -> bool:
        """Whether the model in `subfolder` is trained (loaded at `denoiser_dtype`, not frozen): the
        denoiser; a family with several denoisers says which (Wan 2.2 A14B's trained experts)."""
        return subfolder == self.denoiser_name

    def vae_spatial_factor(self) -> int:
        """Pixels per latent along height and width (`vae_compression` of the loaded VAE's config)."""
        return self.vae_compression(self.vae.config)[0]

    def check_components(self) -> None:
        """Refuse loaded components the family cannot drive (a hook; nothing by default)."""

    def component_configs(self) -> dict[str, dict[str, Any]]:
        """{subfolder: config} of the loaded model components: what `config.json` says, as the
        start-up validation reads it from the folder (`geometry_steps` takes either)."""
        configs = {}
        for sub, (kind, _) in self.components.items():
            config = getattr(getattr(self, sub, None), "config", None) if kind == "model" else None
            if config is not None:  # diffusers: a dict; transformers: a PretrainedConfig
                configs[sub] = dict(config) if isinstance(config, Mapping) else config.to_dict()
        return configs

    # -- geometry from configs (no weights: the start-up validation and the estimate use these) --

    @classmethod
    def vae_compression(cls, vae_config: Mapping[str, Any]) -> tuple[int, int]:
        """(spatial, temporal) compression of the VAE from its config: the video VAEs state them
        (`spatial_compression_ratio`, `temporal_compression_ratio`); an image AutoencoderKL
        halves once per block but the last, and does not compress time."""
        stated = vae_config.get("spatial_compression_ratio")
        spatial = int(stated) if stated else 2 ** (len(vae_config["block_out_channels"]) - 1)
        return spatial, int(vae_config.get("temporal_compression_ratio") or 1)

    @classmethod
    def latent_multiple_in(cls, configs: Mapping[str, Mapping[str, Any]]) -> tuple[int, str]:
        """(multiple, why): the extra down-sampling of the latents after the VAE: the fixed
        `latent_multiple` (FLUX's 2×2 packing), or with `latent_multiple_from_patch_size` the
        spatial `patch_size` of the denoiser's config.json (an int, or (t, h, w) for video
        transformers such as Wan's; the pipelines check height and width against VAE factor × it)."""
        if cls.latent_multiple_from_patch_size:
            patch = configs.get(cls.denoiser_name, {}).get("patch_size")
            if isinstance(patch, int):
                return patch, f": the patch_size of {cls.denoiser_name}/config.json"
            if isinstance(patch, (list, tuple)) and len(patch) == 3:
                if int(patch[1]) != int(patch[2]):
                    raise ValueError(f"non-square spatial patches {tuple(patch)} are not supported")
                return int(patch[1]), f": the spatial patch_size of {cls.denoiser_name}/config.json"
            return 1, ""
        multiple = int(cls.latent_multiple)
        return multiple, f": {cls.__name__} packs {multiple}×{multiple} latents into one token" if multiple > 1 else ""

    @classmethod
    def geometry_steps(cls, configs: Mapping[str, Mapping[str, Any]]) -> GeometrySteps:
        """The family's geometry rules from `configs` ({subfolder: config dict}, the VAE's and the
        denoiser's at least). Raises KeyError/TypeError/ValueError on a config it cannot read."""
        spatial, temporal = cls.vae_compression(configs["vae"])
        multiple, source = cls.latent_multiple_in(configs)
        return GeometrySteps(spatial, multiple, source, temporal)

    def check_frames(self, num_frames: int) -> None:
        """Refuse a clip length the VAE cannot encode: F = t·k + 1 for a VAE compressing time t×."""
        ratio = self.geometry_steps(self.component_configs()).frame_ratio
        if num_frames < 1 or (num_frames - 1) % ratio:
            raise ValueError(f"num_frames must be {ratio}k + 1 (the VAE compresses time {ratio}×, keeping the first frame), got {num_frames}")

    def check_first_frames(self, prompts: list[str], images: Tensor | None) -> None:
        """Refuse missing or misshapen first frames of an image-to-video family's `encode_prompts`:
        one RGB image [3, H, W] in [0, 1] per prompt."""
        if images is None:
            raise ValueError(f"{type(self).__name__} is image-to-video: encode_prompts needs first frames (images [P, 3, H, W] in [0, 1])")
        if images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[1] != 3:
            raise ValueError(f"first frames must be [P={len(prompts)}, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")

    @classmethod
    def config_geometry(cls, init_args: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]], cfg: bool) -> ConfigGeometry:
        """One sample's shapes for a policy built with `init_args` on components with `configs`,
        the unconditional branch's condition included when `cfg` (see `ConfigGeometry`)."""
        raise NotImplementedError(f"{cls.__name__} does not describe its shapes for the memory estimate (config_geometry)")

    @classmethod
    def estimate_predictor(cls, denoiser: nn.Module, init_args: Mapping[str, Any], geometry: ConfigGeometry) -> DiffusersPolicy:
        """An instance of the family holding only what its `predict` reads, on `denoiser`, built
        without loading anything: the memory estimate runs the family's own `predict` (CFG,
        guidance, packing, input concatenation) on it under FakeTensorMode.

        Every constructor argument (its default, or the config's value) becomes the attribute of
        the same name, as the families' constructors store them; families whose `predict` reads
        something computed from loaded parts add it in an override."""
        policy = cls.__new__(cls)
        nn.Module.__init__(policy)
        for name, value in configured(cls, init_args).items():
            stored_as_is = isinstance(value, (bool, int, float, str, type(None), dict, list, tuple))
            if stored_as_is and not isinstance(inspect.getattr_static(cls, name, None), property):
                object.__setattr__(policy, name, value)
        setattr(policy, cls.denoiser_name, denoiser)
        policy.height, policy.width = geometry.height, geometry.width
        policy.vae_scale_factor = geometry.vae_factor
        return policy

    @property
    def frozen_module_names(self) -> list[str]:
        """The model components other than the denoiser (text encoders, VAE): always frozen."""
        return [sub for sub, (kind, _) in self.components.items() if kind == "model" and not self.trains_component(sub)]

    # -- the trainable denoiser (for FSDP wrapping and checkpointing) ------------------------

    @property
    def denoiser(self) -> nn.Module:
        """The one trainable module (with its LoRA adapters when lora_rank > 0)."""
        return getattr(self, self.denoiser_name)

    @property
    def no_split_modules(self) -> tuple[str, ...]:
        """Names of the denoiser's block classes that must not be split across devices
        (diffusers' `_no_split_modules`, e.g. FluxTransformerBlock): the FSDP wrapping unit."""
        return tuple(getattr(self.denoiser, "_no_split_modules", None) or ())

    @property
    def block_classes(self) -> set[type[nn.Module]]:
        """The classes named by `no_split_modules` that the denoiser actually contains: FSDP's
        units (`lightning_grpo.distributed.DenoiserFSDPStrategy`)."""
        return block_classes_of(self.denoiser)

    def fsdp_roots(self, reference: nn.Module | None) -> list[nn.Module]:
        """The trainable denoiser, and full fine-tuning's KL reference (a frozen denoiser copy)."""
        return [self.denoiser] + ([reference] if reference is not None else [])

    def train(self, mode: bool = True) -> DiffusersPolicy:
        """Switch the denoiser's mode; the frozen components always stay in eval (T5 has dropout,
        which would make the conditioning random)."""
        super().train(mode)
        for name in self.frozen_module_names:
            getattr(self, name).eval()
        return self

    # -- the diffusers pipeline, sharing this policy's modules --------------------------------

    def make_scheduler(self):
        """A fresh scheduler of the checkpoint's own class and config."""
        import diffusers

        return getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)

    @property
    def pipeline(self):
        """The family's diffusers pipeline built on this policy's own modules (no copies).

        Used for `encode_prompt` (so prompt templates are the pipeline's, never restated) and
        for export. Built once, on first use.
        """
        if "_pipeline" not in self.__dict__:
            parts = {sub: getattr(self, sub) for sub, (kind, _) in self.components.items() if kind != "scheduler"}
            pipe = resolve_class(f"diffusers.{self.pipeline_class}")(scheduler=self.make_scheduler(), **parts, **self.pipeline_extra_kwargs)
            pipe.set_progress_bar_config(disable=True)
            logger = logging.getLogger(type(pipe).__module__)
            if not any(isinstance(f, _FirstTruncationOnly) for f in logger.filters):
                logger.addFilter(_FirstTruncationOnly())
            self.__dict__["_pipeline"] = pipe
        return self.__dict__["_pipeline"]

    def pipeline_latents(self, latents: Tensor) -> Tensor:
        """What the family's pipeline returns with `output_type="latent"` for the policy's final
        latents: the same tensor for every family whose pipeline returns the layout its `latents`
        argument takes (all but FLUX.2, whose pipeline returns the denormalised VAE latents)."""
        return latents

    def pipeline_call_kwargs(self, num_prompts: int) -> dict[str, Any]:
        """Arguments that make `pipeline(prompts, latents=..., num_inference_steps=N, **these)`
        (len(prompts) = num_prompts) sample what this policy samples deterministically with
        `build_sampler(eta=0)` (resolution, guidance, ...)."""
        return {"height": self.height, "width": self.width}

    # -- latents ------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        """Channels C of the VAE latents [B, C, h, w] (before any packing)."""
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        """VAE latent (h, w) = (H/f, W/f)."""
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Per-sample VAE latent shape (C, h, w), before packing."""
        return (self.latent_channels, *self.latent_size)

    def pack_latents(self, z: Tensor) -> Tensor:
        """VAE latents [B, C, h, w] → the policy's latent layout (identity unless the family packs)."""
        return z

    def unpack_latents(self, latents: Tensor) -> Tensor:
        """The policy's latent layout → VAE latents [B, C, h, w] (inverse of `pack_latents`)."""
        return latents

    def prepare_latents(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise in the policy's layout, fp32.

        Drawn as VAE latents [B, C, h, w] with diffusers' `randn_tensor` and then packed, exactly as
        the pipelines' `prepare_latents`, so a given generator yields the pipeline's own latents.
        """
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch_size, *self.latent_shape)
        noise = randn_tensor(shape, generator=generator, device=placement(self.denoiser)[0], dtype=torch.float32)  # [B, C, h, w]
        return self.pack_latents(noise)

    def pixels_to_vae(self, pixels: Tensor) -> Tensor:
        """The framework's pixel layout → the VAE's input layout (images: both [B, 3, H, W];
        video families: [B, F, 3, H, W] → [B, 3, F, H, W])."""
        return pixels

    def pixels_from_vae(self, decoded: Tensor) -> Tensor:
        """The VAE's output layout → the framework's (inverse of `pixels_to_vae`)."""
        return decoded

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] ([B, 3, H, W]; video [B, F, 3, H, W]) → latents in the policy's layout:
        the inverse of `decode`.

            x = latent_normalization.normalize(mode(VAE.encode(2·pixels − 1))), then packed
            (e.g. (z − shift_factor)·scaling_factor). The posterior's mode, not a sample: deterministic.
        """
        vae = self.vae
        x = self.pixels_to_vae((pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype))  # in [-1, 1]
        z = vae.encode(x).latent_dist.mode()  # [B, C, h, w] (video [B, C, f, h, w])
        return self.pack_latents(self.latent_normalization.normalize(z, vae).float())

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in [0, 1], [B, 3, H, W] (video [B, F, 3, H, W]): z = the family's
        `latent_normalization.denormalize(unpack(x))`; VAE.decode."""
        vae = self.vae
        z = self.latent_normalization.denormalize(self.unpack_latents(latents.to(device=vae.device, dtype=vae.dtype)), vae)
        decoded = vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] (video [B, 3, F, H, W]) in [-1, 1]
        return self.pixels_from_vae((decoded.float() / 2 + 0.5).clamp(0, 1))

    # -- sampler ------------------------------------------------------------------------------

    def sampler_defaults(self, num_steps: int | None, eta: float | None) -> tuple[int, float]:
        """(steps, eta): the arguments if given, else the policy's configured ones, else the family's."""
        steps = num_steps if num_steps is not None else self.num_sampling_steps
        eta = eta if eta is not None else self.sampling_eta
        return (self.default_num_steps if steps is None else int(steps), self.default_eta if eta is None else float(eta))

    # -- KL reference -------------------------------------------------------------------------

    def kl_reference(self) -> nn.Module | None:
        """With LoRA nothing (the reference is the same denoiser with its adapters disabled);
        with full fine-tuning a frozen copy of the denoiser only, not of the text encoders/VAE."""
        if self.lora_rank > 0:
            return None
        return freeze(copy.deepcopy(self.denoiser))

    def reference_predict(self, reference: nn.Module | None, latents: Tensor, timesteps: Tensor, condition: Condition) -> Tensor:
        with self._as_reference(reference):
            return self.predict(latents, timesteps, condition)

    @contextmanager
    def _as_reference(self, reference: nn.Module | None) -> Iterator[None]:
        """predict() inside runs the initial policy: adapters disabled (peft, through diffusers'
        `disable_adapters`), or the frozen denoiser copy swapped in; restored on exit."""
        if reference is None:
            self.denoiser.disable_adapters()
            try:
                yield
            finally:
                self.denoiser.enable_adapters()
            return
        trained = self.denoiser
        setattr(self, self.denoiser_name, reference)
        try:
            yield
        finally:
            setattr(self, self.denoiser_name, trained)

    # -- export -------------------------------------------------------------------------------

    def export(self, out: str | Path) -> Path:
        """Write the policy for plain diffusers; returns `out`.

        Full fine-tuning: the whole pipeline folder (`Pipeline.from_pretrained(out)` loads it).
        LoRA: `pytorch_lora_weights.safetensors`, for `Pipeline.from_pretrained(base)
        .load_lora_weights(out)`. The LoRA scale alpha/rank is folded into the B matrices, since
        the loader assumes alpha = rank when no alpha is stored.
        """
        out = Path(out)
        if self.lora_rank == 0:
            self.pipeline.save_pretrained(out, safe_serialization=True)
            return out
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.denoiser)
        scale = self.lora_alpha / self.lora_rank
        state = {k: (v * scale if "lora_B" in k else v).detach().cpu().contiguous() for k, v in state.items()}
        resolve_class(f"diffusers.{self.pipeline_class}").save_lora_weights(
            out, **{f"{self.denoiser_name}_lora_layers": state}, safe_serialization=True
        )
        return out


def block_classes_of(denoiser: nn.Module) -> set[type[nn.Module]]:
    """The classes of `denoiser`'s modules that its diffusers `_no_split_modules` names
    (FluxTransformerBlock, BasicTransformerBlock, ...): FSDP's units; the classes of its direct
    children when the model names none."""
    names = set(getattr(denoiser, "_no_split_modules", None) or ())
    return {type(m) for m in denoiser.modules() if type(m).__name__ in names} or {type(child) for child in denoiser.children()}


def scheduler_sigmas(scheduler_config: Mapping[str, Any], base_sigmas: Sequence[float] | None, num_steps: int, mu: float | None = None) -> list[float]:
    """The N + 1 sigmas a flow pipeline samples with: its `FlowMatchEulerDiscreteScheduler`'s
    `set_timesteps(sigmas=base_sigmas, mu=mu)`, then `scheduler.sigmas` (σ_N = 0 appended).

    The shift (static `shift`·σ/(1 + (shift − 1)·σ), or the dynamic one with `mu`) is applied by a
    real scheduler built from `scheduler_config`, so every option of the checkpoint's config is
    honoured and the float32 values are bit-identical to the pipeline's. `base_sigmas` None: the
    scheduler's own spacing (what pipelines do when the config sets `use_flow_sigmas`).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    if base_sigmas is None:
        scheduler.set_timesteps(num_steps, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=base_sigmas, mu=mu)
    return scheduler.sigmas.tolist()  # [N + 1]


class FlowMatchingFamily(DiffusersPolicy):
    """The rectified-flow families (FLUX, HunyuanVideo, SkyReels, Wan): velocity prediction, sampled by
    `FlowSDESampler` on the pipeline's own sigmas (`pipeline_sigmas`) or, when the family's
    `sampling_shift` is a number, on the SD3 shift of the DanceGRPO recipes."""

    paradigm = "flow"
    sampling_shift: float | None = None  # the family's __init__ sets it from its argument

    def pipeline_sigmas(self, num_steps: int) -> list[float]:
        """The N + 1 sigmas the family's pipeline samples with at this policy's geometry."""
        raise NotImplementedError(f"{type(self).__name__} must define pipeline_sigmas")

    def build_sampler(self, num_steps: int | None = None, eta: float | None = None) -> Sampler:
        """FlowSDESampler on the pipeline's own sigmas, or on the SD3 shift `sampling_shift`, in the
        policy's `sampling_noise_form`."""
        from lightning_grpo.samplers import FlowSDESampler

        steps, eta = self.sampler_defaults(num_steps, eta)
        form = self.sampling_noise_form
        if self.sampling_shift is not None:
            return FlowSDESampler(num_steps=steps, eta=eta, shift=self.sampling_shift, noise_form=form)
        return FlowSDESampler(num_steps=steps, eta=eta, sigmas=self.pipeline_sigmas(steps), noise_form=form)


__all__ = [
    "ChannelMeanStd", "ComponentSpec", "ConfigGeometry", "DiffusersPolicy", "FlowMatchingFamily", "GeometrySteps",
    "LatentNormalization", "ScaleShift", "block_classes_of", "resolve_class", "scheduler_sigmas",
]
