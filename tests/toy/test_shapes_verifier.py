"""The pixel verifier: accuracy on clean and degraded renders, mismatches, empty images, the reward."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.rewards.base import RewardError
from lightning_grpo.toy import (
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    Scene,
    ShapesVerifier,
    all_scenes,
    attribute_correctness,
    decode_scenes,
    describe,
    exact_match_accuracy,
    render_scenes,
)

SEEDS = 5  # jitter draws per combination: 48 × 5 = 240 images per condition


def _sample(size: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Every combination SEEDS times, jittered, with prompts cycling through all templates."""
    scenes = all_scenes() * SEEDS
    prompts = [describe(s, i % len(TEMPLATES)) for i, s in enumerate(scenes)]
    return render_scenes(scenes, size=size, seed=seed), prompts, scenes


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize(
    ("blur", "noise"),
    [(0.0, 0.0), (0.6, 0.05), (1.0, 0.05), (1.5, 0.08)],
    ids=["clean", "blur0.6-noise0.05", "blur1.0-noise0.05", "blur1.5-noise0.08"],
)
def test_ground_truth_renders_are_correct(size: int, blur: float, noise: float, degrade_fn) -> None:
    pixels, prompts, _ = _sample(size, seed=size)
    pixels = degrade_fn(pixels, blur * size / 32, noise, seed=size)  # blur given in pixels at 32²
    correct = attribute_correctness(pixels, prompts)
    per_attribute = correct.float().mean(0).tolist()
    exact = correct.all(1).float().mean().item()
    print(f"size {size} blur {blur} noise {noise}: colour/shape/position {per_attribute}, exact {exact:.4f}")
    assert exact >= 0.99, per_attribute


@pytest.mark.parametrize("attribute", ["colour", "shape", "position"])
def test_one_wrong_attribute_is_scored_wrong(attribute: str) -> None:
    """Score each image against its prompt with one attribute replaced: that attribute, and only it, fails."""
    pixels, _, scenes = _sample(32, seed=1)
    values = {"colour": COLOUR_NAMES, "shape": SHAPES, "position": POSITIONS}[attribute]
    column = ("colour", "shape", "position").index(attribute)
    for offset in range(1, len(values)):
        wrong = []
        for scene in scenes:
            fields = {"colour": scene.colour, "shape": scene.shape, "position": scene.position}
            fields[attribute] = values[(values.index(fields[attribute]) + offset) % len(values)]
            wrong.append(describe(Scene(**fields)))
        correct = attribute_correctness(pixels, wrong)
        assert not correct[:, column].any(), f"{attribute} accepted for a different {attribute}"
        others = [c for c in range(3) if c != column]
        assert correct[:, others].all()
    dense = ShapesVerifier("dense")(pixels, wrong)  # the reward itself, for the last offset
    assert torch.allclose(dense, torch.full_like(dense, 2 / 3))
    assert (ShapesVerifier("exact")(pixels, wrong) == 0).all()


@pytest.mark.parametrize("size", [32, 64])
def test_dim_blurred_renders_are_correct(size: int, degrade_fn) -> None:
    """An under-saturated object (70% of its colour, as an MSE-trained generator tends to make)."""
    pixels, prompts, _ = _sample(size, seed=size + 1)
    pixels = degrade_fn(0.7 * pixels, size / 32, 0.05, seed=size)
    correct = attribute_correctness(pixels, prompts)
    assert correct.all(1).float().mean().item() >= 0.99, correct.float().mean(0).tolist()


def test_random_other_prompts_score_the_attributes_they_share() -> None:
    pixels, _, scenes = _sample(32, seed=2)
    shuffled = [scenes[i] for i in torch.randperm(len(scenes), generator=torch.Generator().manual_seed(0)).tolist()]
    correct = attribute_correctness(pixels, [describe(s) for s in shuffled])
    shared = torch.tensor(
        [[a.colour == b.colour, a.shape == b.shape, a.position == b.position] for a, b in zip(scenes, shuffled)]
    )
    assert torch.equal(correct, shared)


@pytest.mark.parametrize(
    "image",
    [
        torch.zeros(3, 32, 32),  # black = the background: no object
        torch.ones(3, 32, 32),  # all "foreground": no background, no object
        torch.full((3, 32, 32), 0.2),  # dim grey, below the foreground threshold
        torch.full((3, 32, 32), float("nan")),  # a diverged generator: must not turn into a NaN reward
    ],
    ids=["black", "white", "dim-grey", "nan"],
)
@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_empty_images_score_zero_without_nan(image: torch.Tensor, mode: str) -> None:
    pixels = image.unsqueeze(0).repeat(4, 1, 1, 1)
    prompts = [describe(s) for s in all_scenes()[:4]]
    scores = ShapesVerifier(mode)(pixels, prompts)
    assert torch.isfinite(scores).all()
    assert (scores == 0).all()
    decoded = decode_scenes(pixels)
    assert not decoded.valid.any()
    assert (decoded.indices == -1).all()
    assert decoded.scenes() == [None] * 4


def test_random_noise_gives_finite_scores() -> None:
    pixels = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = ShapesVerifier()(pixels, [describe(all_scenes()[0])] * 16)
    assert torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


def test_reward_modes_and_exact_match_accuracy() -> None:
    scenes = all_scenes()[:8]
    pixels = render_scenes(scenes, seed=3)
    right = [describe(s) for s in scenes]
    moved = [Scene(s.colour, s.shape, POSITIONS[(POSITIONS.index(s.position) + 1) % 4]) for s in scenes[4:]]
    half = right[:4] + [describe(s) for s in moved]
    assert torch.equal(ShapesVerifier("dense")(pixels, half), torch.tensor([1.0] * 4 + [2 / 3] * 4))
    assert torch.equal(ShapesVerifier("exact")(pixels, half), torch.tensor([1.0] * 4 + [0.0] * 4))
    assert exact_match_accuracy(pixels, half) == pytest.approx(0.5)
    assert exact_match_accuracy(pixels, right) == 1.0
    assert decode_scenes(pixels).scenes() == scenes


def test_reward_names_and_errors() -> None:
    assert ShapesVerifier().name == "shapes_dense"
    assert ShapesVerifier("exact").name == "shapes_exact"
    with pytest.raises(ValueError, match="mode"):
        ShapesVerifier("fuzzy")  # type: ignore[arg-type]
    pixels = torch.zeros(2, 1, 32, 32)
    with pytest.raises(RewardError, match=r"RGB images \[B, 3, H, W\]"):
        ShapesVerifier()(pixels, ["a red circle at the top left"] * 2)
    with pytest.raises(RewardError, match="cannot parse prompt 'a circle'"):
        ShapesVerifier()(torch.zeros(1, 3, 32, 32), ["a circle"])
