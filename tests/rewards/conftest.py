"""Tiny, seeded, offline reward models saved in the real checkpoint layouts.

Nothing is downloaded: open_clip models come from a registered tiny config, the CLIP tokenizer from
a handmade vocab/merges file, and the weights are random but fixed by seeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_OPEN_CLIP = "tiny-test-ViT"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_open_clip_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registers the tiny open_clip architecture (open_clip.add_model_config) and returns its name."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP


@pytest.fixture(scope="session")
def tiny_open_clip_model(tiny_open_clip_name: str) -> torch.nn.Module:
    """A seeded tiny open_clip model (random weights), in eval mode."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_open_clip_name, pretrained=None).eval()
    with torch.no_grad():  # a non-default temperature, so tests can tell whether it is applied
        model.logit_scale.fill_(2.0)
    return model


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_open_clip_model: torch.nn.Module) -> Path:
    """HPS_v2.1_compressed.pt in the official layout: {"state_dict": open_clip state dict}."""
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": tiny_open_clip_model.state_dict()}, path)
    return path


def _clip_vocab_and_merges(folder: Path) -> tuple[Path, Path]:
    """A handmade CLIP BPE vocabulary: printable ASCII symbols (alone and word-final; byte-level BPE
    maps them to themselves) plus a few merges."""
    import string

    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


@pytest.fixture(scope="session")
def pickscore_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, processor_dir): a tiny CLIPModel (save_pretrained) and a local CLIPProcessor."""
    return write_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))


def write_tiny_pickscore(root: Path) -> tuple[Path, Path]:
    """Write a tiny PickScore under `root`: (model_dir, processor_dir), seeded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    processor_dir, model_dir = root / "processor", root / "model"
    processor_dir.mkdir(parents=True)
    vocab_file, merges_file = _clip_vocab_and_merges(root)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_dir)

    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 32, "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=1.5,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(model_dir)
    return model_dir, processor_dir
