"""The renderer: layout, determinism per seed, objects kept inside their quadrant, exact colours."""

from __future__ import annotations

import pytest
import torch

from lightning_grpo.worlds.shapes import COLOURS, POSITIONS, Scene, all_scenes, render_indices, render_scenes, scenes_to_indices


@pytest.mark.parametrize("size", [32, 64])
def test_layout_and_range(size: int) -> None:
    pixels = render_scenes(all_scenes(), size=size)
    assert pixels.shape == (48, 3, size, size)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert (pixels.flatten(1).amax(1) > 0.5).all(), "every image must contain an object"


def test_same_seed_same_images_other_seed_other_jitter() -> None:
    scenes = all_scenes()
    first = render_scenes(scenes, seed=7)
    assert torch.equal(first, render_scenes(scenes, seed=7))
    assert not torch.equal(first, render_scenes(scenes, seed=8)), "jitter must depend on the seed"


def test_generator_overrides_seed_and_advances() -> None:
    scenes = all_scenes()[:4]
    gen = torch.Generator().manual_seed(3)
    a = render_scenes(scenes, generator=gen)
    b = render_scenes(scenes, generator=gen)
    assert torch.equal(a, render_scenes(scenes, seed=3))
    assert not torch.equal(a, b), "a shared generator must advance between batches"


def test_no_jitter_is_one_image_per_scene() -> None:
    scene = [Scene("red", "circle", "top left")]
    assert torch.equal(render_scenes(scene, jitter=False, seed=0), render_scenes(scene, jitter=False, seed=99))


@pytest.mark.parametrize("size", [32, 64])
def test_object_stays_in_its_quadrant_under_jitter(size: int) -> None:
    indices = scenes_to_indices(all_scenes()).repeat(10, 1)
    pixels = render_indices(indices, size=size, seed=1)
    foreground = pixels.amax(1) > 0  # [N, H, W]: any coverage at all
    half = size // 2
    for i, position in enumerate(POSITIONS):
        rows = slice(0, half) if position.startswith("top") else slice(half, size)
        cols = slice(0, half) if position.endswith("left") else slice(half, size)
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[rows, cols] = True
        chosen = indices[:, 2] == i
        assert not (foreground[chosen] & ~inside).any(), f"an object leaves the {position} quadrant"


def test_object_colour_is_the_palette_colour() -> None:
    scenes = all_scenes()
    pixels = render_scenes(scenes, jitter=False)
    for image, scene in zip(pixels, scenes):
        brightest = image.flatten(1)[:, image.sum(0).flatten().argmax()]
        assert torch.allclose(brightest, torch.tensor(COLOURS[scene.colour]), atol=1e-6), scene


def test_bad_indices_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        render_indices(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown colour"):
        Scene("purple", "circle", "top left")
