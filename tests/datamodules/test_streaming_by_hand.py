"""The streaming building blocks by hand: the stable hash, the buffered shuffle, the hold-out rule."""

from __future__ import annotations

import random

import pytest

from lightning_grpo.datamodules.streaming import HoldOut, blocks, buffered_shuffle, resume_point, stable_hash


def test_stable_hash_known_answers():
    # BLAKE2b with an 8-byte digest of the UTF-8 text, read little-endian: "a red cat" -> ca9dba9327a8d7d5
    assert stable_hash("a red cat") == 0xD5D7A82793BA9DCA == 15408969538007113162
    assert stable_hash("") == 13020603013274838756
    assert stable_hash("héllo") == 14677004421776497939  # UTF-8, not Latin-1


class ScriptedRandom(random.Random):
    """random() replays a fixed list; shuffle() reverses (both easy to follow by hand)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def shuffle(self, x, *args) -> None:
        x.reverse()


def test_buffered_shuffle_by_hand():
    # buffer 3 holds (0, 1, 2); each new item replaces buffer[int(u · 3)], which is emitted:
    # u = 0.9 -> 2 out (3 in), 0.1 -> 0 out (4 in), 0.5 -> 1 out (5 in), 0.7 -> 3 out (6 in);
    # the rest, (4, 5, 6), comes out shuffled (here: reversed)
    out = list(buffered_shuffle(iter(range(7)), 3, ScriptedRandom([0.9, 0.1, 0.5, 0.7])))
    assert out == [2, 0, 1, 3, 6, 5, 4]


def test_buffered_shuffle_keeps_every_item_and_moves_them_little():
    items = list(range(200))
    out = list(buffered_shuffle(iter(items), 8, random.Random(1)))
    assert sorted(out) == items and out != items
    # an item is emitted no earlier than about buffer_size places before its position
    assert all(item <= position + 8 for position, item in enumerate(out))
    # and it does mix: the first emitted items are not simply the first items
    assert out[:8] != items[:8]


def test_buffered_shuffle_shorter_than_the_buffer_is_one_shuffle():
    assert list(buffered_shuffle(iter(range(3)), 5, ScriptedRandom([]))) == [2, 1, 0]


def test_blocks_drop_or_pad_the_tail():
    assert list(blocks(iter(range(7)), 3, "drop")) == [[0, 1, 2], [3, 4, 5]]
    assert list(blocks(iter(range(7)), 3, "pad")) == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert list(blocks(iter(range(8)), 3, "pad")) == [[0, 1, 2], [3, 4, 5], [6, 7, 6]]
    assert list(blocks(iter(range(6)), 3, "pad")) == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "skip, round_size, block_size, expected",
    [
        (0, 4, 12, (0, 0)),
        (8, 4, 12, (0, 2)),  # two whole rounds into the first block
        (28, 4, 12, (24, 1)),  # block 2 starts at 24, one round done
        (10, 4, 12, (10, 0)),  # not a whole number of rounds: restart at the skip itself
    ],
)
def test_resume_point_by_hand(skip, round_size, block_size, expected):
    assert resume_point(skip, round_size, block_size) == expected


def test_hold_out_by_hash_range_and_by_listed_prompts():
    # stable_hash("a red cat") / 2⁶⁴ = 0.8353, stable_hash("") / 2⁶⁴ = 0.7059
    assert not HoldOut(0.8).holds("a red cat") and HoldOut(0.84).holds("a red cat")
    assert not HoldOut(0.7).holds("") and HoldOut(0.71).holds("")
    listed = HoldOut(0.0, frozenset({stable_hash("a red cat")}))
    assert listed.holds("a red cat") and not listed.holds("")
    assert listed.active and HoldOut(0.1).active and not HoldOut(0.0).active
    with pytest.raises(ValueError, match="val_fraction"):
        HoldOut(1.0)
    with pytest.raises(ValueError, match="val_fraction"):
        HoldOut(-0.1)


def test_worker_slot_outside_and_inside_a_dataloader_worker(monkeypatch):
    from types import SimpleNamespace

    from lightning_grpo.datamodules import streaming

    assert streaming.worker_slot() == (0, 1)  # the main process is the only "worker"
    monkeypatch.setattr(streaming, "get_worker_info", lambda: SimpleNamespace(id=2, num_workers=3))
    assert streaming.worker_slot() == (2, 3)


def test_unit_order_is_reshuffled_every_epoch(tmp_path):
    """Six one-prompt files, shuffle buffer 1 (records keep their order): the file order is a
    permutation that depends on the epoch, the same for the same (seed, epoch)."""
    from lightning_grpo.datamodules.sources import BadRecordReporter, RecordSpec, resolve_sources
    from lightning_grpo.datamodules.streaming import PromptStream, StreamConfig

    for k in range(6):
        (tmp_path / f"part{k}.txt").write_text(f"prompt {k}\n")
    config = StreamConfig(resolve_sources(str(tmp_path / "*.txt")), RecordSpec(prompt_keys=("prompt",)), batch_size=1,
                          shuffle=True, shuffle_buffer_size=1, seed=5)
    stream = PromptStream(config)

    def order(epoch: int) -> list[str]:
        stream.epoch = epoch
        return [r.prompt for r in stream.records(BadRecordReporter("skip"))]

    orders = [order(epoch) for epoch in range(4)]
    assert all(sorted(o) == [f"prompt {k}" for k in range(6)] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert order(2) == orders[2]
    assert orders[0] != orders[1]
    fresh = PromptStream(config)  # a new stream starts at epoch 0
    assert [r.prompt for r in fresh.records(BadRecordReporter("skip"))] == orders[0]


def test_stream_position_counts_batches_and_restarts_at_a_new_epoch():
    from lightning_grpo.datamodules.streaming import StreamPosition

    position = StreamPosition(epoch=0, consumed=6, samples_per_batch=2)
    position.advance(0)
    assert (position.epoch, position.consumed) == (0, 8)
    position.advance(1)  # the first batch of epoch 1: the count restarts from it
    assert (position.epoch, position.consumed) == (1, 2)
    assert position.start_epoch(1) == 2 and position.start_epoch(2) == 0 and position.epoch == 2


def test_resolve_rank_reads_an_initialised_process_group_without_a_trainer(monkeypatch):
    import torch

    from lightning_grpo.datamodules.streaming import resolve_rank

    assert resolve_rank(None, None, None) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert resolve_rank(None, None, None) == (3, 4)
    assert resolve_rank(None, 1, None) == (1, 4) and resolve_rank(None, None, 8) == (3, 8)


def shard_batches(tmp_path, monkeypatch, prompts: list[str], rank: int, worker: int, skip: int = 0, remainder: str = "drop"):
    """The prompts one (rank, DataLoader worker) shard yields, in process: 2 ranks × 3 workers, batch 1."""
    from types import SimpleNamespace

    from lightning_grpo.datamodules import streaming
    from lightning_grpo.datamodules.sources import RecordSpec, resolve_sources

    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"{p}\n" for p in prompts))
    config = streaming.StreamConfig(resolve_sources(str(path)), RecordSpec(prompt_keys=("prompt",)), batch_size=1,
                                    rank=rank, world_size=2, remainder=remainder)
    stream = streaming.PromptStream(config)
    stream.skip = skip
    monkeypatch.setattr(streaming, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=3))
    return [p for batch in stream for p in batch["prompts"]]


P = [f"p{k}" for k in range(18)]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("worker", [0, 1, 2])
def test_shards_are_worker_major_slices_of_each_block(tmp_path, monkeypatch, rank, worker):
    # round = 2 ranks × batch 1 = 2 records, block = 3 workers × round = 6; shard (worker w, rank r)
    # takes slot 2w + r of every block: e.g. (w 1, r 1) -> p3, p9, p15
    expected = [f"p{6 * b + 2 * worker + rank}" for b in range(3)]
    assert shard_batches(tmp_path, monkeypatch, P, rank, worker) == expected


@pytest.mark.parametrize(
    "worker, expected",
    [
        # resumed after one round (skip = 2: p0 on rank 0, p1 on rank 1): the workers' roles rotate by
        # one, role = (w + 1) % 3, so worker 0 delivers the next unseen slice (slot 2: p2) and the
        # worker whose role is 0 skips the first block's slice it already delivered
        (0, ["p2", "p8", "p14"]),
        (1, ["p4", "p10", "p16"]),
        (2, ["p6", "p12"]),
    ],
)
def test_resume_inside_a_block_rotates_the_workers(tmp_path, monkeypatch, worker, expected):
    assert shard_batches(tmp_path, monkeypatch, P, 0, worker, skip=2) == expected


def test_resume_rank_one_continues_its_own_slots(tmp_path, monkeypatch):
    # rank 1, skip one round: worker 0 has role 1 -> slot 3 (p3, p9, p15); worker 2 role 0 -> slot 1, first block skipped
    assert shard_batches(tmp_path, monkeypatch, P, 1, 0, skip=2) == ["p3", "p9", "p15"]
    assert shard_batches(tmp_path, monkeypatch, P, 1, 2, skip=2) == ["p7", "p13"]


def test_padded_tail_block_is_cycled_into_every_slot(tmp_path, monkeypatch):
    # 20 records: blocks p0-5, p6-11, p12-17 and the tail (p18, p19) padded by cycling to 6
    prompts = [f"p{k}" for k in range(20)]
    assert shard_batches(tmp_path, monkeypatch, prompts, 1, 1, remainder="pad") == ["p3", "p9", "p15", "p19"]
    assert shard_batches(tmp_path, monkeypatch, prompts, 0, 2, remainder="pad") == ["p4", "p10", "p16", "p18"]
    assert shard_batches(tmp_path, monkeypatch, prompts, 0, 2) == ["p4", "p10", "p16"]  # dropped


def test_only_the_first_shard_warns_about_malformed_records(tmp_path, monkeypatch):
    import warnings

    prompts = ["p0", "", "p1", "p2", "p3", "p4", "p5"]  # one empty line
    for rank, worker, warns in [(0, 0, True), (1, 0, False), (0, 1, False)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shard_batches(tmp_path, monkeypatch, prompts, rank, worker)
        assert any("malformed" in str(w.message) for w in caught) == warns, (rank, worker)


def test_the_first_shard_summarises_skipped_prompt_records(tmp_path, monkeypatch):
    prompts = ["p0", "", "p1", "", "p2", "p3", "p4", "p5"]  # two empty lines
    with pytest.warns(UserWarning, match="skipped 2 malformed prompt records"):
        assert shard_batches(tmp_path, monkeypatch, prompts, 0, 0) == ["p0"]


def _loader(path, consumed: int = 0, on_empty=None):
    """A ResumableLoader over the one-prompt-per-line file `path` (batch 1, one rank, in process)."""
    from lightning_grpo.datamodules.sources import RecordSpec, resolve_sources
    from lightning_grpo.datamodules.streaming import PromptStream, ResumableLoader, StreamConfig, StreamPosition

    stream = PromptStream(StreamConfig(resolve_sources(str(path)), RecordSpec(prompt_keys=("prompt",)), batch_size=1))
    loader = ResumableLoader(stream, batch_size=None, collate_fn=lambda batch: batch, num_workers=0)
    loader.position = StreamPosition(consumed=consumed, samples_per_batch=1)
    loader.epoch_fn, loader.count_delivered, loader.on_empty = (lambda: 0), (lambda: True), on_empty
    return loader


def test_on_empty_is_called_only_for_a_pass_that_skipped_nothing_and_delivered_nothing(tmp_path):
    """A full pass counts its batches and does not call on_empty; a pass resumed after the whole
    epoch (all 3 records consumed) delivers nothing but skipped, so it does not either; only a
    pass over no record at all does. Without on_empty (validation), an empty pass just ends."""
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "empty.txt").write_text("")
    calls = []
    loader = _loader(tmp_path / "three.txt", on_empty=lambda: calls.append("full"))
    assert [b["prompts"] for b in loader] == [["a"], ["b"], ["c"]] and loader.position.consumed == 3 and calls == []
    assert list(_loader(tmp_path / "three.txt", consumed=3, on_empty=lambda: calls.append("resumed"))) == [] and calls == []
    assert list(_loader(tmp_path / "empty.txt", on_empty=lambda: calls.append("empty"))) == [] and calls == ["empty"]
    assert list(_loader(tmp_path / "empty.txt")) == []
