"""Image-to-video prompts: images loaded lazily, resized, paired with their prompt; bad images reported."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
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
    # the batch keeps its size: the two unreadable records' places go to the readable ones
    assert batches[0]["prompts"] == ["a red", "a blue", "a red", "a blue"] and batches[0]["images"].shape == (4, 3, 8, 8)
    assert_images_match_prompts(batches[0])
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


# --------------------------------------------------------------------------- every format, every mode


def _png_bytes(rgb: tuple[int, int, int], size=(12, 10)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_format_with_images_as_paths_and_as_embedded_bytes(tmp_path, parquet_file, color_images):
    """JSONL (plain and gzip), Parquet and a save_to_disk dataset, each with images as paths and as
    HF Image values {"bytes", "path"}: every record gets the image its prompt names."""
    import gzip
    import json

    import datasets

    by_path = [{"prompt": f"p {c}", "image": str(tmp_path / p)} for c, p in color_images.items()]
    embedded = [{"prompt": f"b {c}", "image": {"bytes": _png_bytes(COLORS[c]), "path": None}} for c in COLORS]
    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in by_path)
    jsonl_bytes = tmp_path / "bytes.jsonl"  # JSON cannot hold bytes: a path-only HF value
    jsonl_bytes.write_text("".join(json.dumps({"prompt": r["prompt"], "image": {"path": r["image"]}}) + "\n" for r in by_path))
    hf_embedded = str(tmp_path / "hf_embedded")
    datasets.Dataset.from_list(embedded).cast_column("image", datasets.Image()).save_to_disk(hf_embedded)
    sources = {
        "jsonl.gz": str(gz), "jsonl {path}": str(jsonl_bytes),
        "parquet paths": parquet_file(by_path, name="paths.parquet"),
        "parquet bytes": parquet_file(embedded, name="bytes.parquet"),
        "hf bytes": hf_embedded,
    }
    for name, source in sources.items():
        batches = all_batches(single_rank(source, batch_size=2, image_size=(6, 8), shuffle=False))
        assert sum(len(b["prompts"]) for b in batches) == 4, name
        for batch in batches:
            assert batch["images"].shape == (2, 3, 6, 8), name
            assert_images_match_prompts(batch)


def test_bad_images_in_tables_are_named_by_file_and_row(tmp_path, parquet_file, color_images):
    """Parquet and HF rows: a corrupt embedded image and a missing file, named by 1-based row."""
    import datasets

    rows = [
        {"prompt": "a red", "image": {"bytes": _png_bytes(COLORS["red"]), "path": None}},
        {"prompt": "a bad", "image": {"bytes": b"\x89PNG but truncated", "path": None}},  # row 2
        {"prompt": "a gone", "image": {"bytes": None, "path": str(tmp_path / "nowhere.png")}},  # row 3
        {"prompt": "a blue", "image": {"bytes": _png_bytes(COLORS["blue"]), "path": None}},
    ]
    parquet = parquet_file(rows, name="bad.parquet")
    folder = str(tmp_path / "hf_bad")
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    for source in (parquet, folder):
        with pytest.warns(MalformedRecordWarning) as caught:
            (batch,) = all_batches(single_rank(source, batch_size=4, image_size=8, shuffle=False))
        messages = " ".join(str(w.message) for w in caught)
        assert f"{source}:2: cannot read image 'dict'" in messages and f"{source}:3: cannot read image 'dict'" in messages
        assert "nowhere.png" in messages
        assert len(batch["prompts"]) == 4 and set(batch["prompts"]) == {"a red", "a blue"}
        assert_images_match_prompts(batch)


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (8, 8), 128), (128, 128, 128)),
        ("P", lambda: Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"), (0, 0, 255)),
        # half-transparent red over the black background: 255 * 0.5 rounds to 128 (alpha 128 / 255)
        ("RGBA", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 128)), (128, 0, 0)),
        ("LA", lambda: Image.new("LA", (8, 8), (200, 0)), (0, 0, 0)),  # fully transparent: background
        ("I;16", lambda: Image.fromarray(np.full((8, 8), 257 * 40, dtype=np.uint16)), (40, 40, 40)),  # 16-bit 10280 -> 40
        ("1", lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    ],
)
def test_image_modes_become_opaque_8_bit_rgb(tmp_path, jsonl_file, mode, make, expected):
    image = make()
    assert image.mode == mode
    image.save(tmp_path / "frame.png")
    (batch,) = all_batches(single_rank(jsonl_file([{"prompt": "x", "image": "frame.png"}]), batch_size=1, image_size=4))
    assert torch.allclose(batch["images"][0].mean(dim=(1, 2)) * 255, torch.tensor(expected, dtype=torch.float32), atol=1.0)


def test_a_32_bit_image_is_a_bad_record_named_by_line(tmp_path, jsonl_file, color_images):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(tmp_path / "float.tiff")
    path = jsonl_file([{"prompt": "a red", "image": color_images["red"]}, {"prompt": "a float", "image": "float.tiff"}])
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: cannot read image 'float.tiff': image mode 'F'")):
        all_batches(single_rank(path, batch_size=2, image_size=8, shuffle=False, on_bad_line="error"))
    with pytest.warns(MalformedRecordWarning, match="mode 'F' has no defined pixel range"):
        (batch,) = all_batches(single_rank(path, batch_size=2, image_size=8, shuffle=False))
    assert batch["prompts"] == ["a red", "a red"]


# --------------------------------------------------------------------------- batches keep their size


def test_a_slice_without_a_readable_image_borrows_from_its_block_on_every_rank(jsonl_file, color_images):
    """Two ranks, batch 1: rank 1's only record of block 0 is missing; it trains on the first
    readable record of the block instead, and both ranks still get one full batch per block."""
    rows = [
        {"prompt": "a red", "image": color_images["red"]},
        {"prompt": "a gone", "image": "images/missing.png"},  # line 2: rank 1's slice of block 0
        {"prompt": "a green", "image": color_images["green"]},
        {"prompt": "a blue", "image": color_images["blue"]},
    ]
    path = jsonl_file(rows)
    per_rank = []
    for rank in range(2):
        dm = ImagePromptDataModule(path, batch_size=1, image_size=8, rank=rank, world_size=2, shuffle=False)
        if rank == 1:
            with pytest.warns(MalformedRecordWarning, match=re.escape(f"{path}:2: cannot read image")):
                per_rank.append(all_batches(dm))
        else:
            per_rank.append(all_batches(dm))
    assert [[b["prompts"] for b in batches] for batches in per_rank] == [[["a red"], ["a green"]], [["a red"], ["a blue"]]]
    for batches in per_rank:
        for batch in batches:
            assert_images_match_prompts(batch)


def test_only_a_block_without_any_readable_image_gives_empty_batches(jsonl_file, color_images):
    rows = [{"prompt": f"gone {i}", "image": f"images/missing{i}.png"} for i in range(2)]
    rows += [{"prompt": "a red", "image": color_images["red"]}, {"prompt": "a blue", "image": color_images["blue"]}]
    with pytest.warns(MalformedRecordWarning):
        batches = all_batches(single_rank(jsonl_file(rows), batch_size=2, image_size=8, shuffle=False))
    assert [b["prompts"] for b in batches] == [[], ["a red", "a blue"]]
    assert batches[0]["images"].shape == (0, 3, 8, 8)
