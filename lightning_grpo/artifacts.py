"""Artifact and drift measures of generated samples, independent of any reward.

What GRPO breaks that a reward does not see: a regular grid of faint blobs over the background
(the checkerboards users of FLUX / Qwen-Image GRPO report), stray energy off the main object,
colours and exposure drifting (over-exposure under VideoAlign), the samples leaving the base
policy's distribution, and for video, flicker and clips that leave their conditioning image.
Each measure maps pixels to numbers; `ArtifactReference` turns the base policy's own samples
(fixed prompts, fixed seeds) into a warning band per measure, and `compare_samples` is the plain
function "base set vs trained set" (what `RewardHackingMonitor` and `HeldOutEvaluation` use).

Pixels are [N, C, H, W] images or [N, F, C, H, W] videos in [0, 1]; video measures of one clip
are the mean over its frames unless said otherwise. Per-sample measures (Tensor[N]):

- ``periodic_energy``: mean-square amplitude of the periodic component off the main object (the
  object painted over with the background first: its straight edges have spectral ripples of
  their own), the power in isolated peaks of the 2-D spectrum (a lattice of blobs or a checkerboard of period p puts its power on
  the frequencies k·H/p: sharp peaks; an object's spectrum is smooth). With Y the luma of the
  image minus its mean, P(u, v) = |DFT(Y)|²; a frequency f (radius ≥ `min_radius` cycles per
  image, so the object's own low-frequency envelope does not count) is a peak if P(f) ≥ P at its
  8 neighbours (circular); its excess is P(f) − median of the 8 neighbours. By Parseval
  (mean Y² = Σ P / (HW)²), Σ_peaks excess / (HW)² is the mean-square amplitude of the peaks, in
  intensity² units. Periodic noise as spectral peaks: Gonzalez & Woods, Digital Image
  Processing, 4th ed., §5.4; checkerboards of strided decoders: Odena et al. 2016, "Deconvolution
  and Checkerboard Artifacts", Distill.
- ``background_energy``: mean over the pixels off the main object (see `main_object_masks`) of
  ‖x − b‖² / C, b the background colour (per-channel median of the 1-pixel border): stray
  blobs, haze and speckle off the object.
- ``chroma``: mean chroma C = max(R, G, B) − min(R, G, B) (HSV saturation × value: saturation
  alone, (max − min)/max, is unstable on near-black pixels).
- ``luminance``: mean luma Y = 0.2126 R + 0.7152 G + 0.0722 B (ITU-R BT.709 coefficients).
- ``clipped``: share of pixels with luma ≥ 0.98 (blown highlights; over-exposure).
- ``flicker`` (video): motion-compensated frame difference on the object: for consecutive
  frames f, f+1, shift frame f+1 by the rounded shift of the object's centroid, and average
  |x_f − x_{f+1}(shifted)| over the union of the two object masks; the mean over frame pairs.
  The warping error of Lai et al. 2018 ("Learning Blind Video Temporal Consistency"), with the
  optical flow replaced by the object's translation: a moving object that keeps its look scores
  0, a changing colour, size or shape does not.
- ``first_frame_adherence`` (image-to-video): 1 − mean |x_0 − c| over the union of the object
  masks of the conditioning image c and frame 0 (mean over channels): frame 0 keeps the
  conditioning object's colour and shape; unlike a mean over the whole frame, a background of
  black pixels does not hide a changed object.

Set measures, distances between the current set and the base set (about 0 for identical sets):

- ``hue_shift``: the circular earth mover's distance between the chroma-weighted hue histograms
  (36 bins, 10°, linear soft binning, each sample's normalised to 1) summed over each set, in degrees: how far, on average, colour
  mass moved around the hue circle (red → orange is 30°). W1 on the circle = Δ · min_α Σ_k
  |F_k − α|, F the cumulative difference of the histograms, minimised at α = median of F (Rabin,
  Delon & Gousseau 2011, "Transportation Distances on the Circle", J. Math. Imaging Vis.).
- ``kid``: Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the
  unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³ between image-encoder
  features of the two sets, computed by torchmetrics' `KernelInceptionDistance` with the encoder
  as its custom feature extractor (any encoder the run already loads, e.g. a CLIP reward's visual
  tower, `encoder_of`); one subset of the full size, so the value is deterministic. Its cross
  term averages over all pairs, each sample with itself included, so identical sets of m
  samples give (2/m)·(mean k(x_i, x_j), i ≠ j − mean k(x_i, x_i)), slightly below 0, and sets
  drawn on the same prompts and seeds sit below 0 too; the band (from within-prompt halves of
  the base) is on the same footing.

Warning band (from the base set alone, `ArtifactReference`): the band is what a second draw of
the base policy's samples on the same prompts, other seeds, could show. For a per-sample
measure, the base mean ± z·√2·SE, SE the standard error of the base mean over seeds with the
prompts held fixed (`standard_error`: within-prompt variances when every prompt has ≥ 2
samples, else the plain s/√N); two independent draws differ by √2·SE. One-sided where only one
direction is an artifact (more periodic energy, less adherence). The two energies are
heavy-tailed: they are summarised by their geometric mean and banded on a log10 scale
(`LOG_OFFSET`). For a set distance, [−∞, mean + z·std] of the distance between two random
halves of the base set, split within each prompt (so both halves hold the same prompts; across
all samples when prompts have 1 sample). Halves hold half the samples, so the band is wider than
what a second full draw would show: conservative. Each half-width is at least `MIN_HALF_WIDTH`
(about two 8-bit levels; 0.1 decade for the energies). `z` = 3 by default: with ten measures
checked at every evaluation, a base-like policy rarely crosses one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ArtifactReference", "ArtifactStats", "Band", "Comparison", "ImageEncoder", "MEASURES", "artifact_stats",
    "background_energy", "chroma", "circular_emd", "clipped", "compare_samples", "encoder_of", "first_frame_adherence",
    "flicker", "format_comparisons", "hue_histograms", "hue_shift", "kid", "luminance", "main_object_masks",
    "periodic_energy", "resolve_encoder", "set_summary",
]

Side = Literal["up", "down", "both"]

#: Per-sample measures and the direction that is an artifact.
MEASURES: dict[str, Side] = {
    "periodic_energy": "up",
    "background_energy": "up",
    "chroma": "both",
    "luminance": "both",
    "clipped": "up",
    "flicker": "up",
    "first_frame_adherence": "down",
}
#: Set distances (about 0 for identical sets; only a rise is drift).
DISTANCES = ("hue_shift", "kid")
#: Smallest band half-width per measure: about two 8-bit levels (0.01 in intensity, 1e-4 in
#: intensity², 1° of hue), so a base whose samples all score the same (clean renders on a black
#: background: no background energy at all) does not warn on a rounding-level change.
MIN_HALF_WIDTH: dict[str, float] = {
    "periodic_energy": 0.1, "background_energy": 0.1,  # decades: these two are compared on a log scale
    "chroma": 0.01, "luminance": 0.01, "clipped": 1e-3,
    "flicker": 0.01, "first_frame_adherence": 0.01, "hue_shift": 1.0, "kid": 0.0,
}
#: Energies span decades and have heavy tails (one sample with a stray second object outweighs
#: forty clean ones): they are summarised by their geometric mean, 10^mean(log10(ε + v)) − ε,
#: and banded on that log scale; ε = (0.5/255)², half an 8-bit level squared.
LOG_OFFSET: dict[str, float] = {"periodic_energy": (0.5 / 255) ** 2, "background_energy": (0.5 / 255) ** 2}


def summary_scale(name: str, values: Tensor) -> Tensor:
    """The per-sample values on the scale their set is summarised and banded on (module doc):
    log10(ε + v) for the energies (`LOG_OFFSET`), the values themselves otherwise."""
    values = values.double()
    return torch.log10(values + LOG_OFFSET[name]) if name in LOG_OFFSET else values


def from_summary_scale(name: str, value: float) -> float:
    """Inverse of `summary_scale` for one number (±inf stay ±inf)."""
    if name not in LOG_OFFSET or not math.isfinite(value):
        return value
    return 10**value - LOG_OFFSET[name]


def set_summary(name: str, values: Tensor) -> float:
    """A set's value of a per-sample measure: the mean, or for the energies the geometric mean."""
    return from_summary_scale(name, float(summary_scale(name, values).mean()))

BT709 = (0.2126, 0.7152, 0.0722)
HUE_BINS = 36
MASK_SIZE = 128  # object masks and object measures at most this many pixels a side (area-downsampled)


# ---------------------------------------------------------------------------- helpers
def _frames(pixels: Tensor) -> tuple[Tensor, int]:
    """[N, C, H, W] or [N, F, C, H, W] -> ([N·F, 3, H, W] float, F) (grey images made RGB)."""
    if pixels.ndim not in (4, 5):
        raise ValueError(f"pixels must be [N, C, H, W] or [N, F, C, H, W], got {tuple(pixels.shape)}")
    frames = pixels.shape[1] if pixels.ndim == 5 else 1
    flat = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
    if flat.shape[1] not in (1, 3):
        raise ValueError(f"pixels need 1 or 3 channels, got {flat.shape[1]} (shape {tuple(pixels.shape)})")
    flat = flat.float()
    return (flat.expand(-1, 3, -1, -1) if flat.shape[1] == 1 else flat), frames


def _per_clip(values: Tensor, frames: int) -> Tensor:
    """Tensor[N·F] -> Tensor[N], the mean over each clip's frames."""
    return values.view(-1, frames).mean(1)


def _luma(images: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, H, W], BT.709 luma."""
    weights = torch.tensor(BT709, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1)


def _small(images: Tensor) -> Tensor:
    """Area-downsample so the longer side is at most `MASK_SIZE` (object measures need no detail)."""
    height, width = images.shape[-2:]
    factor = math.ceil(max(height, width) / MASK_SIZE)
    return F.avg_pool2d(images, factor, ceil_mode=True) if factor > 1 else images


# ---------------------------------------------------------------------------- per-sample measures
def periodic_energy(pixels: Tensor, min_radius: float = 2.0, off_object: bool = True) -> Tensor:
    """Tensor[N]: mean-square amplitude of the isolated spectral peaks of the luma (module doc).

    `off_object`: paint the main object (its mask dilated by 1 px, `main_object_masks`) over with
    the background's luma first: a square's straight edges have spectral ripples of their own,
    larger than a faint grid's peaks, while a grid or checkerboard covers the frame."""
    images, frames = _frames(pixels)
    luma = _luma(images)  # [B, H, W]
    height, width = luma.shape[-2:]
    if off_object:
        near = F.interpolate(_object_rims(images)[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0
        background = _luma(_background_colour(images)[..., None, None])  # [B, 1, 1]
        luma = torch.where(near, background, luma)
    power = torch.fft.fft2(luma - luma.mean((-2, -1), keepdim=True)).abs().square()  # [B, H, W]
    neighbours = torch.stack([power.roll((dy, dx), (-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # [8, B, H, W]
    is_peak = power >= neighbours.max(0).values
    excess = (power - neighbours.median(0).values).clamp(min=0)
    fy = torch.fft.fftfreq(height, 1 / height, device=luma.device).abs()  # cycles per image
    fx = torch.fft.fftfreq(width, 1 / width, device=luma.device).abs()
    far = (fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2) >= min_radius**2  # [H, W]
    energy = (excess * is_peak * far).sum((-2, -1)) / float(height * width) ** 2
    return _per_clip(energy, frames)


def _background_colour(images: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 3]: per-channel median of the 1-pixel border."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    return border.median(-1).values


def _deviation(images: Tensor) -> tuple[Tensor, Tensor]:
    """(d [B, H, W], b [B, 3]): RMS over channels of x − b, b the border's background colour."""
    background = _background_colour(images)
    return (images - background[..., None, None]).square().mean(1).sqrt(), background


def _largest_component(mask: Tensor) -> Tensor:
    """[B, H, W] bool -> the largest 8-connected component of each mask (all False if empty).

    Labels spread by 3×3 max-pooling until stable (each pixel ends with the largest index in its
    component): no scipy / scikit-image dependency, and at `MASK_SIZE` it takes at most a few
    hundred cheap passes."""
    batch, height, width = mask.shape
    index = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, height, width)
    labels = torch.where(mask, index.expand(batch, -1, -1), torch.zeros((), device=mask.device))
    while True:
        spread = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    keep = torch.zeros_like(mask)
    for b in range(batch):
        values, counts = labels[b][mask[b]].unique(return_counts=True)
        if len(values):
            keep[b] = labels[b] == values[counts.argmax()]
    return keep


def main_object_masks(pixels: Tensor, relative: float = 0.5, floor: float = 0.05) -> Tensor:
    """Bool [N, H', W'] (or [N, F, H', W'] for videos), at most `MASK_SIZE` a side: the main object.

    The pixels whose colour differs from the background colour (the border's median) by more than
    max(`relative` × the image's largest difference, `floor`), RMS over channels; of those, the
    largest 8-connected component. Faint blobs below half the object's contrast are not the
    object (they are what `background_energy` counts); an image with no pixel above `floor` has
    no object."""
    images, frames = _frames(pixels)
    deviation, _ = _deviation(_small(images))  # [B, h, w]
    threshold = (relative * deviation.flatten(1).max(1).values).clamp(min=floor).view(-1, 1, 1)
    masks = _largest_component(deviation > threshold)
    return masks.view(-1, frames, *masks.shape[-2:]) if pixels.ndim == 5 else masks


def _object_rims(images: Tensor) -> Tensor:
    """Bool [B, h, w] at the mask resolution: the main object dilated by 1 px (its anti-aliased rim)."""
    objects = main_object_masks(_small(images)).float()
    return F.max_pool2d(objects[:, None], 3, stride=1, padding=1)[:, 0] > 0


def background_energy(pixels: Tensor) -> Tensor:
    """Tensor[N]: mean ‖x − b‖²/C over the pixels off the main object (its mask dilated by 1 px)."""
    images, frames = _frames(pixels)
    deviation, _ = _deviation(_small(images))
    off = (~_object_rims(images)).float()
    energy = (deviation.square() * off).sum((-2, -1)) / off.sum((-2, -1)).clamp(min=1)
    return _per_clip(energy, frames)


def chroma(pixels: Tensor) -> Tensor:
    """Tensor[N]: mean chroma max(R, G, B) − min(R, G, B)."""
    images, frames = _frames(pixels)
    return _per_clip((images.max(1).values - images.min(1).values).mean((-2, -1)), frames)


def luminance(pixels: Tensor) -> Tensor:
    """Tensor[N]: mean BT.709 luma."""
    images, frames = _frames(pixels)
    return _per_clip(_luma(images).mean((-2, -1)), frames)


def clipped(pixels: Tensor, level: float = 0.98) -> Tensor:
    """Tensor[N]: share of pixels with luma ≥ `level` (blown highlights)."""
    images, frames = _frames(pixels)
    return _per_clip((_luma(images) >= level).float().mean((-2, -1)), frames)


def _centroids(masks: Tensor) -> Tensor:
    """[B, H, W] bool -> [B, 2] (y, x) centroids (the image centre for an empty mask)."""
    height, width = masks.shape[-2:]
    weights = masks.float()
    total = weights.sum((-2, -1))
    ys = torch.arange(height, device=masks.device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32).view(1, 1, -1)
    centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], device=masks.device)
    found = torch.stack([(weights * ys).sum((-2, -1)), (weights * xs).sum((-2, -1))], 1) / total.clamp(min=1)[:, None]
    return torch.where(total[:, None] > 0, found, centre)


def _object_difference(first: Tensor, second: Tensor, shifts: Tensor | None = None) -> Tensor:
    """Tensor[B]: mean |first − second(shifted)| (over channels) on the union of their object
    masks, `second` rolled by the integer (dy, dx) `shifts` [B, 2] first; 0 where neither has an object."""
    first, second = _small(first), _small(second)
    masks_a, masks_b = main_object_masks(first), main_object_masks(second)
    out = []
    for b in range(len(first)):
        moved, mask_b = second[b], masks_b[b]
        if shifts is not None:
            dy, dx = (int(v) for v in shifts[b])
            moved, mask_b = moved.roll((dy, dx), (-2, -1)), mask_b.roll((dy, dx), (-2, -1))
        union = masks_a[b] | mask_b
        error = (first[b] - moved).abs().mean(0)  # [h, w]
        out.append(error[union].mean() if union.any() else error.new_zeros(()))
    return torch.stack(out) if out else first.new_zeros(0)


def flicker(videos: Tensor) -> Tensor:
    """Tensor[N]: the object's motion-compensated frame-to-frame difference (module doc)."""
    if videos.ndim != 5 or videos.shape[1] < 2:
        raise ValueError(f"flicker needs videos [N, F >= 2, C, H, W], got {tuple(videos.shape)}")
    clips, frames = videos.shape[:2]
    images, _ = _frames(videos)
    small = _small(images).view(clips, frames, 3, *_small(images[:1]).shape[-2:])
    masks = main_object_masks(small)  # [N, F, h, w]
    centres = _centroids(masks.flatten(0, 1)).view(clips, frames, 2)
    shifts = (centres[:, :-1] - centres[:, 1:]).round()  # roll frame f+1 back onto frame f
    first, second = small[:, :-1].flatten(0, 1), small[:, 1:].flatten(0, 1)
    return _object_difference(first, second, shifts.flatten(0, 1)).view(clips, frames - 1).mean(1)


def first_frame_adherence(videos: Tensor, conditioning: Tensor) -> Tensor:
    """Tensor[N]: 1 − mean |frame 0 − conditioning| on the union of their objects (module doc).

    `conditioning`: [N, C, H, W], one per clip (repeat a prompt's frame for its samples)."""
    if videos.ndim != 5:
        raise ValueError(f"first_frame_adherence needs videos [N, F, C, H, W], got {tuple(videos.shape)}")
    if conditioning.ndim != 4 or len(conditioning) != len(videos) or conditioning.shape[-2:] != videos.shape[-2:]:
        raise ValueError(f"conditioning must be [N={len(videos)}, C, {videos.shape[-2]}, {videos.shape[-1]}], "
                         f"got {tuple(conditioning.shape)}")
    frame0, _ = _frames(videos[:, 0])
    condition, _ = _frames(conditioning.to(videos.device))
    return 1 - _object_difference(frame0, condition)


# ---------------------------------------------------------------------------- colour histograms
def hue_histograms(pixels: Tensor, bins: int = HUE_BINS) -> Tensor:
    """Tensor[N, bins]: each sample's hue histogram, each pixel weighted by its chroma (grey and
    black pixels carry no hue), soft-binned linearly between the two nearest bin centres
    (centres at 0, 360/bins, ... degrees, so pure red sits on bin 0), summed over a clip's
    frames, normalised to sum 1 per sample (0 for a sample without colour), so every coloured
    sample weighs the same in a set whatever its object's size."""
    images, frames = _frames(pixels)
    high, low = images.max(1).values, images.min(1).values
    c = high - low  # [B, H, W]
    r, g, b = images.unbind(1)
    safe = c.clamp(min=1e-8)
    # HSV hue in sextants (0..6): piecewise by the largest channel
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    position = hue / 6 * bins  # [B, H, W] in [0, bins)
    lower = position.floor()
    upper_weight = position - lower
    histogram = torch.zeros(images.shape[0], bins, device=images.device)
    weights = c.flatten(1)
    for index, share in ((lower, 1 - upper_weight), (lower + 1, upper_weight)):
        histogram.scatter_add_(1, index.long().flatten(1) % bins, (weights * share.flatten(1)))
    histogram = histogram.view(-1, frames, bins).sum(1)
    return histogram / histogram.sum(1, keepdim=True).clamp(min=1e-12)


def circular_emd(p: Tensor, q: Tensor) -> float:
    """Earth mover's distance between two histograms on a circle of len(p) bins, in bins
    (module doc: Rabin et al. 2011). Each is normalised to sum 1; an empty one counts as uniform."""
    bins = p.numel()

    def normalised(h: Tensor) -> Tensor:
        h = h.double().flatten()
        return h / h.sum() if h.sum() > 0 else torch.full_like(h, 1 / bins)

    cumulative = torch.cumsum(normalised(p) - normalised(q), 0)
    return float((cumulative - cumulative.median()).abs().sum())


def hue_shift(base: Tensor, current: Tensor, bins: int = HUE_BINS) -> float:
    """Degrees: circular EMD between the summed hue histograms [N, bins] of two sets."""
    return circular_emd(base.sum(0), current.sum(0)) * 360 / bins


# ---------------------------------------------------------------------------- KID
class ImageEncoder(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> features [B, D] from an open_clip model's visual tower
    (e.g. `lightning_grpo.rewards.ClipScore`, `HPSv2`, `PickScore`): the reward's own
    preprocessing, then `model.encode_image`. Built by `encoder_of`."""

    def __init__(self, reward: nn.Module) -> None:
        super().__init__()
        self.reward = reward

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(self.reward.parameters()).device
        dtype = next(self.reward.parameters()).dtype
        pixels = self.reward.preprocess(images.float().to(device)).to(dtype)
        return self.reward.model.encode_image(pixels).float()


def encoder_of(candidates: Iterable[Any]) -> ImageEncoder | None:
    """An `ImageEncoder` on the first candidate that has an open_clip visual tower (a `model`
    with `encode_image` and a `preprocess`), else None: KID uses an encoder the run already loads."""
    for candidate in candidates:
        if isinstance(candidate, ImageEncoder):
            return candidate
        if hasattr(candidate, "preprocess") and hasattr(getattr(candidate, "model", None), "encode_image"):
            return ImageEncoder(candidate)
    return None


def resolve_encoder(explicit: Any, candidates: Iterable[Any]) -> Callable[[Tensor], Tensor] | None:
    """The KID encoder: `explicit` when given (a CLIP-like reward, whose visual tower is wrapped,
    or any module mapping images [B, 3, H, W] in [0, 1] to features [B, D], used as it is), else
    the first CLIP-like reward among `candidates` (`encoder_of`), else None (no KID)."""
    if explicit is not None:
        return encoder_of([explicit]) or explicit
    return encoder_of(candidates)


def encode(encoder: Callable[[Tensor], Tensor], pixels: Tensor, batch_size: int = 64) -> Tensor:
    """Tensor[N, D] float on CPU: features of each image, or of each clip (mean of its frames)."""
    images, frames = _frames(pixels)
    features = torch.cat([encoder(images[i : i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
    return features.view(-1, frames, features.shape[-1]).mean(1)


def kid(base: Tensor, current: Tensor) -> float:
    """KID between two feature sets [N, D] and [M, D] (torchmetrics, module doc). The features are
    passed through an identity extractor; one subset of min(N, M) samples each. The subset draw
    uses `torch.randperm`, so it runs under a forked, fixed-seeded global RNG (never moving the
    training stream); with the whole set as the subset its value does not depend on the draw."""
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(base) < 2 or len(current) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(base)} and {len(current)}")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # sync_on_compute=False: both feature sets are this process's own, and a torchmetrics
        # all-gather here would hang a run that measures on one rank only (the monitor on rank 0)
        metric = KernelInceptionDistance(
            feature=nn.Identity(), subsets=1, subset_size=min(len(base), len(current)), sync_on_compute=False,
        )
    metric.update(base.double(), real=True)
    metric.update(current.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        value, _ = metric.compute()
    return float(value)


# ---------------------------------------------------------------------------- sets and bands
@dataclass
class ArtifactStats:
    """A sample set reduced to what the measures need (small: saved in checkpoints).

    Attributes:
        values: measure name -> Tensor[N] (per-sample measures present for these pixels).
        hue: Tensor[N, bins] chroma-weighted hue histograms.
        features: Tensor[N, D] image-encoder features, or None without an encoder.
        groups: Tensor[N] long, the prompt of each sample (bootstrap and splits resample prompts).
    """

    values: dict[str, Tensor]
    hue: Tensor
    features: Tensor | None = None
    groups: Tensor | None = None

    def __len__(self) -> int:
        return len(self.hue)

    def subset(self, index: Tensor) -> ArtifactStats:
        return ArtifactStats({k: v[index] for k, v in self.values.items()}, self.hue[index],
                             None if self.features is None else self.features[index],
                             None if self.groups is None else self.groups[index])

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "hue": self.hue, "features": self.features, "groups": self.groups}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ArtifactStats:
        return cls(dict(state["values"]), state["hue"], state.get("features"), state.get("groups"))


def artifact_stats(
    pixels: Tensor,
    conditioning: Tensor | None = None,
    encoder: Callable[[Tensor], Tensor] | None = None,
    samples_per_prompt: int = 1,
    batch_size: int = 64,
) -> ArtifactStats:
    """Every measure that applies to `pixels` ([N, C, H, W] or videos [N, F, C, H, W], prompt-major
    with `samples_per_prompt` samples per prompt). `conditioning`: image-to-video first frames,
    [N, C, H, W] per sample or [N / samples_per_prompt, C, H, W] per prompt (adds
    first_frame_adherence); `encoder`: images -> features (adds KID)."""
    if samples_per_prompt < 1 or len(pixels) % samples_per_prompt:
        raise ValueError(f"{len(pixels)} samples do not split into prompts of {samples_per_prompt}")
    pixels = pixels.detach().float().cpu()
    values = {"periodic_energy": periodic_energy(pixels), "background_energy": background_energy(pixels),
              "chroma": chroma(pixels), "luminance": luminance(pixels), "clipped": clipped(pixels)}
    if pixels.ndim == 5 and pixels.shape[1] >= 2:
        values["flicker"] = flicker(pixels)
    if conditioning is not None:
        if pixels.ndim != 5:
            raise ValueError("conditioning frames were given for images; first-frame adherence needs videos")
        conditioning = conditioning.detach().float().cpu()
        if len(conditioning) * samples_per_prompt == len(pixels) and samples_per_prompt > 1:
            conditioning = conditioning.repeat_interleave(samples_per_prompt, 0)
        values["first_frame_adherence"] = first_frame_adherence(pixels, conditioning)
    groups = torch.arange(len(pixels)) // samples_per_prompt
    features = encode(encoder, pixels, batch_size) if encoder is not None else None
    return ArtifactStats(values, hue_histograms(pixels), features, groups)


def _distance(name: str, base: ArtifactStats, current: ArtifactStats) -> float:
    if name == "hue_shift":
        return hue_shift(base.hue, current.hue)
    return kid(base.features, current.features)


def standard_error(values: Tensor, strata: list[Tensor] | None = None) -> float:
    """Standard error of the mean of `values` [N] as an estimate of the set's mean on a redraw of
    its seeds. With `strata` (the sample indices of each prompt, each with ≥ 2 samples) the prompts
    stay fixed: SE² = Σ_p n_p·s_p² / N², s_p² the unbiased within-prompt variance (stratified
    sampling, Cochran 1977, "Sampling Techniques", §5.3); without, the plain s/√N."""
    values = values.double().flatten()
    if strata is None:
        return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    variance = sum(len(u) * float(values[u].var()) for u in strata)
    return math.sqrt(variance) / len(values)


def _halves(strata: list[Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random split of every stratum's samples into two halves (the first gets ⌊n/2⌋)."""
    first, second = [], []
    for unit in strata:
        order = unit[torch.randperm(len(unit), generator=generator)]
        first.append(order[: len(unit) // 2])
        second.append(order[len(unit) // 2 :])
    return torch.cat(first), torch.cat(second)


@dataclass(frozen=True)
class Band:
    """The base's warning band of one measure: values inside [low, high] look like the base."""

    name: str
    base: float  # the base's value (mean of a per-sample measure; 0 for a distance)
    low: float
    high: float

    def outside(self, value: float) -> bool:
        return not (self.low <= value <= self.high)


@dataclass
class Comparison:
    """One measure of a set against the base: its value, the band, and whether it left the band."""

    name: str
    value: float
    band: Band

    @property
    def outside(self) -> bool:
        return self.band.outside(self.value)

    def describe(self) -> str:
        band = self.band
        return f"{self.name} = {self.value:.4g} outside the base's band [{band.low:.4g}, {band.high:.4g}] (base {band.base:.4g})"


@dataclass
class ArtifactReference:
    """The base policy's samples as the reference of every measure, with its warning bands.

    Args:
        stats: the base set's `ArtifactStats`.
        z: band half-width in standard errors (module doc).
        resamples: random half splits of the base set behind the band of each distance.
        seed: seed of the splits (the bands are a deterministic function of the base set).
    """

    stats: ArtifactStats
    z: float = 3.0
    resamples: int = 50
    seed: int = 0
    bands: dict[str, Band] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.z <= 0 or self.resamples < 2:
            raise ValueError(f"z must be > 0 and resamples >= 2, got {self.z}, {self.resamples}")
        if not self.bands:
            self.bands = self._bands()

    def _prompt_units(self) -> list[Tensor]:
        groups = self.stats.groups if self.stats.groups is not None else torch.arange(len(self.stats))
        return [torch.nonzero(groups == g).flatten() for g in groups.unique()]

    def _bands(self) -> dict[str, Band]:
        units = self._prompt_units()
        paired = all(len(u) >= 2 for u in units)  # seeds within prompts: the spread of a redraw on the same prompts
        bands: dict[str, Band] = {}
        for name, values in self.stats.values.items():
            scaled = summary_scale(name, values)
            half = max(self.z * math.sqrt(2) * standard_error(scaled, units if paired else None), MIN_HALF_WIDTH[name])
            centre, side = float(scaled.mean()), MEASURES[name]
            low, high = centre - half if side != "up" else -math.inf, centre + half if side != "down" else math.inf
            bands[name] = Band(name, *(from_summary_scale(name, v) for v in (centre, low, high)))
        generator = torch.Generator().manual_seed(self.seed)
        for name in DISTANCES:
            if (name == "kid" and self.stats.features is None) or (not paired and len(units) < 4):
                continue
            null = []
            for _ in range(self.resamples):
                first, second = _halves(units if paired else [torch.cat(units)], generator)
                null.append(_distance(name, self.stats.subset(first), self.stats.subset(second)))
            null_t = torch.tensor(null, dtype=torch.float64)
            bands[name] = Band(name, 0.0, -math.inf, max(float(null_t.mean() + self.z * null_t.std()), MIN_HALF_WIDTH[name]))
        return bands

    def compare(self, current: ArtifactStats) -> dict[str, Comparison]:
        """name -> `Comparison` of every measure both sets have."""
        out: dict[str, Comparison] = {}
        for name, band in self.bands.items():
            if name in DISTANCES:
                if name == "kid" and current.features is None:
                    continue
                out[name] = Comparison(name, _distance(name, self.stats, current), band)
            elif name in current.values:
                out[name] = Comparison(name, set_summary(name, current.values[name]), band)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "z": self.z, "resamples": self.resamples, "seed": self.seed,
                "bands": {name: (b.base, b.low, b.high) for name, b in self.bands.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ArtifactReference:
        bands = {name: Band(name, *values) for name, values in state["bands"].items()}
        return cls(ArtifactStats.from_state(state["stats"]), state["z"], state["resamples"], state["seed"], bands)


def compare_samples(
    base: Tensor,
    current: Tensor,
    conditioning: Tensor | None = None,
    encoder: Callable[[Tensor], Tensor] | None = None,
    samples_per_prompt: int = 1,
    z: float = 3.0,
) -> dict[str, Comparison]:
    """Every measure of `current` samples against the band of the `base` samples (same prompts and
    seeds, prompt-major): name -> `Comparison` (`.value`, `.band`, `.outside`). The plain-function
    form of what the monitor checks, e.g. for a trained demo against its base:

        report = compare_samples(base_pixels, trained_pixels, samples_per_prompt=2)
        assert not [c.describe() for c in report.values() if c.outside]
    """
    reference = ArtifactReference(artifact_stats(base, conditioning, encoder, samples_per_prompt), z=z)
    return reference.compare(artifact_stats(current, conditioning, encoder, samples_per_prompt))


def format_comparisons(comparisons: dict[str, Comparison]) -> str:
    """A markdown table: measure | base | now | band | outside."""
    lines = ["| measure | base | now | base's band | outside |", "|---|---|---|---|---|"]
    for c in comparisons.values():
        band, flag = c.band, "**yes**" if c.outside else "no"
        lines.append(f"| {c.name} | {band.base:.4g} | {c.value:.4g} | [{band.low:.4g}, {band.high:.4g}] | {flag} |")
    return "\n".join(lines) + "\n"
