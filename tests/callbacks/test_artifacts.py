"""Artifact and drift measures (lightning_grpo/artifacts.py): hand-worked values and the
properties the monitor relies on (a synthetic grid raises the periodic energy, a colour shift the
hue drift, identical sets give no drift)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_grpo.artifacts import (
    ArtifactReference,
    ArtifactStats,
    artifact_stats,
    background_energy,
    chroma,
    circular_emd,
    clipped,
    compare_samples,
    first_frame_adherence,
    flicker,
    hue_histograms,
    hue_shift,
    kid,
    luminance,
    main_object_masks,
    periodic_energy,
    set_summary,
    standard_error,
)
from lightning_grpo.worlds.shapes.prompts import heldout_scenes
from lightning_grpo.worlds.shapes.render import render_scenes


def grey(values: torch.Tensor) -> torch.Tensor:
    """[H, W] -> [1, 3, H, W] with R = G = B (so the luma is the value)."""
    return values.expand(3, -1, -1)[None].clone()


def test_periodic_energy_of_a_grating_is_its_mean_square() -> None:
    """Y = 0.5 + a·cos(2π·4x/32): two spectral peaks of power (a·HW/2)² each, nothing around them,
    so Σ peaks / (HW)² = a²/2, the grating's mean square (Parseval)."""
    x = torch.arange(32).float()
    for a in (0.1, 0.3):
        grating = grey((0.5 + a * torch.cos(2 * math.pi * 4 * x / 32)).expand(32, 32))
        assert periodic_energy(grating, off_object=False).item() == pytest.approx(a * a / 2, rel=1e-4)
    slow = grey((0.5 + 0.3 * torch.cos(2 * math.pi * 1 * x / 32)).expand(32, 32))  # 1 cycle: below min_radius 2
    assert periodic_energy(slow, off_object=False).item() == pytest.approx(0.0, abs=1e-9)
    assert periodic_energy(torch.full((1, 3, 32, 32), 0.7)).item() == 0.0


def test_a_grid_of_faint_blobs_raises_periodic_and_background_energy() -> None:
    clean = render_scenes(heldout_scenes(), seed=0)  # [16, 3, 32, 32]
    blobs = torch.zeros(1, 3, 32, 32)
    for y in range(2, 32, 8):
        for x in range(2, 32, 8):
            blobs[..., y : y + 2, x : x + 2] = torch.tensor([0.3, 0.15, 0.0]).view(3, 1, 1)  # dim orange, period 8
    gridded = (clean + blobs).clamp(0, 1)
    assert (periodic_energy(gridded) > 3 * periodic_energy(clean)).all()
    assert (background_energy(clean) < 1e-6).all() and (background_energy(gridded) > 1e-3).all()


def test_background_energy_by_hand() -> None:
    """Black 16×16 with a white 4×4 object and one grey 0.3 pixel far from it: the off-object
    pixels are the 256 − 36 outside the object dilated by 1 px; one of them has ‖x − b‖²/3 = 0.09."""
    image = torch.zeros(1, 3, 16, 16)
    image[..., 2:6, 2:6] = 1.0
    image[..., 12, 12] = 0.3
    mask = main_object_masks(image)[0]
    assert mask.sum() == 16 and mask[2:6, 2:6].all()  # the dim pixel is below half the object's contrast
    assert background_energy(image).item() == pytest.approx(0.09 / (256 - 36))


def test_largest_component_is_the_object() -> None:
    image = torch.zeros(1, 3, 16, 16)
    image[..., 1:3, 1:3] = 1.0  # 4 pixels
    image[..., 8:13, 8:13] = 0.9  # 25 pixels, the main object
    mask = main_object_masks(image)[0]
    assert mask.sum() == 25 and mask[8:13, 8:13].all() and not mask[1:3, 1:3].any()


def test_colour_and_exposure_by_hand() -> None:
    image = torch.zeros(1, 3, 4, 4)
    image[0, :, :2] = torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1)  # top half orange: chroma 1, luma 0.5702
    image[0, :, 2:, :2] = 1.0  # a white quarter: chroma 0, luma 1 (clipped)
    assert chroma(image).item() == pytest.approx(0.5)
    assert luminance(image).item() == pytest.approx(0.5 * (0.2126 + 0.5 * 0.7152) + 0.25 * 1.0)
    assert clipped(image).item() == pytest.approx(0.25)
    video = torch.stack([image[0], torch.zeros(3, 4, 4)])[None]  # [1, 2, 3, 4, 4]: the mean over frames
    assert chroma(video).item() == pytest.approx(0.25)


def test_hue_histogram_and_shift_by_hand() -> None:
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    orange = red.clone()
    orange[:, 1] = 0.5  # hue 30°: bin 3 of 36
    assert torch.allclose(hue_histograms(red)[0], torch.eye(36)[0])
    assert torch.allclose(hue_histograms(orange)[0], torch.eye(36)[3])
    half = red.clone()
    half[:, 1] = 0.25  # hue 15°: half in bin 1, half in bin 2
    assert torch.allclose(hue_histograms(half)[0, 1:3], torch.tensor([0.5, 0.5]))
    dim = red * 0.2  # chroma weights within a sample; each sample's histogram sums to 1
    assert torch.allclose(hue_histograms(dim)[0], torch.eye(36)[0]) and hue_histograms(torch.zeros(1, 3, 2, 2)).sum() == 0
    assert hue_shift(hue_histograms(red), hue_histograms(orange)) == pytest.approx(30.0)
    assert hue_shift(hue_histograms(red), hue_histograms(red)) == 0.0
    magenta = red.clone()
    magenta[:, 2] = 0.5  # hue 330°: 30° the other way round the circle, not 330°
    assert hue_shift(hue_histograms(red), hue_histograms(magenta)) == pytest.approx(30.0)


def test_circular_emd_goes_round_the_circle() -> None:
    p, q = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 0, 0, 1.0])
    assert circular_emd(p, q) == pytest.approx(1.0)
    assert circular_emd(p, torch.tensor([0, 0, 1.0, 0])) == pytest.approx(2.0)
    assert circular_emd(torch.tensor([1.0, 0, 1, 0]), torch.tensor([0, 1.0, 0, 1])) == pytest.approx(1.0)  # half a bin each ×2


def _moving_square(colours: list[tuple[float, float, float]], size: int = 3) -> torch.Tensor:
    """[1, F, 3, 16, 16]: a square moving 2 px right per frame, frame f in colours[f]."""
    frames = torch.zeros(len(colours), 3, 16, 16)
    for f, colour in enumerate(colours):
        frames[f, :, 6 : 6 + size, 2 + 2 * f : 2 + 2 * f + size] = torch.tensor(colour).view(3, 1, 1)
    return frames[None]


def test_flicker_ignores_motion_and_sees_change() -> None:
    steady = _moving_square([(1.0, 0, 0)] * 4)
    assert flicker(steady).item() == pytest.approx(0.0)
    # red -> orange from frame 1 on: one pair differs by (0, 0.5, 0) on the object: mean |Δ| 1/6
    changing = _moving_square([(1.0, 0, 0), (1.0, 0.5, 0), (1.0, 0.5, 0), (1.0, 0.5, 0)])
    assert flicker(changing).item() == pytest.approx((1 / 6) / 3)


def test_first_frame_adherence_on_the_object() -> None:
    clip = _moving_square([(1.0, 0, 0)] * 3)
    condition = clip[:, 0].clone()
    assert first_frame_adherence(clip, condition).item() == pytest.approx(1.0)
    recoloured = clip.clone()
    recoloured[:, 0, 1] = torch.where(recoloured[:, 0, 0] > 0, 0.5, 0.0)  # frame 0 orange
    assert first_frame_adherence(recoloured, condition).item() == pytest.approx(1 - 1 / 6)
    moved = clip.clone()
    moved[:, 0] = moved[:, 0].roll(6, -1)  # frame 0's square 6 px away: union 18 px, all off by 1 in R
    assert first_frame_adherence(moved, condition).item() == pytest.approx(1 - 1 / 3)
    with pytest.raises(ValueError, match="conditioning must be"):
        first_frame_adherence(clip, condition[:, :, :8])


def test_kid_by_hand_and_identical_sets() -> None:
    """1-D features, k(x, y) = (x·y + 1)³: X = {0, 1}, Y = {0, 2}: k_XX off-diagonal sum 2, k_YY 2,
    k_XY sum 1 + 1 + 1 + 27 = 30: MMD² = (2 + 2)/2 − 2·30/4 = −13."""
    assert kid(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])) == pytest.approx(-13.0)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=generator)
    same = kid(features, features)
    moved = kid(features, features + 1.0)
    assert abs(same) < 0.05 * moved and moved > 0
    state = torch.random.get_rng_state()
    kid(features, features + 1.0)
    assert torch.equal(state, torch.random.get_rng_state())  # never moves the training stream


def test_standard_error_by_hand() -> None:
    values = torch.tensor([0.0, 2.0, 1.0, 3.0])  # prompts {0, 2} and {1, 3}: within-prompt variances 2, 2
    assert standard_error(values, [torch.tensor([0, 1]), torch.tensor([2, 3])]) == pytest.approx(math.sqrt(2 * 2 + 2 * 2) / 4)
    assert standard_error(values) == pytest.approx(values.std().item() / 2)


def test_band_by_hand() -> None:
    """Per-sample measure with prompts {0, 2}, {1, 3}: SE = √8/4, band = 1.5 ± z·√2·SE = 1.5 ± z."""
    values = torch.tensor([0.0, 2.0, 1.0, 3.0])
    stats = ArtifactStats({"chroma": values, "periodic_energy": values}, hue=torch.ones(4, 36), groups=torch.tensor([0, 0, 1, 1]))
    reference = ArtifactReference(stats, z=2.0)
    assert (reference.bands["chroma"].low, reference.bands["chroma"].high) == (pytest.approx(-0.5), pytest.approx(3.5))
    assert reference.bands["periodic_energy"].low == -math.inf  # only a rise is an artifact
    assert reference.bands["hue_shift"].high == 1.0  # identical hue everywhere: no spread, the 1° floor
    restored = ArtifactReference.from_state(reference.state_dict())
    assert restored.bands == reference.bands


def test_band_floor_when_the_base_has_no_spread() -> None:
    """Clean renders have no background energy at all: on the log scale every sample sits at
    log10(ε), ε = (0.5/255)², the spread is 0 and the band is the 0.1-decade floor:
    high = ε·(10^0.1 − 1). One pixel off by an 8-bit level in 1000 does not warn; a grid does."""
    eps = (0.5 / 255) ** 2
    stats = ArtifactStats({"background_energy": torch.zeros(4)}, hue=torch.ones(4, 36), groups=torch.tensor([0, 0, 1, 1]))
    band = ArtifactReference(stats).bands["background_energy"]
    assert band.low == -math.inf and band.high == pytest.approx(eps * (10**0.1 - 1))
    assert not band.outside((1 / 255) ** 2 / 1000) and band.outside(0.005)


def test_energies_are_summarised_by_their_geometric_mean() -> None:
    """One sample with a stray object does not outweigh the others: the set's value is
    10^mean(log10(ε + v)) − ε, not the arithmetic mean."""
    eps = (0.5 / 255) ** 2
    values = torch.tensor([1e-4, 1e-4, 1e-4, 1e-1])
    expected = 10 ** (torch.log10(values.double() + eps).mean().item()) - eps
    assert set_summary("background_energy", values) == pytest.approx(expected)
    assert set_summary("background_energy", values) < 0.01 < values.mean().item()
    assert set_summary("chroma", values) == pytest.approx(values.mean().item())


def test_compare_samples_identical_grid_and_colour_shift() -> None:
    scenes = [s for s in heldout_scenes() for _ in range(2)]
    base = render_scenes(scenes, seed=0)  # 16 prompts × 2 samples
    same = compare_samples(base, base, samples_per_prompt=2)
    assert not [c.describe() for c in same.values() if c.outside]
    assert same["hue_shift"].value == 0.0
    assert all(c.value == pytest.approx(c.band.base) for n, c in same.items() if n != "hue_shift")
    assert not [c.describe() for c in compare_samples(base, render_scenes(scenes, seed=1), samples_per_prompt=2).values() if c.outside]
    blobs = torch.zeros(1, 3, 32, 32)
    blobs[..., 2::8, 2::8] = torch.tensor([0.3, 0.15, 0.0]).view(3, 1, 1)
    gridded = compare_samples(base, (base + blobs).clamp(0, 1), samples_per_prompt=2)
    assert gridded["periodic_energy"].outside and gridded["background_energy"].outside
    warmer = base.clone()
    warmer[:, 1] = torch.maximum(warmer[:, 1], 0.6 * warmer[:, 0])  # red -> orange/yellow
    drifted = compare_samples(base, warmer, samples_per_prompt=2)
    assert drifted["hue_shift"].outside and not drifted["periodic_energy"].outside


def test_artifact_stats_of_videos_with_conditioning_and_encoder() -> None:
    clips = torch.cat([_moving_square([(1.0, 0, 0)] * 3), _moving_square([(0, 1.0, 0)] * 3)])
    stats = artifact_stats(clips, conditioning=clips[:, 0], encoder=lambda x: x.flatten(1)[:, :5], samples_per_prompt=1)
    assert set(stats.values) == {"periodic_energy", "background_energy", "chroma", "luminance", "clipped", "flicker", "first_frame_adherence"}
    assert stats.features.shape == (2, 5) and stats.hue.shape == (2, 36)
    assert torch.allclose(stats.values["first_frame_adherence"], torch.ones(2))
    with pytest.raises(ValueError, match="do not split"):
        artifact_stats(clips, samples_per_prompt=3)


def test_kid_encoder_resolution() -> None:
    """An explicit plain encoder is used as it is; a CLIP-like reward gets its visual tower wrapped;
    without one, the first CLIP-like candidate; none at all: no KID."""
    from torch import nn

    from lightning_grpo.artifacts import ImageEncoder, resolve_encoder

    class ClipLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.encode_image = lambda x: x.flatten(1)[:, :4] * 2
            self.weight = nn.Parameter(torch.zeros(1))

        def preprocess(self, images):
            return images + 1

    plain = nn.Flatten()
    assert resolve_encoder(plain, [ClipLike()]) is plain
    wrapped = resolve_encoder(None, [nn.Identity(), ClipLike()])
    assert isinstance(wrapped, ImageEncoder)
    assert torch.equal(wrapped(torch.zeros(2, 3, 2, 2)), torch.full((2, 4), 2.0))  # (0 + 1) · 2: preprocess, then the tower
    assert isinstance(resolve_encoder(ClipLike(), []), ImageEncoder)
    assert resolve_encoder(None, [nn.Identity()]) is None
