"""open_clip-backed image-text rewards (HPS-v2.1, CLIP score): build, load strictly, score.

Both rewards are the cosine similarity of an open_clip model's normalised image and text
features, differing in weights and in an optional scale; they share this base class.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    resize_shortest_center_crop,
    strip_prefix,
    to_rgb,
)

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
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        architecture: str,
        state_dict_key: str | None = "state_dict",
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        path = require_path(checkpoint, self.name)
        import open_clip  # heavy: imported only when a model-backed reward is built

        self.architecture = architecture
        identifier = resolve_architecture(architecture)
        # load_weights=False: a local folder's own weights are not loaded by open_clip; `checkpoint`
        # is loaded below, strictly, for every kind of architecture
        self.model: nn.Module = open_clip.create_model(identifier, pretrained=None, load_weights=False)
        state_dict = unwrap_state_dict(load_checkpoint_file(path), state_dict_key)
        load_state_dict_strict(self.model, state_dict, self.name)
        self.tokenizer = open_clip.get_tokenizer(identifier)
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size: int | tuple[int, int] = tuple(size) if isinstance(size, (list, tuple)) else int(size)
        self.image_mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        self.interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """[N,C,H,W] in [0,1] -> model input: resize shortest side + center crop + normalise."""
        images = resize_shortest_center_crop(to_rgb(images.float()), self.image_size, self.interpolation)
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
        return f"architecture={self.architecture!r}, image_size={self.image_size}"
