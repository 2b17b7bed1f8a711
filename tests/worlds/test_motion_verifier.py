"""The moving-shapes verifiers: right clips pass under generator-like degradations, deliberately bad
clips of otherwise right scenes fail, the rewards are YAML-ready and validate their input.

The rates in docs/results.md ("Moving-shapes verifier") are `verifier_rates()` of this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from lightning_grpo.rewards.base import RewardError
from lightning_grpo.worlds.moving_shapes import (
    DIRECTIONS,
    TRAVEL,
    MotionTracks,
    all_motion_scenes,
    describe_motion,
    direction_vectors,
    frame_times,
    motion_scenes_to_indices,
    render_tracks,
    sample_tracks,
)
from lightning_grpo.worlds.moving_shapes.verifier import (
    FirstFrameAdherence,
    FirstFrameFidelity,
    MotionRules,
    MovingShapesVerifier,
    fit_tracks,
    judge_clips,
    motion_exact_accuracy,
)
from lightning_grpo.worlds.shapes.vocab import SHAPES

FRAMES, SIZE = 9, 32


def scenes_and_tracks(repeats: int = 1, frames: int = FRAMES, seed: int = 0) -> tuple[list[str], Tensor, MotionTracks]:
    """Every combination `repeats` times with prompts over all 5 templates: (prompts, indices [N, 3], tracks)."""
    scenes = all_motion_scenes() * repeats
    prompts = [describe_motion(s, i % 5) for i, s in enumerate(scenes)]
    indices = motion_scenes_to_indices(scenes)
    return prompts, indices, sample_tracks(indices, frames, seed=seed)


def degraded(clips: Tensor, degrade: Callable, blur: float, noise: float) -> Tensor:
    """`degrade` (tests/worlds/conftest.py: blur σ px + Gaussian noise) applied to every frame of clips [B, F, 3, H, W]."""
    return degrade(clips.flatten(0, 1), blur, noise).view_as(clips)


def with_direction(indices: Tensor, tracks: MotionTracks, mapping: dict[int, int]) -> MotionTracks:
    """The same clips (same starts and radii) moving in `mapping[direction]` instead."""
    unit = direction_vectors()[torch.tensor([mapping[int(d)] for d in indices[:, 2]])]  # [N, 2]
    t = frame_times(tracks.frames).view(1, -1, 1)
    return replace(tracks, centres=tracks.centres[:, :1] + t * TRAVEL * unit.unsqueeze(1))


def _recoloured_half(indices, tracks, field: str, modulus: int) -> Tensor:
    other = replace(tracks, **{field: (getattr(tracks, field) + 1) % modulus})
    clips, changed = render_tracks(tracks, SIZE), render_tracks(other, SIZE)
    clips[:, tracks.frames // 2:] = changed[:, tracks.frames // 2:]
    return clips


def _second_object(indices, tracks, level: float = 1.0) -> Tensor:
    """A smaller second object of another colour and shape, moving alongside the first 0.36 of the
    side away (towards the image's far half, so the two never touch), at `level` of its colour (0.4:
    below the foreground threshold, seen only by the faint-foreground rule)."""
    unit = direction_vectors()[indices[:, 2]]  # [N, 2]
    side = torch.stack([-unit[:, 1], unit[:, 0]], 1)  # perpendicular to the motion
    across = ((tracks.centres[:, 0] - 0.5) * side).sum(1, keepdim=True)  # [N, 1] where the first one is, sideways
    offset = torch.where(across > 0, -1.0, 1.0) * 0.36 * side  # [N, 2]: away from the first object
    other = MotionTracks((tracks.colour + 2) % 4, (tracks.shape + 1) % 3, tracks.centres + offset.unsqueeze(1), tracks.radius * 0.5)
    return torch.maximum(render_tracks(tracks, SIZE), level * render_tracks(other, SIZE))


def _growing(indices, tracks) -> Tensor:
    grow = torch.linspace(0.6, 1.3, tracks.frames).view(1, -1)
    return render_tracks(replace(tracks, radius=tracks.radius.view(-1, 1) * grow), SIZE)


def _jerky(indices, tracks) -> Tensor:
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7, 8])  # frames out of order: the object jumps back and forth
    return render_tracks(tracks, SIZE)[:, order]


def _wobble(indices, tracks) -> Tensor:
    unit = direction_vectors()[indices[:, 2]]  # [N, 2]
    side = torch.stack([-unit[:, 1], unit[:, 0]], 1)  # perpendicular
    zigzag = 0.08 * torch.tensor([(-1.0) ** f for f in range(tracks.frames)]).view(1, -1, 1)
    return render_tracks(replace(tracks, centres=tracks.centres + zigzag * side.unsqueeze(1)), SIZE)


def _flicker(indices, tracks) -> Tensor:
    clips = render_tracks(tracks, SIZE)
    clips[:, 3] = 0
    clips[:, 6] = 0
    return clips


#: Deliberately bad clips of otherwise right scenes: name -> (indices, tracks) -> clips [N, F, 3, H, W].
BAD_CLIPS: dict[str, Callable[[Tensor, MotionTracks], Tensor]] = {
    "static shape": lambda i, t: render_tracks(replace(t, centres=t.centres[:, :1].expand_as(t.centres)), SIZE),
    "reversed direction": lambda i, t: render_tracks(with_direction(i, t, {0: 1, 1: 0, 2: 3, 3: 2}), SIZE),
    "perpendicular direction": lambda i, t: render_tracks(with_direction(i, t, {0: 2, 1: 3, 2: 1, 3: 0}), SIZE),
    "half speed": lambda i, t: render_tracks(replace(t, centres=t.centres[:, :1] + 0.4 * (t.centres - t.centres[:, :1])), SIZE),
    "frames out of order": _jerky,
    "sideways wobble": _wobble,
    "flicker (2 blank frames)": _flicker,
    "flicker (dimmed to 40% every other frame)": lambda i, t: render_tracks(t, SIZE) * torch.tensor([1.0, 0.4] * 4 + [1.0]).view(1, -1, 1, 1, 1),
    "two objects": _second_object,
    "two objects, the second dim (40%)": lambda i, t: _second_object(i, t, level=0.4),
    "colour change mid-clip": lambda i, t: _recoloured_half(i, t, "colour", 4),
    "shape change mid-clip": lambda i, t: _recoloured_half(i, t, "shape", 3),
    "growing shape": _growing,
}

#: Right clips under generator-like degradations: name -> (clips, degrade) -> degraded clips.
GOOD_CLIPS: dict[str, Callable[[Tensor, Callable], Tensor]] = {
    "clean": lambda c, d: c,
    "blur 1.0 px + noise 0.05": lambda c, d: degraded(c, d, 1.0, 0.05),
    "blur 1.5 px + noise 0.08": lambda c, d: degraded(c, d, 1.5, 0.08),
    "object at 70% + blur 1 px + noise 0.05": lambda c, d: degraded(c * 0.7, d, 1.0, 0.05),
}


def verifier_rates(degrade: Callable) -> dict[str, dict[str, float]]:
    """condition -> {motion/appearance/all exact match share, motion/appearance dense mean} (docs/results.md)."""
    rows = {}
    prompts, indices, tracks = scenes_and_tracks(repeats=2)
    clean = render_tracks(tracks, SIZE)
    conditions = {name: fn(clean, degrade) for name, fn in GOOD_CLIPS.items()}
    conditions.update({name: fn(indices, tracks) for name, fn in BAD_CLIPS.items()})
    for name, clips in conditions.items():
        judged = judge_clips(clips, prompts)
        rows[name] = {"motion_exact": judged.motion_exact().mean().item(), "appearance_exact": judged.appearance_exact().mean().item(),
                      "exact": judged.exact().mean().item(), "motion_dense": judged.motion_dense().mean().item(),
                      "appearance_dense": judged.appearance_dense().mean().item()}
    return rows


# ----------------------------------------------------------------------------- right clips
@pytest.mark.parametrize("condition", list(GOOD_CLIPS))
def test_right_clips_are_exact_matches_under_degradation(condition: str, degrade_fn) -> None:
    prompts, _, tracks = scenes_and_tracks(seed=1)
    clips = GOOD_CLIPS[condition](render_tracks(tracks, SIZE), degrade_fn)
    judged = judge_clips(clips, prompts)
    # the harshest condition loses a few clips whose small triangle reads as another shape in one of 9 frames
    harsh = condition.startswith("blur 1.5")
    assert judged.exact().mean() >= (0.9 if harsh else 0.98), condition
    assert judged.motion_dense().mean() >= 0.98 and judged.appearance_dense().mean() >= (0.95 if harsh else 0.98)


@pytest.mark.parametrize("frames", [5, 17])
def test_other_frame_counts(frames: int) -> None:
    prompts, _, tracks = scenes_and_tracks(frames=frames, seed=5)
    assert motion_exact_accuracy(render_tracks(tracks, SIZE), prompts) == 1.0


# ----------------------------------------------------------------------------- bad clips
#: Which aspect must reject each bad clip ("all" must reject every one of them).
REJECTED_BY = {
    "static shape": "motion", "reversed direction": "motion", "perpendicular direction": "motion", "half speed": None,
    "frames out of order": "motion", "sideways wobble": "motion", "flicker (2 blank frames)": "both",
    "flicker (dimmed to 40% every other frame)": "both", "two objects": "both",
    "two objects, the second dim (40%)": "both",
    "colour change mid-clip": "appearance", "shape change mid-clip": "appearance", "growing shape": "appearance",
}


@pytest.mark.parametrize("kind", list(BAD_CLIPS))
def test_bad_clips_of_right_scenes_are_rejected(kind: str) -> None:
    prompts, indices, tracks = scenes_and_tracks()
    judged = judge_clips(BAD_CLIPS[kind](indices, tracks), prompts)
    assert judged.exact().mean() <= 0.02, kind
    rejected_by = REJECTED_BY[kind]
    if rejected_by in ("motion", "both"):
        # a failed exact check costs at least its third of the dense reward
        assert judged.motion_exact().mean() <= 0.02 and judged.motion_dense().mean() <= 2 / 3, kind
    if rejected_by in ("appearance", "both"):
        assert judged.appearance_exact().mean() <= 0.02 and judged.appearance_dense().mean() <= 2 / 3, kind
    if rejected_by == "motion":  # appearance is right: the aspects are independent
        assert judged.appearance_exact().mean() >= 0.95, kind
    if kind in ("colour change mid-clip", "growing shape"):  # the track is right
        assert judged.motion_exact().mean() >= 0.95, kind


def test_half_speed_passes_direction_but_earns_less_progress() -> None:
    """0.4 × TRAVEL is below min_travel (0.5): not an exact match; fewer frames on the world's track."""
    prompts, indices, tracks = scenes_and_tracks()
    judged = judge_clips(BAD_CLIPS["half speed"](indices, tracks), prompts)
    assert judged.motion_exact().mean() == 0 and judged.appearance_exact().mean() >= 0.95
    assert 0.2 < judged.progress.mean() < 0.7


def test_static_and_reversed_clips_earn_little_dense_motion() -> None:
    prompts, indices, tracks = scenes_and_tracks()
    # direction and smooth fail; the world's track moves s = TRAVEL / 8 = 0.025 per frame, so frame f
    # of a static clip is f·s from it (on track, ≤ 0.06, for f = 1, 2: 2 of 8 frames) and of a
    # reversed one 2f·s (f = 1 only: 1 of 8)
    for kind, on_track in (("static shape", 2 / 8), ("reversed direction", 1 / 8)):
        dense = judge_clips(BAD_CLIPS[kind](indices, tracks), prompts).motion_dense()
        assert torch.allclose(dense, torch.full_like(dense, on_track / 3), atol=1e-6), kind


def test_wrong_prompt_direction_is_rejected_by_motion_only() -> None:
    prompts, indices, tracks = scenes_and_tracks()
    clips = render_tracks(tracks, SIZE)
    wrong = [describe_motion(s.__class__(s.colour, s.shape, DIRECTIONS[(s.indices[2] + 2) % 4])) for s in all_motion_scenes()]
    judged = judge_clips(clips, wrong)
    assert judged.motion_exact().sum() == 0 and judged.appearance_exact().mean() == 1
    recoloured = [describe_motion(s.__class__(("red", "green", "blue", "yellow")[(s.indices[0] + 1) % 4], s.shape, s.direction)) for s in all_motion_scenes()]
    judged = judge_clips(clips, recoloured)
    assert judged.motion_exact().mean() == 1 and judged.colour.sum() == 0 and judged.appearance_exact().sum() == 0


def test_empty_and_noise_clips_score_zero_without_nan() -> None:
    prompts = [describe_motion(s) for s in all_motion_scenes()[:4]]
    for clips in (torch.zeros(4, FRAMES, 3, SIZE, SIZE), torch.ones(4, FRAMES, 3, SIZE, SIZE),
                  torch.rand(4, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))):
        for aspect in ("motion", "appearance", "colour", "shape", "all"):
            for mode in ("dense", "exact", "product"):
                scores = MovingShapesVerifier(aspect, mode)(clips, prompts)
                assert torch.isfinite(scores).all() and scores.max() <= 0.1, (aspect, mode)


# ----------------------------------------------------------------------------- pieces by hand
def test_fit_tracks_by_hand() -> None:
    """Three frames at t = 0, 0.5, 1 with x = 0.1, 0.4, 0.5: slope b = Σ(t − ½)(x − x̄)/Σ(t − ½)² =
    (−½·(0.1 − 1/3) + ½·(0.5 − 1/3)) / ½ = 0.4, intercept a = x̄ − ½·b = 1/3 − 0.2 = 2/15."""
    centres = torch.tensor([[[0.1, 0.3], [0.4, 0.3], [0.5, 0.3]]])
    start, displacement = fit_tracks(centres)
    assert torch.allclose(displacement, torch.tensor([[0.4, 0.0]]), atol=1e-6)
    assert torch.allclose(start, torch.tensor([[2 / 15, 0.3]]), atol=1e-6)


def test_rewards_graded_values_on_a_hand_built_batch() -> None:
    """Clip 0 right; clip 1 right track, wrong colour in every frame; clip 2 static.
    appearance dense = (colour share + shape share + stable)/3: 1, (0 + 1 + 1)/3, 1;
    motion dense = (direction + smooth + progress)/3: 1, 1, (0 + 0 + 2/8)/3 (see the test above)."""
    prompts, indices, tracks = scenes_and_tracks()
    pick = [0, 17, 30]
    clips = render_tracks(MotionTracks(tracks.colour[pick], tracks.shape[pick], tracks.centres[pick], tracks.radius[pick]), SIZE)
    clips[2] = clips[2, :1].expand(FRAMES, -1, -1, -1)
    chosen = [prompts[i] for i in pick]
    chosen[1] = chosen[1].replace("green", "blue") if "green" in chosen[1] else chosen[1].replace(chosen[1].split()[1], "green")
    appearance = MovingShapesVerifier("appearance", "dense")(clips, chosen)
    motion = MovingShapesVerifier("motion", "dense")(clips, chosen)
    assert torch.allclose(appearance, torch.tensor([1.0, 2 / 3, 1.0]), atol=1e-6), (appearance, chosen)
    assert torch.allclose(motion, torch.tensor([1.0, 1.0, 0.25 / 3]), atol=1e-6), motion
    both = MovingShapesVerifier("all", "dense")(clips, chosen)
    assert torch.allclose(both, (appearance + motion) / 2)
    assert MovingShapesVerifier("all", "exact")(clips, chosen).tolist() == [1.0, 0.0, 0.0]
    # per attribute: colour share 1, 0, 1; shape share 1, 1, 1 (the static clip keeps its shape)
    assert MovingShapesVerifier("colour", "dense")(clips, chosen).tolist() == [1.0, 0.0, 1.0]
    assert MovingShapesVerifier("shape", "dense")(clips, chosen).tolist() == [1.0, 1.0, 1.0]
    assert MovingShapesVerifier("shape", "product")(clips, chosen).tolist() == [1.0, 1.0, 1.0]  # one term: dense
    # product = motion dense × colour share × shape share: 1·1·1, 1·0·1, (0.25/3)·1·1
    product = MovingShapesVerifier("all", "product")(clips, chosen)
    assert torch.allclose(product, torch.tensor([1.0, 0.0, 0.25 / 3]), atol=1e-6), product
    assert MovingShapesVerifier("appearance", "product")(clips, chosen).tolist() == [1.0, 0.0, 1.0]


def test_product_gives_nothing_to_a_right_clip_of_another_shape() -> None:
    """Right clips judged against prompts naming the next shape: colour and motion right, shape
    wrong in every frame, one stable object. The mean form still pays (1 + (1 + 0 + 1)/3)/2 = 5/6
    (motion; colour share, shape share, stable); the product form and the judge pay 0. Partial
    credit: frames 4-8 blanked, the shape share is 4/9."""
    prompts, indices, tracks = scenes_and_tracks()
    clips = render_tracks(tracks, SIZE)
    reshaped = [p.replace(SHAPES[int(i)], SHAPES[(int(i) + 1) % 3]) for p, i in zip(prompts, indices[:, 1])]
    assert all(a != b for a, b in zip(reshaped, prompts))
    judged = judge_clips(clips, reshaped)
    assert torch.allclose(judged.score("all", "dense"), torch.full((len(prompts),), 5 / 6), atol=1e-6)
    assert judged.score("all", "product").max() == 0 and judged.exact().max() == 0
    assert judged.score("colour", "exact").min() == 1 and judged.score("shape", "dense").max() == 0
    mixed = clips.clone()
    mixed[:, 4:] = 0
    judged = judge_clips(mixed, prompts)
    assert torch.allclose(judged.shape_dense(), torch.full((len(prompts),), 4 / 9), atol=1e-6)


def test_first_frame_fidelity_by_hand() -> None:
    clips = torch.zeros(2, 3, 3, 4, 4)
    clips[1, 0] = 0.25  # first frame off by 0.25 everywhere
    clips[:, 1:] = 0.9  # later frames do not count
    images = torch.zeros(2, 3, 4, 4)
    assert FirstFrameFidelity()(clips, ["a", "b"], images).tolist() == [1.0, 0.75]
    with pytest.raises(RewardError, match="needs the conditioning images"):
        FirstFrameFidelity()(clips, ["a", "b"])
    with pytest.raises(RewardError, match="do not match"):
        FirstFrameFidelity()(clips, ["a", "b"], torch.zeros(2, 3, 8, 8))


def test_first_frame_adherence_looks_at_the_object() -> None:
    """Hand-built clips from one red circle at (0.3, 0.3), radius 0.12, moving right by 0.2; the
    conditioning image is its clean frame 0. Frame 0 kept: 1. Frame 0 redrawn as a red square, or as
    a yellow circle: 0 (whole-image fidelity still ≥ 0.95: mostly black pixels agree). Frame 0 moved
    by 0.15 of the side (> 0.1): 0 for frame 0, while the last frame, checked for colour and shape
    only, keeps 1. Frame 0 with a dim (40%) second object: 0 (faint foreground counts)."""
    t = frame_times(FRAMES).view(1, -1, 1)
    centres = torch.tensor([0.3, 0.3]) + t * torch.tensor([0.2, 0.0])  # [1, F, 2]

    def clip(colour: int = 0, shape: int = 0, shift: float = 0.0) -> Tensor:
        return render_tracks(MotionTracks(torch.tensor([colour]), torch.tensor([shape]), centres + torch.tensor([shift, 0.0]),
                                          torch.tensor([0.12])), SIZE)

    kept = clip()
    image = kept[:, 0]  # [1, 3, H, W]
    dim = kept.clone()
    dim[:, 0] = torch.maximum(dim[:, 0], 0.4 * render_tracks(MotionTracks(torch.tensor([2]), torch.tensor([1]),
                                                                           torch.tensor([[[0.75, 0.75]]]), torch.tensor([0.1])), SIZE)[:, 0])
    moved = clip(shift=0.15)
    clips = torch.cat([kept, clip(shape=1), clip(colour=3), moved, dim])  # [5, F, 3, H, W]
    images = image.expand(5, -1, -1, -1)
    prompts = ["a red circle moving to the right"] * 5
    assert FirstFrameAdherence()(clips, prompts, images).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert FirstFrameAdherence(frame=-1)(clips, prompts, images).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert (FirstFrameFidelity()(clips, prompts, images) >= 0.95).all()  # what the object measure is for
    assert FirstFrameAdherence(max_offset=0.2)(clips[3:4], prompts[:1], images[:1]).tolist() == [1.0]
    assert FirstFrameAdherence().name == "first_frame_adherence" and FirstFrameAdherence(frame=-1).name == "last_frame_adherence"
    assert FirstFrameAdherence(frame=4).name == "frame4_adherence"
    with pytest.raises(RewardError, match="needs the conditioning images"):
        FirstFrameAdherence()(clips, prompts)
    with pytest.raises(RewardError, match="frame 9 outside clips of 9 frames"):
        FirstFrameAdherence(frame=9)(clips, prompts, images)
    with pytest.raises(ValueError, match="max_offset must be > 0"):
        FirstFrameAdherence(max_offset=0)


def test_reward_names_rules_and_errors() -> None:
    assert MovingShapesVerifier().name == "moving_shapes_dense"
    assert MovingShapesVerifier("motion", "exact").name == "motion_exact"
    assert MovingShapesVerifier("appearance", max_stray=0.2, max_track_error=0.1).rules.scene.max_stray == 0.2
    assert MovingShapesVerifier("appearance", max_off_object=3.0).rules.scene.max_off_object == 3.0
    assert MovingShapesVerifier(max_track_error=0.1).rules.max_track_error == 0.1
    with pytest.raises(ValueError, match="aspect"):
        MovingShapesVerifier("size")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        MovingShapesVerifier("motion", "soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_travel"):
        MotionRules(min_travel=1.0, max_travel=0.5)
    with pytest.raises(ValueError, match="max_drift"):
        MotionRules(max_drift=0)
    prompts = [describe_motion(all_motion_scenes()[0])]
    with pytest.raises(RewardError, match=r"clips \[B, F >= 2, 3, H, W\]"):
        MovingShapesVerifier()(torch.zeros(1, 3, SIZE, SIZE), prompts)
    with pytest.raises(RewardError, match="no direction"):
        MovingShapesVerifier()(torch.zeros(1, FRAMES, 3, SIZE, SIZE), ["a red circle"])


def test_rewards_of_one_batch_decode_it_once(monkeypatch) -> None:
    """MultiReward hands every reward the same tensor: the frames are decoded once; a changed
    tensor, other prompts or other rules are judged afresh."""
    import lightning_grpo.worlds.moving_shapes.verifier as verifier
    from lightning_grpo.rewards.base import MultiReward

    calls = []
    original = verifier.decode_scenes
    monkeypatch.setattr(verifier, "decode_scenes", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts, _, tracks = scenes_and_tracks()
    clips = render_tracks(tracks, SIZE)[:6]
    prompts = prompts[:6]
    rewards = MultiReward([MovingShapesVerifier("motion", "dense"), MovingShapesVerifier("appearance", "exact"),
                           MovingShapesVerifier("all", "exact", name="exact_match")])
    scores = rewards(clips, prompts)
    assert len(calls) == 1 and scores["exact_match"].tolist() == [1.0] * 6
    clips[0] = 0  # in place: the version counter moves, the clip is judged again
    assert rewards(clips, prompts)["exact_match"].tolist() == [0.0] + [1.0] * 5 and len(calls) == 2
    MovingShapesVerifier("motion", "dense", max_track_error=0.1)(clips, prompts)  # other rules
    MovingShapesVerifier("motion", "dense")(clips, prompts[::-1])  # other prompts
    MovingShapesVerifier("motion", "dense")(clips.clone(), prompts)  # another tensor with the same values
    assert len(calls) == 5
