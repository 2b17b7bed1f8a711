"""The toy pipelines' components: small instances of the REAL diffusers / transformers classes.

The shipped toy FLUX, toy Stable Diffusion, toy HunyuanVideo (text-to-video) and toy SkyReels-V1
(image-to-video) pipelines are built from these, trained by
`lightning_grpo.worlds.shapes.pretrain`, and saved with `save_pretrained`, so the policy adapters load them
through exactly the code that loads FLUX.1-dev and SD 1.4. `ToySize` scales every width, so a
test can build the same architecture at a fraction of the cost.

Geometry at the default 32×32 pixels: the VAE down-samples ×4 to latents [B, 4, 8, 8]; FLUX
packs them 2×2 into [B, 16, 16] tokens; prompts are at most `TEXT_MAX_LENGTH` tokens.

Video geometry (`VideoToySize()`): clips of 9 frames at 32×32; the causal 3D VAE compresses ×4 in
space and ×4 in time (one latent frame for the first frame, one per 4 after it) to latents
[B, 16, 3, 8, 8]; the HunyuanVideo transformer patches them 1×2×2 into 3·4·4 = 48 tokens. Prompts
go through the pipelines' own Llama-3 chat template (95 template tokens cropped, then at most
`VIDEO_TEXT_MAX_LENGTH` prompt tokens) and a CLIP text encoder at the pipelines' fixed 77 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_grpo.worlds.shapes.prompts import vocabulary
from lightning_grpo.worlds.tokenizers import clip_tokenizer, llama_tokenizer, t5_tokenizer

#: Tokens per prompt (the longest template, "there is a ... of the image", takes 12 with EOS).
TEXT_MAX_LENGTH = 16
#: Latent channels of the toy VAE (SD 1.x has 4; FLUX 16: 4 keeps the toy small).
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class ComponentSize:
    """Widths every toy pipeline has: the frame side, the text encoders' width, CLIP's depth and the
    VAE's block widths (`ToySize` and `VideoToySize` add their denoisers')."""

    image_size: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32, 32)


@dataclass(frozen=True)
class ToySize(ComponentSize):
    """Widths of the toy image components; `ToySize()` is what ships, `ToySize.reduced()` what CI builds."""

    flux_head_dim: int = 32
    flux_heads: int = 2
    flux_layers: int = 2
    flux_single_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)

    @classmethod
    def reduced(cls) -> ToySize:
        """The same architectures at a few percent of the cost (for the pretraining test)."""
        return cls(text_hidden=32, text_layers=1, vae_channels=(8, 16, 16), flux_head_dim=16, flux_heads=2,
                   flux_layers=1, flux_single_layers=1, unet_channels=(16, 32))

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 2^(number of VAE blocks − 1)."""
        return 2 ** (len(self.vae_channels) - 1)


def build_tokenizers() -> tuple:
    """(CLIPTokenizer, T5TokenizerFast) over `vocabulary()`, max length `TEXT_MAX_LENGTH`."""
    words = vocabulary()
    return clip_tokenizer(words, TEXT_MAX_LENGTH), t5_tokenizer(words, TEXT_MAX_LENGTH)


def token_ids(tokenizer) -> dict[str, int]:
    """The vocabulary size and special token ids a toy text encoder's config takes from its tokenizer."""
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_clip_text_encoder(tokenizer, size: ComponentSize, seed: int, max_length: int = TEXT_MAX_LENGTH):
    """A CLIPTextModel (causal transformer, pooled at EOS) whose special ids match `tokenizer`,
    with `max_length` positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=size.text_hidden, intermediate_size=4 * size.text_hidden, num_hidden_layers=size.text_layers,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=size.text_hidden, **token_ids(tokenizer),
    )
    return CLIPTextModel(config).eval()


def build_t5_encoder(tokenizer, size: ToySize, seed: int):
    """A T5EncoderModel (relative-position encoder, FLUX's sequence conditioning)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=size.text_hidden,
        d_kv=size.text_hidden // 4,
        d_ff=2 * size.text_hidden,
        num_layers=size.text_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def build_vae(size: ToySize, seed: int):
    """An AutoencoderKL down-sampling by `size.vae_factor` to `LATENT_CHANNELS` channels.

    No quant convs (as FLUX's VAE). Scaling / shift factors are set after training, from the
    latent statistics (`lightning_grpo.worlds.pretraining.latent_statistics`).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=size.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_flux_transformer(size: ToySize, seed: int):
    """A FluxTransformer2DModel with FLUX.1-dev's guidance embedding, on 2×2-packed latents."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    head = size.flux_head_dim
    rope = (head // 4, 3 * head // 8, 3 * head // 8)  # (index, row, col) axes; must sum to the head dim
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=size.flux_layers,
        num_single_layers=size.flux_single_layers,
        attention_head_dim=head,
        num_attention_heads=size.flux_heads,
        joint_attention_dim=size.text_hidden,
        pooled_projection_dim=size.text_hidden,
        guidance_embeds=True,
        axes_dims_rope=rope,
    )


def build_flux_scheduler():
    """FLUX.1-dev's scheduler configuration (dynamic shifting by image sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def build_unet(size: ToySize, seed: int):
    """A UNet2DConditionModel (ε-prediction) with cross-attention to the CLIP hidden states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(size.unet_channels)
    return UNet2DConditionModel(
        sample_size=size.image_size // size.vae_factor,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=size.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=size.text_hidden,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_ddim_scheduler():
    """A DDIM scheduler for the toy SD: SD 1.x's class, DDPM's linear betas, v-prediction.

    SD 1.x's scaled-linear betas (0.00085 → 0.012) leave √ᾱ_T ≈ 0.07 of the image in the last
    training step; on an 8×8 latent that is enough for the layout to leak through, so a model
    trained on it takes the object's position from the noise rather than from the prompt. DDPM's
    linear 1e-4 → 0.02 betas leave √ᾱ_T ≈ 0.006, but then ε-prediction is ill-conditioned at the
    first sampling steps (x̂0 = (x − √(1−ᾱ)·ε̂)/√ᾱ multiplies the error of ε̂ by ~160), and the
    layout, decided there, comes out random (measured: position at chance after 1000 steps).
    v-prediction (SD 2.x's option of the same classes) stays well-conditioned at every noise
    level, and "trailing" spacing starts sampling at t = 999.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing", prediction_type="v_prediction",
    )


# ----------------------------------------------------------------------------- video (HunyuanVideo, SkyReels-V1)

#: Prompt tokens after the chat template (the longest moving-shapes prompt takes 13 with <|eot_id|>).
VIDEO_TEXT_MAX_LENGTH = 16
#: Tokens the HunyuanVideo pipelines pad every CLIP prompt to (hard-coded there).
CLIP_VIDEO_MAX_LENGTH = 77
#: Template tokens the pipelines crop off the Llama output (their DEFAULT_PROMPT_TEMPLATE's crop_start).
LLAMA_TEMPLATE_TOKENS = 95


@dataclass(frozen=True)
class VideoToySize(ComponentSize):
    """Widths of the toy video components; `VideoToySize()` is what ships, `.reduced()` what CI builds."""

    frames: int = 9
    latent_channels: int = 16  # as the real VAE; one latent frame holds 4 frames of motion: 8 channels blurred them
    llama_layers: int = 3  # the pipelines read hidden_states[-3]: with 3 layers, the output of the first
    vae_channels: tuple[int, ...] = (8, 16, 32)  # full resolution stays narrow (its cost); 32 at 8×8
    head_dim: int = 32
    heads: int = 4  # inner width 128: at 64 the transformer could not model the 16-channel latents
    layers: int = 2
    single_layers: int = 2
    refiner_layers: int = 1

    @classmethod
    def reduced(cls) -> VideoToySize:
        """The same architectures at a few percent of the cost (for the pretraining test)."""
        return cls(latent_channels=4, text_hidden=32, text_layers=1, vae_channels=(8, 8, 8), head_dim=16, heads=2,
                   layers=1, single_layers=1)

    @property
    def latent_frames(self) -> int:
        """Latent frames of a clip: (F − 1)/4 + 1 (the causal VAE's temporal compression)."""
        return (self.frames - 1) // 4 + 1


def video_vocabulary() -> list[str]:
    """The Llama tokenizer's words: every word of the HunyuanVideo prompt template (case kept) and
    of the moving-shapes prompts (the reserved phrasings add none)."""
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from lightning_grpo.worlds.moving_shapes.prompts import motion_words

    return list(dict.fromkeys(re.findall(r"[A-Za-z]+", DEFAULT_PROMPT_TEMPLATE["template"]) + motion_words()))


def build_video_tokenizers() -> tuple:
    """(LlamaTokenizerFast, CLIPTokenizer) of the toy video pipelines.

    The Llama tokenizer holds the template's words, so the pipelines' template takes exactly
    `LLAMA_TEMPLATE_TOKENS` tokens before the prompt, as with the real one: a ValueError says
    otherwise (the crop would then cut prompt words or keep template words).
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from lightning_grpo.worlds.moving_shapes.prompts import motion_words

    llama = llama_tokenizer(video_vocabulary(), LLAMA_TEMPLATE_TOKENS + VIDEO_TEXT_MAX_LENGTH)
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    crop = len(llama(prefix)["input_ids"])
    if crop != DEFAULT_PROMPT_TEMPLATE["crop_start"]:
        raise ValueError(f"the toy Llama tokenizer splits the prompt template into {crop} tokens, "
                         f"the pipelines crop {DEFAULT_PROMPT_TEMPLATE['crop_start']}")
    return llama, clip_tokenizer(motion_words(), CLIP_VIDEO_MAX_LENGTH)


def build_llama_encoder(tokenizer, size: VideoToySize, seed: int):
    """A LlamaModel (causal decoder, RoPE) whose special ids match `tokenizer`; the pipelines take
    its third-last hidden state."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=size.text_hidden, intermediate_size=2 * size.text_hidden, num_hidden_layers=size.llama_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=tokenizer.model_max_length,
        **token_ids(tokenizer),
    )
    return LlamaModel(config).eval()


def build_video_vae(size: VideoToySize, seed: int):
    """An AutoencoderKLHunyuanVideo: causal 3D convolutions, ×4 in space (two down-sampling blocks of
    three) and ×4 in time, no mid-block attention (a 8×8 latent needs none). The scaling factor
    is set after training, from the latent statistics."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    blocks = len(size.vae_channels)
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=size.latent_channels,
        down_block_types=("HunyuanVideoDownBlock3D",) * blocks,
        up_block_types=("HunyuanVideoUpBlock3D",) * blocks,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        norm_num_groups=8,
        spatial_compression_ratio=2 ** (blocks - 1),
        temporal_compression_ratio=4,
        mid_block_add_attention=False,
    )


def build_video_transformer(size: VideoToySize, seed: int, image_latents: bool = False):
    """A HunyuanVideoTransformer3DModel with the distilled guidance embedding, patches 1×2×2.

    `image_latents`: the SkyReels-V1 image-to-video form, in which the first frame's latent
    (zero-padded over time) is concatenated to the noisy latent on the channel axis: 2C input
    channels, C output channels (HunyuanSkyreelsImageToVideoPipeline).
    """
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    head = size.head_dim
    rope = (head // 4, 3 * head // 8, 3 * head // 8)  # (frame, row, col) axes; must sum to the head dim
    channels = size.latent_channels
    return HunyuanVideoTransformer3DModel(
        in_channels=2 * channels if image_latents else channels,
        out_channels=channels,
        num_attention_heads=size.heads,
        attention_head_dim=head,
        num_layers=size.layers,
        num_single_layers=size.single_layers,
        num_refiner_layers=size.refiner_layers,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=size.text_hidden,
        pooled_projection_dim=size.text_hidden,
        rope_axes_dim=rope,
    )


def build_video_scheduler(shift: float):
    """HunyuanVideo's scheduler class (flow matching, static shift; the real checkpoints use 7)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


__all__ = [
    "CLIP_VIDEO_MAX_LENGTH",
    "LLAMA_TEMPLATE_TOKENS",
    "VIDEO_TEXT_MAX_LENGTH",
    "VideoToySize",
    "build_llama_encoder",
    "build_video_scheduler",
    "build_video_tokenizers",
    "build_video_transformer",
    "build_video_vae",
    "video_vocabulary",
    "LATENT_CHANNELS",
    "TEXT_MAX_LENGTH",
    "ToySize",
    "build_clip_text_encoder",
    "build_ddim_scheduler",
    "build_flux_scheduler",
    "build_flux_transformer",
    "build_t5_encoder",
    "build_tokenizers",
    "build_unet",
    "build_vae",
    "vocabulary",
]
