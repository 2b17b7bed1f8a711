"""Shared loading helpers: dtype names, local-vs-hub detection, clear errors, empty tokenizers."""

from __future__ import annotations

import shutil

import pytest
import torch

from lightning_grpo.policies.loading import check_pretrained_folder, load_tokenizer, looks_local, parse_dtype


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


def test_looks_local(tmp_path):
    assert looks_local(tmp_path)
    assert looks_local("./models/sd")
    assert looks_local("/data/models/flux")
    assert looks_local("a/b/c")
    assert not looks_local("CompVis/stable-diffusion-v1-4")
    assert not looks_local("black-forest-labs/FLUX.1-dev")


def test_hub_ids_are_not_checked_on_disk(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_pretrained_folder("some-org/some-model", {"unet": "model"})  # online: from_pretrained decides


def test_uncached_hub_id_offline_is_named_as_a_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'some-org/some-model' is not a local folder .*hub id.*HF_HUB_OFFLINE=1"):
        check_pretrained_folder("some-org/some-model", {"unet": "model"})


def test_relative_path_under_an_existing_folder_is_local_and_never_asks_the_hub(tmp_path, monkeypatch):
    """'models/flux' with ./models present is a path: the error is the missing folder, not the hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("models/flux")
    with pytest.raises(FileNotFoundError, match=r"pretrained model folder 'models/flux' does not exist"):
        check_pretrained_folder("models/flux", {"unet": "model"})


def test_check_names_first_missing_piece(tiny_sd_path, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    (broken / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        check_pretrained_folder(broken, {"unet": "model", "tokenizer": "tokenizer"})
    with pytest.raises(ValueError, match="unknown component kind"):
        check_pretrained_folder(broken, {"unet": "weights"})


def test_tokenizer_that_loads_empty_is_refused():
    """transformers 5 builds an empty tokenizer for a hub id it cannot reach; we raise instead."""
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (a hub call could hang)")
    from transformers import CLIPTokenizer

    with pytest.raises(FileNotFoundError, match="regular tokens"):
        load_tokenizer(CLIPTokenizer, "lightning-grpo-tests/does-not-exist", "tokenizer")


def test_tiny_tokenizers_load_with_their_vocabulary(tiny_flux_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = load_tokenizer(CLIPTokenizer, tiny_flux_path, "tokenizer")
    t5 = load_tokenizer(T5TokenizerFast, tiny_flux_path, "tokenizer_2")
    assert clip.convert_ids_to_tokens(clip("a cat").input_ids) == ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    assert t5.convert_ids_to_tokens(t5("a cat").input_ids) == ["▁a", "▁cat", "</s>"]
