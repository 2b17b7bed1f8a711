"""VideoAlign on a tiny seeded Qwen2-VL + reward head, saved in the official VideoReward layout
(model_config.json + checkpoint-<step>/model.pth of the PEFT-wrapped model, old transformers keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_grpo.rewards import RewardError, VideoAlignReward
from lightning_grpo.rewards._common import CheckpointMismatchError
from lightning_grpo.rewards.videoalign import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_prompt,
    patchify,
    sample_frame_indices,
    smart_resize,
)

STATS = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105, "TA_std": 2.5121}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "a cat dog video the of and to is in red blue runs sky please provide ratings quality".split()
VIDEO_FPS = 8.0


def _tokenizer(with_reward_tokens: bool):
    """A word-level tokenizer with Qwen2-VL's special tokens (unknown words -> [UNK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = QWEN_SPECIALS + (list(SPECIAL_TOKENS) if with_reward_tokens else [])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>", additional_special_tokens=extra
    )


def _config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        },
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def _old_layout(key: str) -> str:
    """transformers >= 4.52 keys -> the layout VideoReward was saved in (text model under `model.`)."""
    inner = "base_model.model."
    key = key.replace(inner + "model.language_model.", inner + "model.")
    return key.replace(inner + "model.visual.", inner + "visual.")


@pytest.fixture(scope="module")
def videoreward(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_videoreward(tmp_path_factory.mktemp("videoreward"))


def write_tiny_videoreward(root: Path):
    """(checkpoint_dir, base_dir, peft_model, tokenizer) under `root`: the official VideoAlign
    build on tiny sizes: Qwen2-VL + rm_head(bias=False, output_dim=1), reward tokens added, LoRA
    r=4/α=8 on the language model's linears (lm_head, rm_head, embed_tokens, visual excluded),
    random non-zero LoRA B. (Also the recipe configs' stand-in, tests/configs.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    base, ckpt = root / "Qwen2-VL-tiny", root / "VideoReward"
    tokenizer = _tokenizer(with_reward_tokens=True)
    config = _config(tokenizer)
    config.save_pretrained(base)
    _tokenizer(with_reward_tokens=False).save_pretrained(base)
    tokenizer.save_pretrained(ckpt / "checkpoint-7" / "tokenizer")

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.rm_head = torch.nn.Linear(32, 1, bias=False)
    excluded = ("lm_head", "rm_head", "embed_tokens", "visual")
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not any(e in n for e in excluded)]
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0, bias="none"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.eval()
    torch.save({_old_layout(k): v for k, v in peft_model.state_dict().items()}, ckpt / "checkpoint-7" / "model.pth")
    (ckpt / "model_config.json").write_text(json.dumps({
        "data_config": {"max_frame_pixels": 200704, "num_frames": None, "fps": 2.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False,
                             "lora_namespan_exclude": list(excluded)},
        "inference_config": STATS,
    }))
    return ckpt, base, peft_model, tokenizer


def official_text_call(inner, ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                       video_grid_thw: torch.Tensor) -> torch.Tensor:
    """Last hidden states as KwaiVGI/VideoAlign trainer.py `Qwen2VLRewardModelBT.forward` gets them:
    token embeddings, video features scattered into the <|video_pad|> slots, then the *text model*
    called with inputs_embeds and position_ids=None (its default: positions 0..L-1 on all three
    M-RoPE axes, as in transformers 4.45/4.46)."""
    backbone = inner.model  # Qwen2VLModel: .visual + .language_model
    embeds = backbone.get_input_embeddings()(ids)
    video = backbone.visual(pixel_values_videos, grid_thw=video_grid_thw).pooler_output
    mask = (ids == inner.config.video_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, video.to(embeds.dtype))
    return backbone.language_model(input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=None).last_hidden_state


def mrope_text_call(inner, ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
    """The transformers-5 multimodal call with 3-D (t, h, w) M-RoPE video positions: not what the
    reward model was trained with (the call our code used to make)."""
    return inner.model(
        input_ids=ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw, mm_token_type_ids=(ids == inner.config.video_token_id).int() * 2,
    ).last_hidden_state


def reference_raw(peft_model, tokenizer, videos: torch.Tensor, prompts: list[str], call=official_text_call) -> torch.Tensor:
    """Official pipeline by hand: frames at 2 fps, smart_resize, HF Qwen2VLVideoProcessor patches,
    chat text with expanded <|video_pad|>, the *unmerged* PEFT model called as the official code
    calls it, rm_head at the reward tokens."""
    import torch.nn.functional as F
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor()
    inner = peft_model.base_model.model  # Qwen2VLForConditionalGeneration (+ rm_head), LoRA active
    rows = []
    for video, prompt in zip(videos, prompts):
        frames = video[torch.linspace(0, video.shape[0] - 1, 4).round().long()]  # 10 frames @ 8 fps -> 4 @ 2 fps
        frames = F.interpolate(frames, size=(336, 308), mode="bicubic", antialias=True).clamp(0, 1)  # smart_resize(56, 52)
        out = processor(videos=[frames], do_resize=False, do_rescale=False, return_tensors="pt")
        t, h, w = out["video_grid_thw"][0].tolist()
        text = CHAT_TEMPLATE.format(video="<|video_pad|>" * (t * h * w // 4), text=build_prompt(prompt))
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = call(inner, ids, torch.ones_like(ids), out["pixel_values_videos"], out["video_grid_thw"])
            positions = [(ids[0] == tokenizer.convert_tokens_to_ids(tok)).nonzero().item() for tok in SPECIAL_TOKENS]
            rows.append(inner.rm_head(hidden[0, positions])[:, 0])
    return torch.stack(rows)  # [B, 3]


@pytest.fixture(scope="module")
def videos() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 10, 3, 56, 52)  # [B, F, C, H, W]


def test_frame_sampling_and_resize_by_hand() -> None:
    assert sample_frame_indices(53, video_fps=24, fps=2) == [0, 17, 35, 52]  # 53/24·2 = 4.4 -> 4 frames
    assert sample_frame_indices(10, video_fps=8, fps=2) == [0, 3, 6, 9]
    assert sample_frame_indices(48, video_fps=8, fps=2) == [round(i * 47 / 11) for i in range(12)]  # 12 frames
    assert smart_resize(480, 480, 128 * 784, 448 * 448) == (448, 448)
    assert smart_resize(56, 52, 128 * 784, 448 * 448) == (336, 308)  # scaled up to the minimum area
    assert smart_resize(400, 640, 128 * 784, 448 * 448) == (336, 560)  # SkyReels size, capped area


def test_patchify_matches_transformers_video_processor() -> None:
    from transformers import Qwen2VLVideoProcessor

    torch.manual_seed(2)
    frames = torch.randn(3, 3, 56, 84)  # odd frame count: last frame repeated to fill the temporal patch
    expected = Qwen2VLVideoProcessor()(videos=[frames], do_resize=False, do_rescale=False, do_normalize=False, return_tensors="pt")
    patches, grid = patchify(frames, 14, 2, 2)
    assert grid == tuple(expected["video_grid_thw"][0].tolist()) == (2, 4, 6)
    torch.testing.assert_close(patches, expected["pixel_values_videos"])


def test_prompt_has_the_three_reward_tokens_in_order() -> None:
    text = build_prompt("a cat runs")
    positions = [text.index(t) for t in SPECIAL_TOKENS]
    assert positions == sorted(positions) and all(text.count(t) == 1 for t in SPECIAL_TOKENS)
    assert "Textual prompt - a cat runs\n" in text


def test_raw_scores_match_unmerged_peft_reference(videoreward, videos) -> None:
    ckpt, base, peft_model, tokenizer = videoreward
    reward = VideoAlignReward(ckpt, output="VQ", normalize=False, base_model_dir=base, video_fps=VIDEO_FPS, dtype="float32")
    prompts = ["a cat runs", "the blue sky"]
    expected = reference_raw(peft_model, tokenizer, videos, prompts)
    raw = reward.raw_scores(videos, prompts)
    torch.testing.assert_close(raw, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reward(videos, prompts), expected[:, 0], atol=1e-4, rtol=1e-4)
    # LoRA really was folded in: the base weights alone give different scores
    with peft_model.disable_adapter():
        assert not torch.allclose(reference_raw(peft_model, tokenizer, videos, prompts), expected, atol=1e-3)
    # the 3-D M-RoPE positions of transformers 5's multimodal call give different scores: the
    # reference above really follows the official sequential positions
    assert not torch.allclose(reference_raw(peft_model, tokenizer, videos, prompts, call=mrope_text_call), expected, atol=1e-3)


def test_official_frame_sampling_at_dancegrpo_fps() -> None:
    # DanceGRPO writes 53-frame clips at 8 fps: 53 / 8 · 2 = 13.25 -> 14 frames at the checkpoint's 2 fps
    assert len(sample_frame_indices(53, 8.0, 2.0)) == 14
    assert len(sample_frame_indices(53, 24.0, 2.0)) == 4  # the old default would keep 4
    assert sample_frame_indices(53, 8.0, 2.0) == torch.linspace(0, 52, 14).round().long().tolist()


@pytest.mark.parametrize("height, width", [(480, 848), (400, 640), (56, 52)])
def test_quantized_frames_equal_the_official_uint8_resize(videoreward, height, width) -> None:
    """vision_process.py `fetch_video`: torchvision resize of the decoded uint8 frames (bicubic,
    antialias), then /255 (processor do_rescale); the frames come from export_to_video's truncation."""
    import torchvision.transforms.functional as TF

    ckpt, base, _, _ = videoreward
    reward = VideoAlignReward(ckpt, base_model_dir=base, video_fps=VIDEO_FPS, dtype="float32", quantize=True)
    torch.manual_seed(7)
    video = torch.rand(4, 3, height, width)  # 4 frames at 8 fps -> all 4 sampled
    patches, grid = reward.preprocess_video(video)
    uint8 = (video * 255).to(torch.uint8)  # astype(np.uint8) truncates
    size = smart_resize(height, width, min_pixels=128 * 28 * 28, max_pixels=200704)
    official = TF.resize(uint8, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True).float() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    expected, expected_grid = patchify((official - mean) / std, 14, 2, 2)
    assert grid == expected_grid
    diff = ((patches - expected).view(-1, 3, 2 * 14 * 14) * std.view(1, 3, 1)).abs() * 255  # uint8 levels
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.3


def test_normalisation_and_overall(videoreward, videos) -> None:
    ckpt, base, _, _ = videoreward
    prompts = ["a dog", "a cat"]
    common = dict(base_model_dir=base, video_fps=VIDEO_FPS, dtype="float32")
    raw = VideoAlignReward(ckpt, normalize=False, **common).raw_scores(videos, prompts)
    normalised = [(raw[:, k] - STATS[f"{a}_mean"]) / STATS[f"{a}_std"] for k, a in enumerate(("VQ", "MQ", "TA"))]
    for k, axis in enumerate(("VQ", "MQ", "TA")):
        reward = VideoAlignReward(ckpt, output=axis, normalize=True, **common)
        assert reward.name == f"videoalign_{axis.lower()}"
        torch.testing.assert_close(reward(videos, prompts), normalised[k], atol=1e-4, rtol=1e-4)
    overall = VideoAlignReward(ckpt, output="Overall", normalize=True, **common)(videos, prompts)
    torch.testing.assert_close(overall, sum(normalised), atol=1e-4, rtol=1e-4)
    unnormalised = VideoAlignReward(ckpt, output="Overall", normalize=False, **common)(videos, prompts)
    torch.testing.assert_close(unnormalised, raw.sum(1), atol=1e-4, rtol=1e-4)


def test_batch_with_different_prompt_lengths_matches_single_scoring(videoreward, videos) -> None:
    ckpt, base, _, _ = videoreward
    reward = VideoAlignReward(ckpt, output="MQ", normalize=False, base_model_dir=base, video_fps=VIDEO_FPS, dtype="float32")
    prompts = ["a", "the red dog runs in the blue sky and the cat"]  # right padding on the first
    batched = reward(videos, prompts)
    single = torch.cat([reward(videos[i : i + 1], prompts[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_tokenizer_falls_back_to_base_plus_reward_tokens(videoreward, tmp_path: Path, videos) -> None:
    ckpt, base, _, _ = videoreward
    # same checkpoint without its tokenizer folder: the base tokenizer gets the 3 tokens appended
    # (train_reward.py), which reproduces the same ids
    copy = tmp_path / "VideoReward"
    (copy / "checkpoint-7").mkdir(parents=True)
    (copy / "model_config.json").write_text((ckpt / "model_config.json").read_text())
    (copy / "checkpoint-7" / "model.pth").symlink_to(ckpt / "checkpoint-7" / "model.pth")
    common = dict(base_model_dir=base, video_fps=VIDEO_FPS, dtype="float32", normalize=False)
    torch.testing.assert_close(
        VideoAlignReward(copy, **common)(videos, ["a cat", "a dog"]),
        VideoAlignReward(ckpt, **common)(videos, ["a cat", "a dog"]),
    )


def test_image_input_is_a_named_error(videoreward) -> None:
    ckpt, base, _, _ = videoreward
    reward = VideoAlignReward(ckpt, base_model_dir=base, dtype="float32")
    with pytest.raises(RewardError, match="'videoalign_vq'.*videos"):
        reward(torch.rand(2, 3, 56, 56), ["a", "b"])


def test_missing_paths_name_reward_and_path(videoreward, tmp_path: Path) -> None:
    ckpt, base, _, _ = videoreward
    with pytest.raises(FileNotFoundError, match=r"'videoalign_vq'.*nowhere"):
        VideoAlignReward(tmp_path / "nowhere", base_model_dir=base)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_config.json").write_text((ckpt / "model_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"'videoalign_mq'.*checkpoint-"):
        VideoAlignReward(tmp_path / "empty", output="MQ", base_model_dir=base)


def test_mismatching_checkpoint_names_reward_and_keys(videoreward, tmp_path: Path) -> None:
    ckpt, base, _, _ = videoreward
    state = torch.load(ckpt / "checkpoint-7" / "model.pth", weights_only=True)
    state.pop("base_model.model.rm_head.weight")
    state["base_model.model.score_head.weight"] = torch.zeros(1, 32)
    broken = tmp_path / "VideoReward"
    (broken / "checkpoint-7").mkdir(parents=True)
    (broken / "model_config.json").write_text((ckpt / "model_config.json").read_text())
    torch.save(state, broken / "checkpoint-7" / "model.pth")
    with pytest.raises(CheckpointMismatchError, match=r"'videoalign_vq'.*rm_head\.weight.*score_head\.weight"):
        VideoAlignReward(broken, base_model_dir=base, dtype="float32")
