"""The toy-pipeline pretraining script, at reduced size: it writes real diffusers pipelines that the
policy adapters load, deterministically, and its noisy captions have the intended statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_grpo.worlds.components import build_tokenizers, vocabulary
from lightning_grpo.worlds.shapes.pretrain import PretrainConfig, load_policy, main, noisy_captions
from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe, parse_prompt, train_prompts
from lightning_grpo.worlds.shapes.vocab import all_scenes


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    main(["--reduced", "--out", str(out)])
    return out


@pytest.mark.parametrize("family,denoiser", [("flux", "transformer"), ("sd", "unet")])
def test_script_writes_loadable_pipelines(pretrained, family, denoiser):
    folder = pretrained / family
    assert (folder / "model_index.json").is_file()
    report = json.loads((folder / "pretrain_report.json").read_text())
    assert report["heldout"]["samples"] == 80  # every held-out prompt, once (reduced config)
    heldout = report["heldout"]
    # an exact match needs all three attributes right, and it counts whole samples out of 80
    assert heldout["exact_match"] <= min(heldout["colour"], heldout["shape"], heldout["position"])
    assert heldout["exact_match"] * 80 == pytest.approx(round(heldout["exact_match"] * 80), abs=1e-6)
    policy = load_policy(family, folder, PretrainConfig.reduced().size.image_size)
    pixels = policy.decode(policy.prepare_latents(2, torch.Generator().manual_seed(0)))
    assert pixels.shape == (2, 3, 32, 32)
    weights = load_file(next((folder / denoiser).glob("*.safetensors")))
    assert all(t.dtype == torch.float16 for t in weights.values())  # stored at half size


def test_script_is_deterministic(pretrained, tmp_path):
    main(["--reduced", "--family", "flux", "--out", str(tmp_path)])
    first = load_file(next((pretrained / "flux" / "transformer").glob("*.safetensors")))
    second = load_file(next((tmp_path / "flux" / "transformer").glob("*.safetensors")))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tokenizers_cover_every_prompt_word_without_unknowns():
    clip, t5 = build_tokenizers()
    for prompt in train_prompts()[:10] + ["upper-left: a RED square!"]:
        clip_ids = clip(prompt.lower()).input_ids
        # this tokenizer's unknown token is its end-of-text token: inside the prompt it must not occur
        assert clip.unk_token_id == clip.eos_token_id and clip_ids[-1] == clip.eos_token_id
        assert clip.unk_token_id not in clip_ids[1:-1]
        assert t5.unk_token_id not in t5(prompt.lower()).input_ids
    # whole words are single tokens: "a red circle at the top left" is 7 words + BOS + EOS
    assert len(clip("a red circle at the top left").input_ids) == 9
    assert {"red", "circle", "top", "upper", "image"} <= set(vocabulary())


def test_shipped_tokenizers_read_reserved_phrasings_as_whole_words():
    """The held-out phrasings tokenize into known whole words within the length budget, with the
    tokenizers the shipped pipelines load (the same vocabulary `build_tokenizers` makes)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from lightning_grpo.worlds.components import TEXT_MAX_LENGTH
    from lightning_grpo.worlds.shapes.prompts import heldout_split_prompts

    folder = Path(__file__).resolve().parents[2] / "lightning_grpo" / "worlds" / "shapes" / "pretrained" / "flux"
    clip, t5 = CLIPTokenizer.from_pretrained(folder / "tokenizer"), T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    built_clip, built_t5 = build_tokenizers()
    assert clip.get_vocab() == built_clip.get_vocab() and t5.get_vocab() == built_t5.get_vocab()
    for prompt in heldout_split_prompts("both"):
        words = prompt.replace(":", " :").split()
        assert t5.tokenize(prompt) == [w if w == ":" else "▁" + w for w in words], prompt
        # CLIP: the same pieces as in training captions (BPE splits "bottom" into 3 there too), no unknowns, no truncation
        assert clip.tokenize(prompt) == [piece for w in words for piece in clip.tokenize(w)], prompt
        ids = clip(prompt).input_ids
        assert clip.unk_token_id not in ids[1:-1] and len(ids) <= TEXT_MAX_LENGTH, prompt
        assert len(t5(prompt).input_ids) <= TEXT_MAX_LENGTH


def test_noisy_captions_zero_noise_keeps_scenes():
    prompts = [describe(s, 0) for s in all_scenes()]
    noisy = noisy_captions(prompts, 0.0, seed=0)
    assert [parse_prompt(p) for p in noisy] == [parse_prompt(p) for p in prompts]


def test_noisy_captions_match_rate_follows_noise():
    # An attribute with K values stays right w.p. (1 - r) + r / K; colour has K = 4.
    prompts = [describe(s, 0) for s in all_scenes()] * 100  # 4800 captions
    noise = 0.4
    noisy = noisy_captions(prompts, noise, seed=1)
    same_colour = sum(parse_prompt(a).colour == parse_prompt(b).colour for a, b in zip(prompts, noisy)) / len(prompts)
    assert same_colour == pytest.approx((1 - noise) + noise / 4, abs=0.03)
    assert len({p for p in noisy}) > len(TEMPLATES)  # templates are redrawn too


def test_noisy_captions_reject_bad_noise():
    with pytest.raises(ValueError, match="caption_noise"):
        noisy_captions(["a red circle at the top left"], 1.5, seed=0)
