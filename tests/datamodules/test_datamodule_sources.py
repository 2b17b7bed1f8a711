"""Each format is parsed; malformed records are reported with file and line; missing files named."""

from __future__ import annotations

import gzip
import json
import re

import pytest

import lightning_grpo.datamodules.sources as sources
from lightning_grpo.datamodules import MalformedRecordError, MalformedRecordWarning, PromptDataModule


def read_all(dm: PromptDataModule) -> list[dict]:
    """Every training batch of a single-rank datamodule, in a fresh pass."""
    return list(dm.train_dataloader())


def prompts_of(batches: list[dict]) -> list[str]:
    return [p for batch in batches for p in batch["prompts"]]


def in_order(files, **kwargs) -> PromptDataModule:
    """A single-rank, unshuffled datamodule with batch size 1 (every record shows, in order)."""
    return PromptDataModule(files, batch_size=1, shuffle=False, rank=0, world_size=1, **kwargs)


# --------------------------------------------------------------------------- formats


def test_text_lines_are_stripped_prompts(prompts_file):
    path = prompts_file(["a red cube", "  a blue sphere  ", "a green cone"])
    assert prompts_of(read_all(in_order(path))) == ["a red cube", "a blue sphere", "a green cone"]


def test_jsonl_reads_prompt_or_caption_and_carries_metadata(jsonl_file):
    path = jsonl_file([{"prompt": "a cat", "id": 1}, {"caption": "a dog", "id": 2, "tag": "x"}])
    batches = read_all(in_order(path, metadata_keys=["id", "tag"]))
    assert prompts_of(batches) == ["a cat", "a dog"]
    assert [m for b in batches for m in b["metadata"]] == [{"id": 1, "tag": None}, {"id": 2, "tag": "x"}]
    assert "metadata" not in read_all(in_order(path))[0]


def test_jsonl_custom_prompt_key(jsonl_file):
    path = jsonl_file([{"text": "one", "prompt": "not me"}, {"text": "two"}])
    assert prompts_of(read_all(in_order(path, prompt_key="text"))) == ["one", "two"]


def test_parquet_reads_every_row_group_in_order(parquet_file):
    rows = [{"caption": f"scene {i}", "score": float(i)} for i in range(200)]
    path = parquet_file(rows, row_group_size=64)  # 4 row groups, the last one partial
    assert sources._parquet_row_groups(path) == 4
    batches = read_all(in_order(path, metadata_keys=["score"]))
    assert prompts_of(batches) == [r["caption"] for r in rows]
    assert [m["score"] for b in batches for m in b["metadata"]] == [r["score"] for r in rows]


def test_hf_save_to_disk_dataset_read_in_row_slices(hf_dir, monkeypatch):
    monkeypatch.setattr(sources, "HF_UNIT_ROWS", 16)  # several units ...
    monkeypatch.setattr(sources, "READ_BATCH_ROWS", 5)  # ... each read in uneven slices
    rows = [{"prompt": f"hf {i}", "n": i} for i in range(50)]
    path = hf_dir(rows)
    sources._open_hf.cache_clear()
    assert len(sources.list_units([sources.Source(path, "hf")])) == 4
    assert prompts_of(read_all(in_order(path))) == [r["prompt"] for r in rows]


def test_hf_dataset_dict_split_is_selectable(hf_dir):
    path = hf_dir({"train": [{"prompt": "t"}], "validation": [{"prompt": "v1"}, {"prompt": "v2"}]})
    assert prompts_of(read_all(in_order(path))) == ["t"]
    assert prompts_of(read_all(in_order(path, hf_split="validation"))) == ["v1", "v2"]
    with pytest.raises(ValueError, match="test"):
        read_all(in_order(path, hf_split="test"))


def test_gzip_and_globs_of_several_files(tmp_path):
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "from gz"}) + "\n")
    (tmp_path / "a.txt").write_text("from a\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("from c\n", encoding="utf-8")
    dm = in_order([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl.gz")])
    assert prompts_of(read_all(dm)) == ["from a", "from c", "from gz"]


# --------------------------------------------------------------------------- malformed records

BAD_JSONL = [
    b'{"prompt": "good one"}',  # 1
    b'{"prompt": "broken"',  # 2 bad JSON
    b"",  # 3 empty line
    b'{"prompt": "caf\xe9"}',  # 4 latin-1 byte, not UTF-8
    b'{"text": "no prompt key"}',  # 5 missing key
    b'{"prompt": 42}',  # 6 not a string
    b'{"prompt": null}',  # 7 null
    b'["a list"]',  # 8 not an object
    b'{"prompt": "   "}',  # 9 empty prompt
    b'{"prompt": "good two"}',  # 10
]
BAD_LINES = [2, 3, 4, 5, 6, 7, 8, 9]


@pytest.fixture
def bad_jsonl(tmp_path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_JSONL) + b"\n")
    return str(path)


def test_malformed_lines_are_skipped_with_file_and_line(bad_jsonl):
    with pytest.warns(MalformedRecordWarning) as caught:
        batches = read_all(in_order(bad_jsonl))
    assert prompts_of(batches) == ["good one", "good two"]
    messages = [str(w.message) for w in caught]
    reported = sorted(int(m) for text in messages for m in re.findall(re.escape(bad_jsonl) + r":(\d+):", text))
    assert reported == BAD_LINES
    assert any(f"skipped {len(BAD_LINES)} malformed" in text for text in messages)


@pytest.mark.parametrize(("line", "reason"), [(2, "invalid JSON"), (4, "UTF-8"), (5, "missing prompt key"),
                                              (6, "int, expected a string"), (7, "null"), (8, "JSON object")])
def test_each_kind_of_malformed_line_is_refused_under_error(tmp_path, line, reason):
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(b"\n".join([BAD_JSONL[0], BAD_JSONL[line - 1]]) + b"\n")
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: ") + f".*{reason}"):
        read_all(in_order(str(path), on_bad_line="error"))


def test_error_policy_reaches_the_main_process_from_workers(bad_jsonl):
    dm = PromptDataModule(bad_jsonl, batch_size=1, shuffle=False, rank=0, world_size=1, num_workers=2,
                          on_bad_line="error")
    with pytest.raises(MalformedRecordError, match=re.escape(f"{bad_jsonl}:2")):
        read_all(dm)


def test_text_file_empty_and_undecodable_lines(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"first\n\n\xff\xfe broken\nlast\n")
    with pytest.warns(MalformedRecordWarning, match=re.escape(f"{path}:3: not valid UTF-8")):
        assert prompts_of(read_all(in_order(str(path)))) == ["first", "last"]
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: empty line")):
        read_all(in_order(str(path), on_bad_line="error"))


def test_parquet_null_prompt_reported_by_row(parquet_file):
    path = parquet_file([{"prompt": "ok"}, {"prompt": None}, {"prompt": "fine"}], row_group_size=2)
    with pytest.raises(MalformedRecordError, match=re.escape(f"{path}:2: ") + "prompt 'prompt' is null"):
        read_all(in_order(path, on_bad_line="error"))
    with pytest.warns(MalformedRecordWarning, match=re.escape(f"{path}:2")):
        assert prompts_of(read_all(in_order(path))) == ["ok", "fine"]


def test_table_without_prompt_column_names_file_and_columns(parquet_file):
    path = parquet_file([{"text": "x"}])
    with pytest.raises(ValueError, match=re.escape(path) + r".*\['text'\]"):
        read_all(in_order(path))


# --------------------------------------------------------------------------- missing files


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        in_order(missing).setup("fit")


def test_glob_matching_nothing_is_named(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(FileNotFoundError, match=re.escape(pattern)):
        in_order(pattern).setup("fit")


def test_unknown_suffix_asks_for_a_format(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.csv"):
        in_order(str(path)).setup("fit")
    assert prompts_of(read_all(in_order(str(path), format="text"))) == ["x"]
