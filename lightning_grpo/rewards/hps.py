"""HPS-v2.1: Human Preference Score v2.1 (Wu et al. 2023), the DanceGRPO image reward.

    HPS(x, p) = ⟨ f_img(x) / ‖f_img(x)‖ , f_txt(p) / ‖f_txt(p)‖ ⟩

i.e. the diagonal of `image_features @ text_features.T` with open_clip's *normalised* features
and no logit scale, exactly as the official scorer does (tgxs002/HPSv2, hpsv2/img_score.py:
`logits_per_image = image_features @ text_features.T; hps_score = torch.diagonal(...)`, where
the features come from open_clip's `output_dict=True` forward, which normalises them).
Typical values are ≈ 0.2-0.35; the DanceGRPO binary example thresholds at 0.28.

Checkpoint layout (hpsv2/img_score.py): `torch.load(cp)["state_dict"]` loaded into open_clip
`ViT-H-14` (laion2B architecture, no QuickGELU); the file for v2.1 is `HPS_v2.1_compressed.pt`.
Preprocessing: open_clip's eval transform (bicubic resize of the shortest side to 224, center
crop, OpenAI CLIP mean/std), done here on tensors.
"""

from __future__ import annotations

from pathlib import Path

from lightning_grpo.rewards._open_clip import OpenClipCosineReward


class HPSReward(OpenClipCosineReward):
    """HPS-v2.1 score of each (image, prompt) pair; videos score the mean over their frames.

    Args:
        checkpoint: path to `HPS_v2.1_compressed.pt` (a dict whose `state_dict` holds the open_clip
            weights; a DDP `module.` prefix is accepted).
        architecture: open_clip architecture the weights belong to (HPS-v2.1: "ViT-H-14"; tests
            pass a tiny registered one).
        name: name the reward is logged under.
        weight: weight in the multi-reward advantage (DanceGRPO multi-reward example: 0.7).
    """

    default_name = "hps"

    def __init__(
        self,
        checkpoint: str | Path,
        architecture: str = "ViT-H-14",
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(checkpoint, architecture, state_dict_key="state_dict", name=name, weight=weight)
