"""Pretrain the toy CLIP of the shapes world: a tiny open_clip model whose CLIP score is a reward.

    python -m lightning_grpo.worlds.shapes.pretrain_clip --out lightning_grpo/worlds/shapes/pretrained/clip

What it builds: an open_clip `CLIP` (ViT vision tower at 32 px, patch 4; small causal text
transformer with open_clip's own CLIP BPE tokenizer, so any prompt tokenizes) trained
contrastively on rendered shapes-world images and their captions
(`lightning_grpo.worlds.shapes.dataset.sample_captioned_images`: all 48 combinations, all 5 templates,
jittered renders, fresh images every step).

Why the model is built this way:
- The output folder is open_clip's own local format (`open_clip_config.json` with `model_cfg`
  and `preprocess_cfg`, weights in `open_clip_model.safetensors`), so the toy loads through the
  same code as real CLIP checkpoints: `ClipScore(checkpoint=<folder>/open_clip_model.safetensors,
  architecture=<folder>)`, and also with plain `open_clip.create_model("local-dir:<folder>")`.
- open_clip's CLIP BPE tokenizer (shipped inside open_clip, nothing downloaded) keeps the model a
  real CLIP; its 49,408-row token table dominates the size, hence a narrow text tower and fp16
  storage (a few MB).
- Loss: symmetric InfoNCE with *multi-positive* targets. A batch of 256 samples over 48 scenes
  holds each scene several times (under different templates and jitter); standard CLIP loss would
  push apart two captions of the same scene. Here every caption of the same scene is a positive,
  and every other scene in the batch, many differing in a single attribute (the hard negatives of
  this world), is a negative.
- Mild augmentation (Gaussian blur, pixel noise, dimming on half of each batch): the reward scores
  *generated* images, which are blurrier and noisier than renders.

Progress is shown with tqdm; the run ends with the caption-retrieval accuracy (each image's true
scene caption against the 47 other scenes' captions, same template) measured on fresh renders
through `ClipScore` loaded from the written folder. Everything is seeded: the same command gives
the same weights on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_grpo.worlds.shapes.dataset import sample_captioned_images
from lightning_grpo.worlds.pretraining import warmup_cosine_schedule
from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe, parse_prompt
from lightning_grpo.worlds.shapes.render import render_scenes
from lightning_grpo.worlds.shapes.vocab import POSITIONS, SHAPES, all_scenes

#: Folder of the shipped toy CLIP (config + weights), inside the package.
TOY_CLIP_DIR = Path(__file__).resolve().parent / "pretrained" / "clip"
#: open_clip's file names for a local model folder (`local-dir:` schema).
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
INFO_NAME = "pretrain_info.json"
#: Mean / std the toy normalises pixels with (open_clip's OpenAI defaults: nothing special needed).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run (the defaults build the shipped model)."""

    steps: int = 800
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    image_size: int = 32
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 3
    vision_patch: int = 4
    text_width: int = 32
    text_layers: int = 2
    context_length: int = 20
    augment: bool = True
    eval_images_per_scene: int = 10
    dtype: str = "float16"
    threads: int = 1

    def model_cfg(self) -> dict:
        """open_clip model config (`CLIP(**model_cfg)`): tiny ViT + tiny text transformer."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.vision_patch,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": 32,
                "mlp_ratio": 2.0,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,  # open_clip's CLIP BPE tokenizer (SimpleTokenizer)
                "width": self.text_width,
                "heads": max(1, self.text_width // 16),
                "layers": self.text_layers,
                "mlp_ratio": 2.0,
            },
        }

    def open_clip_config(self) -> dict:
        """Contents of `open_clip_config.json`: model config + eval preprocessing."""
        return {
            "model_cfg": self.model_cfg(),
            "preprocess_cfg": {
                "mean": list(IMAGE_MEAN),
                "std": list(IMAGE_STD),
                "interpolation": "bilinear",
                "resize_mode": "shortest",
            },
        }


# ---------------------------------------------------------------------------- data
def scene_ids(prompts: list[str]) -> Tensor:
    """Index (0..47, `all_scenes()` order) of the scene each caption describes: LongTensor[N]."""
    rows = [parse_prompt(p).indices for p in prompts]
    c, s, p = torch.tensor(rows).unbind(1)
    return (c * len(SHAPES) + s) * len(POSITIONS) + p


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Per-image Gaussian blur of [N, C, H, W] with standard deviations sigma [N] (0 = identity)."""
    n, c, h, w = images.shape
    radius = 3
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x.view(1, -1) / sigma.clamp_min(1e-3).view(-1, 1)) ** 2)  # [N, k]
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # [N*C, k]
    flat = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)  # horizontal
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)  # vertical
    return flat.view(n, c, h, w)


def augment(images: Tensor, generator: torch.Generator, fraction: float = 0.5) -> Tensor:
    """Degrade a random `fraction` of images like a generator's imperfect samples: Gaussian blur
    σ ~ U(0, 1.2) px, intensity × U(0.75, 1), pixel noise σ ~ U(0, 0.06); clamped to [0, 1]."""
    n = images.shape[0]
    chosen = torch.rand(n, generator=generator) < fraction  # [N]
    sigma = torch.rand(n, generator=generator) * 1.2 * chosen
    dim = 1 - 0.25 * torch.rand(n, generator=generator) * chosen
    noise_std = 0.06 * torch.rand(n, generator=generator) * chosen
    out = gaussian_blur(images, sigma) * dim.view(-1, 1, 1, 1)
    out = out + torch.randn(images.shape, generator=generator) * noise_std.view(-1, 1, 1, 1)
    return torch.where(chosen.view(-1, 1, 1, 1), out.clamp(0, 1), images)


# ---------------------------------------------------------------------------- model and loss
def build_model(config: PretrainConfig, folder: Path) -> nn.Module:
    """Write `open_clip_config.json` into `folder` and build the (random) model from it, through
    open_clip's `local-dir:` loader: the same config file the reward will read."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.open_clip_config(), indent=2) + "\n")
    torch.manual_seed(config.seed)
    return open_clip.create_model(f"local-dir:{folder}", load_weights=False)


def multi_positive_clip_loss(image_features: Tensor, text_features: Tensor, labels: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE where every pair with the same scene label is a positive.

    logits = s · Î Tᵀ; the target of row i is uniform over {j : label_j = label_i} (which always
    includes j = i); loss = ½ (CE(logits, targets) + CE(logitsᵀ, targetsᵀ)). With all labels
    distinct this is exactly CLIP's loss.
    """
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # [N, N]
    same = (labels.view(-1, 1) == labels.view(1, -1)).float()  # [N, N], symmetric
    targets = same / same.sum(1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def caption_retrieval_accuracy(
    reward, images_per_scene: int = 10, seed: int = 12345, size: int = 32, degrade: bool = False
) -> dict[str, float]:
    """Caption retrieval through a loaded `ClipScore`: for each rendered image and each template,
    is the true scene's caption the best of the 48 scenes' captions (written with that template)?

    Args:
        reward: a `ClipScore` (its `features` give unnormalised image and text features).
        images_per_scene: jittered renders of each of the 48 scenes.
        seed: seed of the renders (and of the degradation).
        size: image side.
        degrade: blur (σ = 1 px) and add noise (σ = 0.05) to every render first, like an
            imperfect generator's samples.

    Returns overall accuracy, accuracy per template, per-attribute accuracy of the retrieved
    caption (colour / shape / position right), the mean margin (true − best wrong cosine), and
    the mean cosine of captions sharing 3, 2, 1, 0 attributes with the image (a useful reward
    grows with every attribute right).
    """
    scenes = all_scenes()
    truth = torch.arange(len(scenes)).repeat_interleave(images_per_scene)  # [N]
    pixels = render_scenes([scenes[i] for i in truth.tolist()], size=size, jitter=True, seed=seed)  # [N, 3, H, W]
    if degrade:
        gen = torch.Generator().manual_seed(seed)
        pixels = gaussian_blur(pixels, torch.ones(len(pixels)))
        pixels = (pixels + 0.05 * torch.randn(pixels.shape, generator=gen)).clamp(0, 1)
    image_features, _ = reward.features(pixels, ["x"])  # [N, D]
    image_features = F.normalize(image_features.float(), dim=-1)
    hits, margins, per_template = [], [], {}
    attrs = torch.tensor([s.indices for s in scenes])  # [48, 3]
    attr_hits = []
    shared = (attrs[truth].unsqueeze(1) == attrs.unsqueeze(0)).sum(-1)  # [N, 48] attributes in common
    by_shared = {k: [] for k in range(4)}
    for t in range(len(TEMPLATES)):
        _, text_features = reward.features(pixels[:1], [describe(s, t) for s in scenes])  # [48, D]
        cosine = image_features @ F.normalize(text_features.float(), dim=-1).T  # [N, 48]
        best = cosine.argmax(1)
        hits.append(best == truth)
        true_score = cosine.gather(1, truth.view(-1, 1)).squeeze(1)
        wrong = cosine.scatter(1, truth.view(-1, 1), float("-inf")).max(1).values
        margins.append(true_score - wrong)
        attr_hits.append(attrs[best] == attrs[truth])  # [N, 3]
        per_template[f"template_{t}"] = hits[-1].float().mean().item()
        for k in by_shared:
            by_shared[k].append(cosine[shared == k])
    attr = torch.cat(attr_hits).float().mean(0)
    return {
        "accuracy": torch.cat(hits).float().mean().item(),
        **per_template,
        "colour_accuracy": attr[0].item(),
        "shape_accuracy": attr[1].item(),
        "position_accuracy": attr[2].item(),
        "mean_margin": torch.cat(margins).mean().item(),
        **{f"mean_cosine_{k}_shared": torch.cat(v).mean().item() for k, v in sorted(by_shared.items(), reverse=True)},
        "images": float(truth.numel()),
    }


def load_reward(folder: str | Path, **kwargs):
    """The toy CLIP in `folder` as a `ClipScore` reward (the loader real CLIP checkpoints use)."""
    from lightning_grpo.rewards.clip_score import ClipScore

    folder = Path(folder)
    return ClipScore(checkpoint=folder / WEIGHTS_NAME, architecture=str(folder), **kwargs)


# ---------------------------------------------------------------------------- training
def pretrain(config: PretrainConfig, out: Path, progress: bool = True) -> dict:
    """Train, save config + weights + info into `out`, evaluate through ClipScore; returns the info."""
    import open_clip
    from safetensors.torch import save_file

    torch.set_num_threads(config.threads)
    out = Path(out)
    model = build_model(config, out)
    model.train()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    scheduler = warmup_cosine_schedule(optimizer, config.steps, config.warmup_steps)
    aug_gen = torch.Generator().manual_seed(config.seed + 1)
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="toy CLIP", disable=not progress, dynamic_ncols=True)
    loss_avg = acc_avg = None
    for step in bar:
        pixels, prompts = sample_captioned_images(config.batch_size, size=config.image_size, seed=config.seed * 1_000_003 + step)
        if config.augment:
            pixels = augment(pixels, aug_gen)
        labels = scene_ids(prompts)  # [N]
        image_features = model.encode_image((pixels - mean) / std)  # [N, D]
        text_features = model.encode_text(tokenizer(prompts))  # [N, D]
        loss = multi_positive_clip_loss(image_features, text_features, labels, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
            sims = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
            acc = (labels[sims.argmax(1)] == labels).float().mean().item()  # in-batch image→caption
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        acc_avg = acc if acc_avg is None else 0.95 * acc_avg + 0.05 * acc
        bar.set_postfix(loss=f"{loss_avg:.3f}", batch_acc=f"{acc_avg:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    train_seconds = time.perf_counter() - start

    dtype = getattr(torch, config.dtype)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    reward = load_reward(out)
    metrics = caption_retrieval_accuracy(reward, config.eval_images_per_scene, size=config.image_size)
    degraded = caption_retrieval_accuracy(reward, config.eval_images_per_scene, size=config.image_size, degrade=True)
    info = {
        "command": "python -m lightning_grpo.worlds.shapes.pretrain_clip " + shlex.join(sys.argv[1:]),
        "config": asdict(config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (out / WEIGHTS_NAME).stat().st_size,
        "train_seconds": round(train_seconds, 1),
        "final_loss_ema": loss_avg,
        "final_batch_accuracy_ema": acc_avg,
        "retrieval": metrics,
        "retrieval_degraded": degraded,
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, Path, bool]:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=TOY_CLIP_DIR, help="output folder (config, weights, info)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(image, caption) pairs per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of init, data and augmentation")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim, help="joint embedding size")
    parser.add_argument("--vision-width", type=int, default=defaults.vision_width, help="ViT width")
    parser.add_argument("--vision-layers", type=int, default=defaults.vision_layers, help="ViT blocks")
    parser.add_argument("--text-width", type=int, default=defaults.text_width, help="text transformer width")
    parser.add_argument("--text-layers", type=int, default=defaults.text_layers, help="text transformer blocks")
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="train on clean renders only")
    parser.add_argument("--eval-images-per-scene", type=int, default=defaults.eval_images_per_scene, help="renders per scene in the final retrieval evaluation")
    parser.add_argument("--dtype", choices=("float16", "float32"), default=defaults.dtype, help="dtype of the saved weights")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = vars(parser.parse_args(argv))
    out, quiet = args.pop("out"), args.pop("quiet")
    return PretrainConfig(**args), out, not quiet


def main(argv: list[str] | None = None) -> dict:
    config, out, progress = parse_args(argv)
    info = pretrain(config, out, progress=progress)
    r = info["retrieval"]
    print(
        f"toy CLIP written to {out}: {info['parameters']:,} parameters, {info['weights_bytes'] / 2**20:.2f} MiB, "
        f"trained in {info['train_seconds']:.0f} s; caption retrieval (true vs 47 other scenes) "
        f"{100 * r['accuracy']:.1f}% over {int(r['images'])} renders × {len(TEMPLATES)} templates "
        f"(colour {100 * r['colour_accuracy']:.1f}%, shape {100 * r['shape_accuracy']:.1f}%, "
        f"position {100 * r['position_accuracy']:.1f}%), mean margin {r['mean_margin']:.3f}; "
        f"on blurred + noisy renders {100 * info['retrieval_degraded']['accuracy']:.1f}%; mean cosine of captions "
        f"sharing 3/2/1/0 attributes: "
        + " / ".join(f"{r[f'mean_cosine_{k}_shared']:.3f}" for k in (3, 2, 1, 0))
    )
    return info


if __name__ == "__main__":
    main()
