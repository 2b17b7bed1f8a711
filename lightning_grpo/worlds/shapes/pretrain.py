"""Pretrain the toy FLUX and toy Stable Diffusion pipelines on the shapes world, from scratch.

    python -m lightning_grpo.worlds.shapes.pretrain --family all --out lightning_grpo/worlds/shapes/pretrained

What it does, seeded end to end (same seed and torch build: same weights):

1. VAE: an AutoencoderKL is trained to reconstruct jittered renders (L2 + a small KL term), then
   its latent statistics set `scaling_factor` (1/std) and, for FLUX, `shift_factor` (mean), as
   the real FLUX / SD VAEs are configured.
2. Text encoders: a CLIPTextModel and a T5EncoderModel with word-level tokenizers, left at their
   seeded random initialisation and frozen, like the (pretrained) frozen text encoders of the
   real pipelines. Random transformers still map different prompts to different features;
   the denoiser learns to read them.
3. The pipeline is saved with `save_pretrained` and LOADED BACK THROUGH THE POLICY ADAPTER
   (the FLUX / SD families of the registry), and the denoiser is trained through the family
   layer: images encoded by the adapter's `encode_pixels`, text by its `encode_prompts`, the
   loss on its `predict`, so the pretrained function is exactly what GRPO later samples. Only
   the objective depends on the paradigm (`policy.paradigm`):
     FLUX (rectified flow):  x_σ = (1 − σ)·z + σ·ε,  loss = |v_θ(x_σ, σ) − (ε − z)|²,
                              σ ~ logit-normal(0, 1) (SD3 / FLUX training)
     SD (v-prediction DDPM): x_t = √ᾱ_t·z + √(1 − ᾱ_t)·ε,  loss = |v_θ(x_t, t) − (√ᾱ_t·ε − √(1 − ᾱ_t)·z)|²,
                              t ~ U{0..999}; 10% empty prompts so CFG is usable
   Training images cover all 48 combinations: the held-out split concerns only RL prompts.
   Captions are NOISY, like web alt-text: with probability `caption_noise` each attribute of a
   caption is replaced by a uniformly drawn value (possibly the right one). The model then learns
   p(image | prompt) as a mixture in which the described scene is the most likely but not the
   only outcome: it can draw the right image, but often does not, which is the situation GRPO
   is made for (sharpening the prompt-following of a pretrained generator).
4. The denoiser is saved in fp16 (the size budget of the shipped pipelines); the script then
   evaluates the saved folder on the held-out prompts (ODE sampling, exact-match verifier) and
   records the result in `pretrain_report.json` next to the weights.

The number of denoiser steps is chosen so the base models are competent but far from perfect
(held-out exact match between 15% and 70%): GRPO has room to improve them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_grpo.worlds.components import (
    ToySize,
    TEXT_MAX_LENGTH,
    build_clip_text_encoder,
    build_ddim_scheduler,
    build_flux_scheduler,
    build_flux_transformer,
    build_t5_encoder,
    build_tokenizers,
    build_unet,
    build_vae,
)
from lightning_grpo.worlds.shapes.dataset import noisy_descriptions, sample_captioned_images
from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe, heldout_prompts, parse_prompt
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, Scene

FAMILIES = ("flux", "sd")
DEFAULT_OUT = Path(__file__).parent / "pretrained"


@dataclass
class PretrainConfig:
    """Everything that determines the shipped pipelines (recorded in pretrain_report.json)."""

    size: ToySize = field(default_factory=ToySize)
    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_foreground_weight: float = 0.0  # plain L2 (`reconstruction_loss`): the shipped image VAEs were trained so
    flux_steps: int = 2000
    sd_steps: int = 1500
    denoiser_batch: int = 64
    denoiser_lr: float = 1e-3
    denoiser_sigma_shift: float = 1.0  # rectified flow: σ ~ logit-normal(0, 1) then shifted (`_flow_loss`); 1: unshifted
    dataset_size: int = 20_000
    caption_noise: float = 0.35
    eval_steps: int = 8
    eval_samples_per_prompt: int = 4

    @classmethod
    def reduced(cls) -> PretrainConfig:
        """A few seconds' worth, for the CI test of this script."""
        return cls(size=ToySize.reduced(), vae_steps=4, vae_batch=8, flux_steps=4, sd_steps=4, denoiser_batch=8,
                   dataset_size=64, eval_steps=2, eval_samples_per_prompt=1)


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up ((step + 1) / warmup) then cosine decay to 0 at `steps`: the schedule of every
    toy pretraining (pipelines here, CLIP in `pretrain_clip`)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fit(name: str, params, loss_fn, steps: int, lr: float) -> list[float]:
    """AdamW over `steps` calls of `loss_fn(step)`, progress bar showing the running loss."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = warmup_cosine_schedule(optimizer, steps, warmup=min(100, max(1, steps // 10)))
    losses, running = [], None
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: loss became {value} at step {step}")
        losses.append(value)
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
    return losses


def tail_mean(losses: list[float], last: int = 50) -> float | None:
    """Mean of the last `last` losses: the `final_loss` every pretraining report records (None for a
    zero-step stage, which has no loss, rather than a 0 that reads as a perfect fit)."""
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


# ----------------------------------------------------------------------------- VAE

def train_vae(config, vae: torch.nn.Module | None = None, sample: Callable[[int, int], Tensor] | None = None,
              stats_samples: int = 2048) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train a toy VAE (L2 reconstruction, `reconstruction_loss`, + `vae_kl_weight`·KL); returns it
    (eval mode) and its latent statistics.

    Args:
        config: a pretraining config with `seed`, `vae_steps`, `vae_batch`, `vae_lr`, `vae_kl_weight`
            and `vae_foreground_weight` (0: plain L2).
        vae: the untrained VAE (default: the image world's AutoencoderKL of `config.size`).
        sample: `sample(n, seed)` → n fresh renders in the VAE's input layout, in [0, 1] (default:
            jittered shapes-world images [n, 3, H, W]; the video script passes clips [n, 3, F, H, W]).
        stats_samples: fresh renders the latent statistics are measured on.
    """
    vae = (vae if vae is not None else build_vae(config.size, config.seed)).train()
    sample = sample if sample is not None else _image_sampler(config.size.image_size)
    generator = torch.Generator().manual_seed(config.seed)

    def loss_fn(step: int) -> Tensor:
        pixels = sample(config.vae_batch, config.seed * 100_003 + step)  # [0, 1]
        x = pixels * 2 - 1  # [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return reconstruction_loss(recon, x, pixels, config.vae_foreground_weight) + config.vae_kl_weight * posterior.kl().mean()

    losses = _fit("vae", vae.parameters(), loss_fn, config.vae_steps, config.vae_lr)
    vae.eval()
    stats = latent_statistics(vae, sample(stats_samples, config.seed + 7))
    stats["final_loss"] = losses[-1] if losses else float("nan")
    return vae, stats


def finetune_decoder(config, vae: torch.nn.Module, sample: Callable[[int, int], Tensor], steps: int, lr: float) -> list[float]:
    """Train only the VAE's decoder (`post_quant_conv` and `decoder`) on fresh renders; the encoder is frozen.

    Why a separate stage: every denoiser trained on this VAE learned the ENCODER's latents, so a
    better decoder must leave the encoder bit for bit as it is; then the trained transformers stay
    valid and what they generate simply decodes sharper. The loss is `train_vae`'s reconstruction
    term (`reconstruction_loss` with `vae_foreground_weight`) on posterior samples; the KL term
    depends only on the encoder and is dropped. Returns the per-step losses; `vae` is left in eval mode.

    Args:
        config: supplies `seed`, `vae_batch` and `vae_foreground_weight`.
        sample: `sample(n, seed)` → n renders in the VAE's input layout in [0, 1] (as for `train_vae`);
            seeds are offset from `train_vae`'s, so the stage sees renders the VAE was not trained on.
        steps, lr: AdamW steps (warm-up and cosine decay, `_fit`) and peak learning rate.
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"decoder fine-tuning needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    trainable = ("decoder.", "post_quant_conv.")
    params = [q for name, q in vae.named_parameters() if name.startswith(trainable)]
    if not params:
        raise ValueError(f"{type(vae).__name__} has no decoder / post_quant_conv parameters to fine-tune")
    flags = {name: q.requires_grad for name, q in vae.named_parameters()}
    for name, q in vae.named_parameters():
        q.requires_grad_(name.startswith(trainable))
    vae.eval()  # the encoder's behaviour is fixed; the toy VAEs have no dropout or batch norm either way
    generator = torch.Generator().manual_seed(config.seed)  # posterior samples

    def loss_fn(step: int) -> Tensor:
        pixels = sample(config.vae_batch, config.seed * 100_003 + 7_000_003 + step)  # [0, 1]
        x = pixels * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator)
        return reconstruction_loss(vae.decode(z).sample, x, pixels, config.vae_foreground_weight)

    losses = _fit("vae decoder", params, loss_fn, steps, lr)
    for name, q in vae.named_parameters():
        q.requires_grad_(flags[name])
    return losses


def lit_pixels(pixels: Tensor, channel_dim: int) -> Tensor:
    """Float mask, 1 where any channel of a clean render in [0, 1] exceeds 0.1 (the shape; the shapes
    world draws on black), the channel axis kept at size 1: the foreground both weighted losses use."""
    return (pixels.amax(dim=channel_dim, keepdim=True) > 0.1).float()


def reconstruction_loss(recon: Tensor, x: Tensor, pixels: Tensor, foreground_weight: float = 0.0) -> Tensor:
    """Weighted squared error  mean(w · (x̂ − x)²),  w = 1 + foreground_weight · [pixel is lit].

    A pixel is lit (foreground) when any channel of the clean render exceeds 0.1: the shapes
    world draws on black, so the shape is a few percent of the pixels and plain L2 lets a VAE blur
    it (and fade its colour) at little cost. Weighting the shape's pixels makes colour and outline,
    what the verifiers read, the main term. foreground_weight = 0 is plain L2.
    pixels: the clean renders in [0, 1], channels on axis 1 (images [N, 3, H, W] or clips [N, 3, F, H, W]).
    """
    squared = (recon - x).square()
    if foreground_weight == 0:
        return squared.mean()
    lit = lit_pixels(pixels, channel_dim=1).to(squared.dtype)  # [N, 1, ...]
    return (squared * (1 + foreground_weight * lit)).mean()


def _image_sampler(image_size: int) -> Callable[[int, int], Tensor]:
    """`sample(n, seed)` → n jittered shapes-world renders [n, 3, H, W] over all 48 combinations."""
    return lambda n, seed: sample_captioned_images(n, size=image_size, seed=seed)[0]


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, pixels: Tensor) -> dict[str, float]:
    """Mean and std of the VAE's latent means over `pixels` (in [0, 1], the VAE's input layout):
    shift and 1/scale of the latents."""
    z = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mode() for chunk in pixels.split(256)])
    return {"mean": float(z.mean()), "std": float(z.std())}


# ----------------------------------------------------------------------------- pipelines

def save_pipeline(family: str, folder: Path, vae, config: PretrainConfig, stats: dict[str, float]) -> None:
    """Write a full pipeline (denoiser at its random initialisation) in the diffusers layout."""
    from diffusers import FluxPipeline, StableDiffusionPipeline

    size, seed = config.size, config.seed
    clip_tok, t5_tok = build_tokenizers()
    clip = build_clip_text_encoder(clip_tok, size, seed + 1)
    if family == "flux":
        vae.register_to_config(scaling_factor=1 / stats["std"], shift_factor=stats["mean"])
        pipeline = FluxPipeline(
            scheduler=build_flux_scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
            text_encoder_2=build_t5_encoder(t5_tok, size, seed + 2), tokenizer_2=t5_tok,
            transformer=build_flux_transformer(size, seed + 3),
        )
    else:
        # SD's pipeline scales latents without a shift: z·scale, with the std of un-shifted latents.
        scale = 1 / math.sqrt(stats["std"] ** 2 + stats["mean"] ** 2)
        vae.register_to_config(scaling_factor=scale, shift_factor=None)
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=clip, tokenizer=clip_tok, unet=build_unet(size, seed + 4),
            scheduler=build_ddim_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if folder.exists():
        shutil.rmtree(folder)
    pipeline.save_pretrained(folder)


TOY_POLICIES = {
    "flux": ("flux", {"max_sequence_length": TEXT_MAX_LENGTH}),
    "sd": ("sd", {}),
}
"""Per toy family: its entry in the family registry (lightning_grpo.policies.registry) and its extra arguments."""

CFG_DROPOUT = {"flux": 0.0, "sd": 0.1}
"""Share of empty prompts in the denoiser training (SD: so CFG is usable; FLUX has no CFG)."""


def load_policy(family: str, folder: Path, image_size: int):
    """The policy adapter of `family` on the pipeline in `folder` (the code GRPO uses)."""
    from lightning_grpo.policies.registry import FAMILIES

    name, kwargs = TOY_POLICIES[family]
    return FAMILIES[name].policy_type()(folder, height=image_size, width=image_size, **kwargs)


@torch.no_grad()
def encode_training_set(policy, config: PretrainConfig) -> tuple[Tensor, list[str]]:
    """Jittered renders of all combinations encoded once to scaled latents by the policy's
    `encode_pixels` (the inverse of its decode): (latents [N, *L], prompts)."""
    pixels, prompts = sample_captioned_images(config.dataset_size, size=config.size.image_size, seed=config.seed + 11)
    prompts = noisy_captions(prompts, config.caption_noise, seed=config.seed + 12)
    return torch.cat([policy.encode_pixels(chunk) for chunk in pixels.split(512)]), prompts


def noisy_captions(prompts: list[str], noise: float, seed: int) -> list[str]:
    """Re-describe each prompt's scene with each attribute replaced by a random value w.p. `noise`."""
    return noisy_descriptions(prompts, noise, seed, parse_prompt, (len(COLOUR_NAMES), len(SHAPES), len(POSITIONS)),
                              len(TEMPLATES), lambda indices, template: describe(Scene.from_indices(*indices), template))


def _prompt_table(policy, prompts: list[str]) -> tuple[dict, list[int]]:
    """Encode each distinct prompt once: (condition of the distinct prompts, index per sample)."""
    distinct = sorted(set(prompts))
    index = {p: i for i, p in enumerate(distinct)}
    return policy.encode_prompts(distinct), [index[p] for p in prompts]


def _per_sample_table(policy, prompts: list[str], images: Tensor, chunk: int = 512) -> tuple[dict, list[int]]:
    """Image-conditioned policies: encode every (prompt, first frame) pair once, in chunks:
    (condition of every sample, index per sample = its own row)."""
    parts = [policy.encode_prompts(prompts[i : i + chunk], images=images[i : i + chunk]) for i in range(0, len(prompts), chunk)]
    table = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return table, list(range(len(prompts)))


def train_denoiser(policy, family: str, config, data: tuple | None = None, steps: int | None = None,
                   weights: Tensor | None = None) -> list[float]:
    """Train the adapter's denoiser on the encoded training set (see the module doc for the losses).

    Args:
        data: (latents [N, *L], captions, first frames [N, 3, H, W] or None) to train on; default the
            image world's (`encode_training_set`). With first frames (image-to-video), each sample's
            condition is its own (prompt, image) pair, encoded once by the policy.
        steps: optimizer steps (default `config.flux_steps` / `config.sd_steps` by family).
        weights: per-element loss weights broadcastable to the latents [N, *L]
            (`pretrain_video.latent_foreground_weights`); None: the plain mean.
    """
    latents, prompts, images = data if data is not None else (*encode_training_set(policy, config), None)
    if weights is not None and (weights.ndim != latents.ndim or weights.shape[0] != len(latents)):
        raise ValueError(f"denoiser loss weights {tuple(weights.shape)} do not match the latents {tuple(latents.shape)}")
    if not config.denoiser_sigma_shift > 0:
        raise ValueError(f"denoiser_sigma_shift must be > 0, got {config.denoiser_sigma_shift}")
    dropout = CFG_DROPOUT.get(family, 0.0)
    if images is not None:
        table, sample_index = _per_sample_table(policy, prompts, images)
    else:
        table, sample_index = _prompt_table(policy, prompts + ([""] if dropout else []))
    sample_index = torch.tensor(sample_index)
    empty_index = sample_index[-1] if dropout else None
    sample_index = sample_index[: len(prompts)]
    denoiser = policy.denoiser
    denoiser.train()
    generator = torch.Generator().manual_seed(config.seed + 13)
    if policy.paradigm == "flow":
        loss = functools.partial(_flow_loss, sigma_shift=config.denoiser_sigma_shift)
    else:
        loss = _v_prediction_loss(policy.make_scheduler().alphas_cumprod)

    def loss_fn(step: int) -> Tensor:
        rows = torch.randint(len(latents), (config.denoiser_batch,), generator=generator)
        noise = torch.randn(latents[rows].shape, generator=generator)
        weight = None if weights is None else weights[rows]
        return loss(policy, latents[rows], noise, sample_index[rows], table, generator, dropout, empty_index, weight)

    if steps is None:
        steps = config.flux_steps if family == "flux" else config.sd_steps
    losses = _fit(f"{family} denoiser", [p for p in denoiser.parameters() if p.requires_grad], loss_fn, steps,
                  config.denoiser_lr)
    denoiser.eval()
    return losses


def _flow_loss(policy, z: Tensor, noise: Tensor, ids: Tensor, table: dict, generator, dropout: float, empty_index,
               weight: Tensor | None = None, sigma_shift: float = 1.0) -> Tensor:
    """Rectified flow: x_σ = (1 − σ)·z + σ·ε, loss mean(w·|v_θ(x_σ, σ) − (ε − z)|²), w = `weight` (1 when None),
    σ = s·u / (1 + (s − 1)·u) with u ~ logit-normal(0, 1) and s = `sigma_shift`: the timestep shift of
    SD3 (Esser et al. 2024), the map FlowMatchEulerDiscreteScheduler applies to its sigmas with `shift`,
    here applied to the training noise. It moves the loss to high noise, where the prompt, not the
    latent, decides what is drawn. s = 1: u itself. (Hand-written: diffusers' training utility
    `compute_density_for_timestep_sampling` draws u but does not shift it.)"""
    u = torch.sigmoid(torch.randn(len(z), generator=generator))  # logit-normal(0, 1)
    sigma = sigma_shift * u / (1 + (sigma_shift - 1) * u)  # exactly u at s = 1
    s = sigma.view(-1, *([1] * (z.ndim - 1)))
    x = (1 - s) * z + s * noise
    condition = {k: v[ids] for k, v in table.items()}
    return _weighted_mean((policy.predict(x, sigma * 1000, condition) - (noise - z)).square(), weight)


def _weighted_mean(squared: Tensor, weight: Tensor | None) -> Tensor:
    """mean(w · e²) over every element (the plain mean when `weight` is None), w broadcast to e²."""
    return squared.mean() if weight is None else (squared * weight).mean()


def _v_prediction_loss(alphas_cumprod: Tensor):
    """v-prediction DDPM: x_t = √ᾱ_t·z + √(1 − ᾱ_t)·ε, loss mean(w·|v_θ(x_t, t) − (√ᾱ_t·ε − √(1 − ᾱ_t)·z)|²),
    t ~ U{0..999}; a `dropout` share of empty prompts (ᾱ from the checkpoint's own scheduler)."""

    def loss(policy, z: Tensor, noise: Tensor, ids: Tensor, table: dict, generator, dropout: float, empty_index,
             weight: Tensor | None = None) -> Tensor:
        t = torch.randint(0, len(alphas_cumprod), (len(z),), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x = a.sqrt() * z + (1 - a).sqrt() * noise
        drop = torch.rand(len(z), generator=generator) < dropout
        condition = {k: v[torch.where(drop, empty_index, ids)] for k, v in table.items()}
        target = a.sqrt() * noise - (1 - a).sqrt() * z  # v = √ᾱ·ε − √(1−ᾱ)·z (the scheduler's v-prediction)
        return _weighted_mean((policy.predict(x, t, condition) - target).square(), weight)

    return loss


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_accuracy(policy, num_steps: int, samples_per_prompt: int, seed: int = 1234) -> dict[str, float]:
    """Exact-match and per-attribute accuracy of ODE samples on the held-out prompts, with the
    family's own deterministic sampler (the pipeline's schedule)."""
    from lightning_grpo.rollout import ode_sample
    from lightning_grpo.worlds.shapes.verifier import attribute_correctness

    sampler = policy.build_sampler(num_steps, eta=0.0)
    prompts = [p for p in heldout_prompts() for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    correct = []
    for start in range(0, len(prompts), 64):
        chunk = prompts[start : start + 64]
        pixels = policy.decode(ode_sample(policy, sampler, chunk, generator))
        correct.append(attribute_correctness(pixels, chunk))
    table = torch.cat(correct).float()  # [N, 3] colour, shape, position
    return {
        "exact_match": float(table.all(1).float().mean()),
        "colour": float(table[:, 0].mean()),
        "shape": float(table[:, 1].mean()),
        "position": float(table[:, 2].mean()),
        "samples": len(prompts),
    }


# ----------------------------------------------------------------------------- driver

def _save_denoiser_fp16(policy, folder: Path) -> None:
    """Overwrite the saved denoiser with the trained weights, stored in fp16 (half the bytes)."""
    save_module_fp16(policy.denoiser, folder / policy.denoiser_name)


def save_module_fp16(module: torch.nn.Module, path: Path) -> None:
    """`module.save_pretrained(path)` with fp16 weights (half the bytes); the module stays float32."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "cast with to()" advice is about inference, not storage
    try:
        module.to(torch.float16).save_pretrained(path)
        module.to(torch.float32)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def pretrain(families: tuple[str, ...], out: Path, config: PretrainConfig) -> dict[str, dict]:
    """Build, train, save and evaluate the toy pipelines of `families` under `out/<family>`."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    vae, stats = train_vae(config)
    print(f"vae: latent mean {stats['mean']:.4f}, std {stats['std']:.4f}, final loss {stats['final_loss']:.5f}")
    reports = {}
    for family in families:
        family_start = time.perf_counter()
        folder = out / family
        save_pipeline(family, folder, build_vae(config.size, config.seed).eval(), config, stats)
        _copy_vae_weights(vae, folder)
        policy = load_policy(family, folder, config.size.image_size)
        losses = train_denoiser(policy, family, config)
        _save_denoiser_fp16(policy, folder)
        policy = load_policy(family, folder, config.size.image_size)  # evaluate what ships
        accuracy = heldout_accuracy(policy, config.eval_steps, config.eval_samples_per_prompt)
        reports[family] = {
            "heldout": accuracy,
            "final_loss": tail_mean(losses),
            "vae": stats,
            "seconds": round(time.perf_counter() - family_start, 1),
            "total_seconds_so_far": round(time.perf_counter() - started, 1),
            "config": asdict(config),
            "torch": torch.__version__,
        }
        (folder / "pretrain_report.json").write_text(json.dumps(reports[family], indent=2) + "\n")
        print(f"{family}: held-out exact match {accuracy['exact_match']:.1%} "
              f"(colour {accuracy['colour']:.1%}, shape {accuracy['shape']:.1%}, position {accuracy['position']:.1%}, "
              f"{accuracy['samples']} samples) -> {folder}")
    return reports


def _copy_vae_weights(vae, folder: Path) -> None:
    """Put the trained VAE weights into the saved pipeline, keeping that pipeline's VAE config."""
    from diffusers import AutoencoderKL

    saved = AutoencoderKL.from_pretrained(folder / "vae")
    saved.load_state_dict(vae.state_dict())
    saved.save_pretrained(folder / "vae")


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m lightning_grpo.worlds.shapes.pretrain [--family flux|sd|all] [--out DIR]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all", help="which pipeline(s) to build")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder receiving <family>/ pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduced", action="store_true", help="tiny widths and a few steps (for tests)")
    parser.add_argument("--vae-steps", type=int, default=None)
    parser.add_argument("--flux-steps", type=int, default=None)
    parser.add_argument("--sd-steps", type=int, default=None)
    args = parser.parse_args(argv)
    config = PretrainConfig.reduced() if args.reduced else PretrainConfig()
    config.seed = args.seed
    for key in ("vae_steps", "flux_steps", "sd_steps"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    families = FAMILIES if args.family == "all" else (args.family,)
    pretrain(families, args.out, config)


if __name__ == "__main__":
    main()
