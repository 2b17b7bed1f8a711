"""Loading helpers shared by the policy adapters: folder checks, dtypes, freezing, LoRA.

A pretrained model is named by a local folder in the diffusers layout (`model_index.json`,
one subfolder per component) or by a hub id. For a local folder we check every subfolder and
file an adapter needs *before* calling `from_pretrained`, because the errors diffusers and
transformers raise for a missing piece are long and name the wrong thing (they fall back to
the hub and report a network error, or silently build an empty tokenizer).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lightning_grpo.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")
"""File endings that count as model weights (single, sharded or variant files)."""

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")
"""Any one of these makes a tokenizer folder loadable."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("float32", "bf16", ...) so configs can hold plain strings."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def looks_local(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` is (or is written as) a filesystem path rather than a hub id.

    A hub id is "name" or "owner/name"; anything existing on disk, absolute, starting with
    "." or "~", with more than one "/", or whose first part is an existing folder ("models/flux"
    when ./models exists) is a path.
    """
    text = str(name_or_path)
    if Path(text).expanduser().exists():
        return True
    if text.startswith((os.sep, ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and bool(first) and Path(first).is_dir()


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds `repo_id` (its model_index.json or config.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("model_index.json", "config.json"))
    except ValueError:  # not a valid repo id
        return False


def _has_weights(folder: Path) -> bool:
    return any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir() if f.is_file())


def _has_any(folder: Path, names: Sequence[str]) -> bool:
    return any((folder / name).is_file() for name in names)


def check_component(root: Path, subfolder: str, kind: str) -> None:
    """Raise FileNotFoundError naming what is missing from `root/subfolder` for a `kind`.

    Kinds: "model" (config.json + a weights file), "tokenizer" and "processor" (one of
    TOKENIZER_FILES: a processor folder, e.g. FLUX.2 [dev]'s PixtralProcessor, holds its
    tokenizer's files beside processor_config.json), "image_processor" (an image processor's
    preprocessor_config.json, e.g. Wan I2V's CLIPImageProcessor), "scheduler" (scheduler_config.json).
    """
    folder = root / subfolder
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder {str(folder)!r}: a diffusers checkpoint needs '{subfolder}/' here")
    if kind == "model":
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"missing file {str(folder / 'config.json')!r}")
        if not _has_weights(folder):
            raise FileNotFoundError(f"no weights file (*{', *'.join(WEIGHT_SUFFIXES)}) in {str(folder)!r}")
    elif kind in ("tokenizer", "processor"):
        if not _has_any(folder, TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {str(folder)!r}")
    elif kind == "scheduler":
        if not (folder / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"missing file {str(folder / 'scheduler_config.json')!r}")
    elif kind == "image_processor":
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"missing file {str(folder / 'preprocessor_config.json')!r}")
    else:
        raise ValueError(f"unknown component kind {kind!r}")


def check_pretrained_folder(name_or_path: str | os.PathLike, components: dict[str, str]) -> None:
    """Check a local diffusers folder holds `components` ({subfolder: kind}); hub ids pass.

    Raises FileNotFoundError naming the folder itself, or the first missing subfolder/file; for
    a hub id with HF_HUB_OFFLINE=1 and no cached copy, one naming it as a hub id (and saying that
    no local folder of that name exists), instead of the empty tokenizer transformers builds.
    """
    if not looks_local(name_or_path):
        if _hub_offline() and not _in_hub_cache(str(name_or_path)):
            raise FileNotFoundError(
                f"{str(name_or_path)!r} is not a local folder (nothing at {str(Path.cwd() / str(name_or_path))!r}) and, read as "
                "a hub id, is not in the hub cache while HF_HUB_OFFLINE=1: give the path of a local diffusers folder, "
                "or download the hub model first"
            )
        return
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"pretrained model folder {str(root)!r} does not exist (a local path: the hub is not asked)")
    for subfolder, kind in components.items():
        check_component(root, subfolder, kind)


def load_component(loader: Callable[..., Any], name_or_path: str | os.PathLike, subfolder: str, **kwargs: Any) -> Any:
    """`loader(name_or_path, subfolder=subfolder, **kwargs)` with hub failures as FileNotFoundError.

    `loader` is a `from_pretrained` (or `load_config`) bound method. Local folders are checked
    beforehand by `check_pretrained_folder`; this rewraps what the hub path can raise (offline,
    unknown repo) into one clear error naming the component and the hub id, and what a local
    folder raises (a truncated or corrupt weights file) into an OSError naming the files.
    """
    try:
        loaded = loader(str(name_or_path), subfolder=subfolder, **kwargs)
    except Exception as err:
        if not looks_local(name_or_path):
            if isinstance(err, (OSError, ValueError)):
                raise FileNotFoundError(f"cannot load '{subfolder}' from hub id {str(name_or_path)!r}: {err}") from err
            raise
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"cannot load '{subfolder}' from {str(name_or_path)!r}: {err}") from err
        folder = Path(name_or_path).expanduser() / subfolder
        mismatch = config_weights_mismatch(getattr(loader, "__self__", None), folder)
        if mismatch is not None:
            raise WeightsMismatchError(f"component '{subfolder}' of {str(name_or_path)!r}: {mismatch}") from err
        files = sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) if folder.is_dir() else []
        raise OSError(
            f"cannot load component '{subfolder}' from {str(folder)!r} (weights: {files}): {type(err).__name__}: {err}; "
            "a truncated or corrupt file (an interrupted copy?) is the usual cause"
        ) from err
    if isinstance(loaded, nn.Module) and looks_local(name_or_path):
        _check_no_meta(loaded, getattr(loader, "__self__", None), Path(name_or_path).expanduser(), subfolder)
    return loaded


class WeightsMismatchError(InputError, OSError):
    """A component's config.json describes other parameters than its weights file holds."""


def _check_no_meta(module: nn.Module, cls: Any, root: Path, subfolder: str) -> None:
    """A parameter left on the meta device had no weights in the file (diffusers builds the model
    from config.json on the meta device and fills it from the weights; a config describing more
    than the weights hold leaves the rest without data, which fails much later as "Cannot copy out
    of meta tensor"). Raise WeightsMismatchError naming the component and the first difference."""
    empty = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if not empty:
        return
    mismatch = config_weights_mismatch(cls, root / subfolder) or (
        f"{len(empty)} parameters of the model built from config.json got no weights, e.g. {empty[:3]}"
    )
    raise WeightsMismatchError(f"component '{subfolder}' of {str(root)!r}: {mismatch}")


def config_weights_mismatch(cls: Any, folder: Path) -> str | None:
    """The first difference between the parameters `cls` builds from `folder/config.json` (on the
    meta device: no memory, no weights read) and those the folder's safetensors files hold (their
    headers only): a differing shape first, else parameters missing on one side; None when they
    agree or either side cannot be read."""
    expected, found = _config_shapes(cls, folder), _weight_shapes(folder)
    if not expected or not found:
        return None
    config = f"{folder.name}/config.json"
    for name in sorted(set(expected) & set(found)):
        if expected[name] != found[name]:
            return f"{config} does not match its weights: first differing shape {name}: {expected[name]} by {config}, {found[name]} in the weights"
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        return f"{config} describes {len(missing)} parameters its weights do not hold, e.g. {missing[:3]}"
    if extra:
        return f"the weights hold {len(extra)} parameters {config} does not describe, e.g. {extra[:3]}"
    return None


def _config_shapes(cls: Any, folder: Path) -> dict[str, list[int]] | None:
    """{name: shape} of the model `cls` builds from the folder's config, built on the meta device."""
    try:
        if hasattr(cls, "load_config") and hasattr(cls, "from_config"):  # diffusers
            config = cls.load_config(str(folder))
            with torch.device("meta"):
                model = cls.from_config(config)
        elif hasattr(cls, "config_class"):  # transformers
            config = cls.config_class.from_pretrained(str(folder))
            with torch.device("meta"):
                model = cls(config)
        else:
            return None
    except Exception:
        return None
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def _weight_shapes(folder: Path) -> dict[str, list[int]] | None:
    """{name: shape} from the headers of the folder's safetensors files (no tensor data read)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = list(handle.get_slice(key).get_shape())
    except Exception:
        return None
    return shapes


MIN_TOKENIZER_VOCAB = 8
"""Fewer non-special tokens than this means a tokenizer loaded empty (see `load_tokenizer`)."""


def load_tokenizer(tokenizer_cls: Any, name_or_path: str | os.PathLike, subfolder: str) -> Any:
    """`tokenizer_cls.from_pretrained` that refuses a tokenizer which loaded empty.

    transformers 5 does not raise when a tokenizer's files cannot be found (e.g. a hub id
    offline): it builds a tokenizer holding only its special tokens, which then maps every
    prompt to unknown tokens. Such a tokenizer is reported as a FileNotFoundError instead. A
    processor (`tokenizer_cls` a transformers ProcessorMixin, e.g. PixtralProcessor) is checked
    by the tokenizer it holds.
    """
    loaded = load_component(tokenizer_cls.from_pretrained, name_or_path, subfolder)
    tokenizer = getattr(loaded, "tokenizer", None) if not hasattr(loaded, "get_vocab") else loaded
    if tokenizer is None:
        raise TypeError(f"'{subfolder}' of {str(name_or_path)!r} loaded as {type(loaded).__name__}, which is neither a tokenizer nor holds one")
    regular = len(tokenizer.get_vocab()) - len(set(tokenizer.all_special_tokens))
    if regular < MIN_TOKENIZER_VOCAB:
        kind = "local folder" if looks_local(name_or_path) else "hub id"
        raise FileNotFoundError(
            f"tokenizer '{subfolder}' of {kind} {str(name_or_path)!r} loaded with {regular} regular tokens: "
            "its vocabulary files were not found (offline without a cached copy?)"
        )
    return loaded


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients and switch to eval mode (no dropout) for a frozen component."""
    module.requires_grad_(False)
    module.eval()
    return module


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: Sequence[str],
    init: bool | str = True,
) -> None:
    """Freeze `model` and add a trainable peft LoRA adapter to its `target_modules`.

    The base weights stay frozen; only the LoRA A/B matrices require grad. With the default
    `init=True` B starts at zero, so the adapted model initially equals the base model.
    Uses diffusers' `PeftAdapterMixin.add_adapter` (all diffusers denoisers have it). The
    adapters are float32 whatever the base's dtype (trained in full precision).
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights=init,
    )
    model.add_adapter(config)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    # peft creates the adapters in the base weights' dtype: under a bf16 denoiser AdamW would
    # step the LoRA matrices in bf16, where an update of lr 1e-4 relative to a weight is below
    # half an ulp (2^-9) and is lost. diffusers' training scripts upcast the trainable
    # parameters; peft's forward casts the input to the adapter's dtype and the sum back.
    cast_training_params(model, dtype=torch.float32)


__all__ = [
    "add_lora",
    "check_component",
    "check_pretrained_folder",
    "freeze",
    "load_component",
    "load_tokenizer",
    "looks_local",
    "parse_dtype",
    "WeightsMismatchError",
    "config_weights_mismatch",
]


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a module's first parameter.

    diffusers' `ModelMixin.device` / `.dtype` walk every submodule looking for offloading hooks:
    ~7 ms per access on the toy FLUX transformer (bench/rollout_overhead.py's profile), paid at
    every denoiser call and every per-sample noise draw; this reads one parameter instead.
    """
    weight = next(module.parameters())
    return weight.device, weight.dtype

