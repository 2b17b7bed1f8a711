"""CLIP score: cosine similarity of an open_clip model's image and prompt features.

    CLIPScore(x, p) = s · cos(f_img(x), f_txt(p))

with s = 1 (default: a cosine in [-1, 1]), a constant such as 100 (the "CLIPScore" convention of
Hessel et al. 2021 and torchmetrics, there also clipped at 0), or s = exp(logit_scale) of the model
(the logits CLIP itself is trained on). The DanceGRPO authors used DFN5B ViT-H-14 at 378 px
(open_clip `ViT-H-14-378-quickgelu`, weights `apple/DFN5B-CLIP-ViT-H-14-378`), combined with
HPS-v2.1 at weights 1.4 (CLIP) and 0.7 (HPS).

Preprocessing follows the model's open_clip config: DFN5B's registry entry (open_clip
pretrained.py, `ViT-H-14-378` / `dfn5b`) says `resize_mode="squash"`, bicubic, OpenAI mean/std,
so a 848×480 frame is squashed to 378×378, not centre-cropped. `pretrained_tag="dfn5b"` (default)
reads that entry offline; a local model folder's `open_clip_config.json` gives its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor

from lightning_grpo.rewards._open_clip import OpenClipCosineReward
from lightning_grpo.rewards._preprocess import ResizeMode


class ClipScore(OpenClipCosineReward):
    """CLIP score of each (image, prompt) pair; videos score the mean over their frames.

    Args:
        checkpoint: path to the open_clip weights (e.g. DFN5B's `open_clip_pytorch_model.bin`, or a
            .safetensors file); a plain state dict or one wrapped under `state_dict`.
        architecture: open_clip architecture of the weights (DFN5B: "ViT-H-14-378-quickgelu"), or
            a local open_clip model folder holding `open_clip_config.json` (the toy CLIP of the
            shapes world: `lightning_grpo/worlds/shapes/pretrained/clip`, with checkpoint
            `lightning_grpo/worlds/shapes/pretrained/clip/open_clip_model.safetensors`).
        scale: multiplier of the cosine: a number (1.0 = raw cosine, 100.0 = CLIPScore convention)
            or "logit_scale" for the model's own exp(logit_scale).
        pretrained_tag: open_clip pretrained tag whose registered preprocessing applies ("dfn5b"
            for the default architecture; None for registered models without a tag). Not consulted
            for a local model folder, whose `open_clip_config.json` gives the preprocessing.
        resize_mode: override of the preprocessing's resize ("shortest", "longest", "squash").
        quantize: round the pixels to the uint8 grid first (as scoring a saved image does).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage (DanceGRPO multi-reward example: 1.4).
    """

    default_name = "clip_score"

    def __init__(
        self,
        checkpoint: str | Path,
        architecture: str = "ViT-H-14-378-quickgelu",
        scale: float | Literal["logit_scale"] = 1.0,
        pretrained_tag: str | None = "dfn5b",
        resize_mode: ResizeMode | None = None,
        quantize: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(
            checkpoint, architecture, state_dict_key="state_dict", pretrained_tag=pretrained_tag,
            resize_mode=resize_mode, quantize=quantize, name=name, weight=weight,
        )
        if scale != "logit_scale" and not isinstance(scale, (int, float)):
            raise ValueError(f"scale must be a number or 'logit_scale', got {scale!r}")
        self.scale_mode = scale

    def scale(self) -> Tensor | float:
        return self.logit_scale() if self.scale_mode == "logit_scale" else float(self.scale_mode)
