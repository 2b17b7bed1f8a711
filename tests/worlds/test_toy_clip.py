"""The toy CLIP of the shapes world: the pretraining script's output loads through ClipScore, and
the shipped weights score the caption of the rendered scene above the captions of other scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_grpo.rewards import ClipScore
from lightning_grpo.worlds.shapes.pretrain_clip import (
    CONFIG_NAME,
    INFO_NAME,
    TOY_CLIP_DIR,
    WEIGHTS_NAME,
    main,
    multi_positive_clip_loss,
    scene_ids,
)
from lightning_grpo.worlds.shapes.prompts import TEMPLATES, describe
from lightning_grpo.worlds.shapes.render import render_scenes
from lightning_grpo.worlds.shapes.vocab import all_scenes
from tests.worlds.conftest import degrade

SCENES = all_scenes()


@pytest.fixture(scope="module")
def toy_clip() -> ClipScore:
    """The shipped weights, through the loader real CLIP checkpoints use."""
    torch.set_num_threads(1)
    return ClipScore(checkpoint=TOY_CLIP_DIR / WEIGHTS_NAME, architecture=str(TOY_CLIP_DIR))


def caption_scores(reward: ClipScore, pixels: torch.Tensor, templates: list[int]) -> torch.Tensor:
    """[N, 48]: reward of image i against scene k's caption written with image i's template,
    through the reward's public call (one (image, caption) pair per sample)."""
    columns = [reward(pixels, [describe(scene, t) for t in templates]) for scene in SCENES]
    return torch.stack(columns, dim=1)


def test_scene_ids_and_multi_positive_loss_by_hand():
    prompts = [describe(SCENES[5], 0), describe(SCENES[5], 3), describe(SCENES[47], 2)]
    assert scene_ids(prompts).tolist() == [5, 5, 47]
    # orthogonal unit features, scale 1: logits = I; targets rows (½, ½, 0), (½, ½, 0), (0, 0, 1)
    feats = torch.eye(3)
    loss = multi_positive_clip_loss(feats, feats, torch.tensor([5, 5, 47]), torch.tensor(1.0))
    log_p_hit, log_p_miss = 1 - torch.log(torch.tensor(torch.e + 2)), -torch.log(torch.tensor(torch.e + 2))
    expected = -(2 * (0.5 * log_p_hit + 0.5 * log_p_miss) + log_p_hit) / 3  # same in both directions
    torch.testing.assert_close(loss, expected)


def test_reduced_pretraining_writes_a_folder_that_clipscore_loads(tmp_path: Path):
    out = tmp_path / "clip"
    info = main([
        "--out", str(out), "--steps", "3", "--batch-size", "16", "--warmup-steps", "1", "--vision-layers", "1",
        "--text-layers", "1", "--eval-images-per-scene", "1", "--quiet",
    ])
    assert {p.name for p in out.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, INFO_NAME}
    assert json.loads((out / INFO_NAME).read_text())["config"]["steps"] == 3
    retrieval = info["retrieval"]
    # a retrieved caption is right only if its colour, shape and position all are; one render per
    # scene and template: the accuracy is the mean of the per-template ones and counts whole renders
    assert retrieval["accuracy"] <= min(retrieval[f"{a}_accuracy"] for a in ("colour", "shape", "position"))
    per_template = [retrieval[f"template_{t}"] for t in range(len(TEMPLATES))]
    assert retrieval["accuracy"] == pytest.approx(sum(per_template) / len(TEMPLATES), abs=1e-6)
    assert all(v * 48 == pytest.approx(round(v * 48), abs=1e-5) for v in per_template)
    reward = ClipScore(checkpoint=out / WEIGHTS_NAME, architecture=str(out))
    pixels = render_scenes(SCENES[:4], size=32)
    scores = reward(pixels, [describe(s) for s in SCENES[:4]])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_shipped_toy_clip_is_small():
    assert (TOY_CLIP_DIR / WEIGHTS_NAME).stat().st_size <= 8 * 2**20


def test_shipped_toy_clip_prefers_the_true_caption_over_the_other_47_scenes(toy_clip: ClipScore):
    # fresh renders (a seed the training stream does not use), two per scene, every template
    truth = torch.arange(len(SCENES)).repeat(2)  # [96]
    pixels = render_scenes([SCENES[i] for i in truth.tolist()], size=32, jitter=True, seed=20_251)
    templates = [i % len(TEMPLATES) for i in range(len(truth))]
    scores = caption_scores(toy_clip, pixels, templates)  # [96, 48]
    accuracy = (scores.argmax(1) == truth).float().mean().item()
    assert accuracy >= 0.9, f"caption retrieval {accuracy:.3f}"
    # the score grows with every attribute the caption gets right (what makes it a dense reward)
    attrs = torch.tensor([s.indices for s in SCENES])
    shared = (attrs[truth].unsqueeze(1) == attrs.unsqueeze(0)).sum(-1)  # [96, 48]
    means = [scores[shared == k].mean().item() for k in (3, 2, 1, 0)]
    assert means == sorted(means, reverse=True) and means[0] - means[1] > 0.1, means


def test_shipped_toy_clip_on_blurred_noisy_renders(toy_clip: ClipScore):
    # an imperfect generator's samples: blur σ = 1 px and noise 0.05 (the verifier's 100% regime)
    truth = torch.arange(len(SCENES))
    pixels = degrade(render_scenes(SCENES, size=32, jitter=True, seed=7), blur_sigma=1.0, noise_std=0.05, seed=7)
    scores = caption_scores(toy_clip, pixels, [0] * len(SCENES))
    accuracy = (scores.argmax(1) == truth).float().mean().item()
    assert accuracy >= 0.85, f"caption retrieval on degraded renders {accuracy:.3f}"
