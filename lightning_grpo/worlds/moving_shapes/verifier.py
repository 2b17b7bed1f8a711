"""Read a moving-shapes clip back from pixels and score it against its prompt (the video verifiers).

Every frame is decoded by the image world's strict verifier (`lightning_grpo.worlds.shapes.verifier.decode_scenes`:
foreground by palette coverage, the main object's colour, shape template and centroid, the
one-object / purity / shape-match measures), all B·F frames in one batch. On top of that:

Motion (the analogue of VideoAlign's motion quality, MQ), from the main object's centroid track
c_f (fractions of the side) at times t_f = f / (F − 1), u the named direction's unit vector:
- constant-velocity fit by least squares, c_f ≈ a + t_f·b (b: the displacement over the clip);
- direction: every frame shows one object, the fitted displacement along u is between
  `min_travel` and `max_travel` times the world's `TRAVEL`, and its sideways part is at most
  `max_drift` times the along part (a cone of about ±27° by default);
- smooth: direction holds, no step goes back along u by more than `max_backstep`, and no frame
  is more than `max_track_error` from the fitted line (jerky, teleporting, wobbling tracks fail);
- progress (graded): share of the frames f ≥ 1 where the object is within `progress_tolerance`
  of where the world's clip would put it, c_0 + t_f·TRAVEL·u (a half-speed clip earns part).
Appearance (the analogue of visual quality, VQ), per frame with the image world's strict rules
(`SceneRules`; the position rule is not used, a moving object changes quadrant):
- colour: one object, decoded colour = the named one, purity ≥ `min_purity`;
- shape: one object, best template = the named shape with a good match and no streak;
- stable: one object in every frame, decoded with the same colour and shape in every frame, and
  its area varies by at most `max_area_change` (max/min).

Rewards: dense motion = mean(direction, smooth, progress); dense appearance = mean(share of
frames with the right colour, share with the right shape, stable); exact motion = smooth; exact
appearance = every frame coloured and shaped right and stable; exact match = both exact (shape,
colour, direction, one object in every frame). Per attribute, dense colour / shape = the share of
frames with the named colour / shape, exact = every frame. The product form of "all" is the
graded exact match, dense motion × colour share × shape share: like the judge it pays nothing to a
clip whose shape (or colour) is never right, where the mean form still pays 5/6 to a right clip
of another shape (what the text-to-video demo trains on, docs/results.md). Every term needs the
object to be there, so a blank, static, reversed or two-object clip earns (almost) nothing of the
dense and product forms.

Measured rates: docs/results.md ("Moving-shapes verifier"), from tests/worlds/test_motion_verifier.py.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_grpo.rewards.base import Reward
from lightning_grpo.worlds.moving_shapes.prompts import parse_motion_prompt
from lightning_grpo.worlds.moving_shapes.render import frame_times
from lightning_grpo.worlds.moving_shapes.vocab import TRAVEL, direction_vectors
from lightning_grpo.worlds.shapes.verifier import SceneRules, decode_scenes

Aspect = Literal["motion", "appearance", "colour", "shape", "all"]
Mode = Literal["dense", "exact", "product"]


@dataclass(frozen=True)
class MotionRules:
    """Thresholds of the moving-shapes verifier (module doc); lengths are fractions of the side.

    Attributes:
        min_travel, max_travel: bounds of the fitted displacement along the direction, in units of `TRAVEL`.
        max_drift: largest sideways / along ratio of the fitted displacement.
        max_backstep: largest step against the direction between two frames.
        max_track_error: largest distance of a frame's centroid from the fitted constant-velocity line.
        progress_tolerance: a frame is on track within this distance of c_0 + t_f·TRAVEL·u.
        max_area_change: largest ratio of the object's largest to smallest area over the frames.
        scene: the per-frame strict image rules (one object, purity, shape match).
    """

    min_travel: float = 0.5
    max_travel: float = 2.0
    max_drift: float = 0.5
    max_backstep: float = 0.03
    max_track_error: float = 0.05
    progress_tolerance: float = 0.06
    max_area_change: float = 1.5
    scene: SceneRules = field(default_factory=SceneRules)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "scene" and not value > 0:
                raise ValueError(f"MotionRules.{item.name} must be > 0, got {value}")
        if self.max_travel <= self.min_travel:
            raise ValueError(f"MotionRules.max_travel ({self.max_travel}) must exceed min_travel ({self.min_travel})")
        if self.max_area_change < 1:
            raise ValueError(f"MotionRules.max_area_change must be >= 1, got {self.max_area_change}")


@dataclass(frozen=True)
class ClipJudgement:
    """Every check of a batch of clips against its prompts (the terms of the module doc).

    Per clip [B]: `direction`, `smooth`, `stable` BoolTensors; `progress` FloatTensor (share of
    frames on track); `displacement` [B, 2] the fitted displacement b; `track_error` the largest
    distance from the fitted line. Per frame [B, F]: `one_object`, `colour`, `shape` BoolTensors
    and `centres` [B, F, 2] (the main object's centroid, fractions of the side).
    """

    direction: Tensor
    smooth: Tensor
    progress: Tensor
    stable: Tensor
    displacement: Tensor
    track_error: Tensor
    one_object: Tensor
    colour: Tensor
    shape: Tensor
    centres: Tensor

    def motion_dense(self) -> Tensor:
        """[B] mean(direction, smooth, progress)."""
        return (self.direction.float() + self.smooth.float() + self.progress) / 3

    def motion_exact(self) -> Tensor:
        """[B] 1 iff the track is smooth (hence in the right direction, one object in every frame)."""
        return self.smooth.float()

    def appearance_dense(self) -> Tensor:
        """[B] mean(share of right-coloured frames, share of right-shaped frames, stable)."""
        return (self.colour_dense() + self.shape_dense() + self.stable.float()) / 3

    def appearance_exact(self) -> Tensor:
        """[B] 1 iff every frame has the right colour and shape and the object is stable."""
        return (self.colour.all(1) & self.shape.all(1) & self.stable).float()

    def appearance_product(self) -> Tensor:
        """[B] share of right-coloured frames × share of right-shaped frames (0 if either is never right)."""
        return self.colour_dense() * self.shape_dense()

    def colour_dense(self) -> Tensor:
        """[B] share of frames with the named colour (one object, pure)."""
        return self.colour.float().mean(1)

    def colour_exact(self) -> Tensor:
        """[B] 1 iff every frame has the named colour."""
        return self.colour.all(1).float()

    def shape_dense(self) -> Tensor:
        """[B] share of frames with the named shape (one object, clean template match)."""
        return self.shape.float().mean(1)

    def shape_exact(self) -> Tensor:
        """[B] 1 iff every frame has the named shape."""
        return self.shape.all(1).float()

    def exact(self) -> Tensor:
        """[B] exact match: every attribute right (shape, colour, direction, one object in every frame)."""
        return self.motion_exact() * self.appearance_exact()

    def product(self) -> Tensor:
        """[B] the graded exact match: motion dense × colour share × shape share.

        Each factor is the graded form of one attribute of `exact`; a product, not a mean, so a clip
        right in colour and motion but of another shape earns 0, as under the judge. (Under the
        mean of `dense`, such a clip still earns about 5/6, and a policy that drifts to one shape
        for every prompt loses little.)"""
        return self.motion_dense() * self.appearance_product()

    def score(self, aspect: Aspect, mode: Mode) -> Tensor:
        """[B] the reward of one aspect ("motion", "appearance", "colour", "shape" or "all") and mode.

        "product" is defined for "all" (`product`) and "appearance" (`appearance_product`); for a
        single-term aspect it equals "dense"."""
        if aspect == "all":
            return {"exact": self.exact, "product": self.product,
                    "dense": lambda: (self.motion_dense() + self.appearance_dense()) / 2}[mode]()
        if mode == "product":
            return self.appearance_product() if aspect == "appearance" else getattr(self, f"{aspect}_dense")()
        return getattr(self, f"{aspect}_{mode}")()


def _check_clips(pixels: Tensor) -> Tensor:
    if pixels.ndim != 5 or pixels.shape[2] != 3 or pixels.shape[1] < 2:
        raise ValueError(f"moving-shapes pixels must be RGB clips [B, F >= 2, 3, H, W], got {tuple(pixels.shape)}")
    return pixels


def fit_tracks(centres: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares constant-velocity fit c_f ≈ a + t_f·b of tracks [B, F, 2]: (a [B, 2], b [B, 2]).

    b = Σ_f (t_f − t̄)(c_f − c̄) / Σ_f (t_f − t̄)², a = c̄ − t̄·b (ordinary least squares per coordinate).
    """
    t = frame_times(centres.shape[1], centres.device).view(1, -1, 1)  # [1, F, 1]
    dt = t - t.mean(1, keepdim=True)
    mean = centres.mean(1, keepdim=True)  # [B, 1, 2]
    b = (dt * (centres - mean)).sum(1) / dt.square().sum(1)  # [B, 2]
    return mean.squeeze(1) - t.mean() * b, b


class _LastJudgement:
    """The judgement of the last (clips, prompts, rules), reused while the very same tensor object,
    unmodified (same version counter), is judged again with the same prompts and rules.

    `MultiReward` hands every reward the same pixels tensor, so a run that logs motion, appearance
    and exact match beside its training reward decodes each batch once instead of four times.
    Only a weak reference is kept: a freed tensor can never be mistaken for a new one."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ref: weakref.ref | None = None
        self.value: ClipJudgement | None = None

    def get(self, pixels: Tensor, key: tuple) -> ClipJudgement | None:
        if self.ref is not None and self.ref() is pixels and self.key == (pixels._version, key):
            return self.value
        return None

    def put(self, pixels: Tensor, key: tuple, value: ClipJudgement) -> None:
        self.ref, self.key, self.value = weakref.ref(pixels), (pixels._version, key), value


_LAST = _LastJudgement()


def judge_clips(pixels: Tensor, prompts: list[str], rules: MotionRules | None = None) -> ClipJudgement:
    """Decode every frame of clips [B, F, 3, H, W] in [0, 1] and check them against `prompts`
    (the same unmodified tensor judged again with the same prompts and rules reuses the result)."""
    pixels = _check_clips(pixels)
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {pixels.shape[0]} clips")
    rules = rules or MotionRules()
    key = (tuple(prompts), rules)
    cached = _LAST.get(pixels, key)
    if cached is None:
        cached = _judge(pixels, prompts, rules)
        _LAST.put(pixels, key, cached)
    return cached


def _judge(pixels: Tensor, prompts: list[str], rules: MotionRules) -> ClipJudgement:
    """`judge_clips` without the reuse."""
    batch, frames, _, height, width = pixels.shape
    decoded = decode_scenes(pixels.flatten(0, 1), max_off_palette=rules.scene.max_off_palette)  # B·F frames
    per_frame = lambda x: x.view(batch, frames)  # noqa: E731
    targets = torch.tensor([parse_motion_prompt(p).indices for p in prompts], device=pixels.device).view(-1, 3)
    clean = decoded.clean_attributes(rules.scene)  # [B·F, 3] colour, shape, position
    one = per_frame(decoded.one_object(rules.scene))
    colour = per_frame(clean[:, 0]) & (per_frame(decoded.colour) == targets[:, :1])
    shape = per_frame(clean[:, 1]) & (per_frame(decoded.shape) == targets[:, 1:2])
    centres = torch.stack([per_frame(decoded.cx) / width, per_frame(decoded.cy) / height], -1)  # [B, F, 2]

    every = one.all(1)
    unit = direction_vectors(pixels.device)[targets[:, 2]]  # [B, 2]
    start, displacement = fit_tracks(centres)
    along = (displacement * unit).sum(1)  # [B]
    sideways = (displacement[:, 0] * unit[:, 1] - displacement[:, 1] * unit[:, 0]).abs()
    direction = every & (along >= rules.min_travel * TRAVEL) & (along <= rules.max_travel * TRAVEL) & (sideways <= rules.max_drift * along)
    t = frame_times(frames, pixels.device).view(1, -1, 1)
    track_error = (centres - start.unsqueeze(1) - t * displacement.unsqueeze(1)).norm(dim=-1).amax(1)  # [B]
    steps = ((centres[:, 1:] - centres[:, :-1]) * unit.unsqueeze(1)).sum(-1)  # [B, F-1] along u
    smooth = direction & (steps >= -rules.max_backstep).all(1) & (track_error <= rules.max_track_error)
    expected = centres[:, :1] + t[:, 1:] * TRAVEL * unit.unsqueeze(1)  # [B, F-1, 2] the world's track from c_0
    on_track = ((centres[:, 1:] - expected).norm(dim=-1) <= rules.progress_tolerance) & one[:, 1:] & one[:, :1]
    area = per_frame(decoded.area)
    same = (per_frame(decoded.colour) == per_frame(decoded.colour)[:, :1]).all(1) & (per_frame(decoded.shape) == per_frame(decoded.shape)[:, :1]).all(1)
    stable = every & same & (area.amax(1) <= rules.max_area_change * area.amin(1))
    return ClipJudgement(direction=direction, smooth=smooth, progress=on_track.float().mean(1), stable=stable,
                         displacement=displacement, track_error=track_error, one_object=one, colour=colour,
                         shape=shape, centres=centres)


def motion_exact_accuracy(pixels: Tensor, prompts: list[str]) -> float:
    """Share of clips that are an exact match (every attribute right, one object in every frame)."""
    if pixels.shape[0] == 0:
        raise ValueError("motion_exact_accuracy needs at least one clip")
    return judge_clips(pixels, prompts).exact().mean().item()


class MovingShapesVerifier(Reward):
    """The moving-shapes world's rewards, computed from pixels [B, F, 3, H, W] (module doc).

    Args:
        aspect: "motion" (direction and smoothness of the track: the image-to-video reward),
            "appearance" (right colour and shape in every frame, stable), "colour" or "shape" (one
            attribute per frame), or "all" (motion and appearance).
        mode: "dense" (graded terms, mean of the aspect's terms, for training), "exact" (1 iff every
            check of the aspect passes) or "product" (graded terms multiplied: "all" = motion dense ×
            colour share × shape share, "appearance" = colour share × shape share; = "dense" for a
            one-term aspect).
        min_travel, max_travel, max_drift, max_backstep, max_track_error, progress_tolerance,
            max_area_change: `MotionRules` overrides (None keeps the default).
        max_stray, max_off_object, min_purity, max_off_palette, max_shape_error, max_elongation: per-frame
            `SceneRules` overrides (None keeps the default).
        name: logged name (default "{aspect}_{mode}", "moving_shapes_{mode}" for "all").
        weight: weight in the multi-reward advantage.
    """

    default_name = "moving_shapes"

    def __init__(
        self,
        aspect: Aspect = "all",
        mode: Mode = "dense",
        min_travel: float | None = None, max_travel: float | None = None, max_drift: float | None = None,  # direction
        max_backstep: float | None = None, max_track_error: float | None = None,  # smooth
        progress_tolerance: float | None = None, max_area_change: float | None = None,  # progress, stable
        max_stray: float | None = None, max_off_object: float | None = None,  # per frame: one object
        min_purity: float | None = None, max_off_palette: float | None = None,  # per frame: one colour
        max_shape_error: float | None = None, max_elongation: float | None = None,  # per frame: the shape
        name: str | None = None,
        weight: float = 1.0,
    ) -> None:
        if aspect not in get_args(Aspect):
            raise ValueError(f"MovingShapesVerifier aspect must be one of {list(get_args(Aspect))}, got {aspect!r}")
        if mode not in get_args(Mode):
            raise ValueError(f"MovingShapesVerifier mode must be one of {list(get_args(Mode))}, got {mode!r}")
        super().__init__(name or f"{'moving_shapes' if aspect == 'all' else aspect}_{mode}", weight)
        self.aspect, self.mode = aspect, mode
        scene = SceneRules.with_overrides(max_stray=max_stray, max_off_object=max_off_object, min_purity=min_purity,
                                          max_off_palette=max_off_palette, max_shape_error=max_shape_error,
                                          max_elongation=max_elongation)
        motion = {"min_travel": min_travel, "max_travel": max_travel, "max_drift": max_drift, "max_backstep": max_backstep,
                  "max_track_error": max_track_error, "progress_tolerance": progress_tolerance, "max_area_change": max_area_change}
        self.rules = MotionRules(**{k: float(v) for k, v in motion.items() if v is not None}, scene=scene)

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        """Tensor[B] of per-clip rewards in [0, 1]."""
        return judge_clips(pixels, prompts, self.rules).score(self.aspect, self.mode)


class FirstFrameFidelity(Reward):
    """How closely a generated clip starts from its image-to-video condition: 1 − mean |x_0 − image|
    over pixels and channels (1 = the first frame reproduces the image exactly; values in [0, 1]).

    A measure to log beside the motion reward (never a training reward: it is trivially maximised
    by a static clip), so an image-to-video run shows that its clips still begin at their first frame.
    Needs the `images` [B, 3, H, W] the clips were conditioned on (the evaluation passes them).
    """

    default_name = "first_frame_fidelity"

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        pixels = _check_clips(pixels)
        if images is None:
            raise ValueError("first_frame_fidelity needs the conditioning images (image-to-video)")
        if images.shape != pixels[:, 0].shape:
            raise ValueError(f"first frames {tuple(images.shape)} do not match the clips' frames {tuple(pixels[:, 0].shape)}")
        return 1 - (pixels[:, 0].float().clamp(0, 1) - images.to(pixels.device).float().clamp(0, 1)).abs().mean((1, 2, 3))


class FirstFrameAdherence(Reward):
    """Does an image-to-video clip keep its conditioning image's OBJECT: 1 iff frame `frame` of the
    clip holds one object (the strict per-frame rules, faint foreground included) whose colour and
    shape, each read cleanly, are those decoded from the conditioning image, and, for frame 0, whose
    centroid lies within `max_offset` (a fraction of the side) of the image's object; else 0.

    Why beside `FirstFrameFidelity`: that one averages |x_0 − image| over every pixel, mostly black
    background, so a frame 0 that recolours or reshapes the object still scores ≈ 0.96 (issue 28:
    0.97 → 0.96 while frame 0 kept the image's colour and shape in 71% → 33% of clips). This one
    looks at the object only. With `frame=-1` it asks whether the LAST frame still shows the
    image's object (colour and shape; it has moved, so no place check). A measure to log, like
    `FirstFrameFidelity`; as a training reward a static copy of the image would maximise it.

    Args:
        frame: which frame of the clip to check (0: the first; negative counts from the end).
        max_offset: largest centroid distance from the image's object for frame 0 (0.1 of the side:
            a tenth of the world's travel over the clip is 0.2).
        name: logged name (default "first_frame_adherence", "last_frame_adherence" for -1,
            "frame{k}_adherence" otherwise).
        weight: weight in the multi-reward advantage.
    """

    default_name = "first_frame_adherence"

    def __init__(self, frame: int = 0, max_offset: float = 0.1, name: str | None = None, weight: float = 1.0) -> None:
        if not max_offset > 0:
            raise ValueError(f"FirstFrameAdherence max_offset must be > 0, got {max_offset}")
        default = {0: "first_frame_adherence", -1: "last_frame_adherence"}.get(int(frame), f"frame{int(frame)}_adherence")
        super().__init__(name or default, weight)
        self.frame, self.max_offset, self.rules = int(frame), float(max_offset), SceneRules()

    def score(self, pixels: Tensor, prompts: list[str], images: Tensor | None = None) -> Tensor:
        pixels = _check_clips(pixels)
        if images is None:
            raise ValueError(f"{self.name} needs the conditioning images (image-to-video)")
        if not -pixels.shape[1] <= self.frame < pixels.shape[1]:
            raise ValueError(f"{self.name}: frame {self.frame} outside clips of {pixels.shape[1]} frames")
        frame = pixels[:, self.frame]  # [B, 3, H, W]
        if images.shape != frame.shape:
            raise ValueError(f"conditioning images {tuple(images.shape)} do not match the clips' frames {tuple(frame.shape)}")
        both = decode_scenes(torch.cat([images.to(pixels.device).float(), frame.float()]), max_off_palette=self.rules.max_off_palette)
        batch = frame.shape[0]
        clean = both.clean_attributes(self.rules)  # [2B, 3] colour, shape, position read cleanly (one object)
        image, clip = slice(0, batch), slice(batch, 2 * batch)
        keeps = (clean[clip, 0] & clean[clip, 1] & both.valid[image]
                 & (both.colour[clip] == both.colour[image]) & (both.shape[clip] == both.shape[image]))
        if self.frame == 0:
            side = torch.tensor([frame.shape[-1], frame.shape[-2]], device=pixels.device, dtype=torch.float32)
            centres = torch.stack([both.cx, both.cy], 1) / side  # [2B, 2] fractions of the side
            keeps &= (centres[clip] - centres[image]).norm(dim=1) <= self.max_offset
        return keeps.float()
