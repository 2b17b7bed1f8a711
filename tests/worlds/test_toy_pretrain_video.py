"""The toy video pretraining script, at reduced size: it writes a real HunyuanVideoPipeline and a
real HunyuanSkyreelsImageToVideoPipeline that the policy adapters load; the image-to-video
transformer starts as the text-to-video one; the toy Llama tokenizer splits the pipelines' prompt
template exactly where their hard-coded crop assumes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_grpo.worlds.components import (
    LLAMA_TEMPLATE_TOKENS,
    VIDEO_TEXT_MAX_LENGTH,
    VideoToySize,
    build_video_tokenizers,
    build_video_transformer,
)
from lightning_grpo.worlds.moving_shapes.prompts import motion_heldout_splits, train_motion_prompts
from lightning_grpo.worlds.moving_shapes.pretrain import VideoPretrainConfig, image_to_video_transformer, load_policy, main

SHIPPED = Path(__file__).resolve().parents[2] / "lightning_grpo" / "worlds" / "moving_shapes" / "pretrained"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_video")
    main(["--reduced", "--out", str(out)])
    return out


@pytest.mark.parametrize("family,pipeline", [("hunyuan_video", "HunyuanVideoPipeline"),
                                             ("skyreels", "HunyuanSkyreelsImageToVideoPipeline")])
def test_script_writes_loadable_video_pipelines(pretrained, family, pipeline):
    folder = pretrained / family
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == pipeline
    report = json.loads((folder / "pretrain_report.json").read_text())
    heldout = report["heldout"]
    assert heldout["samples"] == 80  # every new-combination prompt once (reduced config)
    assert heldout["exact_match"] <= min(heldout["colour"], heldout["shape"], heldout["motion"])
    assert heldout["exact_match"] * 80 == pytest.approx(round(heldout["exact_match"] * 80), abs=1e-6)
    config = VideoPretrainConfig.reduced()
    policy = load_policy(family, folder, config)
    clips = policy.decode(policy.prepare_latents(2, torch.Generator().manual_seed(0)))
    assert clips.shape == (2, config.size.frames, 3, 32, 32)  # [B, F, 3, H, W]
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):  # all stored at half size
        weights = load_file(next((folder / component).glob("*.safetensors")))
        assert all(t.dtype == torch.float16 for t in weights.values()), component
    assert all(p.dtype == torch.float32 for p in policy.vae.parameters())  # ... and loaded at float32
    report_ceiling = report["vae"]["ceiling"]  # the VAE's own judge ceiling is recorded
    assert 0 <= report_ceiling["exact_match"] <= min(report_ceiling["colour"], report_ceiling["shape"], report_ceiling["motion"])
    # the image-to-video pipeline shares the text-to-video one's VAE
    vae = load_file(next((folder / "vae").glob("*.safetensors")))
    other = load_file(next((pretrained / "hunyuan_video" / "vae").glob("*.safetensors")))
    assert all(torch.equal(vae[k], other[k]) for k in vae)


def test_vae_scaling_makes_latents_unit_scale(pretrained):
    """The pipelines scale latents without a shift, so scale = 1/√(std² + mean²) of the VAE's
    latent means: the scaled latents of fresh clips have second moment ≈ 1."""
    from lightning_grpo.worlds.moving_shapes import sample_captioned_clips

    policy = load_policy("hunyuan_video", pretrained / "hunyuan_video", VideoPretrainConfig.reduced())
    report = json.loads((pretrained / "hunyuan_video" / "pretrain_report.json").read_text())["vae"]
    assert policy.vae.config.scaling_factor == pytest.approx(1 / (report["std"] ** 2 + report["mean"] ** 2) ** 0.5)
    clips, _ = sample_captioned_clips(64, frames=9, seed=5)
    z = policy.encode_pixels(clips)
    assert z.square().mean().item() == pytest.approx(1.0, abs=0.25)


def test_image_to_video_transformer_starts_as_the_text_to_video_one():
    """Zero image channels: the I2V transformer on cat([x, I]) predicts what the T2V one predicts on
    x, whatever the first-frame latent I."""
    size = VideoToySize.reduced()
    t2v = build_video_transformer(size, seed=3)
    i2v = image_to_video_transformer(t2v, size, seed=4)
    assert i2v.config.in_channels == 2 * t2v.config.in_channels and i2v.config.out_channels == t2v.config.out_channels
    generator = torch.Generator().manual_seed(0)
    c, f, h = size.latent_channels, size.latent_frames, size.image_size // 4
    x, image = torch.randn(2, c, f, h, h, generator=generator), torch.randn(2, c, f, h, h, generator=generator)
    text = {"timestep": torch.tensor([300.0, 800.0]), "encoder_hidden_states": torch.randn(2, 5, size.text_hidden, generator=generator),
            "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
            "pooled_projections": torch.randn(2, size.text_hidden, generator=generator), "guidance": torch.full((2,), 6000.0)}
    with torch.no_grad():
        expected = t2v(hidden_states=x, **text, return_dict=False)[0]
        got = i2v(hidden_states=torch.cat([x, image], dim=1), **text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_llama_tokenizer_matches_the_pipelines_template_crop():
    """The HunyuanVideo pipelines cut a hard-coded 95 tokens (their template under the real Llama-3
    tokenizer) off the Llama states; the toy tokenizer splits the template into exactly as many, so
    the cropped states start at the prompt's first word."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    llama, clip = build_video_tokenizers()
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    assert DEFAULT_PROMPT_TEMPLATE["crop_start"] == LLAMA_TEMPLATE_TOKENS
    ids = llama(template.format("a red circle moving up"))["input_ids"]
    tokens = llama.convert_ids_to_tokens(ids[LLAMA_TEMPLATE_TOKENS:])
    assert tokens == ["▁a", "▁red", "▁circle", "▁moving", "▁up", "<|eot_id|>"]
    prompts = train_motion_prompts() + [p for split in motion_heldout_splits().values() for p in split]
    for prompt in prompts:  # every training and held-out prompt: whole words, no byte fallback, in budget
        pieces = llama.tokenize(prompt)
        assert pieces == ["▁" + w if w[0].isalpha() else w for w in prompt.replace(":", " :").split()], prompt
        assert len(pieces) + 1 <= VIDEO_TEXT_MAX_LENGTH  # + <|eot_id|>
        assert clip.unk_token_id not in clip(prompt).input_ids[1:-1], prompt
    assert llama.padding_side == "right"  # the transformer masks the padded tail
    assert llama.model_max_length == LLAMA_TEMPLATE_TOKENS + VIDEO_TEXT_MAX_LENGTH  # the template plus the prompt budget


@pytest.mark.parametrize("family", ["hunyuan_video", "skyreels"])
def test_shipped_video_tokenizers_are_the_built_ones(family):
    from transformers import CLIPTokenizer, LlamaTokenizerFast

    folder = SHIPPED / family
    if not folder.exists():
        pytest.fail(f"{folder} is not shipped")
    llama, clip = LlamaTokenizerFast.from_pretrained(folder / "tokenizer"), CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    built_llama, built_clip = build_video_tokenizers()
    assert llama.get_vocab() == built_llama.get_vocab() and clip.get_vocab() == built_clip.get_vocab()
    prompt = "the green triangle moves to the left across the frame"
    assert llama(prompt)["input_ids"] == built_llama(prompt)["input_ids"]


def test_the_real_pipelines_sample_from_the_written_folders(pretrained):
    """`HunyuanVideoPipeline` / `HunyuanSkyreelsImageToVideoPipeline.from_pretrained` load the folders
    and generate clips of the toy geometry (their own prompt template, CLIP at 77 tokens)."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline

    call = {"prompt": "a red circle moving up", "height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 2,
            "output_type": "pt", "max_sequence_length": VIDEO_TEXT_MAX_LENGTH}
    t2v = HunyuanVideoPipeline.from_pretrained(pretrained / "hunyuan_video")
    t2v.set_progress_bar_config(disable=True)
    assert t2v(**call).frames.shape == (1, 9, 3, 32, 32)
    i2v = HunyuanSkyreelsImageToVideoPipeline.from_pretrained(pretrained / "skyreels")
    i2v.set_progress_bar_config(disable=True)
    assert i2v(image=torch.rand(1, 3, 32, 32), true_cfg_scale=1.0, **call).frames.shape == (1, 9, 3, 32, 32)


def test_latent_foreground_weights_follow_the_causal_vae_grouping():
    """Frame 0 alone in latent frame 0, frames 1–4 in latent frame 1, 5–8 in latent frame 2; each
    latent cell covers a 4×4 pixel block; a cell is lit when any of its pixels is (> 0.1)."""
    from lightning_grpo.worlds.moving_shapes.pretrain import latent_foreground_weights

    clips = torch.zeros(1, 9, 3, 8, 8)  # [N, F, 3, H, W]
    clips[0, 0, 1, 0, 0] = 0.5  # frame 0, top-left block  -> latent (0, 0, 0)
    clips[0, 3, 2, 5, 6] = 0.2  # frame 3, bottom-right    -> latent (1, 1, 1)
    clips[0, 8, 0, 1, 7] = 0.9  # frame 8, top-right       -> latent (2, 0, 1)
    clips[0, 5, 0, 6, 1] = 0.05  # below the 0.1 threshold: not lit
    weights = latent_foreground_weights(clips, (1, 16, 3, 2, 2), foreground_weight=4.0)
    assert weights.shape == (1, 1, 3, 2, 2)
    expected = torch.ones(3, 2, 2)
    expected[0, 0, 0] = expected[1, 1, 1] = expected[2, 0, 1] = 5.0
    assert torch.equal(weights[0, 0], expected)
    with pytest.raises(ValueError, match="do not tile"):
        latent_foreground_weights(torch.zeros(1, 8, 3, 8, 8), (1, 16, 3, 2, 2), 4.0)


def test_weighted_flow_loss_is_the_plain_loss_at_unit_weight_and_scales_per_element():
    """mean(w·e²): w = 1 is the plain loss; weighting one half of the latents by 3 gives
    (3·S_a + S_b) / n from the two halves' summed squared errors."""
    from lightning_grpo.worlds import pretraining as pretrain

    class Fixed:
        def predict(self, x, t, condition):  # v_θ = 0, so the error is −(ε − z)
            return torch.zeros_like(x)

    z, noise = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 3, 2, 2)
    table, ids = {"c": torch.zeros(1, 1)}, torch.zeros(2, dtype=torch.long)
    loss = lambda w=None: pretrain._flow_loss(Fixed(), z, noise, ids, table, torch.Generator().manual_seed(1), 0.0, None,  # noqa: E731
                                              **({} if w is None else {"weight": w}))
    assert loss(torch.ones(2, 1, 3, 2, 2)) == pytest.approx(loss().item(), rel=1e-6)
    error = (noise - z).square()  # e² = |0 − (ε − z)|² at v_θ = 0, whatever σ was drawn
    weight = torch.ones(2, 1, 3, 2, 2)
    weight[:, :, 0] = 3.0
    by_hand = (3 * error[:, :, 0].sum() + error[:, :, 1:].sum()) / error.numel()
    assert loss(weight).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_flow_loss_sigma_shift_moves_the_training_noise_up():
    """σ = s·u / (1 + (s − 1)·u) on the logit-normal draw u (at s = 3: u = 1/2 → 3/4): the timesteps
    the denoiser sees are 1000·σ of exactly that map, and s = 1 leaves u as drawn."""
    from lightning_grpo.worlds import pretraining as pretrain

    seen = []

    class Recorder:
        def predict(self, x, t, condition):
            seen.append(t.clone())
            return torch.zeros_like(x)

    z = torch.zeros(64, 2, 1, 1, 1)
    table, ids = {"c": torch.zeros(1, 1)}, torch.zeros(64, dtype=torch.long)
    for shift in (1.0, 3.0):
        pretrain._flow_loss(Recorder(), z, torch.ones_like(z), ids, table, torch.Generator().manual_seed(7), 0.0, None,
                            sigma_shift=shift)
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(7)))
    assert torch.allclose(seen[0], 1000 * u)
    assert torch.allclose(seen[1], 1000 * 3 * u / (1 + 2 * u))
    assert (seen[1] >= seen[0]).all() and seen[1].mean() > seen[0].mean() + 100  # mass moved to high noise


def test_t2v_training_continues_from_an_earlier_pipeline(pretrained, tmp_path):
    """`--t2v-init-from` (one stage of a staged recipe): zero further steps leave the earlier
    transformer exactly as it was, and the report names where the stage started and the loss options."""
    source = pretrained / "hunyuan_video"
    main(["--reduced", "--family", "hunyuan_video", "--out", str(tmp_path), "--vae-from", str(source / "vae"),
          "--t2v-init-from", str(source), "--t2v-steps", "0", "--denoiser-sigma-shift", "3",
          "--denoiser-foreground-weight", "4", "--caption-noise", "0.3,0,0.3"])
    before = load_file(next((source / "transformer").glob("*.safetensors")))
    after = load_file(next((tmp_path / "hunyuan_video" / "transformer").glob("*.safetensors")))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = json.loads((tmp_path / "hunyuan_video" / "pretrain_report.json").read_text())
    assert report["init_from"] == str(source)
    assert report["final_loss"] is None  # a zero-step stage has no loss (not a 0 that reads as a perfect fit)
    assert report["config"]["denoiser_sigma_shift"] == 3.0 and report["config"]["t2v_steps"] == 0
    assert report["config"]["denoiser_foreground_weight"] == 4.0
    assert report["config"]["caption_noise"] == [0.3, 0.0, 0.3]  # (colour, shape, direction) rates


def test_caption_noise_argument_takes_one_rate_or_three():
    from lightning_grpo.worlds.moving_shapes.pretrain import caption_noise_arg

    assert caption_noise_arg("0.3") == 0.3 and caption_noise_arg("0.3,0,0.6") == (0.3, 0.0, 0.6)
    for bad in ("0.3;0", "0.3,0.3", "0.3,0,1.5"):  # not numbers, two rates, a rate above 1
        with pytest.raises(argparse.ArgumentTypeError, match="colour,shape,direction"):
            caption_noise_arg(bad)


def test_train_denoiser_rejects_a_bad_shift_and_mismatched_weights_before_any_work():
    from lightning_grpo.worlds.pretraining import train_denoiser

    latents = torch.zeros(4, 16, 3, 2, 2)
    data = (latents, ["a red circle moving up"] * 4, None)
    with pytest.raises(ValueError, match="denoiser_sigma_shift must be > 0, got 0.0"):
        train_denoiser(object(), "hunyuan_video", VideoPretrainConfig(denoiser_sigma_shift=0.0), data=data, steps=1)
    with pytest.raises(ValueError, match=r"weights \(3, 1, 3, 2, 2\) do not match the latents \(4, 16, 3, 2, 2\)"):
        train_denoiser(object(), "hunyuan_video", VideoPretrainConfig(), data=data, steps=1, weights=torch.ones(3, 1, 3, 2, 2))


def test_decoder_stage_changes_only_the_decoder(pretrained, tmp_path):
    """`--vae-decoder-steps` (`pretraining.finetune_decoder`): the encoder and quant_conv, hence every
    latent an earlier transformer was trained on, stay bit for bit; the decoder moves; the report
    keeps the ceiling before beside the new one."""
    source = pretrained / "hunyuan_video"
    main(["--reduced", "--family", "hunyuan_video", "--out", str(tmp_path), "--vae-from", str(source / "vae"),
          "--t2v-init-from", str(source), "--t2v-steps", "0", "--vae-decoder-steps", "3", "--vae-decoder-lr", "1e-2"])
    before = load_file(next((source / "vae").glob("*.safetensors")))
    after = load_file(next((tmp_path / "hunyuan_video" / "vae").glob("*.safetensors")))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    report = json.loads((tmp_path / "hunyuan_video" / "pretrain_report.json").read_text())
    decoder = report["vae"]["decoder"]
    assert decoder["steps"] == 3 and decoder["lr"] == 1e-2 and decoder["ceiling_before"] is not None
    assert set(report["vae"]["ceiling"]) == set(decoder["ceiling_before"])


def test_finetune_decoder_restores_the_flags_and_rejects_bad_arguments():
    from lightning_grpo.worlds.components import build_video_vae
    from lightning_grpo.worlds.pretraining import finetune_decoder
    from lightning_grpo.worlds.moving_shapes.pretrain import clip_sampler

    config = VideoPretrainConfig.reduced()
    vae = build_video_vae(config.size, 0)
    vae.encoder.requires_grad_(False)  # a caller's own freezing survives the stage
    losses = finetune_decoder(config, vae, clip_sampler(config.size), steps=2, lr=1e-3)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert not any(p.requires_grad for p in vae.encoder.parameters())
    assert all(p.requires_grad for p in vae.decoder.parameters())
    with pytest.raises(ValueError, match="steps >= 0 and lr > 0, got steps=1, lr=0"):
        finetune_decoder(config, vae, clip_sampler(config.size), steps=1, lr=0)
