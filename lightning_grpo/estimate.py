"""`lightning-grpo estimate`: per-GPU peak memory of a recipe at full size, before renting a GPU.

    lightning-grpo estimate -c configs/flux_hps.yaml --devices 8 --nodes 2

Where every figure comes from:

* **Architectures** are the models' published configs: a local model folder's `<component>/
  config.json` when the recipe names one, else the copies shipped in `configs/models/`
  (FLUX.1-dev, SD 1.4, HunyuanVideo, SkyReels-V1 I2V, open_clip ViT-H-14, Qwen2-VL-2B; sources in
  configs/models/README.md). No weights are read.
* **Parameter bytes** of every part (denoiser, LoRA, text encoders, VAE, rewards, KL reference)
  come from the real classes built on the `meta` device (parameters without storage), times the
  bytes of the dtype the recipe keeps them in.
* **Activations** are measured, not modelled: the denoiser is built again under PyTorch's
  `FakeTensorMode` (tensors with shapes, dtypes and storages but no data) and the family's own
  `predict` runs forward under no_grad at the rollout batch, and forward + backward at the update
  micro-batch (with CFG doubling the batch, LoRA, gradient checkpointing and autocast as
  configured). `LiveBytes`, a `TorchDispatchMode`, sees every tensor each op creates, counts its
  storage once while it is alive (a finaliser uncounts it when freed) and keeps the peak; weights
  and inputs are registered beforehand and not counted. Gradients are dropped as they accumulate
  during the measurement and counted analytically instead (all of them are alive from the
  second micro-batch of an optimizer step on). Attention runs as PyTorch's fused CPU flash kernel
  on fake CPU tensors, whose saved tensors (output and log-sum-exp, no S×S matrix) are what the
  GPU's flash / memory-efficient kernels keep. The VAE decode (tiled when configured) and the
  open_clip rewards are measured the same way; VideoAlign's activations are modelled (its
  forward has data-dependent shapes), at most a few hundred MB.
* **States by strategy**: AdamW keeps two states per trainable parameter in its dtype; DDP keeps
  a second copy of the trainable gradients in its all-reduce buckets; FSDP (FULL_SHARD over all
  GPUs, HYBRID_SHARD within a node) divides the denoiser's weights, gradients and AdamW states by
  the shard count and holds the full parameters (and, in the update, gradients) of one block at a
  time; frozen parts are replicated unless `replicate_frozen: false`; `cpu_offload` moves the
  sharded states off the GPU.
* **Phases**: *rollout* = resident states + trajectories + the larger of the denoiser's no-grad
  forward and decode + reward (with the decoded pixels, kept for the step); *update* = resident +
  trajectories + pixels + gradients + the larger of the forward/backward and the AdamW step's
  temporaries (one state-sized tensor); *checkpoint* = resident + the last step's record + what
  the strategy gathers to write (FSDP: one block's weights and AdamW states at a time).

Not counted: the CUDA context and allocator fragmentation (keep a margin: the recipes aim at
75 GiB of an 80 GB GPU), the text encoders' activations (prompts are short), and CPU memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
"""The published configs shipped with the repository (configs/models/)."""

SHIPPED_BY_HUB_ID = {
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev",
    "CompVis/stable-diffusion-v1-4": "stable-diffusion-v1-4",
    "hunyuanvideo-community/HunyuanVideo": "HunyuanVideo",
    "Skywork/SkyReels-V1-Hunyuan-I2V": "SkyReels-V1-Hunyuan-I2V",
}
"""Hub ids whose shipped folder is not named after the repository (a hub id "owner/NAME" whose
configs/models/NAME exists needs no entry). The family's own default is its `published_config`."""
OPEN_CLIP_REWARDS = ("HPSReward", "ClipScore", "PickScore")
KNOBS = (
    "model.rollout_batch_size (rollout), model.micro_batch_size (update), model.decode_batch_size (decode), "
    "LoRA (model.policy.init_args.lora_rank), FSDP (lightning_grpo.distributed.DenoiserFSDPStrategy, more GPUs), "
    "offload (the strategy's cpu_offload), model.policy.init_args.gradient_checkpointing"
)
"""What to turn when a phase does not fit (named in the warnings of `fit`)."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


# ============================================================================ live bytes
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once while active (real or fake tensors).

    Every op's outputs pass through `__torch_dispatch__` (backward's too: the mode is carried into
    the autograd engine); a new storage is counted once (views share it) and uncounted when freed
    (a finaliser on the storage object, which PyTorch keeps exactly as long as the storage).
    `ignore(...)` registers tensors that exist already (weights, inputs) so their views are not
    taken for new allocations. Hand-written because PyTorch's `MemTracker` refuses a module called
    more than once per step and cannot leave grads out; bench/memory.py uses the same idea.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def ignore(self, tensors: Any) -> None:
        for value in tree_flatten(tensors)[0]:
            if isinstance(value, Tensor):
                self._seen[value.untyped_storage()] = 0

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, Tensor):
                self._count(value.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size


# ============================================================================ the recipe
def _init_args(entry: Any) -> dict[str, Any]:
    return dict((entry or {}).get("init_args") or {}) if isinstance(entry, Mapping) else {}


def _class_name(entry: Any) -> str:
    if isinstance(entry, str):
        return entry.rsplit(".", 1)[-1]
    return str((entry or {}).get("class_path", "")).rsplit(".", 1)[-1]


@dataclass
class Strategy:
    """What the estimate needs of `trainer.strategy`: the kind and how it shards."""

    kind: str  # "single", "ddp" or "fsdp"
    shards: int = 1  # devices the denoiser is sharded over (FSDP)
    replicate_frozen: bool = True
    cpu_offload: bool = False
    name: str = ""


def _strategy(trainer: Mapping[str, Any], world: int, devices: int) -> Strategy:
    entry = trainer.get("strategy", "auto")
    name = entry if isinstance(entry, str) else str(entry.get("class_path", ""))
    args = _init_args(entry)
    lowered = name.lower()
    if "fsdp" in lowered:
        sharding = str(args.get("sharding_strategy", "FULL_SHARD")).upper()
        shards = {"FULL_SHARD": world, "SHARD_GRAD_OP": world, "HYBRID_SHARD": devices, "_HYBRID_SHARD_ZERO2": devices}.get(sharding, 1)
        if sharding == "NO_SHARD":
            return Strategy("ddp", 1, True, False, f"{name.rsplit('.', 1)[-1]} NO_SHARD")
        return Strategy("fsdp", max(1, shards), bool(args.get("replicate_frozen", True)), bool(args.get("cpu_offload", False)),
                        f"{name.rsplit('.', 1)[-1]} {sharding} over {shards}")
    if world > 1:
        return Strategy("ddp", name=f"DDP over {world}")
    return Strategy("single", name="one device")


@dataclass
class Recipe:
    """The settings of a recipe that decide its memory (read from the YAML, see `read_recipe`)."""

    path: str
    policy_class: str
    policy_args: dict[str, Any]
    model: dict[str, Any]
    rewards: list[Any]
    precision: str
    devices: int
    nodes: int
    strategy: Strategy
    callbacks: list[Any] = field(default_factory=list)
    batch_size: int = 1

    @property
    def world(self) -> int:
        return self.devices * self.nodes


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive number of devices, got {value!r}")
    return value


def read_recipe(config: Mapping[str, Any] | str | Path, devices: int | None = None, nodes: int | None = None) -> Recipe:
    """The memory-relevant settings of a recipe: a YAML path or an already parsed config dict
    (the `fit` section of LightningCLI's config); `devices`/`nodes` override the trainer's."""
    path = "<config>"
    if isinstance(config, (str, Path)):
        import yaml

        path = str(config)
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe {path!r} does not exist")
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    trainer = dict(config.get("trainer") or {})
    model = dict(config.get("model") or {})
    policy = model.get("policy")
    if not isinstance(policy, Mapping) or "class_path" not in policy:
        raise ValueError(f"{path}: model.policy needs a class_path (a lightning_grpo.policies class)")
    data = config.get("data") or {}
    configured_devices = trainer.get("devices", 1)
    devices = _as_int(devices if devices is not None else (configured_devices if isinstance(configured_devices, int) else 1), "--devices")
    nodes = _as_int(nodes if nodes is not None else trainer.get("num_nodes", 1) or 1, "--nodes")
    callbacks = trainer.get("callbacks") or []
    return Recipe(
        path=path,
        policy_class=str(policy["class_path"]),
        policy_args=_init_args(policy),
        model=model,
        rewards=list(model.get("rewards") or []),
        precision=str(trainer.get("precision", "32-true") or "32-true"),
        devices=devices,
        nodes=nodes,
        strategy=_strategy(trainer, devices * nodes, devices),
        callbacks=callbacks if isinstance(callbacks, list) else [callbacks],
        batch_size=int(_init_args(data).get("batch_size", 1) if isinstance(data, Mapping) else 1),
    )


# ============================================================================ architectures
def _resolve_class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def model_folder(recipe: Recipe) -> tuple[Path, str]:
    """(folder holding `<component>/config.json`, where it came from) for the recipe's model: the
    local folder it names, else the shipped published config (by hub id, by folder name, or the
    family's default)."""
    name = str(recipe.policy_args.get("pretrained_model_name_or_path", ""))
    local = Path(name).expanduser()
    if name and local.is_dir():
        return local, f"local folder {name}"
    shipped = SHIPPED_BY_HUB_ID.get(name) or (local.name if (MODEL_CONFIGS / local.name).is_dir() and local.name else None)
    if shipped is None:
        shipped = getattr(_resolve_class(recipe.policy_class), "published_config", None)  # the family's default
        if shipped is None:
            raise ValueError(f"{recipe.path}: no architecture for {name!r} ({recipe.policy_class}): give a local model folder")
    return MODEL_CONFIGS / shipped, f"published config configs/models/{shipped}"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing architecture config {str(path)!r}")
    return json.loads(path.read_text())


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_component(class_name: str, config: dict[str, Any]) -> nn.Module:
    """An instance of `class_name` ("diffusers.X" / "transformers.Y") from its config dict, built
    in the current device / fake-tensor context (call it under `torch.device("meta")`)."""
    cls = _resolve_class(class_name)
    if class_name.startswith("transformers."):
        return cls(cls.config_class(**config))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(kwargs)


def meta_component(class_name: str, config: dict[str, Any]) -> nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_component(class_name, config)


def param_count(module: nn.Module, trainable: bool | None = None) -> int:
    """Parameters of `module` (tied weights once); only (non-)trainable ones when asked."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _add_lora(denoiser: nn.Module, args: Mapping[str, Any], policy_cls: type) -> None:
    from lightning_grpo.policies.loading import add_lora

    rank = int(args.get("lora_rank", 0) or 0)
    alpha = args.get("lora_alpha")
    add_lora(denoiser, rank, float(alpha) if alpha is not None else None, args.get("lora_target_modules") or policy_cls.default_lora_targets)


def _block_params(denoiser: nn.Module) -> int:
    """Parameters of the denoiser's largest block (diffusers `_no_split_modules`): FSDP's unit."""
    from lightning_grpo.policies.family import block_classes_of

    classes = block_classes_of(denoiser)
    sizes = [param_count(m) for m in denoiser.modules() if type(m) in classes]
    return max(sizes) if sizes else param_count(denoiser)


# ============================================================================ the estimate
@dataclass
class Row:
    """One line of the table: bytes per GPU in each phase (None: not present then)."""

    name: str
    rollout: float | None
    update: float | None
    checkpoint: float | None
    note: str = ""


PHASES = ("rollout", "update", "checkpoint")


@dataclass
class Estimate:
    recipe: Recipe
    rows: list[Row]
    totals: dict[str, float]
    notes: list[str]

    @property
    def largest(self) -> tuple[str, float]:
        phase = max(PHASES, key=lambda p: self.totals[p])
        return phase, self.totals[phase]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def table(self) -> str:
        r = self.recipe
        phase, value = self.largest
        unit, scale = ("GiB", GIB) if value >= GIB else ("MiB", 2**20)
        head = (f"{r.path}: {r.nodes} node(s) × {r.devices} GPU(s), {r.strategy.name}, precision {r.precision}\n"
                f"{unit + ' per GPU':<42}{'rollout':>9}{'update':>9}{'checkpoint':>11}  note")
        lines = [head, "-" * 80]
        show = lambda v: f"{v / scale:9.2f}" if v is not None else f"{'-':>9}"
        for row in self.rows:
            lines.append(f"{row.name:<42}{show(row.rollout)}{show(row.update)}{show(row.checkpoint):>11}  {row.note}")
        lines.append("-" * 80)
        lines.append(f"{'total':<42}{show(self.totals['rollout'])}{show(self.totals['update'])}{show(self.totals['checkpoint']):>11}")
        lines += [f"  {n}" for n in self.notes]
        lines.append(f"peak per GPU: {value / scale:.2f} {unit} ({phase})")
        return "\n".join(lines)


def _dtype(name: Any, default: torch.dtype = torch.float32) -> torch.dtype:
    if name is None:
        return default
    key = str(name).removeprefix("torch.").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _Setting:
    """Dtypes and batch sizes derived from the recipe."""

    frozen: torch.dtype
    denoiser: torch.dtype
    compute: torch.dtype | None  # autocast dtype (None: no autocast)
    fsdp_param: torch.dtype  # dtype of FSDP's unsharded parameters
    reward: torch.dtype | None  # None: each reward's own


def _setting(recipe: Recipe) -> _Setting:
    args, precision = recipe.policy_args, recipe.precision
    frozen, denoiser = _dtype(args.get("dtype")), _dtype(args.get("denoiser_dtype"))
    low = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    if precision.endswith("-true") and low is not None:  # Lightning converts the whole module
        return _Setting(low, low, None, low, low)
    compute = low if precision.endswith("-mixed") else None
    return _Setting(frozen, denoiser, compute, compute or denoiser, None)


def _uses_cfg(recipe: Recipe) -> bool:
    """Classifier-free guidance as the recipe's family says (`uses_cfg_with`); a guidance or true
    CFG scale above 1 where the family cannot say before it loads."""
    stated = _resolve_class(recipe.policy_class).uses_cfg_with(recipe.policy_args)
    if stated is not None:
        return bool(stated)
    args = recipe.policy_args
    return float(args.get("guidance_scale", 1.0) or 1.0) > 1.0 or float(args.get("true_cfg_scale", 1.0) or 1.0) > 1.0


KIND_DTYPES = {"mask": torch.long, "latent": torch.float32}
"""Dtypes of the condition's tensors by kind (`ConfigGeometry.condition`); "embed": the frozen dtype."""


class _Geometry:
    """One sample's latent, condition and pixel shapes, as the recipe's family describes them from
    the architecture configs (`DiffusersPolicy.config_geometry`)."""

    def __init__(self, recipe: Recipe, policy_cls: type, configs: dict[str, dict[str, Any]]) -> None:
        self.shapes = policy_cls.config_geometry(recipe.policy_args, configs, _uses_cfg(recipe))
        self.height, self.width, self.num_frames = self.shapes.height, self.shapes.width, self.shapes.num_frames
        self.vae_factor = self.shapes.vae_factor
        self.latent, self.vae_latent = self.shapes.latent, self.shapes.vae_latent

    def _dtype(self, kind: str, dtype: torch.dtype) -> torch.dtype:
        return KIND_DTYPES.get(kind, dtype)

    def condition(self, batch: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """A condition of `batch` samples (fake when called under FakeTensorMode)."""
        return {key: torch.zeros(batch, *shape, dtype=self._dtype(kind, dtype)) for key, (shape, kind) in self.shapes.condition.items()}

    def latent_bytes(self) -> int:
        return math.prod(self.latent) * 4  # fp32 latents

    def condition_bytes(self, dtype: torch.dtype) -> int:
        return sum(math.prod(shape) * _size(self._dtype(kind, dtype)) for shape, kind in self.shapes.condition.values())

    def pixel_bytes(self) -> int:
        return self.num_frames * 3 * self.height * self.width * 4  # decoded fp32 pixels


def _predictor(policy_cls: type, denoiser: nn.Module, recipe: Recipe, geometry: _Geometry) -> nn.Module:
    """An instance of the family class holding only what its `predict` reads (no loading), so the
    family's own predict (CFG, guidance, packing, input concatenation) is what gets measured."""
    return policy_cls.estimate_predictor(denoiser, recipe.policy_args, geometry.shapes)


def _measure_denoiser(recipe: Recipe, policy_cls: type, den_class: str, den_config: dict, geometry: _Geometry,
                      setting: _Setting, batch: int, grad: bool) -> int:
    """Peak bytes of the activations of one `predict` of `batch` samples (forward under no_grad,
    or forward + backward), on fake tensors; weights, inputs and gradients not counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = recipe.policy_args
    weights = setting.fsdp_param if recipe.strategy.kind == "fsdp" else setting.denoiser
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _default_dtype(weights):
            denoiser = build_component(den_class, den_config)
        if int(args.get("lora_rank", 0) or 0) > 0:
            with _adapters_stay_fp32():
                _add_lora(denoiser, args, policy_cls)
        else:
            denoiser.requires_grad_(True)
        if args.get("gradient_checkpointing"):
            denoiser.enable_gradient_checkpointing()
        policy = _predictor(policy_cls, denoiser, recipe, geometry)
        latents = torch.zeros(batch, *geometry.latent)
        timesteps = torch.full((batch,), 500.0)
        condition = geometry.condition(batch, setting.frozen)
        tracker = LiveBytes()
        tracker.ignore([list(denoiser.parameters()), list(denoiser.buffers()), latents, timesteps, condition])
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in denoiser.parameters() if p.requires_grad]
        autocast = torch.autocast("cpu", dtype=setting.compute) if setting.compute is not None else nullcontext()
        with tracker, autocast, (nullcontext() if grad else torch.no_grad()):
            out = policy.predict(latents, timesteps, condition)
            if grad:
                out.float().square().mean().backward()
        for hook in hooks:
            hook.remove()
    return tracker.peak


@contextmanager
def _adapters_stay_fp32() -> Iterator[None]:
    """peft moves new adapters to the base layer's device and dtype and then casts them back to
    fp32 (`autocast_adapter_dtype`), and moves each new layer to its base's device, with
    `Module.to`, which fake parameters cannot go through (module conversion swaps fake tensors,
    even to the device they are on, and peft still holds a reference). Built under the default
    dtype fp32 on the fake CPU device, the adapters already are what those casts and moves make,
    so they are skipped while the adapters are added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    move, to = BaseTunerLayer._move_adapter_to_device_of_base_layer, nn.Module.to

    def to_unless_there(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(module.parameters()) + list(module.buffers())
        if all((device is None or t.device == device) and (dtype is None or t.dtype == dtype) for t in tensors):
            return module
        return to(module, *args, **kwargs)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *args, **kwargs: None
    nn.Module.to = to_unless_there
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move
        nn.Module.to = to


def _drop_grad(param: Tensor) -> None:
    """Gradients are counted analytically (all alive from the second micro-batch on)."""
    param.grad = None


def _measure_decode(vae_class: str, vae_config: dict, geometry: _Geometry, recipe: Recipe, dtype: torch.dtype, batch: int) -> int:
    """Peak activation bytes of decoding `batch` samples with the VAE (tiled when configured)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tiling = recipe.policy_args.get("vae_tiling")
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _default_dtype(dtype):
            vae = build_component(vae_class, vae_config)
        if tiling:
            vae.enable_tiling(**(tiling if isinstance(tiling, dict) else {}))
        z = torch.zeros(batch, *geometry.vae_latent, dtype=dtype)
        tracker = LiveBytes()
        tracker.ignore([list(vae.parameters()), list(vae.buffers()), z])
        with tracker, torch.no_grad():
            vae.decode(z, return_dict=False)[0].float()
    return tracker.peak


# ---------------------------------------------------------------------------- rewards
@dataclass
class _RewardCost:
    name: str
    weight_bytes: int
    activation_bytes: int


def _open_clip_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip model_cfg of a reward's `architecture`: a local folder's open_clip_config.json,
    else the shipped published config, else open_clip's own registry."""
    arch = str(args.get("architecture", "ViT-H-14"))
    folder = Path(arch).expanduser()
    if folder.is_file() and folder.name == "open_clip_config.json":
        folder = folder.parent
    if (folder / "open_clip_config.json").is_file():
        return _read_json(folder / "open_clip_config.json")["model_cfg"]
    shipped = MODEL_CONFIGS / "open_clip" / f"{arch}.json"
    if shipped.is_file():
        return _read_json(shipped)
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    return config


def _open_clip_cost(name: str, args: Mapping[str, Any], images: int) -> _RewardCost:
    """Weights (fp32, as the rewards keep them) and the activations of scoring `images` images."""
    from open_clip.model import CLIP
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = dict(_open_clip_config(args))
    with torch.device("meta"):
        weights = param_count(CLIP(**config)) * 4
    size = config["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    context = int(config["text_cfg"].get("context_length", 77))
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CLIP(**config)
        pixels, tokens = torch.zeros(images, 3, size, size), torch.zeros(images, context, dtype=torch.long)
        tracker = LiveBytes()
        tracker.ignore([list(model.parameters()), list(model.buffers()), pixels, tokens])
        with tracker, torch.no_grad():
            model.encode_image(pixels)
            model.encode_text(tokens)
    return _RewardCost(name, weights, tracker.peak)


def _videoalign_cost(name: str, args: Mapping[str, Any], geometry: _Geometry) -> _RewardCost:
    """Qwen2-VL-2B weights (bf16 by default) built on meta from the base model's config, and a
    modelled activation peak: the video's vision tokens n (frames resampled to the checkpoint's
    2 fps, ≤ 448² pixels per frame, 14-px patches) through the ViT's MLP (4× width) and the merged
    n/4 tokens through the LLM's MLP, a few tensors of each alive at once (8 × the widest)."""
    from lightning_grpo.rewards.videoalign import VideoAlignModel

    base = Path(str(args.get("base_model_dir", ""))).expanduser()
    config = _read_json(base / "config.json") if (base / "config.json").is_file() else _read_json(MODEL_CONFIGS / "Qwen2-VL-2B-Instruct" / "config.json")
    from transformers import Qwen2VLConfig

    dtype = _dtype(args.get("dtype", "bfloat16"))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = VideoAlignModel(Qwen2VLConfig(**config), 1, [0, 1, 2])
    weights = param_count(model) * _size(dtype)
    seconds = geometry.num_frames / float(args.get("video_fps", 8.0))
    frames = max(4, min(geometry.num_frames, 2 * round(seconds * 2.0 / 2)))
    patches_per_frame = min(geometry.height * geometry.width, 448 * 448) // (14 * 14)
    tokens = frames * patches_per_frame
    vision = config["vision_config"]
    text = config.get("text_config", config)
    widest = max(tokens * vision["embed_dim"] * vision.get("mlp_ratio", 4), tokens // 4 * text["intermediate_size"])
    return _RewardCost(name, weights, 8 * widest * _size(dtype))


def _reward_costs(recipe: Recipe, geometry: _Geometry, decode_batch: int) -> list[_RewardCost]:
    costs = []
    for entry in recipe.rewards:
        name, args = _class_name(entry), _init_args(entry)
        while name == "Binary" and isinstance(args.get("reward"), Mapping):  # a wrapper: its inner model
            name, args = _class_name(args["reward"]), _init_args(args["reward"])
        label = str(_init_args(entry).get("name") or name)
        if name in OPEN_CLIP_REWARDS:
            costs.append(_open_clip_cost(label, args, decode_batch * geometry.num_frames))
        elif name == "VideoAlignReward":
            costs.append(_videoalign_cost(label, args, geometry))
        else:
            costs.append(_RewardCost(label, 0, 0))  # a model-free reward (verifiers, compressibility)
    return costs


# ---------------------------------------------------------------------------- assembling
def _ema_on_device(recipe: Recipe) -> bool:
    for entry in recipe.callbacks:
        if _class_name(entry) == "EMA" and str(_init_args(entry).get("device") or "") != "cpu":
            return True
    return False


@dataclass
class DenoiserFigures:
    """The denoiser's part of an estimate: parameter counts and measured activation peaks."""

    trainable: int  # parameters the optimizer updates (all, or the LoRA adapters)
    frozen_base: int  # the frozen base under LoRA (0 for full fine-tuning)
    block: int  # parameters of the largest block (FSDP's unit)
    train_dtype: torch.dtype
    group: int
    samples: int  # per GPU per rollout
    trained: int  # after best-of-n
    rollout_batch: int
    micro_batch: int
    steps: int
    rollout_activations: int  # bytes, no-grad forward of `rollout_batch` samples
    update_activations: int  # bytes, forward + backward of `micro_batch` samples (gradients excluded)


def denoiser_figures(recipe: Recipe) -> DenoiserFigures:
    """Parameters (on meta) and activation peaks (under FakeTensorMode) of the recipe's denoiser
    at its rollout and update batch sizes (used by `estimate` and bench/gpu_check.py)."""
    policy_cls = _resolve_class(recipe.policy_class)
    folder, _ = model_folder(recipe)
    setting, model = _setting(recipe), recipe.model
    components = {sub: cls for sub, (kind, cls) in policy_cls.components.items() if kind == "model"}
    den_name = policy_cls.denoiser_name
    # the denoiser's and the VAE's configs are needed; the text encoders' where present (sequence lengths)
    configs = {sub: _read_json(folder / sub / "config.json") for sub in components
               if sub in (den_name, "vae") or (folder / sub / "config.json").is_file()}
    geometry = _Geometry(recipe, policy_cls, configs)
    lora = int(recipe.policy_args.get("lora_rank", 0) or 0) > 0
    denoiser = meta_component(components[den_name], configs[den_name])
    if lora:
        with torch.device("meta"):
            _add_lora(denoiser, recipe.policy_args, policy_cls)
    else:
        denoiser.requires_grad_(True)
    trainable, frozen_base, block = param_count(denoiser, True), param_count(denoiser, False), _block_params(denoiser)
    del denoiser
    group = int(model.get("group_size", 12))
    samples = recipe.batch_size * group  # per rank (also with groups spanning ranks: P·W prompts × G/W members)
    best = model.get("best_of_n")
    trained = recipe.batch_size * sum(best) if best else samples
    rollout_batch = min(int(model.get("rollout_batch_size") or samples), samples)
    micro = min(int(model.get("micro_batch_size", 1) or 1), trained)
    sampler_steps = _init_args(model.get("sampler")).get("num_steps")
    steps = int(sampler_steps or recipe.policy_args.get("num_sampling_steps") or policy_cls.default_num_steps)
    den_class, den_config = components[den_name], configs[den_name]
    return DenoiserFigures(
        trainable, frozen_base, block, torch.float32 if lora else setting.denoiser,  # add_lora upcasts the adapters to fp32
        group, samples, trained, rollout_batch, micro, steps,
        _measure_denoiser(recipe, policy_cls, den_class, den_config, geometry, setting, rollout_batch, grad=False),
        _measure_denoiser(recipe, policy_cls, den_class, den_config, geometry, setting, micro, grad=True),
    )


def estimate(recipe: Recipe) -> Estimate:
    """Per-GPU bytes of every part in every phase (see the module docstring for the method)."""
    from lightning_grpo.policies.family import DiffusersPolicy

    policy_cls = _resolve_class(recipe.policy_class)
    if not (isinstance(policy_cls, type) and issubclass(policy_cls, DiffusersPolicy)):
        raise ValueError(f"{recipe.path}: estimate needs a diffusers-backed family (a DiffusersPolicy of lightning_grpo.policies), got {recipe.policy_class}")
    folder, source = model_folder(recipe)
    setting, strategy, model = _setting(recipe), recipe.strategy, recipe.model
    components = {sub: cls for sub, (kind, cls) in policy_cls.components.items() if kind == "model"}
    configs = {sub: _read_json(folder / sub / "config.json") for sub in components}
    den_name = policy_cls.denoiser_name
    geometry = _Geometry(recipe, policy_cls, configs)
    cfg = _uses_cfg(recipe)
    lora = int(recipe.policy_args.get("lora_rank", 0) or 0) > 0
    den = denoiser_figures(recipe)
    trainable, frozen_base, block = den.trainable, den.frozen_base, den.block
    train_dtype, train_size, base_size = den.train_dtype, _size(den.train_dtype), _size(setting.denoiser)
    frozen_parts = {sub: param_count(meta_component(cls, configs[sub])) * _size(setting.frozen) for sub, cls in components.items() if sub != den_name}
    group, samples, trained = den.group, den.samples, den.trained
    best = model.get("best_of_n")
    rollout_batch, micro, steps = den.rollout_batch, den.micro_batch, den.steps
    rollout_act, update_act = den.rollout_activations, den.update_activations
    decode_batch = min(int(model.get("decode_batch_size", 8) or 8), samples)
    decode_act = _measure_decode(components["vae"], configs["vae"], geometry, recipe, setting.frozen, decode_batch)
    rewards = _reward_costs(recipe, geometry, decode_batch)

    # states per GPU
    fsdp, ddp = strategy.kind == "fsdp", strategy.kind == "ddp"
    shards = strategy.shards if fsdp else 1
    offload = fsdp and strategy.cpu_offload
    unsharded_block = block * _size(setting.fsdp_param) if fsdp else 0
    weights = 0 if offload else (trainable * train_size + frozen_base * base_size) / shards
    grads = 0 if offload else trainable * train_size / shards
    grad_block = block * _size(setting.fsdp_param) if fsdp and not lora else 0
    adam = 0 if offload else 2 * trainable * train_size / shards
    buckets = trainable * train_size if ddp else 0
    step_temp = 0 if offload else trainable * train_size / shards
    frozen_div = 1 if (strategy.replicate_frozen or not fsdp) else shards
    kl = (trainable + frozen_base) * base_size / frozen_div if float(model.get("kl_beta", 0) or 0) > 0 and not lora else 0
    ema = trainable * 4 / shards if _ema_on_device(recipe) else 0
    reward_weights = sum(r.weight_bytes for r in rewards) / frozen_div
    frozen_weights = sum(frozen_parts.values()) / frozen_div
    trajectory = samples * ((steps + 1) * geometry.latent_bytes() + steps * 4 + geometry.condition_bytes(setting.frozen))
    selected = trained * ((steps + 1) * geometry.latent_bytes() + geometry.condition_bytes(setting.frozen)) if best else 0
    pixels = samples * geometry.pixel_bytes()
    record = samples * (geometry.latent_bytes() + geometry.pixel_bytes())
    decode_peak = max(decode_act, max((r.activation_bytes for r in rewards), default=0))
    ckpt_gather = block * 4 * 3 if fsdp and not lora else 0  # one block's fp32 weights + 2 AdamW states

    rows = [
        Row("denoiser weights" + (f" (sharded /{shards})" if fsdp else ""), weights, weights, weights,
            f"{(trainable + frozen_base) / 1e9:.2f}B params" + (", LoRA base frozen" if lora else "")),
        Row("FSDP: one unsharded block", unsharded_block or None, (unsharded_block + grad_block) or None, None,
            f"{block / 1e6:.0f}M params" if fsdp else ""),
        Row("gradients" + (f" (sharded /{shards})" if fsdp else ""), None, grads, None, f"{trainable / 1e6:.1f}M trainable"),
        Row("DDP gradient buckets", buckets or None, buckets or None, buckets or None, "a 2nd copy of the gradients" if ddp else ""),
        Row("AdamW states (exp_avg, exp_avg_sq)", adam, adam, adam, "on the CPU (cpu_offload)" if offload else f"{train_dtype}".removeprefix("torch.")),
        Row("frozen: " + ", ".join(frozen_parts), frozen_weights, frozen_weights, frozen_weights, f"{setting.frozen}".removeprefix("torch.")),
        Row("rewards: " + ", ".join(r.name for r in rewards), reward_weights, reward_weights, reward_weights, ""),
        Row("KL reference / EMA", (kl + ema) or None, (kl + ema) or None, (kl + ema) or None, ""),
        Row(f"trajectories ({samples} samples × {steps + 1} latents)", trajectory, trajectory + selected, None, ""),
        Row("decoded pixels (kept for the step)", pixels, pixels, record, ""),
        Row(f"denoiser activations (batch {rollout_batch}{'×2 CFG' if cfg else ''} | {micro}{'×2 CFG' if cfg else ''})",
            rollout_act, update_act, None, "measured on fake tensors"),
        Row(f"decode + reward activations (batch {decode_batch})", decode_peak, None, None, "measured (VideoAlign modelled)"),
        Row("AdamW step temporaries", None, step_temp, None, "one state-sized tensor (foreach)"),
        Row("checkpoint gathering", None, None, ckpt_gather or None, "one block's fp32 weights + states" if ckpt_gather else ""),
    ]
    resident = weights + adam + buckets + frozen_weights + reward_weights + kl + ema
    totals = {
        "rollout": resident + unsharded_block + trajectory + max(rollout_act, pixels + decode_peak),
        "update": resident + unsharded_block + grad_block + trajectory + selected + pixels + grads + max(update_act, step_temp),
        "checkpoint": resident + record + ckpt_gather,
    }
    notes = [
        f"architecture: {source}; {samples} samples per GPU per rollout ({recipe.batch_size} prompt(s) × G = {group}), "
        f"{trained} trained, {steps} sampling steps",
        "not counted: CUDA context and allocator fragmentation (keep a few GiB of margin), text-encoder activations",
    ]
    return Estimate(recipe, [r for r in rows if any(v for v in (r.rollout, r.update, r.checkpoint))], totals, notes)


# ============================================================================ fit's warning
def fit_warning(config: Mapping[str, Any], devices: int, nodes: int, capacity: int) -> str | None:
    """The warning `fit` prints when the estimate of `config` exceeds `capacity` bytes per GPU
    (None when it fits), naming the phases over and the knobs that lower them."""
    result = estimate(read_recipe(config, devices, nodes))
    over = [f"{p} {result.totals[p] / GIB:.1f} GiB" for p in PHASES if result.totals[p] > capacity]
    if not over:
        return None
    return (
        f"lightning-grpo estimate: this run needs more than the GPU's {capacity / GIB:.1f} GiB per GPU in "
        f"{', '.join(over)} (run `lightning-grpo estimate -c <config>` for the table). Knobs that lower it: {KNOBS}."
    )


def warn_if_over_capacity(config: Mapping[str, Any], trainer: Any) -> str | None:
    """Called by `lightning-grpo fit` at start-up: on CUDA only (returns at once on CPU), on global
    rank 0 only, estimate the recipe and warn when a phase exceeds the device's memory. Never
    stops the run: an estimate that cannot be made is reported and training goes on."""
    accelerator = type(getattr(trainer, "accelerator", None)).__name__
    if accelerator != "CUDAAccelerator" or not torch.cuda.is_available():
        return None
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)) or 0) != 0:
        return None
    capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        message = fit_warning(config, int(trainer.num_devices), int(trainer.num_nodes), capacity)
    except Exception as err:  # the estimate is advice: it must never stop a run
        message = None
        warnings.warn(f"lightning-grpo estimate could not estimate this run's memory: {type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


# ============================================================================ command line
def main(args: list[str] | None = None) -> Estimate:
    """`lightning-grpo estimate -c RECIPE [--devices N] [--nodes M]`: print the table."""
    parser = argparse.ArgumentParser(
        prog="lightning-grpo estimate",
        description="Per-GPU peak memory of a recipe at full size (rollout, update, checkpoint), from the models' "
        "published configs on the meta device and activations measured on fake tensors. Prints a table, the "
        "largest figure last.",
    )
    parser.add_argument("-c", "--config", required=True, help="the recipe YAML (e.g. configs/flux_hps.yaml)")
    parser.add_argument("--devices", type=int, default=None, help="GPUs per node (default: the recipe's trainer.devices)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's trainer.num_nodes, else 1)")
    parsed = parser.parse_args(args)
    try:
        result = estimate(read_recipe(parsed.config, parsed.devices, parsed.nodes))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(result.table())
    return result


__all__ = ["Estimate", "LiveBytes", "Recipe", "Row", "estimate", "fit_warning", "main", "read_recipe", "warn_if_over_capacity"]


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
