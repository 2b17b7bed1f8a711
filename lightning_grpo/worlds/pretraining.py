"""The training machinery every world's toy pipelines are pretrained with: AdamW with warm-up and
cosine decay, the VAE (and decoder-only) stage, the denoiser stage through the policy adapter
(rectified flow or v-prediction DDPM), fp16 storage, the report each script writes beside the
weights, and the command line the scripts share.

The world scripts (`python -m lightning_grpo.worlds.shapes.pretrain`, `... .shapes.pretrain_clip`,
`python -m lightning_grpo.worlds.moving_shapes.pretrain`) supply what they train on: renders and
captions of their world, their pipelines' components (`lightning_grpo.worlds.components`) and how
they judge the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm


@dataclass
class ToyPretrainConfig:
    """What every toy pretraining sets (each script's config adds its own and may change the
    defaults; the whole config is recorded in pretrain_report.json)."""

    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_foreground_weight: float = 0.0  # the shape's pixels weigh 1 + this in the VAE loss (`reconstruction_loss`)
    denoiser_batch: int = 64
    denoiser_lr: float = 1e-3
    denoiser_sigma_shift: float = 1.0  # rectified flow: σ ~ logit-normal(0, 1) then shifted (`_flow_loss`); 1: unshifted
    dataset_size: int = 20_000
    caption_noise: float | tuple[float, float, float] = 0.35  # each caption attribute replaced w.p. this (or per attribute)
    eval_steps: int = 8
    eval_samples_per_prompt: int = 4


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up ((step + 1) / warmup) then cosine decay to 0 at `steps`: the schedule of every
    toy pretraining (pipelines here, CLIP in `pretrain_clip`)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(name: str, params, loss_fn, steps: int, lr: float) -> list[float]:
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


def train_vae(config, vae: torch.nn.Module, sample: Callable[[int, int], Tensor],
              stats_samples: int = 2048) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train a toy VAE (L2 reconstruction, `reconstruction_loss`, + `vae_kl_weight`·KL); returns it
    (eval mode) and its latent statistics.

    Args:
        config: a pretraining config with `seed`, `vae_steps`, `vae_batch`, `vae_lr`, `vae_kl_weight`
            and `vae_foreground_weight` (0: plain L2).
        vae: the untrained VAE (the image world's AutoencoderKL, the video world's causal 3D one).
        sample: `sample(n, seed)` → n fresh renders in the VAE's input layout, in [0, 1] (images
            [n, 3, H, W] or clips [n, 3, F, H, W]).
        stats_samples: fresh renders the latent statistics are measured on.
    """
    vae = vae.train()
    generator = torch.Generator().manual_seed(config.seed)

    def loss_fn(step: int) -> Tensor:
        pixels = sample(config.vae_batch, config.seed * 100_003 + step)  # [0, 1]
        x = pixels * 2 - 1  # [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return reconstruction_loss(recon, x, pixels, config.vae_foreground_weight) + config.vae_kl_weight * posterior.kl().mean()

    losses = fit("vae", vae.parameters(), loss_fn, config.vae_steps, config.vae_lr)
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
        steps, lr: AdamW steps (warm-up and cosine decay, `fit`) and peak learning rate.
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

    losses = fit("vae decoder", params, loss_fn, steps, lr)
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


@torch.no_grad()
def latent_statistics(vae: torch.nn.Module, pixels: Tensor) -> dict[str, float]:
    """Mean and std of the VAE's latent means over `pixels` (in [0, 1], the VAE's input layout):
    shift and 1/scale of the latents."""
    z = torch.cat([vae.encode(chunk * 2 - 1).latent_dist.mode() for chunk in pixels.split(256)])
    return {"mean": float(z.mean()), "std": float(z.std())}


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


def train_denoiser(policy, family: str, config, data: tuple, steps: int, weights: Tensor | None = None,
                   dropout: float = 0.0) -> list[float]:
    """Train the adapter's denoiser on the encoded training set (see the module doc for the losses).

    Args:
        family: the toy family's name (the progress bar's).
        config: supplies `seed`, `denoiser_batch`, `denoiser_lr` and `denoiser_sigma_shift`.
        data: (latents [N, *L], captions, first frames [N, 3, H, W] or None) to train on. With first
            frames (image-to-video), each sample's condition is its own (prompt, image) pair,
            encoded once by the policy.
        steps: optimizer steps.
        weights: per-element loss weights broadcastable to the latents [N, *L]
            (`lightning_grpo.worlds.moving_shapes.pretrain.latent_foreground_weights`); None: the plain mean.
        dropout: share of empty prompts (classifier-free guidance training; v-prediction only).
    """
    latents, prompts, images = data
    if weights is not None and (weights.ndim != latents.ndim or weights.shape[0] != len(latents)):
        raise ValueError(f"denoiser loss weights {tuple(weights.shape)} do not match the latents {tuple(latents.shape)}")
    if not config.denoiser_sigma_shift > 0:
        raise ValueError(f"denoiser_sigma_shift must be > 0, got {config.denoiser_sigma_shift}")
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

    losses = fit(f"{family} denoiser", [p for p in denoiser.parameters() if p.requires_grad], loss_fn, steps,
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


def save_denoiser_fp16(policy, folder: Path) -> None:
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


def write_report(folder: Path, config: Any, heldout: dict, losses: list[float], vae: dict, started: float,
                 family_started: float, **extra: Any) -> dict:
    """Write `folder/pretrain_report.json` (the held-out accuracy of what ships, the denoiser's final
    loss, the VAE's statistics, `extra` entries, the times, the whole config and the torch
    version) and return it."""
    now = time.perf_counter()
    report = {"heldout": heldout, "final_loss": tail_mean(losses), "vae": vae, **extra,
              "seconds": round(now - family_started, 1), "total_seconds_so_far": round(now - started, 1),
              "config": asdict(config), "torch": torch.__version__}
    (folder / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def command_line(description: str, families: tuple[str, ...], default_out: Path, default: Callable[[], Any],
                 reduced: Callable[[], Any], overrides: dict[str, Callable[[str], Any]], argv: list[str] | None,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[argparse.Namespace, Any, tuple[str, ...]]:
    """The command line of a pretraining script: `--family` (one of `families` or all), `--out`,
    `--seed`, `--reduced` (tiny widths and a few steps, for tests) and one `--<key>` per config
    field in `overrides` (its parser); returns (arguments, the config with them applied, families)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--family", choices=(*families, "all"), default="all", help="which pipeline(s) to build")
    parser.add_argument("--out", type=Path, default=default_out, help="folder receiving <family>/ pipelines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduced", action="store_true", help="tiny widths and a few steps (for tests)")
    if add_arguments is not None:
        add_arguments(parser)
    for key, kind in overrides.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None, help=f"the config's {key}")
    args = parser.parse_args(argv)
    config = reduced() if args.reduced else default()
    config.seed = args.seed
    for key in overrides:
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    return args, config, families if args.family == "all" else (args.family,)
