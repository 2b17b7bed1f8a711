"""open_clip-backed image-text rewards (HPS-v2.1, CLIP score): build, load strictly, score.

Both rewards are the cosine similarity of an open_clip model's normalised image and text
features, differing in weights and in an optional scale; they share this base class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn

from lightning_grpo.rewards._common import (
    FrozenModelReward,
    cosine_diagonal,
    flatten_frames,
    load_checkpoint_file,
    load_state_dict_strict,
    mean_over_frames,
    normalize,
    repeat_prompts,
    require_path,
    strip_prefix,
    to_rgb,
)
from lightning_grpo.rewards._preprocess import RESIZE_MODES, ResizeMode, quantize_uint8, resize_by_mode

# open_clip's OPENAI_DATASET_MEAN/STD: the fallback when a model carries no preprocess config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_architecture(architecture: str | Path) -> str:
    """The open_clip model identifier for `architecture`.

    Accepted: a registered open_clip name ("ViT-H-14"), an identifier with open_clip's own schema
    ("local-dir:<folder>", "hf-hub:<repo>"), or a local model folder in open_clip's format (holding
    `open_clip_config.json` with `model_cfg` and `preprocess_cfg`, like the shipped toy CLIP), or
    the path of that json file. A folder becomes "local-dir:<folder>", which open_clip reads for the
    architecture, the tokenizer and the preprocessing; the weights still come from `checkpoint`.
    """
    text = str(architecture)
    if text.startswith(("local-dir:", "hf-hub:")):
        return text
    path = Path(text).expanduser()
    if path.is_file() and path.name == "open_clip_config.json":
        path = path.parent
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"open_clip model folder {path} has no open_clip_config.json")
        return f"local-dir:{path}"
    return text


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... Model initialized randomly" record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def quiet_random_init_warning() -> Iterator[None]:
    """Around `open_clip.create_model(..., pretrained=None)`: the model is built empty on purpose
    and its weights are loaded strictly right after, so open_clip's root-logger warning that the
    model is random would tell the user the opposite of what happens. Other records pass."""
    root, dropper = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def preprocess_config(model: nn.Module, architecture: str, pretrained_tag: str | None) -> dict:
    """The model's open_clip preprocessing config (size, mean, std, interpolation, resize_mode,
    fill_color): the model's own (a local folder's `preprocess_cfg`, else open_clip's defaults),
    updated with open_clip's registry entry for (architecture, pretrained_tag) when a tag is given,
    e.g. ("ViT-H-14-378-quickgelu", "dfn5b") -> resize_mode "squash". Read offline: no download."""
    import open_clip

    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    if pretrained_tag is not None:
        entry = open_clip.get_pretrained_cfg(architecture, pretrained_tag)
        if not entry:
            known = open_clip.list_pretrained_tags_by_model(architecture)
            raise ValueError(f"open_clip has no pretrained tag {pretrained_tag!r} for {architecture!r} (known: {known})")
        cfg.update({k: entry[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color") if k in entry})
    return cfg


def unwrap_state_dict(checkpoint: Mapping[str, object], key: str | None) -> dict[str, Tensor]:
    """The tensors of a checkpoint: `checkpoint[key]` when `key` is given and present (HPS stores
    `{"state_dict": ...}`), else the checkpoint itself; a DDP `module.` prefix is removed."""
    if key is not None and key in checkpoint:
        checkpoint = checkpoint[key]  # type: ignore[assignment]
    return strip_prefix(checkpoint, "module.")  # type: ignore[arg-type]


class OpenClipCosineReward(FrozenModelReward):
    """scale · cos(f_img(x), f_txt(prompt)) with an open_clip model and local weights.

    Args:
        checkpoint: path to the weights file (torch pickle or .safetensors).
        architecture: open_clip model name (`open_clip.list_models()`, or one registered with
            `open_clip.add_model_config`), or a local open_clip model folder / its
            `open_clip_config.json` (see `resolve_architecture`; the toy CLIP ships as one).
        state_dict_key: key holding the state dict inside the checkpoint, if wrapped.
        pretrained_tag: open_clip pretrained tag of the weights (e.g. "dfn5b") whose registered
            preprocessing (resize_mode, interpolation, mean/std) applies; consulted only for a
            registered architecture name (a local folder's `open_clip_config.json` carries its own
            `preprocess_cfg`, which is used instead). The weights always come from `checkpoint`.
        resize_mode: "shortest" (resize + centre crop), "longest" (resize + pad) or "squash";
            None takes the model's preprocessing config (open_clip's default: "shortest").
        quantize: round the pixels to the uint8 grid first, as the official scorers see images
            read from a saved PNG (off: score the float images as they are).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage.
    """

    # open_clip's eval transform resizes the uint8 PIL image (HPS-v2 resizes the float tensor)
    resizes_uint8 = True

    def __init__(
        self,
        checkpoint: str | Path,
        architecture: str,
        state_dict_key: str | None = "state_dict",
        pretrained_tag: str | None = None,
        resize_mode: ResizeMode | None = None,
        quantize: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        path = require_path(checkpoint, self.name)
        if resize_mode is not None and resize_mode not in RESIZE_MODES:
            raise ValueError(f"reward {self.name!r}: resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        import open_clip  # heavy: imported only when a model-backed reward is built

        self.architecture = architecture
        identifier = resolve_architecture(architecture)
        if identifier != str(architecture):
            pretrained_tag = None  # a local folder / hub id carries its own preprocess_cfg
        # load_weights=False: a local folder's own weights are not loaded by open_clip; `checkpoint`
        # is loaded below, strictly, for every kind of architecture
        with quiet_random_init_warning():
            self.model: nn.Module = open_clip.create_model(identifier, pretrained=None, load_weights=False)
        state_dict = unwrap_state_dict(load_checkpoint_file(path), state_dict_key)
        load_state_dict_strict(self.model, state_dict, self.name)
        self.tokenizer = open_clip.get_tokenizer(identifier)
        cfg = preprocess_config(self.model, str(architecture), pretrained_tag)
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        if isinstance(size, (list, tuple)):
            size = int(size[0]) if size[0] == size[1] else (int(size[0]), int(size[1]))
        self.image_size: int | tuple[int, int] = size if isinstance(size, tuple) else int(size)
        self.image_mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        self.interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self.resize_mode: ResizeMode = resize_mode or cfg.get("resize_mode", "shortest")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"reward {self.name!r}: unsupported resize_mode {self.resize_mode!r} in the preprocessing config")
        self.fill = float(cfg.get("fill_color", 0)) / 255.0  # open_clip fills the uint8 image
        self.quantize = bool(quantize)
        self.freeze()

    def resize(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> [N,3,h,w]: open_clip's eval geometry for `resize_mode`, clamped like
        the uint8 image open_clip resizes."""
        return resize_by_mode(images, self.resize_mode, self.image_size, self.interpolation, clamp=True, fill=self.fill)

    def preprocess(self, images: Tensor) -> Tensor:
        """[N,C,H,W] in [0,1] -> model input: resize, normalise. With `quantize`, the input and
        (where the official path resizes a uint8 image, `resizes_uint8`) the resized image are
        rounded to the uint8 grid, as that path's PIL image is."""
        images = to_rgb(images.float())
        if self.quantize:
            images = quantize_uint8(images)
        images = self.resize(images)
        if self.quantize and self.resizes_uint8:
            images = quantize_uint8(images)
        return normalize(images, self.image_mean, self.image_std)

    def features(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Unnormalised image and text features, [N, D] each, on the model's device."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        return self.model.encode_image(pixels), self.model.encode_text(tokens)

    def scale(self) -> Tensor | float:
        """Multiplier of the cosine (1 by default; see subclasses)."""
        return 1.0

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        frames, per_sample = flatten_frames(pixels)  # [B*F, C, H, W]
        image_features, text_features = self.features(frames, repeat_prompts(prompts, per_sample))
        cosine = cosine_diagonal(image_features, text_features)  # [B*F]
        return mean_over_frames(self.scale() * cosine, per_sample).to(pixels.device)

    def logit_scale(self) -> Tensor:
        """exp(learned log temperature) of the CLIP model (≈100 for trained CLIP models)."""
        return self.model.logit_scale.detach().float().exp()

    def extra_repr(self) -> str:
        return f"architecture={self.architecture!r}, image_size={self.image_size}, resize_mode={self.resize_mode!r}"
