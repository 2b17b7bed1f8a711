"""Captioned samples for pretraining: deterministic, drawn from the requested pool, self-consistent."""

from __future__ import annotations

import torch

from lightning_grpo.worlds.shapes import exact_match_accuracy, heldout_scenes, parse_prompt, sample_captioned_images, train_scenes


def test_same_seed_same_batch() -> None:
    a_pixels, a_prompts = sample_captioned_images(64, seed=5)
    b_pixels, b_prompts = sample_captioned_images(64, seed=5)
    c_pixels, c_prompts = sample_captioned_images(64, seed=6)
    assert torch.equal(a_pixels, b_pixels) and a_prompts == b_prompts
    assert a_prompts != c_prompts


def test_pool_is_respected_and_captions_match_images() -> None:
    pixels, prompts = sample_captioned_images(200, scenes=train_scenes(), size=32, seed=0)
    assert pixels.shape == (200, 3, 32, 32)
    heldout = set(heldout_scenes())
    assert not {parse_prompt(p) for p in prompts} & heldout
    assert exact_match_accuracy(pixels, prompts) == 1.0
