"""Both shipped worlds keep the `World` contract (lightning_grpo/worlds/base.py): vocabulary,
paraphrase templates and a parser that reads them back, the compositional split, a renderer and a
verifier that judges the renderer's scenes right and other scenes wrong."""

from __future__ import annotations

import re
from itertools import combinations

import pytest

from lightning_grpo.worlds.base import HELDOUT_SPLITS, World
from lightning_grpo.worlds.moving_shapes import WORLD as MOVING_SHAPES
from lightning_grpo.worlds.shapes import WORLD as SHAPES

WORLDS = [SHAPES, MOVING_SHAPES]


@pytest.fixture(params=WORLDS, ids=lambda world: world.name)
def world(request):
    return request.param


def test_each_world_implements_the_protocol(world):
    assert isinstance(world, World)
    assert {SHAPES.name, MOVING_SHAPES.name} == {"shapes", "moving_shapes"}


def test_the_vocabulary_covers_every_prompt_of_every_set(world):
    vocabulary = set(world.vocabulary())
    sets = world.split.prompt_sets(world.phrasebook)
    assert set(sets) == {"train", *HELDOUT_SPLITS}
    words = {w for prompts in sets.values() for prompt in prompts for w in re.findall(r"[a-z]+", prompt.lower())}
    assert words <= vocabulary, sorted(words - vocabulary)


def test_the_parser_reads_back_every_scene_in_every_phrasing(world):
    for phrasing in ("train", "heldout"):
        templates = world.phrasebook.templates_of(phrasing)
        for scene in world.split.scenes():
            for template in range(len(templates)):
                assert world.parse(world.phrasebook.describe(scene, template, phrasing)) == scene


def test_the_split_holds_out_whole_triples_and_trains_every_pair(world):
    train, heldout = world.split.train_scenes(), world.split.heldout_scenes()
    assert (len(train), len(heldout)) == (32, 16)  # (a + b + c) % 3 == 0 holds 16 of 4 × 3 × 4
    assert not set(train) & set(heldout)
    for i, j in combinations(range(3), 2):
        pairs = {(s.indices[i], s.indices[j]) for s in world.split.scenes()}
        assert pairs == {(s.indices[i], s.indices[j]) for s in train}  # every pair of values is trained
    assert set(world.split.prompt_sets(world.phrasebook)["train"]).isdisjoint(
        world.phrasebook.prompts_for(heldout, phrasing="train"))


def test_the_verifier_accepts_the_renderer_and_rejects_other_scenes(world):
    scenes = world.split.heldout_scenes()
    pixels = world.render(scenes, size=32, seed=5)
    assert pixels.shape[0] == len(scenes) and pixels.shape[-3:] == (3, 32, 32)
    exact = world.verifier(mode="exact")
    right = world.phrasebook.prompts_for(scenes, [0])
    wrong = world.phrasebook.prompts_for(scenes[1:] + scenes[:1], [0])  # each image captioned as another scene
    assert exact(pixels, right).tolist() == [1.0] * len(scenes)
    assert exact(pixels, wrong).tolist() == [0.0] * len(scenes)
