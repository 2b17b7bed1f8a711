"""The moving-shapes world: renderer, first frames, templates, parser, split, captioned clips."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch

from lightning_grpo.worlds.moving_shapes import (
    DIRECTIONS,
    HELDOUT_MOTION_TEMPLATES,
    HELDOUT_SPLITS,
    MOTION_TEMPLATES,
    PROMPT_FILES,
    TRAVEL,
    MotionScene,
    all_motion_scenes,
    describe_motion,
    heldout_motion_scenes,
    motion_heldout_split_prompts,
    motion_heldout_splits,
    motion_words,
    noisy_motion_captions,
    parse_motion_prompt,
    render_first_frames,
    render_motion_scenes,
    sample_captioned_clips,
    sample_tracks,
    train_motion_prompts,
    train_motion_scenes,
    write_motion_prompt_files,
)
from lightning_grpo.worlds.shapes.prompts import PromptParseError
from lightning_grpo.worlds.tokenizers import words_of
from lightning_grpo.worlds.shapes.vocab import COLOUR_NAMES, COLOURS, SHAPES

PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "prompts"


def centroid(frames) -> torch.Tensor:
    """(x, y) centre of mass of the non-black pixels of frames [..., 3, H, W], in fractions of the side."""
    mass = frames.amax(-3)  # [..., H, W]
    side = frames.shape[-1]
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    total = mass.sum((-2, -1))
    return torch.stack([(mass * coords).sum((-2, -1)) / total, (mass * coords.view(-1, 1)).sum((-2, -1)) / total], -1)


# ----------------------------------------------------------------------------- renderer
def test_clip_layout_and_colour() -> None:
    clips = render_motion_scenes([MotionScene("green", "square", "up")], frames=5, size=32)
    assert clips.shape == (1, 5, 3, 32, 32) and clips.dtype == torch.float32
    assert 0 <= clips.min() and clips.max() <= 1
    # the plateau of the object is exactly its palette colour in every frame
    brightest = clips[0].flatten(2).amax(2)  # [F, 3]
    assert torch.allclose(brightest, torch.tensor(COLOURS["green"]).expand(5, 3))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_object_moves_travel_along_its_direction_at_constant_speed(direction: str) -> None:
    """Centroid at frame f = start + f/(F−1) · TRAVEL · u: hand-written unit vectors, y down."""
    unit = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    clips = render_motion_scenes([MotionScene("red", "square", direction)], frames=9, size=64, jitter=False)
    track = centroid(clips[0])  # [F, 2]
    expected = torch.tensor([0.5, 0.5]) + torch.linspace(0, 1, 9).view(-1, 1) * TRAVEL * torch.tensor(unit, dtype=torch.float32)
    assert torch.allclose(track, expected, atol=0.01), (track, expected)


def test_jittered_objects_stay_inside_the_frame_and_start_anywhere() -> None:
    scenes = [s for s in all_motion_scenes()] * 20
    tracks = sample_tracks(torch.tensor([s.indices for s in scenes]), 9, seed=3)
    # never clipped by the image edge: every frame's bounding box lies inside [0, 1]²
    low = tracks.centres - tracks.radius.view(-1, 1, 1)
    high = tracks.centres + tracks.radius.view(-1, 1, 1)
    assert low.min() > 0 and high.max() < 1
    # first frames do not reveal the direction: start points of every direction cover the same box
    starts = tracks.centres[:, 0]  # [N, 2]
    directions = torch.tensor([s.indices[2] for s in scenes])
    for d in range(len(DIRECTIONS)):
        mine = starts[directions == d]
        assert mine.min(0).values.max() < 0.43 and mine.max(0).values.min() > 0.57


def test_same_seed_same_clips_and_first_frames_equal_frame_zero() -> None:
    scenes = all_motion_scenes()[:7]
    a = render_motion_scenes(scenes, frames=5, seed=11)
    assert torch.equal(a, render_motion_scenes(scenes, frames=5, seed=11))
    assert not torch.equal(a, render_motion_scenes(scenes, frames=5, seed=12))
    for frames in (5, 9, 17):  # the start does not depend on the frame count
        assert torch.equal(render_first_frames(scenes, seed=11), render_motion_scenes(scenes, frames=frames, seed=11)[:, 0])


def test_bad_render_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        render_motion_scenes(all_motion_scenes()[:1], frames=1)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        sample_tracks(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        MotionScene("red", "circle", "sideways")


# ----------------------------------------------------------------------------- prompts and split
def test_parser_round_trips_every_template_and_reads_synonyms() -> None:
    for scene in all_motion_scenes():
        for phrasing, templates in (("train", MOTION_TEMPLATES), ("heldout", HELDOUT_MOTION_TEMPLATES)):
            for t in range(len(templates)):
                assert parse_motion_prompt(describe_motion(scene, t, phrasing)) == scene
    assert describe_motion(MotionScene("red", "circle", "right")) == "a red circle moving to the right"
    assert parse_motion_prompt("BLUE triangle, drifting upwards!") == MotionScene("blue", "triangle", "up")
    for prompt, problem in (("a red circle", "no direction"), ("a red circle moving up and down", "conflicting"),
                            ("a circle moving left", "no colour")):
        with pytest.raises(PromptParseError, match=problem):
            parse_motion_prompt(prompt)


def test_split_holds_out_16_triples_and_trains_every_pair() -> None:
    train, heldout = set(train_motion_scenes()), set(heldout_motion_scenes())
    assert len(train) == 32 and len(heldout) == 16 and train | heldout == set(all_motion_scenes())
    assert all(sum(s.indices) % 3 == 0 for s in heldout) and not train & heldout
    for a, b in combinations(("colour", "shape", "direction"), 2):
        assert {(getattr(s, a), getattr(s, b)) for s in train} == {(getattr(s, a), getattr(s, b)) for s in all_motion_scenes()}
    assert {parse_motion_prompt(p) for p in train_motion_prompts()} == train


def test_heldout_splits_and_reserved_phrasings_are_fair() -> None:
    splits = motion_heldout_splits()
    assert list(splits) == list(HELDOUT_SPLITS)
    assert [len(v) for v in splits.values()] == [80, 96, 48]
    assert {parse_motion_prompt(p) for p in splits["new_phrasings"]} == set(train_motion_scenes())
    assert {parse_motion_prompt(p) for p in splits["both"]} | {parse_motion_prompt(p) for p in splits["new_combinations"]} == set(heldout_motion_scenes())
    training = set(train_motion_prompts())
    assert all(not training & set(prompts) for prompts in splits.values())
    trained_words = set(words_of([t.format(colour="", shape="", motion=m) for t in MOTION_TEMPLATES for m in ("to the right", "up", "down")]))
    for template in HELDOUT_MOTION_TEMPLATES:
        assert set(words_of([template.format(colour="", shape="", motion="")])) <= trained_words, template
    assert set(motion_words()) >= trained_words | set(COLOUR_NAMES) | set(SHAPES) | set(DIRECTIONS)
    assert not {"colour", "shape", "motion"} & set(motion_words())  # no placeholder names
    with pytest.raises(ValueError, match="unknown held-out split 'typo'"):
        motion_heldout_split_prompts("typo")


def test_shipped_prompt_files_are_the_splits(tmp_path) -> None:
    written = write_motion_prompt_files(tmp_path)
    for key, name in PROMPT_FILES.items():
        assert (PROMPTS / name).read_text() == written[key].read_text(), name
    assert (PROMPTS / PROMPT_FILES["train"]).read_text().splitlines() == train_motion_prompts()


# ----------------------------------------------------------------------------- captioned clips
def test_captioned_clips_match_their_captions_and_are_seeded() -> None:
    clips, prompts = sample_captioned_clips(24, scenes=train_motion_scenes(), frames=5, size=32, seed=4)
    assert clips.shape == (24, 5, 3, 32, 32) and len(prompts) == 24
    again, same = sample_captioned_clips(24, scenes=train_motion_scenes(), frames=5, size=32, seed=4)
    assert torch.equal(clips, again) and prompts == same
    for clip, prompt in zip(clips, prompts):
        scene = parse_motion_prompt(prompt)
        assert scene in set(train_motion_scenes())
        moved = centroid(clip[-1]) - centroid(clip[0])
        unit = torch.tensor({"right": (1.0, 0), "left": (-1.0, 0), "up": (0, -1.0), "down": (0, 1.0)}[scene.direction])
        assert torch.allclose(moved, TRAVEL * unit, atol=0.02), prompt
        colour = clip[0].flatten(1).amax(1)
        assert torch.allclose(colour, torch.tensor(COLOURS[scene.colour]), atol=1e-6), prompt


def test_noisy_captions_take_one_rate_per_attribute() -> None:
    """(colour, shape, direction) rates: a zero rate keeps that attribute in every caption, the
    others change at (k − 1)/k of their rate; one rate repeated is the scalar (the same draws)."""
    _, prompts = sample_captioned_clips(3000, frames=2, size=8, seed=0)
    noisy = noisy_motion_captions(prompts, (0.3, 0.0, 0.6), seed=1)
    changed = torch.tensor([[a != b for a, b in zip(parse_motion_prompt(p).indices, parse_motion_prompt(q).indices)]
                            for p, q in zip(prompts, noisy)]).float().mean(0)  # [3]
    assert changed[1] == 0 and torch.allclose(changed[[0, 2]], torch.tensor([0.225, 0.45]), atol=0.03), changed
    assert noisy_motion_captions(prompts[:200], (0.3, 0.3, 0.3), seed=1) == noisy_motion_captions(prompts[:200], 0.3, seed=1)
    for bad in ((0.3, 0.3), (0.3, -0.1, 0.3)):
        with pytest.raises(ValueError, match="caption noise"):
            noisy_motion_captions(prompts[:5], bad, seed=0)


def test_noisy_captions_replace_attributes_at_the_given_rate() -> None:
    _, prompts = sample_captioned_clips(3000, frames=2, size=8, seed=0)
    noisy = noisy_motion_captions(prompts, 0.3, seed=1)
    assert set(noisy) <= {describe_motion(s, t) for s in all_motion_scenes() for t in range(len(MOTION_TEMPLATES))}
    changed = torch.tensor([[a != b for a, b in zip(parse_motion_prompt(p).indices, parse_motion_prompt(q).indices)]
                            for p, q in zip(prompts, noisy)]).float().mean(0)  # [3]
    # replaced w.p. 0.3 by a uniform value, which differs w.p. (k − 1)/k: 0.225, 0.2, 0.225
    assert torch.allclose(changed, torch.tensor([0.225, 0.2, 0.225]), atol=0.03), changed
    assert noisy_motion_captions(prompts[:50], 0.0, seed=1) != [] and all(
        parse_motion_prompt(a) == parse_motion_prompt(b) for a, b in zip(prompts[:50], noisy_motion_captions(prompts[:50], 0.0, 1)))
    with pytest.raises(ValueError, match="caption noise"):
        noisy_motion_captions(prompts, 1.5, seed=0)
