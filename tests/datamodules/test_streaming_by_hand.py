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
