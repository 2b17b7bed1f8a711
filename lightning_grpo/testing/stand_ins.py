"""Tiny stand-ins: random, offline diffusers pipelines of each family in the real folder layout.

The family registry (`lightning_grpo.policies.registry`) names one builder per family by its dotted
path (imported only when a stand-in is built); the family contract test (tests/families) and the
policy tests run on what they write.

Nothing here touches the network: every component is built from a small config with a fixed
seed, and the tokenizers are built from a handmade vocabulary (a byte-pair CLIP vocabulary and
a unigram T5 vocabulary), then the whole pipeline is written with `pipeline.save_pretrained`
so `model_index.json` and the `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`
(and `transformer/`, `text_encoder_2/`, `tokenizer_2/` for FLUX and the video families) subfolders are exactly those a
real checkpoint has. Adapters then load them through their own `from_pretrained` code.

In tests: the `tiny_sd_path` / `tiny_flux_path` fixtures of tests/policies/conftest.py, or
`lightning_grpo.policies.registry.FAMILIES[name].build_stand_in(path)`.

Sizes: images are 16×16 pixels. SD: VAE ×2 down-sampling → latents [B, 4, 8, 8].
FLUX: VAE ×2 → [B, 4, 8, 8] unpacked, [B, 16, 16] packed 2×2.
HunyuanVideo / SkyReels-V1 I2V: clips of 5 frames, VAE ×4 in space and time → [B, 4, 2, 4, 4];
a byte-pair Llama tokenizer (the template's header tokens as special tokens) and a short prompt
template (`VIDEO_TEMPLATE`) in the form of the pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_grpo.policies.registry import FLUX2_DEV_TEXT_LENGTH, VIDEO_FRAMES, VIDEO_TEMPLATE  # noqa: F401  (the stand-ins' geometry)
from lightning_grpo.worlds.tokenizers import clip_tokenizer, t5_tokenizer


# The shared handmade vocabulary: a few words (letters are the tokenizers' fallback), so any
# lowercase prompt tokenizes without unknown tokens.
WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "photo", "of", "on", "sofa", "circle", "square"]

TEXT_HIDDEN = 32  # hidden size of both tiny text encoders (CLIP pooled dim, T5 sequence dim)
TEXT_MAX_LENGTH = 16  # tokenizer max length (CLIP positions; FLUX max_sequence_length in tests)
IMAGE_SIZE = 16  # pixels; the tiny VAEs down-sample ×2


def tiny_clip_tokenizer():
    """A CLIPTokenizer (byte-pair) over WORDS, letters as fallback, max length TEXT_MAX_LENGTH."""
    return clip_tokenizer(WORDS, TEXT_MAX_LENGTH)


def tiny_t5_tokenizer():
    """A T5 tokenizer (unigram, tokenizers-backed) over WORDS, letters as fallback, no sentinels."""
    return t5_tokenizer(WORDS, TEXT_MAX_LENGTH)


def tiny_clip_text_encoder(tokenizer, seed: int, max_positions: int = TEXT_MAX_LENGTH):
    """A 2-layer CLIPTextModel whose special-token ids match `tokenizer` (`max_positions` tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(config).eval()


def tiny_t5_encoder(tokenizer, seed: int, umt5: bool = False):
    """A 2-layer T5EncoderModel (UMT5EncoderModel with `umt5`: Wan's) whose special-token ids match
    `tokenizer`, hidden size TEXT_HIDDEN, seeded by `seed`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.1, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_class(config).eval()


def tiny_vae(seed: int, flux: bool = False):
    """A 2-block AutoencoderKL (×2 down-sampling, 4 latent channels); FLUX-style when `flux`."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False) if flux else {}
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        **extra,
    ).eval()


def build_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion 1.x pipeline to `path` and return it.

    Layout as runwayml/CompVis checkpoints: model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ (a DDIMScheduler with SD 1.x betas, steps_offset 1). No safety
    checker. Resolution 16×16; latents [B, 4, 8, 8]; text embeddings [B, 16, 32].
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    vae = tiny_vae(seed + 2)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny random FLUX.1 pipeline to `path` and return it.

    Layout as black-forest-labs/FLUX.1-dev: model_index.json, transformer/, vae/ (with
    shift/scaling factors), text_encoder/ + tokenizer/ (CLIP, pooled), text_encoder_2/ +
    tokenizer_2/ (T5, sequence), scheduler/ (FlowMatchEulerDiscreteScheduler with dynamic
    shifting). `guidance_embeds` as FLUX.1-dev (True) or FLUX.1-schnell (False).
    Resolution 16×16; packed latents [B, 16, 16]; T5 embeddings [B, 16, 32] at max length 16.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    path = Path(path)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, seed)
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = tiny_t5_encoder(tokenizer_2, seed + 1)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    vae = tiny_vae(seed + 3, flux=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(path)
    return path


# -- HunyuanVideo / SkyReels-V1 ------------------------------------------------------------------

LLAMA_SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
"""The chat-header tokens of HunyuanVideo's prompt template (single tokens, as in Llama 3)."""

CLIP_POOLED_LENGTH = 77  # HunyuanVideoPipeline encodes CLIP prompts at 77 tokens, fixed


def tiny_llama_tokenizer(words=WORDS, max_length: int = 64):
    """A `LlamaTokenizerFast` (byte-pair, metaspace "▁") over `words`, letters as fallback, with
    the template's header tokens as special tokens and right padding (the pipeline crops the
    template's tokens off the front, so prompts must start at the same position)."""
    from transformers import LlamaTokenizerFast

    from lightning_grpo.worlds.tokenizers import LETTERS, PUNCTUATION, word_merges

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "▁": 4}
    for piece in list(LETTERS) + list(PUNCTUATION):
        vocab.setdefault(piece, len(vocab))
    tokenizer = LlamaTokenizerFast(
        vocab=vocab, merges=word_merges(vocab, words), pad_token="<pad>", model_max_length=max_length, padding_side="right",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLAMA_SPECIAL)})
    return tokenizer


def tiny_llama(tokenizer, seed: int):
    """A 3-layer LlamaModel (the pipeline reads hidden state 3 from the top) for `tokenizer`."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaModel(config).eval()


def tiny_video_vae(seed: int):
    """A 3-block AutoencoderKLHunyuanVideo: ×4 in space, ×4 in time (causal: F = 4k + 1 frames → k + 1)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
        spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=True,
    ).eval()


def build_tiny_hunyuan_video(path: str | Path, seed: int = 0, image_to_video: bool = False) -> Path:
    """Write a tiny random HunyuanVideo pipeline to `path` and return it.

    Layout as hunyuanvideo-community/HunyuanVideo: model_index.json, transformer/, vae/
    (AutoencoderKLHunyuanVideo), text_encoder/ + tokenizer/ (Llama, sequence), text_encoder_2/ +
    tokenizer_2/ (CLIP, pooled, 77 positions), scheduler/ (FlowMatchEulerDiscreteScheduler,
    static shift 7 as the real checkpoint). `image_to_video`: a SkyReels-V1 I2V pipeline instead
    (HunyuanSkyreelsImageToVideoPipeline; the transformer takes 2C channels: noise ⊕ first frame).
    Frames 16×16, VIDEO_FRAMES frames; latents [B, 4, 2, 4, 4], 2×2 patches; text [B, S, 32].
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        HunyuanSkyreelsImageToVideoPipeline,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    path = Path(path)
    tokenizer = tiny_llama_tokenizer()
    text_encoder = tiny_llama(tokenizer, seed)
    tokenizer_2 = clip_tokenizer(WORDS, CLIP_POOLED_LENGTH)
    text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, seed + 1, max_positions=CLIP_POOLED_LENGTH)
    torch.manual_seed(seed + 2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=8 if image_to_video else 4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    ).eval()
    vae = tiny_video_vae(seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipeline_class = HunyuanSkyreelsImageToVideoPipeline if image_to_video else HunyuanVideoPipeline
    pipeline = pipeline_class(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipeline.save_pretrained(path)
    return path


# -- Wan 2.1 ---------------------------------------------------------------------------------------

WAN_LATENTS_MEAN = [-0.25, 0.5, 0.1, -0.6]
WAN_LATENTS_STD = [1.5, 0.6, 2.2, 0.9]
"""Per-channel statistics of the tiny Wan VAE's latents (made up, far from 0 and 1 so that a
missed or wrong normalisation changes every decoded pixel; the real VAE has 16 of each)."""


def build_tiny_wan(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 text-to-video pipeline to `path` and return it.

    Layout as Wan-AI/Wan2.1-T2V-1.3B-Diffusers: model_index.json, transformer/
    (WanTransformer3DModel, 3-D patches 1×2×2), vae/ (AutoencoderKLWan with per-channel
    `latents_mean` / `latents_std`, ×4 in space and time), text_encoder/ (UMT5EncoderModel),
    tokenizer/ (a T5 unigram tokenizer, as google/umt5-xxl's), scheduler/. The published
    checkpoint ships a UniPCMultistepScheduler with `flow_shift` 3; the stand-in ships the
    FlowMatchEulerDiscreteScheduler with the same shift, the schedule the family samples with
    (`WanT2VPolicy.pipeline_sigmas`), so plain `WanPipeline.from_pretrained(path)` samples what the
    policy's deterministic sampler does.
    Frames 16×16, VIDEO_FRAMES frames; latents [B, 4, 2, 4, 4]; UMT5 states [B, S, 32].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    path = Path(path)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, seed, umt5=True)
    transformer = tiny_wan_transformer(seed + 1)
    vae = tiny_wan_vae(seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipeline.save_pretrained(path)
    return path


def tiny_wan_transformer(seed: int, in_channels: int = 4, **extra):
    """A 2-block WanTransformer3DModel (3-D patches 1×2×2, 4 output channels) taking
    `in_channels` (4: text-to-video; image-to-video adds the mask and image channels), seeded."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=4,
        text_dim=TEXT_HIDDEN, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **extra,
    ).eval()


def tiny_wan_vae(seed: int):
    """A tiny AutoencoderKLWan: 4 latent channels with per-channel `latents_mean` / `latents_std`,
    ×4 in space and time, seeded."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=WAN_LATENTS_MEAN, latents_std=WAN_LATENTS_STD, scale_factor_spatial=4, scale_factor_temporal=4,
    ).eval()


# -- Stable Diffusion 3 / 3.5 ------------------------------------------------------------------------

def tiny_clip_with_projection(tokenizer, seed: int, hidden: int, projection: int):
    """A 2-layer CLIPTextModelWithProjection (SD3's CLIP-L / CLIP-G role) for `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion 3.5 pipeline to `path` and return it.

    Layout as stabilityai/stable-diffusion-3.5-medium: model_index.json, transformer/
    (SD3Transformer2DModel with QK RMS-norm and a dual-attention block, as 3.5 Medium's MMDiT-X),
    vae/ (AutoencoderKL with shift and scaling factors), text_encoder/ + tokenizer/ (CLIP-L's
    role), text_encoder_2/ + tokenizer_2/ (CLIP-G's), text_encoder_3/ + tokenizer_3/ (T5's),
    scheduler/ (FlowMatchEulerDiscreteScheduler, static shift 3 as the real checkpoint).
    The two CLIP widths (16 + 8) are narrower than T5's (32), so the pipeline's zero-padding of the
    CLIP states to T5's width is exercised. Resolution 16×16; latents [B, 4, 8, 8], 2×2 patches;
    text states [B, 16 + S, 32]; pooled [B, 24].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = Path(path)
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    text_encoder = tiny_clip_with_projection(tokenizer, seed, hidden=16, projection=16)
    text_encoder_2 = tiny_clip_with_projection(tokenizer_2, seed + 1, hidden=8, projection=8)
    text_encoder_3 = tiny_t5_encoder(tokenizer_3, seed + 2)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, caption_projection_dim=16, pooled_projection_dim=24,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,),
    ).eval()
    vae = tiny_vae(seed + 4, flux=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(path)
    return path


# -- Qwen-Image ------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen2's special tokens (one token each): the chat markers the prompt templates use and the
vision markers Qwen2.5-VL's config names."""

QWEN_IMAGE_TEMPLATE_WORDS = (
    "system", "Describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity",
    "text", "spatial", "relationships", "of", "objects", "and", "background", "user", "assistant",
)
"""The words of QwenImagePipeline's prompt template: whole tokens in the tiny tokenizer, so the
template's prefix is the 34 tokens its hard-coded `prompt_template_encode_start_idx` drops, as with
the real Qwen2 tokenizer (`build_tiny_qwen_image` checks it)."""


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map, which byte-level BPE (Qwen2's
    `pre_tokenizers.ByteLevel`) applies before merging: printable Latin-1 bytes map to themselves,
    the others (space, newline, control bytes) to the characters from U+0100 on ("Ġ" for space,
    "Ċ" for newline). Hand-written (tokenizers exposes it only as `ByteLevel.alphabet()`, unordered)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def qwen2_tokenizer(words, max_length: int = 2048):
    """A `transformers.Qwen2Tokenizer` (byte-level BPE, Qwen2's pre-tokenizer) with one token per
    word of `words`, with and without a leading space ("Ġ"-marked), every byte as fallback, and
    `QWEN_SPECIAL_TOKENS` as special tokens (`<|endoftext|>` pads, as Qwen2's).

    Each word is merged left to right, then the space onto the whole word. BPE applies merges in
    rank order, so a word whose letters another word's early merge grabs ("sh" of "shape" inside
    "relationships") would split; such words' merges are moved to the front until every word is
    one token (checked)."""
    from transformers import Qwen2Tokenizer

    alphabet = _byte_level_alphabet()
    space = alphabet[ord(" ")]
    words = ["".join(alphabet[b] for b in word.encode()) for word in dict.fromkeys(words)]  # byte-level form ("\n" → "Ċ")
    chains: dict[str, list[tuple[str, str]]] = {}
    for word in words:
        pieces, chain = list(word), []
        while len(pieces) > 1:
            chain.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
        chains[word] = chain
    order = list(words)
    for _ in range(len(words) + 1):
        vocab = {alphabet[byte]: byte for byte in range(256)}
        merges = list(dict.fromkeys([m for w in order for m in chains[w]] + [(space, w) for w in order]))
        for left, right in merges:
            vocab.setdefault(left + right, len(vocab))
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
        decoded = {w: tokenizer.convert_tokens_to_string([w]) for w in order}
        split = [w for w in order if tokenizer.tokenize(decoded[w]) != [w] or tokenizer.tokenize(" " + decoded[w]) != [space + w]]
        if not split:
            break
        order = split + [w for w in order if w not in split]
    else:
        raise AssertionError(f"words {split} do not merge into one token")
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]})
    return tokenizer


def tiny_qwen25_vl(tokenizer, seed: int, hidden: int = TEXT_HIDDEN):
    """A 2-layer Qwen2_5_VLForConditionalGeneration (1-block vision tower) for `tokenizer`:
    Qwen-Image's text encoder class; the pipeline reads its last hidden state."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": hidden,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


QWEN_IMAGE_LATENTS_MEAN = [0.3, -0.45, 0.15, -0.8]
QWEN_IMAGE_LATENTS_STD = [1.7, 0.55, 2.4, 0.8]
"""Per-channel statistics of the tiny Qwen-Image VAE's latents (made up, far from 0 and 1, as
Wan's stand-in: a missed normalisation changes every decoded pixel; the real VAE has 16)."""


def build_tiny_qwen_image(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image pipeline to `path` and return it.

    Layout as Qwen/Qwen-Image: model_index.json, transformer/ (QwenImageTransformer2DModel, packed
    2×2 latents), vae/ (AutoencoderKLQwenImage with per-channel `latents_mean` / `latents_std`,
    ×2 in space), text_encoder/ (Qwen2_5_VLForConditionalGeneration), tokenizer/ (a byte-level BPE
    Qwen2Tokenizer on which the pipeline's prompt template prefix is 34 tokens, as on the real
    one), scheduler/ (FlowMatchEulerDiscreteScheduler with Qwen-Image's dynamic exponential shift
    and `shift_terminal`). Resolution 16×16; VAE latents [B, 4, 1, 8, 8], packed [B, 16, 16];
    text states [B, L, 32].
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    path = Path(path)
    tokenizer = qwen2_tokenizer(list(QWEN_IMAGE_TEMPLATE_WORDS) + WORDS)
    text_encoder = tiny_qwen25_vl(tokenizer, seed)
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=QWEN_IMAGE_LATENTS_MEAN, latents_std=QWEN_IMAGE_LATENTS_STD,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image scheduler/scheduler_config.json
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipeline = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipeline.prompt_template_encode_start_idx:
        raise AssertionError(f"the tiny tokenizer splits the prompt template into {len(tokenizer(prefix).input_ids)} tokens, "
                             f"the pipeline drops {pipeline.prompt_template_encode_start_idx}")
    pipeline.save_pretrained(path)
    return path


# -- FLUX.2 klein ----------------------------------------------------------------------------------

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
"""A short chat template giving what Qwen3's own template gives for plain user/assistant turns
(Flux2KleinPipeline asks for one user turn, a generation prompt and `enable_thinking=False`: the
empty think block); the real template's tool-call and reasoning branches are left out."""

FLUX2_BN_MEAN = [0.2, -0.3, 0.1, 0.5, -0.6, 0.05, 0.3, -0.1, 0.4, -0.2, 0.15, -0.45, 0.25, 0.0, -0.35, 0.6]
FLUX2_BN_VAR = [1.8, 0.5, 2.5, 0.7, 1.2, 3.0, 0.4, 1.5, 0.9, 2.2, 0.6, 1.1, 2.8, 0.8, 1.6, 0.45]
"""Running statistics of the tiny FLUX.2 VAE's batch norm over the 2×2-patchified latents (made
up, far from 0 and 1 as the Wan and Qwen-Image stand-ins': a missed normalisation changes every
decoded pixel; the real VAE has 128 of each, learnt)."""


def tiny_qwen3(tokenizer, seed: int, hidden: int = 16, layers: int = 27):
    """A Qwen3ForCausalLM with `layers` thin layers (Flux2KleinPipeline stacks hidden states 9, 18
    and 27, so it needs 27 at least) for `tokenizer`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    return Qwen3ForCausalLM(config).eval()


def build_tiny_flux2_klein(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [klein] base pipeline (Flux2KleinPipeline, not step-distilled: its
    CFG runs) to `path` and return it.

    Layout as black-forest-labs/FLUX.2-klein-base-4B: model_index.json, transformer/
    (Flux2Transformer2DModel, no guidance embedding), vae/ (AutoencoderKLFlux2 with its batch norm
    over 2×2-patchified latents; made-up running statistics), text_encoder/ (Qwen3ForCausalLM, 27
    layers), tokenizer/ (a byte-level BPE Qwen2Tokenizer with a Qwen3-style chat template),
    scheduler/ (FlowMatchEulerDiscreteScheduler with dynamic shifting; the pipeline passes its own
    μ). Resolution 16×16; VAE latents [B, 4, 8, 8], patchified [B, 16, 4, 4]; text states [B, S, 48]
    (hidden states 9, 18, 27 side by side).
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    path = Path(path)
    tokenizer = qwen2_tokenizer(["user", "assistant", "\n\n"] + WORDS)
    tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3's think markers: added, not special
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    text_encoder = tiny_qwen3(tokenizer, seed)
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * text_encoder.config.hidden_size, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor(FLUX2_BN_MEAN))
        vae.bn.running_var.copy_(torch.tensor(FLUX2_BN_VAR))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  transformer=transformer, is_distilled=False)
    pipeline.save_pretrained(path)
    return path


# -- FLUX.2 dev ------------------------------------------------------------------------------------

MISTRAL_SPECIAL_TOKENS = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
"""The control tokens of Mistral Small 3.1's chat template and of PixtralProcessor's image
placeholders (one token each, special, as in the real tokenizer)."""

MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set blocks = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set blocks = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}{%- for b in blocks %}{{- b['text'] }}{%- endfor %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- for b in blocks %}"
    "{%- if b['type'] == 'text' %}{{- b['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}{%- endfor %}{{- '[/INST]' }}"
    "{%- else %}{%- for b in blocks %}{{- b['text'] }}{%- endfor %}{{- eos_token }}{%- endif %}{%- endfor %}"
)
"""A short chat template giving what Mistral Small 3.1's gives for the turns Flux2Pipeline sends
(a system message and a user turn of content blocks, no generation prompt): BOS,
[SYSTEM_PROMPT]…[/SYSTEM_PROMPT], [INST]…[/INST]; the real template's tool calls and date
substitution are left out."""



def tiny_pixtral_processor():
    """A `transformers.PixtralProcessor` built offline: a byte-fallback BPE tokenizer
    (`llama_tokenizer`) whose words are those of Flux2Pipeline's system message and WORDS,
    Mistral's control tokens, `<pad>` padding, a tiny PixtralImageProcessor and
    `MISTRAL_CHAT_TEMPLATE`."""
    import re

    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PixtralImageProcessor, PixtralProcessor

    from lightning_grpo.worlds.tokenizers import llama_tokenizer

    words = list(dict.fromkeys(re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE))) + WORDS
    tokenizer = llama_tokenizer(words, 512)
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIAL_TOKENS), "pad_token": "<pad>"})
    images = PixtralImageProcessor(patch_size=8, size={"longest_edge": 32})
    return PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, spatial_merge_size=2, chat_template=MISTRAL_CHAT_TEMPLATE)


def tiny_mistral3(tokenizer, seed: int, hidden: int = 16, layers: int = 30):
    """A Mistral3ForConditionalGeneration (FLUX.2 [dev]'s text encoder class) with a `layers`-layer
    thin Mistral text model (Flux2Pipeline stacks hidden states 10, 20 and 30, so it needs 30 at
    least) and a 1-layer Pixtral vision tower, for `tokenizer`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 24,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "max_position_embeddings": 512, "sliding_window": None, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "patch_size": 8, "image_size": 32},
        image_token_index=ids("[IMG]"), spatial_merge_size=2, tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def build_tiny_flux2_dev(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.2 [dev] pipeline (Flux2Pipeline) to `path` and return it.

    Layout as black-forest-labs/FLUX.2-dev: model_index.json, transformer/ (Flux2Transformer2DModel
    with a guidance embedding: the guidance-distilled [dev]), vae/ (AutoencoderKLFlux2, the same
    made-up batch-norm statistics as the [klein] stand-in), text_encoder/
    (Mistral3ForConditionalGeneration, 30 text layers), tokenizer/ (a PixtralProcessor with a
    Mistral-style chat template: `tiny_pixtral_processor`), scheduler/ (FlowMatchEulerDiscreteScheduler
    with dynamic shifting; the pipeline passes its own μ). Resolution 16×16; VAE latents
    [B, 4, 8, 8], patchified [B, 16, 4, 4]; text states [B, S, 48] (hidden states 10, 20, 30).
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    path = Path(path)
    processor = tiny_pixtral_processor()
    text_encoder = tiny_mistral3(processor.tokenizer, seed)
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * text_encoder.config.text_config.hidden_size, timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE,
    ).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.tensor(FLUX2_BN_MEAN))
        vae.bn.running_var.copy_(torch.tensor(FLUX2_BN_VAR))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor, transformer=transformer)
    pipeline.save_pretrained(path)
    return path


# -- Wan 2.2 A14B (two experts) -------------------------------------------------------------------

WAN_A14B_BOUNDARY_RATIO = 0.7
"""The stand-in's boundary_ratio: boundary timestep 700, between the second and third timesteps
(857.1, 600.0) of the 4-step Euler schedule with shift 3, so both experts run in a 4-step sample
(the published T2V A14B: 0.875)."""


def build_tiny_wan_a14b(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.2 A14B text-to-video pipeline to `path` and return it.

    Layout as Wan-AI/Wan2.2-T2V-A14B-Diffusers: `build_tiny_wan`'s, plus transformer_2/ (the
    low-noise expert, the same architecture with its own weights) and `boundary_ratio`
    (WAN_A14B_BOUNDARY_RATIO) in model_index.json. Latents [B, 4, 2, 4, 4]; UMT5 states [B, S, 32].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    path = Path(path)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, seed, umt5=True)
    pipeline = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed + 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed + 1), transformer_2=tiny_wan_transformer(seed + 3), boundary_ratio=WAN_A14B_BOUNDARY_RATIO,
    )
    pipeline.save_pretrained(path)
    return path


# -- Wan 2.1 image-to-video ----------------------------------------------------------------------------

WAN_CLIP_HIDDEN = 16  # the tiny CLIP vision tower's width: the I2V transformer's image_dim


def build_tiny_wan_i2v(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 image-to-video pipeline to `path` and return it.

    Layout as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: `build_tiny_wan`'s, with a transformer taking
    4 + 4 + 4 channels (noise, first-frame mask, first-frame latent) and CLIP image states
    (`image_dim`, the added K/V projections of its cross-attention), plus image_encoder/ (a 2-layer
    CLIPVisionModel, 16×16 images in 4×4 patches: 17 tokens) and image_processor/ (a
    CLIPImageProcessor at 16×16). The processor is saved with `do_rescale=False`: it takes pixel
    values in [0, 1] as the framework's first frames are (the published one rescales 0–255 values,
    what a PIL image gives; `WanI2VPolicy` passes `do_rescale=False` itself), so the plain pipeline
    given the same float frames processes them as the policy does.
    Frames 16×16, VIDEO_FRAMES frames; latents [B, 4, 2, 4, 4]; UMT5 states [B, S, 32].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, seed, umt5=True)
    transformer = tiny_wan_transformer(seed + 1, in_channels=12, image_dim=WAN_CLIP_HIDDEN, added_kv_proj_dim=24)
    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=WAN_CLIP_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=4, projection_dim=WAN_CLIP_HIDDEN,
    )).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_rescale=False,
    )
    pipeline = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed + 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor, image_encoder=image_encoder, transformer=transformer,
    )
    pipeline.save_pretrained(path)
    return path


# -- Wan 2.2 I2V A14B (two experts, no CLIP) ---------------------------------------------------------

def build_tiny_wan22_i2v_a14b(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.2 I2V A14B pipeline to `path` and return it.

    Layout as Wan-AI/Wan2.2-I2V-A14B-Diffusers: a `WanImageToVideoPipeline` with two experts
    (transformer/, transformer_2/: 4 + 4 + 4 input channels, no CLIP image states), vae/,
    text_encoder/, tokenizer/, scheduler/, no image encoder, and `boundary_ratio`
    WAN_A14B_BOUNDARY_RATIO (between the 4-step schedule's second and third timesteps; the
    published I2V A14B: 0.9). Latents [B, 4, 2, 4, 4]; UMT5 states [B, S, 32].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    path = Path(path)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = tiny_t5_encoder(tokenizer, seed, umt5=True)
    pipeline = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed + 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed + 1, in_channels=12), transformer_2=tiny_wan_transformer(seed + 3, in_channels=12),
        boundary_ratio=WAN_A14B_BOUNDARY_RATIO,
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_skyreels_i2v(path: str | Path, seed: int = 0) -> Path:
    """The SkyReels-V1 image-to-video stand-in: the HunyuanVideo one whose transformer also takes
    the first frame's latent on the channel axis (`build_tiny_hunyuan_video(image_to_video=True)`)."""
    return build_tiny_hunyuan_video(path, seed, image_to_video=True)
