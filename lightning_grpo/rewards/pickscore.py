"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

    PickScore(x, p) = exp(logit_scale) · cos(E_img(x), E_txt(p))

as the official snippet computes it (yuvalkirstain/PickScore README: `scores =
model.logit_scale.exp() * (text_embs @ image_embs.T)` with both embeddings L2-normalised), here
for each (image, its own prompt) pair. Typical values are ≈ 18-23.

Layout: a transformers `CLIPModel` folder (`yuvalkirstain/PickScore_v1`) and a processor folder
(`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) giving the tokenizer and the image statistics. Images are
preprocessed on tensors as the processor's `CLIPImageProcessor` does (the PIL path of the
transformers the official snippet ran on): bicubic resize of the shortest edge to
`size["shortest_edge"]` (long side truncated), centre crop to `crop_size` with the offset
floored ((H − h)//2, transformers' `center_crop`, where torchvision rounds), rescale, the
processor's mean/std. `quantize=True` rounds to the uint8 grid first, as the PIL image the official
code (and DanceGRPO's train_grpo_flux.py `calc_probs`) is given.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from lightning_grpo.rewards._common import (
    CheckpointMismatchError,
    FrozenModelReward,
    cosine_diagonal,
    flatten_frames,
    mean_over_frames,
    normalize,
    repeat_prompts,
    require_path,
    to_rgb,
)
from lightning_grpo.rewards._preprocess import quantize_uint8, resize_shortest_crop


def _resize_size(image_processor: object) -> int | tuple[int, int]:
    """What the CLIP image processor resizes to: its shortest edge (int), or an exact (h, w)."""
    size = getattr(image_processor, "size", None) or {"shortest_edge": 224}
    if isinstance(size, int):
        return size
    size = dict(size)
    if size.get("shortest_edge") is not None:
        return int(size["shortest_edge"])
    return int(size["height"]), int(size["width"])


def _crop_size(image_processor: object) -> tuple[int, int]:
    """(height, width) the CLIP image processor crops to (falls back to its resize size)."""
    crop = getattr(image_processor, "crop_size", None) or getattr(image_processor, "size", None) or {}
    if isinstance(crop, int):
        return crop, crop
    crop = dict(crop)
    if "height" in crop:
        return int(crop["height"]), int(crop["width"])
    side = int(crop.get("shortest_edge", 224))
    return side, side


def check_loading_info(info: dict, reward_name: str, model_dir: Path) -> None:
    """Raises CheckpointMismatchError if `from_pretrained` reported missing/unexpected/mismatched keys."""
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k} ({len(v)}): {v[:8]}" for k, v in problems.items())
        raise CheckpointMismatchError(f"reward {reward_name!r}: weights in {model_dir} do not match the architecture: {detail}")


class PickScore(FrozenModelReward):
    """PickScore of each (image, prompt) pair; videos score the mean over their frames.

    Args:
        model_dir: local folder of the PickScore `CLIPModel` (config.json + weights).
        processor_dir: local folder of the CLIP processor (tokenizer + preprocessor_config.json).
        max_length: token limit of the prompts (CLIP: 77).
        quantize: round the pixels to the uint8 grid first (the official code scores a PIL image).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage.
    """

    default_name = "pickscore"

    def __init__(
        self,
        model_dir: str | Path,
        processor_dir: str | Path,
        max_length: int = 77,
        quantize: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(name, weight)
        model_path = require_path(model_dir, self.name, directory=True)
        processor_path = require_path(processor_dir, self.name, directory=True)
        from transformers import AutoProcessor, CLIPModel

        self.model: nn.Module
        self.model, info = CLIPModel.from_pretrained(model_path, local_files_only=True, output_loading_info=True)
        check_loading_info(info, self.name, model_path)
        processor = AutoProcessor.from_pretrained(processor_path, local_files_only=True)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.resize_size = _resize_size(image_processor)
        self.image_size = _crop_size(image_processor)
        if not getattr(image_processor, "do_center_crop", True) or not isinstance(self.resize_size, int):
            raise ValueError(
                f"reward {self.name!r}: {processor_path} must resize the shortest edge and centre crop (CLIP's processor), "
                f"got size={getattr(image_processor, 'size', None)}, do_center_crop={getattr(image_processor, 'do_center_crop', None)}"
            )
        self.quantize = bool(quantize)
        self.image_mean = tuple(image_processor.image_mean)
        self.image_std = tuple(image_processor.image_std)
        self.max_length = int(max_length)
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """[N,C,H,W] in [0,1] -> CLIP input (shortest-edge bicubic resize, floored centre crop,
        normalise), clamped after the resize as the uint8 PIL resize is; with `quantize` the input
        and the resized image are rounded to the uint8 grid."""
        images = to_rgb(images.float())
        if self.quantize:
            images = quantize_uint8(images)
        images = resize_shortest_crop(images, self.resize_size, "bicubic", crop="floor", clamp=True, crop_size=self.image_size)
        if self.quantize:  # the PIL resize returns a uint8 image
            images = quantize_uint8(images)
        return normalize(images, self.image_mean, self.image_std)

    def features(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Projected (unnormalised) image and text embeddings, [N, D] each."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        # vision/text towers + projections directly: `get_image_features` changed its return type in transformers 5
        image_embeds = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text_embeds = self.model.text_projection(self.model.text_model(**tokens).pooler_output)
        return image_embeds, text_embeds

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        frames, per_sample = flatten_frames(pixels)  # [B*F, C, H, W]
        image_embeds, text_embeds = self.features(frames, repeat_prompts(prompts, per_sample))
        scores = self.model.logit_scale.float().exp() * cosine_diagonal(image_embeds, text_embeds)  # [B*F]
        return mean_over_frames(scores, per_sample).to(pixels.device)
