"""Image-to-video prompts: images loaded lazily, resized, paired with their prompt; bad images reported."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_grpo.datamodules import ImagePromptDataModule, MalformedRecordError, MalformedRecordWarning

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture
def color_images(tmp_path: Path) -> dict[str, str]:
    """One solid-color PNG per color, of different sizes and aspect ratios, in tmp/images/."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (40 + 10 * index, 30), rgb).save(folder / f"{name}.png")
    return {name: f"images/{name}.png" for name in COLORS}


def all_batches(dm: ImagePromptDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def single_rank(files, **kwargs) -> ImagePromptDataModule:
    return ImagePromptDataModule(files, rank=0, world_size=1, **kwargs)


def assert_images_match_prompts(batch: dict) -> None:
    """Each image is the solid color its prompt names (so prompt and image stayed paired)."""
    for prompt, image in zip(batch["prompts"], batch["images"]):
        expected = torch.tensor(COLORS[prompt.split()[-1]], dtype=torch.float32) / 255
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=1e-3), prompt


def test_jsonl_images_are_resized_float_tensors_paired_with_prompts(jsonl_file, color_images):
    rows = [{"prompt": f"a cube {color}", "image": path} for color, path in color_images.items()] * 3
    dm = single_rank(jsonl_file(rows), batch_size=4, image_size=(16, 24), seed=1)
    batches = all_batches(dm)
    assert len(batches) == 3
    for batch in batches:
        assert batch["images"].shape == (4, 3, 16, 24) and batch["images"].dtype == torch.float32
        assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
        assert_images_match_prompts(batch)


def test_parquet_with_image_root_and_hf_dataset_with_embedded_images(parquet_file, hf_dir, color_images, tmp_path):
    import datasets

    names = [Path(p).name for p in color_images.values()]
    parquet = parquet_file([{"caption": f"x {Path(n).stem}", "file": n} for n in names])
    dm = single_rank(parquet, batch_size=2, image_key="file", image_root=str(tmp_path / "images"), image_size=8)
    batches = all_batches(dm)
    assert sum(len(b["prompts"]) for b in batches) == 4
    for batch in batches:
        assert batch["images"].shape == (2, 3, 8, 8)
        assert_images_match_prompts(batch)

    table = datasets.Dataset.from_dict({"prompt": [f"y {c}" for c in COLORS],
                                        "image": [str(tmp_path / p) for p in color_images.values()]})
    folder = str(tmp_path / "hf_images")
    table.cast_column("image", datasets.Image()).save_to_disk(folder)
    for batch in all_batches(single_rank(folder, batch_size=2, image_size=8, shuffle=False)):
        assert_images_match_prompts(batch)


def test_missing_and_undecodable_images_are_reported_with_file_and_line(jsonl_file, color_images, tmp_path):
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image at all")
    rows = [
        {"prompt": "a red", "image": color_images["red"]},
        {"prompt": "a gone", "image": "images/missing.png"},  # line 2
        {"prompt": "a broken", "image": "images/broken.png"},  # line 3
        {"prompt": "a blue", "image": color_images["blue"]},
    ]
    path = jsonl_file(rows)
    with pytest.warns(MalformedRecordWarning) as caught:
        batches = all_batches(single_rank(path, batch_size=4, image_size=8, shuffle=False))
    assert batches[0]["prompts"] == ["a red", "a blue"] and batches[0]["images"].shape == (2, 3, 8, 8)
    messages = " ".join(str(w.message) for w in caught)
    assert f"{path}:2: cannot read image 'images/missing.png'" in messages
    assert f"{path}:3: cannot read image 'images/broken.png'" in messages
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: cannot read image")):
        all_batches(single_rank(path, batch_size=4, image_size=8, shuffle=False, on_bad_line="error"))


def test_record_without_image_is_a_malformed_line(jsonl_file, color_images):
    path = jsonl_file([{"prompt": "a red", "image": color_images["red"]}, {"prompt": "no image"}])
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: missing or null 'image'")):
        all_batches(single_rank(path, batch_size=1, image_size=8, shuffle=False, on_bad_line="error"))


def test_plain_text_is_refused_for_image_prompts(prompts_file):
    with pytest.raises(ValueError, match="plain text"):
        all_batches(single_rank(prompts_file(["a prompt"]), batch_size=1))


def test_two_ranks_two_workers_each_image_prompt_once(jsonl_file, color_images):
    rows = [{"prompt": f"item {i} {color}", "image": path}
            for i in range(8) for color, path in color_images.items()]  # 32 = 4 blocks of 2 x 2 x 2
    path = jsonl_file(rows)
    seen: Counter[str] = Counter()
    for rank in range(2):
        dm = ImagePromptDataModule(path, batch_size=2, image_size=8, rank=rank, world_size=2, num_workers=2)
        batches = all_batches(dm)
        assert len(batches) == 8
        for batch in batches:
            assert_images_match_prompts(batch)
            seen.update(batch["prompts"])
    assert seen == Counter(r["prompt"] for r in rows)


def test_image_size_is_validated(jsonl_file):
    with pytest.raises(ValueError, match="image_size"):
        ImagePromptDataModule(jsonl_file([]), image_size=(0, 4))
