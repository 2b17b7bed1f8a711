"""VideoAlign / VideoReward (Liu et al. 2025, KwaiVGI/VideoAlign): the DanceGRPO video reward.

A Qwen2-VL-2B reward model scoring a video and its prompt on three axes: VQ (visual quality),
MQ (motion quality), TA (text alignment). DanceGRPO trains HunyuanVideo T2V on VQ and
SkyReels I2V on MQ.

Model (KwaiVGI/VideoAlign trainer.py, `Qwen2VLRewardModelBT`): Qwen2-VL with a bias-free linear
head `rm_head: hidden -> output_dim` applied to the last hidden states. The prompt template
"detailed_special" (prompt_template.py) contains three special tokens `<|VQ_reward|>`,
`<|MQ_reward|>`, `<|TA_reward|>` (added to the tokenizer; embeddings resized to len(tokenizer));
the head's outputs at those three positions, in sequence order, are the raw VQ, MQ, TA:
    logits = rm_head(h)[special positions].view(B, 3, output_dim)
    output_dim == 1 -> [B, 3];  output_dim == 3 -> diagonal -> [B, 3]
Normalised scores (inference.py `_norm`): r_k = (raw_k − mean_k) / std_k with `inference_config`
{VQ,MQ,TA}_{mean,std} from model_config.json; Overall = VQ + MQ + TA (after normalisation if on).

Checkpoint layout (HF `KlingTeam/VideoReward`, formerly `KwaiVGI/VideoReward`):
    <checkpoint_dir>/model_config.json     data_config / model_config / peft_lora_config / inference_config
    <checkpoint_dir>/checkpoint-<step>/model.pth   full state dict of the PEFT-wrapped model:
        base_model.model.{model.*, visual.*, lm_head.*, rm_head.*} with LoRA layers stored as
        `<layer>.base_layer.weight` + `<layer>.lora_A.default.weight` / `lora_B...`
        (utils.py `load_model_from_checkpoint`; older transformers layout: `model.` = text model)
    <checkpoint_dir>/checkpoint-<step>/tokenizer/  (optional) tokenizer with the 3 special tokens
and the base model folder (Qwen/Qwen2-VL-2B-Instruct) for config.json (and its tokenizer when the
checkpoint has none). LoRA is folded in at load time, W = W₀ + (α/r)·B·A (α/√r with rsLoRA), so
the scorer is a plain Qwen2-VL with no PEFT wrapper; every key must match (strict).

Video preprocessing (vision_process.py, on tensors here instead of a decoded MP4):
    n = round₂(clamp(F / video_fps · fps, 4, F)); frame indices = round(linspace(0, F−1, n))
    (H', W') = smart_resize(H, W, factor 28, min_pixels 128·28², max_pixels = max_frame_pixels)
    bicubic antialiased resize, CLIP mean/std normalisation, pad to a multiple of the temporal
    patch (repeat the last frame), then Qwen2-VL patchification (14-px patches, 2×2 merge).
The official pipeline sees uint8 frames decoded from an MP4 (DanceGRPO train_grpo_hunyuan.py
writes each clip with diffusers' `export_to_video(..., fps=args.fps)`, `--fps 8` in its
finetune_hunyuan_grpo.sh / finetune_skyreels_i2v.sh, hence `video_fps=8`) and resizes the uint8
tensor (rounded, clamped); here the float frames are used as they are, which is the point of
scoring in memory. `quantize=True` truncates them to uint8 as `export_to_video` does
(`(frame * 255).astype(np.uint8)`) and rounds the resized frames, leaving only the codec out.

Text decoder call (trainer.py `Qwen2VLRewardModelBT.forward`): the video features are scattered
into the token embeddings and the text model is called with `inputs_embeds` and
`position_ids=None`. In the transformers VideoAlign (4.45.2) and DanceGRPO (4.46.1) pin, the text
model then uses sequential positions 0..L−1 on all three M-RoPE axes; the reward model was trained
and is used that way, so `VideoAlignModel` passes exactly those positions instead of letting
transformers 5 compute the 3-D (t, h, w) video positions of `get_rope_index`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grpo.rewards._common import (
    CheckpointMismatchError,
    FrozenModelReward,
    load_checkpoint_file,
    load_state_dict_strict,
    require_path,
)
from lightning_grpo.rewards._preprocess import quantize_uint8

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
AXES = ("VQ", "MQ", "TA")
# Qwen2-VL image/video processor statistics (OpenAI CLIP) and geometry.
QWEN2VL_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN2VL_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_FACTOR = 28  # patch 14 × merge 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# Qwen2-VL chat template with its default system prompt, one video then the text (what
# `processor.apply_chat_template(..., add_generation_prompt=True)` renders for VideoAlign).
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{text}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ---------------------------------------------------------------------------------------------
# prompt (KwaiVGI/VideoAlign prompt_template.py, template "detailed_special")
# ---------------------------------------------------------------------------------------------
_VQ_BLOCK = """**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 
"""
_MQ_BLOCK = """**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.
"""
_TA_BLOCK = """**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.
"""
_INTRO = (
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
    "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
    "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others."
)


def build_prompt(text_prompt: str) -> str:
    """The "detailed_special" evaluation prompt: one special reward token after each axis."""
    return (
        f"\n{_INTRO}\n\n{_VQ_BLOCK}\nPlease provide the ratings of Visual Quality: <|VQ_reward|>\nEND\n\n"
        f"{_MQ_BLOCK}\nPlease provide the ratings of Motion Quality: <|MQ_reward|>\nEND\n\n"
        f"{_TA_BLOCK}\nTextual prompt - {text_prompt}\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n"
    )


# ---------------------------------------------------------------------------------------------
# frames and pixels (vision_process.py: smart_nframes, smart_resize; Qwen2-VL patchification)
# ---------------------------------------------------------------------------------------------
def _round_by(x: float, factor: int) -> int:
    return round(x / factor) * factor


def sample_frame_indices(num_frames: int, video_fps: float, fps: float) -> list[int]:
    """Uniform frame indices at `fps` (official `smart_nframes` + `linspace(...).round()`)."""
    min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(FPS_MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = num_frames / video_fps * fps
    n = _round_by(min(max(n, min_frames), max_frames), FRAME_FACTOR)
    n = min(n, num_frames)
    if n < FRAME_FACTOR:
        raise ValueError(f"VideoAlign needs at least {FRAME_FACTOR} frames, got {num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Sides divisible by `factor`, area within [min_pixels, max_pixels], aspect ratio kept."""
    h_bar, w_bar = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> tuple[Tensor, tuple[int, int, int]]:
    """Qwen2-VL flattening of normalised frames [T, C, H, W] into patches.

    Returns ([grid_t·grid_h·grid_w, C·tps·ps·ps], (grid_t, grid_h, grid_w)), patches ordered
    so that each 2×2 merge window is contiguous (as Qwen2VLImageProcessor/VideoProcessor do).
    """
    if frames.shape[0] % temporal_patch_size:
        pad = temporal_patch_size - frames.shape[0] % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, tps, ps, ps]
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------
# checkpoint conversion
# ---------------------------------------------------------------------------------------------
def merge_lora(state_dict: Mapping[str, Tensor], alpha: float, rank: int, use_rslora: bool = False) -> dict[str, Tensor]:
    """Folds PEFT LoRA layers into plain weights: W = W₀ + s·B·A, s = α/r (α/√r with rsLoRA).

    `x.base_layer.weight` + `x.lora_A.<adapter>.weight` + `x.lora_B.<adapter>.weight` -> `x.weight`
    (and `x.base_layer.bias` -> `x.bias`); a state dict without LoRA keys is returned unchanged.
    """
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    out: dict[str, Tensor] = {}
    lora = re.compile(r"^(.*)\.lora_([AB])\.[^.]+\.weight$")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = lora.match(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".base_layer." in key:
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or f"{module}.weight" not in out:
            raise KeyError(f"incomplete LoRA layer {module!r}: has {sorted(ab)}, base weight {'present' if f'{module}.weight' in out else 'missing'}")
        base = out[f"{module}.weight"]
        delta = ab["B"].float() @ ab["A"].float()  # [out, r] @ [r, in]
        out[f"{module}.weight"] = (base.float() + scaling * delta).to(base.dtype)
    return out


def to_backbone_layout(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys -> keys of `VideoAlignModel` (`backbone.visual.*`, `backbone.language_model.*`,
    `rm_head.*`), accepting the PEFT prefix and both transformers layouts:
    old (< 4.52): `model.<text>`, `visual.*`; new: `model.language_model.*`, `model.visual.*`.
    `lm_head.weight` is dropped: the reward reads hidden states, never language-model logits."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.").removeprefix("module.")
        if key.startswith("lm_head."):
            continue
        if key.startswith("rm_head."):
            out[key] = value
        elif key.startswith(("model.language_model.", "model.visual.")):
            out["backbone." + key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            out["backbone." + key] = value
        elif key.startswith("model."):
            out["backbone.language_model." + key.removeprefix("model.")] = value
        else:
            out[key] = value  # left as is: reported as unexpected by the strict load
    return out


def find_checkpoint(checkpoint_dir: Path, step: int, reward_name: str) -> Path:
    """`checkpoint-<step>/model.pth` (latest step when `step` is −1), or FileNotFoundError."""
    steps = sorted(
        (int(p.name.split("-")[-1]), p) for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
    )
    if step >= 0:
        steps = [(s, p) for s, p in steps if s == step]
    if not steps:
        wanted = f"checkpoint-{step}" if step >= 0 else "checkpoint-<step>"
        raise FileNotFoundError(f"reward {reward_name!r}: no {wanted}/ folder in {checkpoint_dir}")
    return require_path(steps[-1][1] / "model.pth", reward_name)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class VideoAlignModel(nn.Module):
    """Qwen2-VL backbone (vision tower + language model, no LM head) + the linear reward head.

    Args:
        config: a transformers `Qwen2VLConfig`.
        output_dim: outputs of `rm_head` per special token (VideoReward: 1).
        special_token_ids: ids of <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>.
    """

    def __init__(self, config: object, output_dim: int, special_token_ids: list[int]) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.backbone = Qwen2VLModel(config)
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        self.output_dim = output_dim
        self.register_buffer("special_token_ids", torch.tensor(special_token_ids), persistent=False)
        self.video_token_id = int(config.video_token_id)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor, video_grid_thw: Tensor) -> Tensor:
        """Raw [B, 3] (VQ, MQ, TA) rewards: rm_head at the special tokens (trainer.py, reward_token="special").

        Positions are the official ones: 0..L−1 on the three M-RoPE axes (see the module doc)."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, batch, length)  # [3, B, L]
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state  # [B, L, D]
        logits = self.rm_head(hidden)  # [B, L, N]
        special = torch.isin(input_ids, self.special_token_ids)  # [B, L]
        counts = special.sum(dim=1)
        if not torch.all(counts == len(AXES)):
            raise ValueError(f"each sequence needs exactly {len(AXES)} reward tokens, found {counts.tolist()}")
        pooled = logits[special].view(input_ids.shape[0], len(AXES), self.output_dim)  # [B, 3, N]
        if self.output_dim == len(AXES):
            return pooled.diagonal(dim1=1, dim2=2)
        if self.output_dim == 1:
            return pooled[..., 0]
        raise ValueError(f"rm_head output_dim must be 1 or 3, got {self.output_dim}")


class VideoAlignReward(FrozenModelReward):
    """VideoAlign (VideoReward) score of each (video, prompt) pair.

    Args:
        checkpoint_dir: VideoReward folder: model_config.json and checkpoint-<step>/model.pth
            (optionally checkpoint-<step>/tokenizer/).
        output: the score returned: "VQ" (visual quality), "MQ" (motion quality), "TA" (text
            alignment) or "Overall" (VQ + MQ + TA).
        normalize: standardise each axis with the checkpoint's inference_config mean/std (as the
            official `reward(..., use_norm=True)`).
        base_model_dir: Qwen2-VL-2B-Instruct folder (config.json; tokenizer when the checkpoint has
            none). Defaults to `checkpoint_dir` itself.
        checkpoint_step: which checkpoint-<step> to load; −1 for the latest.
        video_fps: frame rate of the generated videos (pixels carry none); frames are resampled from
            it to the checkpoint's `fps` (2 for VideoReward). 8 = the rate DanceGRPO writes its
            clips at (53 frames -> 14 sampled; at 24 it would be 4).
        quantize: score the frames as DanceGRPO's MP4 path sees them, minus the codec: truncated to
            uint8 (`export_to_video`), resized, rounded to uint8 (torchvision's uint8 resize).
        dtype: dtype the model is built in ("bfloat16" as the official inference, "float32" on CPU).
        name: name the reward is logged under (defaults to "videoalign_<output>").
        weight: weight in the multi-reward advantage.
    """

    default_name = "videoalign"

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output: Literal["VQ", "MQ", "TA", "Overall"] = "VQ",
        normalize: bool = True,
        base_model_dir: str | Path | None = None,
        checkpoint_step: int = -1,
        video_fps: float = 8.0,
        quantize: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        if output not in (*AXES, "Overall"):
            raise ValueError(f"output must be one of VQ, MQ, TA, Overall; got {output!r}")
        super().__init__(name or f"videoalign_{output.lower()}", weight)
        self.output, self.normalize, self.video_fps = output, bool(normalize), float(video_fps)
        if self.video_fps <= 0:
            raise ValueError(f"reward {self.name!r}: video_fps must be > 0, got {video_fps}")
        self.quantize = bool(quantize)
        root = require_path(checkpoint_dir, self.name, directory=True)
        base = require_path(base_model_dir if base_model_dir is not None else root, self.name, directory=True)
        configs = json.loads(require_path(root / "model_config.json", self.name).read_text())
        weights_path = find_checkpoint(root, checkpoint_step, self.name)
        self._read_configs(configs)
        self.tokenizer = self._load_tokenizer(weights_path.parent / "tokenizer", base)
        special_ids = self._special_token_ids()
        state_dict = self._convert(load_checkpoint_file(weights_path), configs.get("peft_lora_config") or {})
        config = self._model_config(base, state_dict)
        self.model = VideoAlignModel(config, int(configs["model_config"].get("output_dim", 1)), special_ids)
        load_state_dict_strict(self.model, state_dict, self.name)
        self.model.to(getattr(torch, dtype))
        self.patch_size = int(config.vision_config.patch_size)
        self.temporal_patch_size = int(config.vision_config.temporal_patch_size)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        self.freeze()

    # -- loading ------------------------------------------------------------------------------
    def _read_configs(self, configs: Mapping) -> None:
        """Frame sampling / resolution from data_config; normalisation stats from inference_config."""
        data = configs.get("data_config") or {}
        model = configs.get("model_config") or {}
        if not model.get("use_special_tokens", False) or data.get("prompt_template_type", "detailed_special") != "detailed_special":
            raise ValueError(f"reward {self.name!r}: only special-token checkpoints with the 'detailed_special' template are supported")
        if data.get("num_frames") is not None:
            raise ValueError(f"reward {self.name!r}: fixed num_frames sampling is not supported (fps sampling only)")
        self.fps = float(data.get("fps", 2.0))
        self.max_frame_pixels = int(data.get("max_frame_pixels", 448 * 448))
        stats = configs.get("inference_config") or {}
        if self.normalize and not all(f"{a}_{s}" in stats for a in AXES for s in ("mean", "std")):
            raise ValueError(f"reward {self.name!r}: normalize=True but model_config.json has no inference_config mean/std")
        self.stats = {a: (float(stats.get(f"{a}_mean", 0.0)), float(stats.get(f"{a}_std", 1.0))) for a in AXES}

    def _load_tokenizer(self, checkpoint_tokenizer: Path, base: Path) -> object:
        """The checkpoint's tokenizer, else the base model's plus the three reward tokens (train_reward.py)."""
        from transformers import AutoTokenizer

        folder = checkpoint_tokenizer if checkpoint_tokenizer.is_dir() else base
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        return tokenizer

    def _special_token_ids(self) -> list[int]:
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ValueError(f"reward {self.name!r}: tokenizer lacks the reward tokens {SPECIAL_TOKENS}")
        return ids

    def _convert(self, checkpoint: Mapping[str, Tensor], peft: Mapping) -> dict[str, Tensor]:
        """PEFT/DDP-wrapped, possibly LoRA, old- or new-layout keys -> `VideoAlignModel` keys."""
        if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
            checkpoint = checkpoint["state_dict"]
        has_lora = any(".lora_A." in k for k in checkpoint)
        if has_lora:
            try:
                checkpoint = merge_lora(checkpoint, float(peft["lora_alpha"]), int(peft["lora_r"]), bool(peft.get("use_rslora", False)))
            except KeyError as err:
                raise CheckpointMismatchError(f"reward {self.name!r}: cannot merge LoRA: {err}") from err
        return to_backbone_layout(checkpoint)

    def _model_config(self, base: Path, state_dict: Mapping[str, Tensor]) -> object:
        """Base Qwen2-VL config, its vocabulary sized like the checkpoint's (resized) embeddings."""
        from transformers import Qwen2VLConfig

        config = Qwen2VLConfig.from_pretrained(require_path(base / "config.json", self.name).parent, local_files_only=True)
        embed = state_dict.get("backbone.language_model.embed_tokens.weight")
        if embed is not None:
            config.text_config.vocab_size = int(embed.shape[0])
        config._attn_implementation = "sdpa"
        config.text_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        return config

    # -- scoring ------------------------------------------------------------------------------
    def preprocess_video(self, video: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """[F, C, H, W] in [0, 1] -> (patches [N, C·2·14·14], grid (t, h, w))."""
        frames = video[sample_frame_indices(video.shape[0], self.video_fps, self.fps)].float()  # [n, C, H, W]
        if self.quantize:  # export_to_video: (frame * 255).astype(np.uint8) truncates
            frames = (frames.clamp(0.0, 1.0) * 255.0).floor() / 255.0
        height, width = smart_resize(*frames.shape[-2:], min_pixels=VIDEO_MIN_PIXELS, max_pixels=self.max_frame_pixels)
        if (height, width) != tuple(frames.shape[-2:]):
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        frames = quantize_uint8(frames) if self.quantize else frames.clamp(0.0, 1.0)  # the official uint8 resize rounds and clamps
        mean = torch.tensor(QWEN2VL_MEAN, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(QWEN2VL_STD, device=frames.device).view(1, 3, 1, 1)
        return patchify((frames - mean) / std, self.patch_size, self.temporal_patch_size, self.merge_size)

    def tokenize(self, prompts: list[str], grids: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
        """Chat-formatted prompts, <|video_pad|> repeated once per merged patch, right-padded."""
        merge = self.merge_size**2
        texts = [
            CHAT_TEMPLATE.format(video="<|video_pad|>" * (t * h * w // merge), text=build_prompt(p))
            for p, (t, h, w) in zip(prompts, grids)
        ]
        ids = [torch.tensor(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        length = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)], attention_mask[row, : len(seq)] = seq, 1
        return input_ids, attention_mask

    def raw_scores(self, videos: Tensor, prompts: list[str]) -> Tensor:
        """Unnormalised [B, 3] (VQ, MQ, TA) for videos [B, F, C, H, W] in [0, 1]."""
        prepared = [self.preprocess_video(v) for v in videos.to(self.device)]
        patches = torch.cat([p for p, _ in prepared]).to(self.dtype)  # [ΣN, C·tps·ps²]
        grids = [g for _, g in prepared]
        input_ids, attention_mask = self.tokenize(prompts, grids)
        return self.model(
            input_ids.to(self.device), attention_mask.to(self.device), patches,
            torch.tensor(grids, dtype=torch.long, device=self.device),
        ).float()

    def axes(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """{"VQ","MQ","TA","Overall"} -> [B]; normalised per axis if `normalize`, Overall = their sum."""
        raw = self.raw_scores(videos, prompts)
        scores = {}
        for k, axis in enumerate(AXES):
            mean, std = self.stats[axis] if self.normalize else (0.0, 1.0)
            scores[axis] = (raw[:, k] - mean) / std
        scores["Overall"] = scores["VQ"] + scores["MQ"] + scores["TA"]
        return scores

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        if pixels.ndim != 5:
            raise ValueError(f"VideoAlign scores videos [B, F, C, H, W], got {tuple(pixels.shape)}")
        return self.axes(pixels, prompts)[self.output].to(pixels.device)
