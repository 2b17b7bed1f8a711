"""How far each reward's tensor preprocessing is from its official transform, in normalised units
(what the model sees) and uint8 levels, on the same uint8 image; and how far the rule we used
before (shortest side + centre crop for every reward) was. Prints one line per case; the last
line is the key figure: the old HPS rule's mean error on an 848×480 frame.

    PYTHONPATH=$PWD python bench/preprocessing_vs_official.py

The image is smooth structure plus noise (seeded), the kind of content where resampling rules
show; numbers on real photographs differ a little, the geometry errors do not.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from lightning_grpo.rewards._common import normalize
from lightning_grpo.rewards._preprocess import quantize_uint8, resize_by_mode, resize_longest_pad, resize_shortest_crop

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def image(height: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=g), size=(height, width), mode="bilinear")
    return ((0.8 * smooth + 0.2 * torch.rand(1, 3, height, width, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def hpsv2(pil: Image.Image) -> torch.Tensor:
    tensor = TF.to_tensor(pil)
    h, w = tensor.shape[1:]
    scale = 224 / max(h, w)
    new = [round(h * scale), round(w * scale)]
    tensor = TF.resize(tensor, new, TF.InterpolationMode.BICUBIC)
    ph, pw = 224 - new[0], 224 - new[1]
    return TF.normalize(TF.pad(tensor, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]), MEAN, STD)


def report(label: str, ours: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (ours - reference).abs()
    levels = diff * torch.tensor(STD).view(3, 1, 1) * 255
    print(f"{label:58s} normalised: mean {diff.mean():.4f} max {diff.max():.3f} | uint8 levels: mean {levels.mean():.2f} max {levels.max():.1f}")
    return float(diff.mean())


def main() -> None:
    import open_clip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    key = 0.0
    for height, width in [(480, 848), (512, 512)]:
        u8 = image(height, width)
        pil = Image.fromarray(u8[0].permute(1, 2, 0).numpy())
        x = u8.float() / 255
        tag = f"{width}x{height}"
        reference = hpsv2(pil)
        report(f"HPS  {tag} ours, quantize (float resize, pad)", normalize(resize_longest_pad(quantize_uint8(x), 224), MEAN, STD)[0], reference)
        old = report(f"HPS  {tag} old rule (shortest + crop)", normalize(resize_shortest_crop(x, 224), MEAN, STD)[0], reference)
        for mode, size in (("squash", 378), ("shortest", 224)):
            ref = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD, resize_mode=mode, interpolation="bicubic")(pil)
            q = normalize(quantize_uint8(resize_by_mode(quantize_uint8(x), mode, size)), MEAN, STD)[0]
            f = normalize(resize_by_mode(x, mode, size), MEAN, STD)[0]
            report(f"CLIP {tag} {mode}: ours, quantize", q, ref)
            report(f"CLIP {tag} {mode}: ours, float", f, ref)
            if mode == "squash":
                report(f"CLIP {tag} squash: old rule (shortest + crop at 378)", normalize(resize_shortest_crop(x, 378), MEAN, STD)[0], ref)
        processor = CLIPImageProcessorPil()
        ref = torch.from_numpy(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"][0]))
        report(f"Pick {tag} ours, quantize (floored crop)", normalize(quantize_uint8(resize_shortest_crop(quantize_uint8(x), 224, crop="floor")), MEAN, STD)[0], ref)
        report(f"Pick {tag} old rule (rounded crop)", normalize(resize_shortest_crop(x, 224, crop="round"), MEAN, STD)[0], ref)
        if (height, width) == (480, 848):
            key = old
    print(f"old HPS rule, 848x480: mean |error| {key:.3f} normalised units")


if __name__ == "__main__":
    main()
