"""Pretrain the toy HunyuanVideo (text-to-video) and toy SkyReels-V1 (image-to-video) pipelines on the
moving-shapes world, from scratch.

    python -m lightning_grpo.worlds.moving_shapes.pretrain --family all --out lightning_grpo/worlds/moving_shapes/pretrained

The recipe of the image toys (`lightning_grpo.worlds.shapes.pretrain`; both run the VAE and denoiser
training loops of `lightning_grpo.worlds.pretraining`), on clips [N, F, 3, H, W] of `lightning_grpo.worlds.moving_shapes`; seeded end to end:

1. VAE: an AutoencoderKLHunyuanVideo (causal 3D convolutions, ×4 in space and time) is trained to
   reconstruct jittered clips of all 48 combinations; its `scaling_factor` is then set from the
   latent statistics. The HunyuanVideo pipelines scale without a shift (z·scale), so
   scale = 1/√(std² + mean²), as for SD. Optionally (`vae_decoder_steps`, also on a VAE reused
   with `--vae-from`) the decoder is then fine-tuned alone, the encoder frozen
   (`pretraining.finetune_decoder`): the latents stay those earlier transformers learned.
2. Text encoders: a LlamaModel (the pipelines read its third-last hidden state under their own
   Llama-3 chat template) and a CLIPTextModel (pooled), with word-level tokenizers, left at their
   seeded random initialisation and frozen, like the frozen encoders of the real pipelines.
3. Text-to-video: a `HunyuanVideoPipeline` is saved, LOADED BACK THROUGH THE POLICY ADAPTER, and its
   transformer trained through the family layer (clips encoded by the adapter's `encode_pixels`,
   captions by its `encode_prompts`, the loss on its `predict`): rectified flow,
       x_σ = (1 − σ)·z + σ·ε,  loss = |v_θ(x_σ, σ) − (ε − z)|²,  σ ~ logit-normal(0, 1),
   on NOISY captions (each attribute replaced by a random value with probability `caption_noise`,
   `lightning_grpo.worlds.moving_shapes.noisy_motion_captions`; one rate or (colour, shape, direction)
   rates), so the model follows its prompt only part of the time: what GRPO is for. The clips are
   encoded once and shared by both families.
4. Image-to-video: a `HunyuanSkyreelsImageToVideoPipeline` on the same VAE and text encoders, whose
   transformer takes 2C input channels (the noisy latent, then the first frame's latent padded
   with zeros over time). It starts from the text-to-video transformer (the image channels of the
   patch embedding start at zero, so it starts as the T2V model that ignores the image) and is
   trained with the same loss, each clip conditioned on its caption and its own first frame
   (through the adapter's `encode_prompts(prompts, images)`). Its captions are noisier
   (`i2v_caption_noise`): the first frame fixes colour and shape, so what the image-to-video model
   gets wrong is the motion, and an accurate direction from 35% noise would leave little to learn.
5. The transformers, VAE and text encoders are saved in fp16 (size budget) and the saved folders evaluated on the
   held-out prompts with ODE sampling and the pixel verifiers; `pretrain_report.json` records it.

The number of steps is chosen so the base models are competent but far from perfect (held-out
exact match / motion accuracy between 15% and 60%).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lightning_grpo.worlds.components import CLIP_VIDEO_MAX_LENGTH, VIDEO_TEXT_MAX_LENGTH, VideoToySize
from lightning_grpo.worlds.components import build_clip_text_encoder, build_llama_encoder, build_video_scheduler
from lightning_grpo.worlds.components import build_video_tokenizers, build_video_transformer, build_video_vae
from lightning_grpo.worlds.pretraining import ToyPretrainConfig, command_line, finetune_decoder, lit_pixels, save_denoiser_fp16
from lightning_grpo.worlds.pretraining import save_module_fp16, tail_mean, train_denoiser, train_vae, write_report

FAMILIES = ("hunyuan_video", "skyreels")
DEFAULT_OUT = Path(__file__).parent / "pretrained"

TOY_POLICIES = {
    "hunyuan_video": ("hunyuan_video", "HunyuanVideoPipeline"),
    "skyreels": ("skyreels_i2v", "HunyuanSkyreelsImageToVideoPipeline"),
}
"""Per toy family: its entry in the family registry (lightning_grpo.policies.registry), the diffusers pipeline class."""


@dataclass
class VideoPretrainConfig(ToyPretrainConfig):
    """Everything that determines the shipped video pipelines (recorded in pretrain_report.json): the
    shared `ToyPretrainConfig` fields at the video defaults, and the video stages' own."""

    size: VideoToySize = field(default_factory=VideoToySize)
    vae_steps: int = 800
    vae_batch: int = 16
    vae_foreground_weight: float = 4.0  # the shape's pixels weigh 1 + this in the VAE loss (`reconstruction_loss`)
    vae_decoder_steps: int = 0  # then the decoder alone, encoder frozen (`finetune_decoder`): latents unchanged
    vae_decoder_lr: float = 5e-4
    t2v_steps: int = 3000
    i2v_steps: int = 500
    denoiser_batch: int = 32
    denoiser_foreground_weight: float = 0.0  # latent cells that see the shape weigh 1 + this (`latent_foreground_weights`)
    dataset_size: int = 4000
    # text-to-video: each attribute of a caption replaced w.p. 0.3, or (colour, shape, direction) rates
    caption_noise: float | tuple[float, float, float] = 0.3
    i2v_caption_noise: float = 0.6  # image-to-video: the frame fixes colour and shape, so motion is what varies
    scheduler_shift: float = 1.5
    guidance: float = 6.0  # the distilled guidance the transformer is trained at (HunyuanVideoPipeline's default)

    @classmethod
    def reduced(cls) -> VideoPretrainConfig:
        """A few seconds' worth, for the CI test of this script."""
        return cls(size=VideoToySize.reduced(), vae_steps=2, vae_batch=2, t2v_steps=2, i2v_steps=2, denoiser_batch=4,
                   dataset_size=16, eval_steps=2, eval_samples_per_prompt=1)


# ----------------------------------------------------------------------------- data

def clip_sampler(size: VideoToySize):
    """`sample(n, seed)` → n jittered clips of all combinations in the VAE layout [n, 3, F, H, W]."""
    from lightning_grpo.worlds.moving_shapes import sample_captioned_clips

    return lambda n, seed: sample_captioned_clips(n, frames=size.frames, size=size.image_size, seed=seed)[0].transpose(1, 2)


@torch.no_grad()
def encode_clip_set(policy, config: VideoPretrainConfig, chunk: int = 256) -> tuple[Tensor, list[str], Tensor, Tensor | None]:
    """Jittered clips of all combinations encoded once by the policy's `encode_pixels` (the inverse
    of its decode), their true captions, first frames and denoiser loss weights: (latents [N, *L],
    prompts, frames [N, 3, H, W], `latent_foreground_weights` [N, 1, T', H', W'] or None when
    `denoiser_foreground_weight` is 0). Both families share the VAE, so one encoding serves both."""
    from lightning_grpo.worlds.moving_shapes import sample_captioned_clips

    size = config.size
    clips, prompts = sample_captioned_clips(config.dataset_size, frames=size.frames, size=size.image_size, seed=config.seed + 11)
    latents = torch.cat([policy.encode_pixels(part) for part in clips.split(chunk)])
    weights = None
    if config.denoiser_foreground_weight:
        weights = latent_foreground_weights(clips, tuple(latents.shape), config.denoiser_foreground_weight)
    return latents, prompts, clips[:, 0].contiguous(), weights


def latent_foreground_weights(clips: Tensor, latent_shape: tuple[int, ...], foreground_weight: float) -> Tensor:
    """Denoiser loss weights on the latent grid, 1 + foreground_weight · [the latent cell sees the shape]:
    Tensor[N, 1, T', H', W'] for clips [N, F, 3, H, W] and latents [N, C, T', H', W'].

    The shape covers a few percent of a clip, so plain L2 on the latents spends the denoiser on the
    empty background; this is `pretraining.reconstruction_loss`'s weighting carried to the latent grid.
    A pixel is lit as in `pretraining.lit_pixels`; a latent cell is lit when any pixel it encodes is:
    HunyuanVideo's causal VAE puts frame 0 alone in latent frame 0 and frames 4k−3 … 4k in latent
    frame k (temporal ratio (F − 1)/(T' − 1)), each latent cell covering H/H' × W/W' pixels.
    """
    n, frames, _, height, width = clips.shape
    t_lat, h_lat, w_lat = latent_shape[-3:]
    lit = lit_pixels(clips, channel_dim=2).squeeze(2)  # [N, F, H, W]
    if (frames - 1) % max(1, t_lat - 1) or height % h_lat or width % w_lat:
        raise ValueError(f"clips {tuple(clips.shape)} do not tile latents of shape {tuple(latent_shape)}")
    ratio = (frames - 1) // max(1, t_lat - 1)
    rest = lit[:, 1:].reshape(n, t_lat - 1, ratio, height, width).amax(2)  # [N, T'-1, H, W]
    grouped = torch.cat([lit[:, :1], rest], dim=1)  # [N, T', H, W]
    cells = torch.nn.functional.max_pool2d(grouped, kernel_size=(height // h_lat, width // w_lat))  # [N, T', H', W']
    return (1 + foreground_weight * cells).unsqueeze(1)


# ----------------------------------------------------------------------------- pipelines

def save_video_pipeline(family: str, folder: Path, vae, config: VideoPretrainConfig, transformer=None) -> None:
    """Write a full pipeline in the diffusers layout: seeded text encoders, the given (trained) VAE,
    and `transformer` (default: a fresh one at its seeded initialisation)."""
    import diffusers

    size, seed = config.size, config.seed
    llama_tok, clip_tok = build_video_tokenizers()
    if transformer is None:
        transformer = build_video_transformer(size, seed + 3, image_latents=family == "skyreels")
    pipeline = getattr(diffusers, TOY_POLICIES[family][1])(
        text_encoder=build_llama_encoder(llama_tok, size, seed + 1), tokenizer=llama_tok, transformer=transformer,
        vae=vae, scheduler=build_video_scheduler(config.scheduler_shift),
        text_encoder_2=build_clip_text_encoder(clip_tok, size, seed + 2, CLIP_VIDEO_MAX_LENGTH), tokenizer_2=clip_tok,
    )
    if folder.exists():
        shutil.rmtree(folder)
    pipeline.save_pretrained(folder)


def image_to_video_transformer(t2v, size: VideoToySize, seed: int):
    """The SkyReels transformer (2C input channels) initialised from a text-to-video one: every
    weight copied, the patch embedding's image-latent input channels set to zero, so it starts as
    the text-to-video model (which ignores the image)."""
    i2v = build_video_transformer(size, seed, image_latents=True)
    state = {k: v.float() for k, v in t2v.state_dict().items()}
    weight = state["x_embedder.proj.weight"]  # [inner, C, 1, 2, 2]
    state["x_embedder.proj.weight"] = torch.cat([weight, torch.zeros_like(weight)], dim=1)  # [inner, 2C, 1, 2, 2]
    i2v.load_state_dict(state)
    return i2v


def save_frozen_fp16(policy, folder: Path) -> None:
    """Store the frozen components (VAE, text encoders) in fp16, as the denoiser: the size budget
    (at most 6 MB a pipeline). The policies load every component at float32 by default, so only the
    stored bytes change; the saved pipeline is evaluated after this, so the report is what ships."""
    for name in policy.frozen_module_names:
        save_module_fp16(getattr(policy, name), folder / name)


def load_policy(family: str, folder: Path, config: VideoPretrainConfig):
    """The policy adapter of `family` on the pipeline in `folder` (the code GRPO uses)."""
    from lightning_grpo.policies.registry import FAMILIES

    size = config.size
    return FAMILIES[TOY_POLICIES[family][0]].policy_type()(
        str(folder), height=size.image_size, width=size.image_size, num_frames=size.frames,
        max_sequence_length=VIDEO_TEXT_MAX_LENGTH, guidance=config.guidance,
    )


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def heldout_video_accuracy(policy, family: str, num_steps: int, samples_per_prompt: int, seed: int = 1234,
                           batch: int = 64) -> dict[str, float]:
    """Accuracy of ODE samples on the held-out new-combination prompts, with the family's own
    deterministic sampler, judged by the moving-shapes verifier (`judge_clips`): colour, shape
    (right in every frame), motion (the exact motion check: direction and a smooth track) and
    exact match (all of them, stable). Image-to-video clips start from each prompt's first frame
    (`first_frames_for_prompts`, the frames the demos condition on); there, motion accuracy is the
    measure (the frame gives colour and shape)."""
    from lightning_grpo.rollout import ode_sample
    from lightning_grpo.worlds.moving_shapes import motion_heldout_split_prompts
    from lightning_grpo.worlds.moving_shapes.data import first_frames_for_prompts
    from lightning_grpo.worlds.moving_shapes.verifier import judge_clips

    sampler = policy.build_sampler(num_steps, eta=0.0)
    prompts = [p for p in motion_heldout_split_prompts("new_combinations") for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    tables = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        images = first_frames_for_prompts(chunk, size=policy.height) if family == "skyreels" else None
        clips = policy.decode(ode_sample(policy, sampler, chunk, generator, images=images))  # [B, F, 3, H, W]
        judged = judge_clips(clips, chunk)
        tables.append({"colour": judged.colour.all(1), "shape": judged.shape.all(1), "motion": judged.motion_exact().bool(),
                       "exact_match": judged.exact().bool()})
    table = {k: torch.cat([t[k] for t in tables]).float() for k in tables[0]}
    out = {name: float(v.mean()) for name, v in table.items()}
    out["samples"] = len(prompts)
    return out


@torch.no_grad()
def vae_ceiling(vae, config: VideoPretrainConfig, clips: int = 96, seed: int = 999, batch: int = 32) -> dict[str, float]:
    """What the VAE alone lets any generator score: fresh rendered clips (all combinations, true
    captions) encoded (posterior mode) and decoded, judged by `judge_clips`. A perfect generator of
    latents scores at most this, so a base model far below the 15–60% band is first a VAE problem."""
    from lightning_grpo.worlds.moving_shapes import sample_captioned_clips
    from lightning_grpo.worlds.moving_shapes.verifier import judge_clips

    size = config.size
    pixels, prompts = sample_captioned_clips(clips, frames=size.frames, size=size.image_size, seed=seed)  # [N, F, 3, H, W]
    x = pixels.transpose(1, 2) * 2 - 1  # the VAE layout [N, 3, F, H, W] in [-1, 1]
    recon = torch.cat([vae.decode(vae.encode(part).latent_dist.mode()).sample for part in x.split(batch)])
    recon = ((recon + 1) / 2).clamp(0, 1).transpose(1, 2)  # back to [N, F, 3, H, W] in [0, 1]
    judged = judge_clips(recon, prompts)
    return {"exact_match": float(judged.exact().mean()), "motion": float(judged.motion_exact().mean()),
            "colour": float(judged.colour.all(1).float().mean()), "shape": float(judged.shape.all(1).float().mean()),
            "mse": float((recon - pixels).square().mean()), "clips": clips}


# ----------------------------------------------------------------------------- driver

def train_video_vae(config: VideoPretrainConfig):
    """The toy HunyuanVideo VAE trained on clips, with `scaling_factor` set; (vae, latent statistics)."""
    vae, stats = train_vae(config, build_video_vae(config.size, config.seed), clip_sampler(config.size), stats_samples=512)
    vae.register_to_config(scaling_factor=1 / math.sqrt(stats["std"] ** 2 + stats["mean"] ** 2))
    stats["ceiling"] = vae_ceiling(vae, config)
    return vae, stats


def sharpen_decoder(vae, stats: dict, config: VideoPretrainConfig) -> dict:
    """Fine-tune the VAE's decoder alone (`pretraining.finetune_decoder`) and return the latent
    statistics with a `decoder` entry (steps, lr, loss, time, the ceiling before) and the new
    ceiling. The encoder, hence the latents and `scaling_factor`, are unchanged: a transformer
    trained on the earlier VAE works with this one and decodes sharper (the stage-1 VAE rounded
    squares into discs: 57% of reconstructed square clips kept their shape in every frame)."""
    started = time.perf_counter()
    losses = finetune_decoder(config, vae, clip_sampler(config.size), config.vae_decoder_steps, config.vae_decoder_lr)
    decoder = {"steps": config.vae_decoder_steps, "lr": config.vae_decoder_lr, "final_loss": tail_mean(losses),
               "seconds": round(time.perf_counter() - started, 1), "ceiling_before": stats.get("ceiling")}
    return {**stats, "decoder": decoder, "ceiling": vae_ceiling(vae, config)}


def load_vae(folder: Path) -> tuple:
    """A VAE trained by an earlier run (`--vae-from`): (vae, the latent statistics in its report)."""
    from diffusers import AutoencoderKLHunyuanVideo

    report = json.loads((folder.parent / "pretrain_report.json").read_text())
    return AutoencoderKLHunyuanVideo.from_pretrained(folder).eval(), report["vae"]


def pretrain_video(families: tuple[str, ...], out: Path, config: VideoPretrainConfig, vae_from: Path | None = None,
                   init_from: Path | None = None, t2v_init_from: Path | None = None) -> dict[str, dict]:
    """Build, train, save and evaluate the toy video pipelines of `families` under `out/<family>`.

    vae_from: reuse the VAE folder of an earlier run instead of training one (its time is in its report).
    init_from: the text-to-video pipeline to start the image-to-video transformer from (default:
        the one trained in this run, else `out/hunyuan_video`; "none": from its seeded initialisation).
    t2v_init_from: a text-to-video pipeline whose transformer this run's text-to-video training
        continues (a staged recipe: each stage its own steps, learning rate and noise shift;
        default: from the seeded initialisation).
    """
    from diffusers import HunyuanVideoTransformer3DModel

    from lightning_grpo.worlds.moving_shapes import noisy_motion_captions

    torch.manual_seed(config.seed)
    started = time.perf_counter()
    if vae_from is not None:
        vae, stats = load_vae(vae_from)
        stats = {**stats, "from": str(vae_from)}
    else:
        vae, stats = train_video_vae(config)
        stats["seconds"] = round(time.perf_counter() - started, 1)
    if config.vae_decoder_steps:
        stats = sharpen_decoder(vae, stats, config)
    print(f"vae: latent mean {stats['mean']:.4f}, std {stats['std']:.4f}, final loss {stats['final_loss']:.5f}"
          + (f", reconstructions' exact match {stats['ceiling']['exact_match']:.1%}" if "ceiling" in stats else ""))
    reports, clip_set = {}, None
    for family in families:
        family_start = time.perf_counter()
        folder = out / family
        transformer = None
        if family == "hunyuan_video" and t2v_init_from is not None:
            transformer = HunyuanVideoTransformer3DModel.from_pretrained(t2v_init_from / "transformer").float()
        if family == "skyreels" and str(init_from) != "none":
            source = init_from if init_from is not None else out / "hunyuan_video"
            t2v = HunyuanVideoTransformer3DModel.from_pretrained(source / "transformer")
            transformer = image_to_video_transformer(t2v, config.size, config.seed + 3)
        save_video_pipeline(family, folder, vae, config, transformer)
        policy = load_policy(family, folder, config)
        clip_set = clip_set if clip_set is not None else encode_clip_set(policy, config)
        latents, prompts, first_frames, weights = clip_set
        i2v = family == "skyreels"
        noise = config.i2v_caption_noise if i2v else config.caption_noise
        captions = noisy_motion_captions(prompts, noise, seed=config.seed + (14 if i2v else 12))
        steps = config.i2v_steps if i2v else config.t2v_steps
        data = (latents, captions, first_frames if i2v else None)
        losses = train_denoiser(policy, family, config, data=data, steps=steps, weights=weights)
        save_denoiser_fp16(policy, folder)
        save_frozen_fp16(policy, folder)
        policy = load_policy(family, folder, config)  # evaluate what ships
        accuracy = heldout_video_accuracy(policy, family, config.eval_steps, config.eval_samples_per_prompt)
        # the transformer this run started from ("none" or null: its seeded initialisation)
        start = str(init_from or out / "hunyuan_video") if i2v else (t2v_init_from and str(t2v_init_from))
        reports[family] = write_report(folder, config, accuracy, losses, stats, started, family_start, init_from=start)
        print(f"{family}: held-out " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if k != "samples")
              + f" ({accuracy['samples']} samples) -> {folder}")
    return reports


def caption_noise_arg(text: str) -> float | tuple[float, ...]:
    """`--caption-noise 0.3` (every attribute) or `--caption-noise 0.3,0,0.3` (colour, shape, direction),
    checked by `caption_noise_rates` here, so a bad value stops the command line before any training."""
    from lightning_grpo.worlds.base import caption_noise_rates

    try:
        rates = tuple(float(part) for part in text.split(","))
        noise = rates[0] if len(rates) == 1 else rates
        caption_noise_rates(noise, 3)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"caption noise must be a rate or colour,shape,direction rates in [0, 1], "
                                         f"got {text!r} ({error})") from None
    return noise


def _source_arguments(parser: argparse.ArgumentParser) -> None:
    """The video script's own options: where its VAE and transformers start from."""
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse this trained VAE folder (…/<family>/vae)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="T2V pipeline the I2V transformer starts from ('none': its seeded initialisation)")
    parser.add_argument("--t2v-init-from", type=Path, default=None,
                        help="T2V pipeline whose transformer the T2V training continues (one stage of a staged recipe)")


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m lightning_grpo.worlds.moving_shapes.pretrain [--family hunyuan_video|skyreels|all] [--out DIR]`."""
    overrides = {"vae_steps": int, "vae_decoder_steps": int, "vae_decoder_lr": float, "t2v_steps": int, "i2v_steps": int,
                 "denoiser_lr": float, "denoiser_sigma_shift": float, "denoiser_foreground_weight": float,
                 "caption_noise": caption_noise_arg}
    args, config, families = command_line(__doc__.split("\n\n")[0], FAMILIES, DEFAULT_OUT, VideoPretrainConfig,
                                          VideoPretrainConfig.reduced, overrides, argv, _source_arguments)
    pretrain_video(families, args.out, config, args.vae_from, args.init_from, args.t2v_init_from)


if __name__ == "__main__":
    main()
