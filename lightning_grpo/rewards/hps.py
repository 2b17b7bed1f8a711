"""HPS-v2.1: Human Preference Score v2.1 (Wu et al. 2023), the DanceGRPO image reward.

    HPS(x, p) = ⟨ f_img(x) / ‖f_img(x)‖ , f_txt(p) / ‖f_txt(p)‖ ⟩

i.e. the diagonal of `image_features @ text_features.T` with open_clip's *normalised* features
and no logit scale, exactly as the official scorer does (tgxs002/HPSv2, hpsv2/img_score.py:
`logits_per_image = image_features @ text_features.T; hps_score = torch.diagonal(...)`, where
the features come from open_clip's `output_dict=True` forward, which normalises them).
Typical values are ≈ 0.2-0.35; the DanceGRPO binary example thresholds at 0.28.

Checkpoint layout (hpsv2/img_score.py): `torch.load(cp)["state_dict"]` loaded into open_clip
`ViT-H-14` (laion2B architecture, no QuickGELU); the file for v2.1 is `HPS_v2.1_compressed.pt`.
Preprocessing: HPS-v2's own eval transform, not open_clip's default. `create_model_and_transforms`
(hpsv2/src/open_clip/factory.py) builds `preprocess_val` with `resize_longest_max=True`, i.e.
`ToTensor` -> `ResizeMaxSize(224)` (longest side to 224, bicubic on the float tensor, zero pad)
-> normalise (OpenAI CLIP mean/std), see `resize_longest_pad`. No clamp after the resize: the
official path resizes the float tensor. The scorer (and DanceGRPO's train_grpo_flux.py) feeds it
the uint8 PIL image; `quantize=True` rounds to the uint8 grid first to match that exactly.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lightning_grpo.rewards._open_clip import OpenClipCosineReward
from lightning_grpo.rewards._preprocess import resize_longest_pad


class HPSReward(OpenClipCosineReward):
    """HPS-v2.1 score of each (image, prompt) pair; videos score the mean over their frames.

    Args:
        checkpoint: path to `HPS_v2.1_compressed.pt` (a dict whose `state_dict` holds the open_clip
            weights; a DDP `module.` prefix is accepted).
        architecture: open_clip architecture the weights belong to (HPS-v2.1: "ViT-H-14"; tests
            pass a tiny registered one).
        quantize: round the pixels to the uint8 grid first (the official scorer reads a uint8 image).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage (DanceGRPO multi-reward example: 0.7).
    """

    default_name = "hps"
    resizes_uint8 = False  # ToTensor comes before ResizeMaxSize in HPS-v2's transform

    def __init__(
        self,
        checkpoint: str | Path,
        architecture: str = "ViT-H-14",
        quantize: bool = False,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(checkpoint, architecture, state_dict_key="state_dict", quantize=quantize, name=name, weight=weight)
        self.resize_mode = "longest"

    def resize(self, images: Tensor) -> Tensor:
        """HPS-v2 `ResizeMaxSize`: longest side to the model's size, zero pad, no clamp."""
        return resize_longest_pad(images, self.image_size, "bicubic", fill=0.0, clamp=False)
