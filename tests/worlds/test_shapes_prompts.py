"""Templates, parser and the train / held-out split."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest

from lightning_grpo.worlds.shapes import (
    COLOUR_NAMES,
    HELDOUT_SPLITS,
    HELDOUT_TEMPLATES,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    PromptParseError,
    Scene,
    all_scenes,
    describe,
    heldout_prompts,
    heldout_scenes,
    heldout_split_prompts,
    heldout_splits,
    parse_prompt,
    sample_captioned_images,
    train_prompts,
    train_scenes,
    write_prompt_files,
)
from lightning_grpo.worlds.tokenizers import words_of

PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "prompts"


def test_parser_round_trips_every_template_and_scene() -> None:
    for scene in all_scenes():
        for template in range(len(TEMPLATES)):
            prompt = describe(scene, template)
            assert parse_prompt(prompt) == scene, prompt


def test_templates_are_distinct_paraphrases() -> None:
    scene = Scene("blue", "triangle", "bottom right")
    assert len({describe(scene, t) for t in range(len(TEMPLATES))}) == len(TEMPLATES) >= 3
    assert describe(scene) == "a blue triangle at the bottom right"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Upper-left: RED square!", Scene("red", "square", "top left")),
        ("a yellow circle, lower right", Scene("yellow", "circle", "bottom right")),
        ("right  top   green triangle", Scene("green", "triangle", "top right")),
        ("a red red circle at the top left", Scene("red", "circle", "top left")),
    ],
)
def test_parser_ignores_case_punctuation_order_and_synonyms(prompt: str, expected: Scene) -> None:
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "missing"),
    [
        ("a circle at the top left", "no colour"),
        ("a red thing at the top left", "no shape"),
        ("a red circle on the left", "no vertical position"),
        ("a red and blue circle at the top left", "conflicting"),
        ("a red circle at the top bottom left", "conflicting"),
    ],
)
def test_unparseable_prompt_raises_naming_it(prompt: str, missing: str) -> None:
    with pytest.raises(PromptParseError, match=missing) as info:
        parse_prompt(prompt)
    assert repr(prompt) in str(info.value)


def test_split_partitions_the_48_combinations() -> None:
    train, heldout = set(train_scenes()), set(heldout_scenes())
    assert len(all_scenes()) == 48
    assert train | heldout == set(all_scenes())
    assert not train & heldout
    assert 0.25 <= len(heldout) / 48 <= 0.35
    # the documented rule, (colour + shape + position index) % 3 == 0 is held out: 16 of 48, in index order
    assert len(heldout) == 16 and all(sum(scene.indices) % 3 == 0 for scene in heldout)
    assert all(sum(scene.indices) % 3 != 0 for scene in train)
    order = all_scenes().index
    assert heldout_scenes() == sorted(heldout, key=order) and train_scenes() == sorted(train, key=order)


def test_heldout_combinations_never_appear_in_train_prompts() -> None:
    trained = {parse_prompt(p) for p in train_prompts()}
    assert trained == set(train_scenes())
    assert not trained & set(heldout_scenes())
    assert {parse_prompt(p) for p in heldout_prompts()} == set(heldout_scenes())


def test_every_value_and_every_pair_of_values_is_trained() -> None:
    train = train_scenes()
    assert {s.colour for s in train} == set(COLOUR_NAMES)
    assert {s.shape for s in train} == set(SHAPES)
    assert {s.position for s in train} == set(POSITIONS)
    for a, b in combinations(("colour", "shape", "position"), 2):
        seen = {(getattr(s, a), getattr(s, b)) for s in train}
        every = {(getattr(s, a), getattr(s, b)) for s in all_scenes()}
        assert seen == every, f"some ({a}, {b}) pairs are never trained"


def test_prompt_counts_and_template_selection() -> None:
    assert len(train_prompts()) == 32 * len(TEMPLATES)
    assert len(heldout_prompts(templates=[0])) == 16
    assert heldout_prompts(templates=[0])[0] == describe(heldout_scenes()[0])


def test_write_prompt_files(tmp_path) -> None:
    paths = write_prompt_files(tmp_path, templates=[0, 1])
    assert paths["train"].read_text().splitlines() == train_prompts([0, 1])
    assert paths["heldout"].read_text().splitlines() == heldout_prompts([0, 1])
    assert paths["new_phrasings"].read_text().splitlines() == heldout_split_prompts("new_phrasings")
    assert paths["both"].read_text().splitlines() == heldout_split_prompts("both")


def test_shipped_prompt_files_are_the_splits() -> None:
    files = {"new_combinations": "shapes_heldout.txt", "new_phrasings": "shapes_heldout_phrasings.txt",
             "both": "shapes_heldout_both.txt"}
    for split, name in files.items():
        assert (PROMPTS / name).read_text().splitlines() == heldout_split_prompts(split), name
    assert (PROMPTS / "shapes_train.txt").read_text().splitlines() == train_prompts()


# ----------------------------------------------------------------------------- held-out phrasings
def test_heldout_splits_partition_combinations_and_phrasings() -> None:
    splits = heldout_splits()
    assert list(splits) == list(HELDOUT_SPLITS)
    assert [len(v) for v in splits.values()] == [16 * len(TEMPLATES), 32 * len(HELDOUT_TEMPLATES), 16 * len(HELDOUT_TEMPLATES)]
    assert {parse_prompt(p) for p in splits["new_phrasings"]} == set(train_scenes())
    assert {parse_prompt(p) for p in splits["both"]} == set(heldout_scenes())
    training = set(train_prompts())
    for split, prompts in splits.items():
        assert not training & set(prompts), split
    # a reserved phrasing never coincides with a training one, for any scene
    for scene in all_scenes():
        trained = {describe(scene, t) for t in range(len(TEMPLATES))}
        assert not trained & {describe(scene, t, "heldout") for t in range(len(HELDOUT_TEMPLATES))}
    with pytest.raises(ValueError, match="unknown held-out split 'typo'"):
        heldout_split_prompts("typo")
    with pytest.raises(ValueError, match="phrasing"):
        describe(all_scenes()[0], 0, "other")  # type: ignore[arg-type]


def test_reserved_phrasings_parse_and_use_only_trained_words() -> None:
    """Fair split: every word of a reserved template also appears in a training template (in
    another sentence), so the toy text encoders' vocabulary has it as a word the denoiser read."""
    trained_words = set(words_of(TEMPLATES))
    for template in HELDOUT_TEMPLATES:
        words = set(words_of([template.format(colour="", shape="", position="")]))
        assert words <= trained_words, (template, words - trained_words)
    for scene in all_scenes():
        for t in range(len(HELDOUT_TEMPLATES)):
            assert parse_prompt(describe(scene, t, "heldout")) == scene


def test_pretraining_captions_never_use_reserved_phrasings() -> None:
    from lightning_grpo.worlds.shapes.pretrain import noisy_captions

    _, captions = sample_captioned_images(2000, size=16, seed=0)
    captions += noisy_captions(captions, 0.35, seed=1)  # what pretrain.encode_training_set feeds the denoiser
    reserved = {describe(s, t, "heldout") for s in all_scenes() for t in range(len(HELDOUT_TEMPLATES))}
    allowed = {describe(s, t) for s in all_scenes() for t in range(len(TEMPLATES))}
    assert set(captions) <= allowed and not set(captions) & reserved
