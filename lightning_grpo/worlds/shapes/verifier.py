"""Read a shapes-world scene back from pixels, and score it against its prompt (the verifier reward).

Decoding, batched in torch on the pixels' device:

1. Foreground. Each pixel x is explained as a mix of the background b and one palette colour p_k:
   α_k = clamp(⟨x − b, p_k − b⟩ / |p_k − b|², 0, 1), residual_k = |x − b − α_k (p_k − b)|.
   The pixel's hue is the k of least residual and its coverage α = α_k. Working along the segment
   b → p_k, rather than with the nearest palette colour, keeps blurred edges and dim blobs
   (which are mixes with the background) on the right hue; the residual says how far the pixel
   is from every such mix (an orange pixel, half red and half yellow, is 0.26 away from both).
   Foreground = pixels with α ≥ 0.5.
2. Objects = 8-connected components of the foreground; the main object is the largest one.
   An image has an object iff the foreground covers between `min_area_frac` and `max_area_frac`
   of it; otherwise (black, blank, all-foreground images) every attribute decodes to -1 (wrong).
3. Colour = majority hue of the main object; position = quadrant of its centroid.
4. Shape = template matching: the main object's coverage map (α within a few pixels of it,
   which drops background noise and other objects) is compared in L1 with each candidate shape
   drawn at the object's centroid with the object's area (both from α, which blur conserves),
   each also blurred by a few Gaussian widths; the best match wins, and its L1 error per unit
   of coverage is kept. Coverage is first divided by the object's plateau level, so an
   under-saturated object matches like a full one.

5. Faint coverage off the object (`off_object`): the coverage α summed over the pixels more than
   `OBJECT_MARGIN` pixels from the main object whose 3×3 average of α (at a 32-pixel side; it
   averages pixel noise away, not blobs) is ≥ `FAINT_THRESHOLD`, in units of full pixels of a
   32×32 image (× 32²/(H·W)). It sees what the foreground threshold hides: dim blobs, a faint
   grid or haze over the background (GRPO-trained toy generators painted dim orange blobs,
   α < 0.5, beside their objects: docs/results.md).

Strict rules (`SceneRules`, the default judge and reward): a scene is right only if
- one object: foreground outside the main object ≤ `max_stray` of its area (a second blob, a
  speckle of stray dots fail), and faint coverage off it ≤ `max_off_object` pixels' worth (a
  dim second blob, a faint pattern or haze over the background fail);
- one colour, the named one: ≥ `min_purity` of ALL foreground pixels have the named hue and lie
  within `max_off_palette` of it (a mixed-colour smear, an orange-tinged blob, a second object
  of another colour fail);
- the named shape, matched well: best template = the named shape with error ≤ `max_shape_error`
  (a smear matches no template well);
- the named place: ≥ `min_inside` of the foreground lies in the named quadrant.
Each attribute check includes the one-object check, so the dense reward (mean of the three)
gives nothing to an image with two objects, and no attribute term can be earned by a blob
that is merely centred, coloured or sized right on average. `strict=False` reads the main
object's attributes without these rules (the earlier, lenient verifier).

Measured rates: docs/results.md ("Shapes-world verifier"), from tests/worlds/test_shapes_verifier.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_grpo.rewards.base import Reward
from lightning_grpo.worlds.shapes.prompts import parse_prompt
from lightning_grpo.worlds.shapes.render import shape_masks
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, SHAPES, Scene, background, palette

#: Coverage above which a pixel is foreground.
FOREGROUND_THRESHOLD = 0.5
#: Gaussian widths (pixels at a 32-pixel side; scaled with the side) the shape templates are tried at.
TEMPLATE_BLURS = (0.0, 0.8, 1.6)
#: Coverage within this many pixels (at a 32-pixel side) of the main object belongs to it.
OBJECT_MARGIN = 3
#: 3×3-averaged coverage (at a 32-pixel side) at or above which a pixel off the object counts as faint
#: foreground. Renders with noise σ = 0.08 per channel reach at most 0.21 (the largest of 240 images;
#: noise 0.05: 0.13), so a few noise pixels pass it; `SceneRules.max_off_object` allows for them. A
#: 3×3 blob at 40% of a palette colour counts whole (its corners average 4/9 · 0.4 = 0.18).
FAINT_THRESHOLD = 0.15
#: Sub-pixels per side used to anti-alias the shape templates.
_TEMPLATE_SUPERSAMPLE = 2


@dataclass(frozen=True)
class SceneRules:
    """Thresholds of the strict verifier (module doc, "Strict rules"); defaults set from measured renders.

    Attributes:
        max_stray: foreground outside the main object, as a fraction of its area (one object).
        max_off_object: faint coverage off the main object (module doc, step 5), in full pixels of a
            32×32 image (one object: a dim blob, a faint grid or a haze fails). 1.5: renders with
            noise σ = 0.08 reach 1.7 at most (1.2 for 99% of them), a 3×3 blob at 40% is 3.6.
        min_purity: share of the foreground of the named hue and on the palette (one colour).
        max_off_palette: residual (RGB distance to the hue's background-to-colour segment) above
            which a pixel is off the palette; 0.2 passes noise σ = 0.08 but not orange (0.26).
        max_shape_error: L1 error of the best shape template per unit of object coverage.
        max_elongation: ratio of the object's principal second moments (the triangle has 4/3).
        min_inside: share of the foreground inside the named quadrant.
    """

    max_stray: float = 0.1
    max_off_object: float = 1.5
    min_purity: float = 0.75
    max_off_palette: float = 0.2
    max_shape_error: float = 0.45
    max_elongation: float = 1.6
    min_inside: float = 0.9

    @classmethod
    def with_overrides(cls, **overrides: float | None) -> SceneRules:
        """The default rules with every threshold given (not None) replaced, as a float: how the
        image and the clip verifiers take their per-image thresholds as keyword options."""
        return cls(**{name: float(value) for name, value in overrides.items() if value is not None})

    def __post_init__(self) -> None:
        for name in ("max_stray", "min_purity", "min_inside"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SceneRules.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_off_object < 0:
            raise ValueError(f"SceneRules.max_off_object must be >= 0, got {self.max_off_object}")
        for name in ("max_off_palette", "max_shape_error", "max_elongation"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SceneRules.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DecodedScenes:
    """What was read from a batch of images; attribute indices are -1 where no object was found.

    Fields (all [B]): `colour`, `shape`, `position` LongTensor indices into `COLOUR_NAMES`,
    `SHAPES`, `POSITIONS` (of the main object); `valid` BoolTensor (an object was found);
    `area` foreground pixel count; `objects` LongTensor number of connected foreground
    components; `stray` foreground outside the main object / its area; `off_object` faint
    coverage off the main object in pixels of a 32² image (module doc, step 5); `purity` share of the
    foreground with the main object's hue and on the palette; `shape_error` L1 error of the best
    template per unit coverage; `elongation` ratio of the object's principal second moments
    (a streak is long); `inside` share of the foreground in the decoded quadrant; `hue_share`
    [B, K] share of the foreground of each palette hue and on the palette; `cx`, `cy` the main
    object's centroid in pixels (0 where the image has no foreground), what the moving-shapes
    verifier tracks over frames.
    """

    colour: Tensor
    shape: Tensor
    position: Tensor
    valid: Tensor
    area: Tensor
    objects: Tensor
    stray: Tensor
    off_object: Tensor
    purity: Tensor
    shape_error: Tensor
    elongation: Tensor
    inside: Tensor
    cx: Tensor
    cy: Tensor
    hue_share: Tensor  # [B, K] share of the foreground on each palette hue (purity for every hue)

    @property
    def indices(self) -> Tensor:
        """LongTensor[B, 3] of (colour, shape, position), -1 where invalid."""
        return torch.stack([self.colour, self.shape, self.position], dim=1)

    def one_object(self, rules: SceneRules) -> Tensor:
        """BoolTensor[B]: an object was found and almost nothing else is foreground, faint or not."""
        return self.valid & (self.stray <= rules.max_stray) & (self.off_object <= rules.max_off_object)

    def clean_attributes(self, rules: SceneRules) -> Tensor:
        """BoolTensor[B, 3]: whether colour, shape and position were each read without doubt
        (pure colour, good template match, foreground inside one quadrant), and one object."""
        one = self.one_object(rules)
        return torch.stack([
            one & (self.purity >= rules.min_purity),
            one & (self.shape_error <= rules.max_shape_error) & (self.elongation <= rules.max_elongation),
            one & (self.inside >= rules.min_inside),
        ], dim=1)

    def scenes(self) -> list[Scene | None]:
        """The decoded scenes as `Scene`s (None where no object was found), for reading and logging."""
        return [Scene.from_indices(*row) if ok else None for row, ok in zip(self.indices.tolist(), self.valid.tolist())]


def _check_pixels(pixels: Tensor) -> Tensor:
    """Pixels as float [B, 3, H, W] clamped to [0, 1] (NaN → 0); a clear error for any other layout."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"shapes-world pixels must be RGB images [B, 3, H, W], got {tuple(pixels.shape)}")
    return torch.nan_to_num(pixels.float(), nan=0.0).clamp(0, 1)


def _coverage_hue_residual(pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel coverage α, hue index and residual, each [B, H, W] (step 1 of the module doc)."""
    bg = background(pixels.device)  # [3]
    seg = palette(pixels.device) - bg  # [K, 3] segment directions b -> p_k
    diff = pixels - bg.view(1, 3, 1, 1)  # [B, 3, H, W]
    alpha = torch.einsum("bchw,kc->bkhw", diff, seg) / seg.square().sum(1).view(1, -1, 1, 1)
    alpha = alpha.clamp(0, 1)  # [B, K, H, W]
    residual = (diff.unsqueeze(1) - alpha.unsqueeze(2) * seg.view(1, -1, 3, 1, 1)).square().sum(2)  # [B, K, H, W]
    best, hue = residual.min(1)  # [B, H, W]
    return alpha.gather(1, hue.unsqueeze(1)).squeeze(1), hue, best.sqrt()


def connected_components(mask: Tensor) -> Tensor:
    """8-connected component labels [B, H, W] of a boolean mask [B, H, W]: 0 off the mask, else a
    positive id shared by exactly the pixels of one component.

    Label propagation (each pixel takes the largest id in its 3×3 neighbourhood, within the mask,
    until nothing changes): batched on the mask's device, which scipy.ndimage.label (one CPU image
    at a time) is not; it converges in as many sweeps as the longest in-component path.
    """
    batch, height, width = mask.shape
    ids = torch.arange(1, height * width + 1, device=mask.device, dtype=torch.float32).view(1, height, width)
    on = mask.float()
    labels = ids * on  # [B, H, W]
    for _ in range(height * width):
        spread = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * on
        if torch.equal(spread, labels):
            break
        labels = spread
    return labels.long()


def _main_object(fg: Tensor) -> tuple[Tensor, Tensor]:
    """(mask [B, H, W] of the largest 8-connected foreground component, number of components [B])."""
    batch, height, width = fg.shape
    labels = connected_components(fg > 0).flatten(1)  # [B, H·W]
    counts = torch.zeros(batch, height * width + 1, device=fg.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    counts[:, 0] = 0  # background
    main = counts.argmax(1)  # [B] label of the largest component (0 when there is none)
    objects = (counts > 0).sum(1)
    return (labels == main.view(-1, 1)).view(batch, height, width) & (fg > 0), objects


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates xs [1, 1, W] and ys [1, H, 1] in pixel units."""
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5
    return xs, ys


def _shape_templates(cx: Tensor, cy: Tensor, area: Tensor, height: int, width: int) -> Tensor:
    """Anti-aliased coverage [B, S, H, W] of each shape, centroid at (cx, cy), with the given area.

    Radius from area: circle πr², square 4r², triangle 2r² (bounding box 2r × 2r). The triangle's
    centroid lies r/3 below its bounding-box centre, so its box is centred at cy − r/3.
    """
    sub = _TEMPLATE_SUPERSAMPLE
    batch = cx.shape[0]
    radii = torch.stack([(area / math.pi).sqrt(), area.sqrt() / 2, (area / 2).sqrt()], dim=1)  # [B, S]
    box_cy = cy.unsqueeze(1) - torch.tensor([0.0, 0.0, 1 / 3], device=cx.device) * radii  # [B, S]
    xs = (torch.arange(width * sub, device=cx.device, dtype=torch.float32) + 0.5) / sub
    ys = (torch.arange(height * sub, device=cx.device, dtype=torch.float32) + 0.5) / sub
    dx = xs.view(1, 1, -1) - cx.repeat_interleave(len(SHAPES)).view(-1, 1, 1)  # [B*S, 1, w]
    dy = ys.view(1, -1, 1) - box_cy.reshape(-1, 1, 1)  # [B*S, h, 1]
    kinds = torch.arange(len(SHAPES), device=cx.device).repeat(batch)  # [B*S]
    masks = shape_masks(kinds, dx, dy, radii.reshape(-1, 1, 1)).float()  # [B*S, h, w]
    return F.avg_pool2d(masks.unsqueeze(1), sub).view(batch, len(SHAPES), height, width)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of x [N, H, W] with zero padding (background is 0 coverage).

    Written as K_h @ x @ K_wᵀ with banded Gaussian matrices: one batched matmul, much faster on a
    CPU than a depthwise convolution over thousands of one-channel maps.
    """
    if sigma <= 0:
        return x

    def band(n: int) -> Tensor:
        idx = torch.arange(n, device=x.device, dtype=x.dtype)
        half = max(1, math.ceil(3 * sigma))
        norm = torch.exp(-torch.arange(-half, half + 1, device=x.device, dtype=x.dtype).square() / (2 * sigma**2)).sum()
        weights = torch.exp(-(idx.view(-1, 1) - idx.view(1, -1)).square() / (2 * sigma**2)) / norm
        return torch.where((idx.view(-1, 1) - idx.view(1, -1)).abs() <= half, weights, torch.zeros_like(weights))

    return band(x.shape[-2]) @ x @ band(x.shape[-1]).T


def _elongation(observed: Tensor, cx: Tensor, cy: Tensor, mass: Tensor) -> Tensor:
    """λ_max / λ_min [B] of the coverage's second central moments (1 for a disc or a square,
    4/3 for the apex-up triangle, more for a streak; blur moves it towards 1)."""
    xs, ys = _pixel_grid(*observed.shape[1:], observed.device)
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    mxx, myy, mxy = ((observed * d).sum((1, 2)) / mass for d in (dx * dx, dy * dy, dx * dy))
    mean, half = (mxx + myy) / 2, (((mxx - myy) / 2).square() + mxy.square()).sqrt()
    return (mean + half) / (mean - half).clamp_min(1e-6)


def _object_neighbourhood(main: Tensor) -> Tensor:
    """[B, H, W] float: 1 within `OBJECT_MARGIN` pixels (at a 32-pixel side) of the main object [B, H, W]."""
    margin = max(1, round(OBJECT_MARGIN * main.shape[-2] / 32))
    return F.max_pool2d(main.float().unsqueeze(1), 2 * margin + 1, stride=1, padding=margin).squeeze(1)


def _off_object(alpha: Tensor, near: Tensor) -> Tensor:
    """[B] faint coverage off the main object, in full pixels of a 32×32 image (module doc, step 5).

    alpha, near: [B, H, W] coverage and the object's neighbourhood (`_object_neighbourhood`)."""
    height, width = alpha.shape[-2:]
    side = 2 * max(1, round(height / 32)) + 1  # 3 at 32 px, odd, scaled with the side
    local = F.avg_pool2d(alpha.unsqueeze(1), side, stride=1, padding=side // 2, count_include_pad=False).squeeze(1)
    faint = (local >= FAINT_THRESHOLD).float() * (1 - near)  # [B, H, W]
    return (alpha * faint).sum((1, 2)) * (32 * 32) / (height * width)


def _match_shape(alpha: Tensor, main: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(shape index [B] whose (possibly blurred) template best matches the main object's coverage,
    that match's L1 error per unit coverage [B], the coverage's elongation [B]) (step 4 of the
    module doc)."""
    batch, height, width = alpha.shape
    scale = height / 32
    near = _object_neighbourhood(main)  # [B, H, W]
    # A dim object (a generator that under-saturates) is compared at its own plateau level: the
    # peak of the 3×3-averaged coverage, which single noisy pixels cannot raise much.
    level = F.avg_pool2d((alpha * near).unsqueeze(1), 3, stride=1, padding=1).amax((1, 2, 3)).clamp(0.5, 1.0)  # [B]
    observed = (alpha / level.view(-1, 1, 1)).clamp(max=1.0) * near  # [B, H, W]
    mass = observed.sum((1, 2)).clamp_min(1.0)  # [B] soft area: blur moves coverage, never creates it
    xs, ys = _pixel_grid(height, width, alpha.device)
    cx = (observed * xs).sum((1, 2)) / mass
    cy = (observed * ys).sum((1, 2)) / mass
    sharp = _shape_templates(cx, cy, mass, height, width)  # [B, S, H, W]
    errors = []
    for sigma in TEMPLATE_BLURS:
        template = _gaussian_blur(sharp, sigma * scale)  # [B, S, H, W]
        errors.append((template - observed.unsqueeze(1)).abs().sum((2, 3)))  # [B, S]
    best, shape = torch.stack(errors).amin(0).min(1)  # [B] each
    return shape, best / mass, _elongation(observed, cx, cy, mass)


def decode_scenes(
    pixels: Tensor, min_area_frac: float = 0.01, max_area_frac: float = 0.5,
    max_off_palette: float = SceneRules.max_off_palette,
) -> DecodedScenes:
    """Read the main object's (colour, shape, position) and the strict rules' measures; see the module doc.

    Args:
        pixels: Tensor[B, 3, H, W] in [0, 1] (values outside are clamped, NaN read as background).
        min_area_frac: smallest foreground fraction of the image that counts as an object.
        max_area_frac: largest one (an image that is mostly "foreground" has no background: invalid).
        max_off_palette: residual above which a pixel does not count towards `purity`.
    """
    pixels = _check_pixels(pixels)
    batch, _, height, width = pixels.shape
    device = pixels.device
    alpha, hue, residual = _coverage_hue_residual(pixels)  # [B, H, W] each
    fg = (alpha >= FOREGROUND_THRESHOLD).float()  # [B, H, W]
    area = fg.sum((1, 2))  # [B]
    valid = (area >= min_area_frac * height * width) & (area <= max_area_frac * height * width) & (area > 0)
    main, objects = _main_object(fg)  # [B, H, W], [B]
    main_f = main.float()
    main_area = main_f.sum((1, 2)).clamp_min(1.0)

    votes = torch.zeros(batch, len(COLOUR_NAMES), device=device).scatter_add_(1, hue.flatten(1), main_f.flatten(1))
    colour = votes.argmax(1)  # [B]
    hue_share = torch.stack([  # [B, K]: share of ALL foreground on hue k and on the palette (graded colour term)
        (((hue == k) & (residual <= max_off_palette)).float() * fg).sum((1, 2)) for k in range(len(COLOUR_NAMES))
    ], dim=1) / area.clamp_min(1.0).unsqueeze(1)
    purity = hue_share.gather(1, colour.unsqueeze(1)).squeeze(1)  # [B]: the share of the decoded colour

    xs, ys = _pixel_grid(height, width, device)
    cx = (main_f * xs).sum((1, 2)) / main_area  # [B]
    cy = (main_f * ys).sum((1, 2)) / main_area
    bottom, right = (cy >= height / 2), (cx >= width / 2)
    position = bottom.long() * 2 + right.long()  # POSITIONS order: TL, TR, BL, BR
    in_rows = (ys >= height / 2) == bottom.view(-1, 1, 1)  # [B, H, 1]
    in_cols = (xs >= width / 2) == right.view(-1, 1, 1)  # [B, 1, W]
    inside = (fg * (in_rows & in_cols).float()).sum((1, 2)) / area.clamp_min(1.0)

    shape, shape_error, elongation = _match_shape(alpha, main)  # [B] each

    invalid = torch.full_like(colour, -1)
    return DecodedScenes(
        colour=torch.where(valid, colour, invalid),
        shape=torch.where(valid, shape, invalid),
        position=torch.where(valid, position, invalid),
        valid=valid,
        area=area,
        objects=objects,
        stray=(area - main_f.sum((1, 2))) / main_area,
        off_object=_off_object(alpha, _object_neighbourhood(main)),
        purity=purity,
        shape_error=shape_error,
        elongation=elongation,
        inside=inside,
        hue_share=hue_share,
        cx=cx,
        cy=cy,
    )


def target_indices(prompts: list[str], device: torch.device | str | None = None) -> Tensor:
    """LongTensor[B, 3] of (colour, shape, position) named by each prompt (parsed, so any template)."""
    return torch.tensor([parse_prompt(p).indices for p in prompts], dtype=torch.long, device=device).reshape(-1, 3)


def attribute_correctness(
    pixels: Tensor,
    prompts: list[str],
    min_area_frac: float = 0.01,
    max_area_frac: float = 0.5,
    strict: bool = True,
    rules: SceneRules | None = None,
) -> Tensor:
    """BoolTensor[B, 3]: whether each image's (colour, shape, position) matches its prompt.

    `strict` (default): each attribute also needs the strict rules (`SceneRules`: one object, one
    pure colour, a good shape match, foreground inside the quadrant); otherwise only the main
    object's decoded attributes are compared (the lenient verifier).
    """
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {pixels.shape[0]} images")
    rules = rules or SceneRules()
    decoded = decode_scenes(pixels, min_area_frac, max_area_frac, rules.max_off_palette)
    correct = decoded.indices == target_indices(prompts, pixels.device)
    return correct & decoded.clean_attributes(rules) if strict else correct


def graded_attributes(
    pixels: Tensor,
    prompts: list[str],
    min_area_frac: float = 0.01,
    max_area_frac: float = 0.5,
    rules: SceneRules | None = None,
) -> Tensor:
    """Tensor[B, 3] in [0, 1]: the strict attribute terms with a graded colour term.

    Colour = one object × min(share of the foreground on the NAMED hue and palette / `min_purity`, 1):
    it is 1 exactly when the strict colour check passes, and otherwise grows with how much of the
    object is drawn in the named colour, so an orange blob for "red" earns part of it and a pure red
    one all of it. Shape and position are the strict binary terms. Hence every term is 1 iff the
    strict term is, and the mean is 1 iff the strict exact match is.
    Why: the toy FLUX draws many blends of two palette colours, which the strict colour check
    scores 0 whatever their mix; GRPO then sees no difference between a blend that is mostly the
    named colour and one that is not (docs/results.md, "graded reward").
    """
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {pixels.shape[0]} images")
    rules = rules or SceneRules()
    decoded = decode_scenes(pixels, min_area_frac, max_area_frac, rules.max_off_palette)
    target = target_indices(prompts, pixels.device)  # [B, 3]
    strict = (decoded.indices == target) & decoded.clean_attributes(rules)  # [B, 3]
    named_share = decoded.hue_share.gather(1, target[:, :1]).squeeze(1)  # [B]
    colour = decoded.one_object(rules).float() * (named_share / rules.min_purity).clamp(max=1.0)
    return torch.cat([colour.unsqueeze(1), strict[:, 1:].float()], dim=1)


def exact_match_accuracy(pixels: Tensor, prompts: list[str], strict: bool = True) -> float:
    """Fraction of images whose colour, shape and position all match their prompt (strict rules by default)."""
    if pixels.shape[0] == 0:
        raise ValueError("exact_match_accuracy needs at least one image")
    return attribute_correctness(pixels, prompts, strict=strict).all(1).float().mean().item()


class ShapesVerifier(Reward):
    """The shapes-world reward, computed from pixels: does the image show what the prompt says?

    Args:
        mode: "dense" → mean of (colour, shape, position) correct, in {0, 1/3, 2/3, 1};
            "exact" → 1 iff all three are correct (the exact-match binary reward);
            "graded" → the dense mean with a graded colour term (`graded_attributes`; strict only):
            1 iff the exact match is 1, and a blend that is mostly the named colour earns more
            than one that is not.
        strict: apply the strict rules (`SceneRules`; default): every term also needs exactly one
            object, of one pure colour, matching its shape template well, inside its quadrant.
            False: the lenient verifier (the main object's attributes only).
        max_stray, max_off_object, min_purity, max_off_palette, max_shape_error, max_elongation, min_inside:
            the strict rules' thresholds (see `SceneRules`); None keeps the default.
        min_area_frac, max_area_frac: object-size bounds of `decode_scenes`.
        name: logged name (default "shapes_dense" / "shapes_exact", with "_lenient" when not strict).
        weight: weight in the multi-reward advantage.
    """

    default_name = "shapes"

    def __init__(
        self,
        mode: Literal["dense", "exact", "graded"] = "dense",
        strict: bool = True,
        max_stray: float | None = None, max_off_object: float | None = None,  # one object
        min_purity: float | None = None, max_off_palette: float | None = None,  # one colour, the named one
        max_shape_error: float | None = None, max_elongation: float | None = None,  # the named shape
        min_inside: float | None = None,  # the named place
        min_area_frac: float = 0.01,
        max_area_frac: float = 0.5,
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        if mode not in ("dense", "exact", "graded"):
            raise ValueError(f"ShapesVerifier mode must be 'dense', 'exact' or 'graded', got {mode!r}")
        if mode == "graded" and not strict:
            raise ValueError("ShapesVerifier mode 'graded' grades the strict colour check: it needs strict=True")
        super().__init__(name or f"shapes_{mode}" + ("" if strict else "_lenient"), weight)
        self.mode = mode
        self.strict = bool(strict)
        self.rules = SceneRules.with_overrides(max_stray=max_stray, max_off_object=max_off_object, min_purity=min_purity,
                                               max_off_palette=max_off_palette, max_shape_error=max_shape_error,
                                               max_elongation=max_elongation, min_inside=min_inside)
        self.min_area_frac = float(min_area_frac)
        self.max_area_frac = float(max_area_frac)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """Tensor[B] of per-sample rewards in [0, 1]; an image with no object scores 0."""
        if self.mode == "graded":
            return graded_attributes(pixels, prompts, self.min_area_frac, self.max_area_frac, self.rules).mean(1)
        correct = attribute_correctness(
            pixels, prompts, self.min_area_frac, self.max_area_frac, strict=self.strict, rules=self.rules
        ).float()  # [B, 3]
        return correct.mean(1) if self.mode == "dense" else correct.prod(1)
