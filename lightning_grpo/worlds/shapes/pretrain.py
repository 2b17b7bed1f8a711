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

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lightning_grpo.worlds.components import ToySize, TEXT_MAX_LENGTH, build_clip_text_encoder, build_ddim_scheduler
from lightning_grpo.worlds.components import build_flux_scheduler, build_flux_transformer, build_t5_encoder
from lightning_grpo.worlds.components import build_tokenizers, build_unet, build_vae
from lightning_grpo.worlds.base import noisy_descriptions
from lightning_grpo.worlds.pretraining import ToyPretrainConfig, command_line, save_denoiser_fp16, train_denoiser, train_vae, write_report
from lightning_grpo.worlds.shapes.dataset import sample_captioned_images
from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe, heldout_prompts, parse_prompt
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, POSITIONS, SHAPES, Scene

FAMILIES = ("flux", "sd")
DEFAULT_OUT = Path(__file__).parent / "pretrained"


@dataclass
class PretrainConfig(ToyPretrainConfig):
    """Everything that determines the shipped image pipelines (recorded in pretrain_report.json):
    the shared `ToyPretrainConfig` fields (the shipped image VAEs were trained with plain L2,
    `vae_foreground_weight` 0), the component sizes and each family's denoiser steps."""

    size: ToySize = field(default_factory=ToySize)
    flux_steps: int = 2000
    sd_steps: int = 1500

    @classmethod
    def reduced(cls) -> PretrainConfig:
        """A few seconds' worth, for the CI test of this script."""
        return cls(size=ToySize.reduced(), vae_steps=4, vae_batch=8, flux_steps=4, sd_steps=4, denoiser_batch=8,
                   dataset_size=64, eval_steps=2, eval_samples_per_prompt=1)


# ----------------------------------------------------------------------------- VAE

def _image_sampler(image_size: int) -> Callable[[int, int], Tensor]:
    """`sample(n, seed)` → n jittered shapes-world renders [n, 3, H, W] over all 48 combinations."""
    return lambda n, seed: sample_captioned_images(n, size=image_size, seed=seed)[0]


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

def pretrain(families: tuple[str, ...], out: Path, config: PretrainConfig) -> dict[str, dict]:
    """Build, train, save and evaluate the toy pipelines of `families` under `out/<family>`."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    vae, stats = train_vae(config, build_vae(config.size, config.seed), _image_sampler(config.size.image_size))
    print(f"vae: latent mean {stats['mean']:.4f}, std {stats['std']:.4f}, final loss {stats['final_loss']:.5f}")
    reports = {}
    for family in families:
        family_start = time.perf_counter()
        folder = out / family
        save_pipeline(family, folder, build_vae(config.size, config.seed).eval(), config, stats)
        _copy_vae_weights(vae, folder)
        policy = load_policy(family, folder, config.size.image_size)
        steps = config.flux_steps if family == "flux" else config.sd_steps
        losses = train_denoiser(policy, family, config, (*encode_training_set(policy, config), None), steps,
                                dropout=CFG_DROPOUT[family])
        save_denoiser_fp16(policy, folder)
        policy = load_policy(family, folder, config.size.image_size)  # evaluate what ships
        accuracy = heldout_accuracy(policy, config.eval_steps, config.eval_samples_per_prompt)
        reports[family] = write_report(folder, config, accuracy, losses, stats, started, family_start)
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
    args, config, families = command_line(__doc__.split("\n\n")[0], FAMILIES, DEFAULT_OUT, PretrainConfig, PretrainConfig.reduced,
                                          {"vae_steps": int, "flux_steps": int, "sd_steps": int}, argv)
    pretrain(families, args.out, config)


if __name__ == "__main__":
    main()
