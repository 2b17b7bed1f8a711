"""Sharding over ranks x workers, deterministic shuffle, and the validation hold-out."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lightning_grpo.datamodules import PromptDataModule
from lightning_grpo.datamodules.streaming import PromptStream, buffered_shuffle, worker_slot


class WorkerTaggedStream(PromptStream):
    """Tags each batch with the DataLoader worker that built it."""

    def make_batch(self, records, reporter):
        return {**super().make_batch(records, reporter), "worker": worker_slot()}


class WorkerTaggedModule(PromptDataModule):
    def make_stream(self, config):
        return WorkerTaggedStream(config)


def prompts_of(batches: list[dict]) -> list[str]:
    return [p for batch in batches for p in batch["prompts"]]


def rank_batches(path: str, world_size: int, **kwargs) -> list[list[dict]]:
    """The batches each simulated rank's train dataloader yields in one epoch."""
    return [list(WorkerTaggedModule(path, rank=rank, world_size=world_size, **kwargs).train_dataloader())
            for rank in range(world_size)]


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("kind", ["text", "parquet"])
def test_two_ranks_two_workers_see_every_prompt_exactly_once(kind, prompts_file, parquet_file):
    prompts = [f"prompt {i}" for i in range(1000)]  # 50 blocks of 2 ranks x 2 workers x 5: 100 batches a rank
    if kind == "text":
        path = prompts_file(prompts)
    else:
        path = parquet_file([{"prompt": p} for p in prompts], row_group_size=128)
    per_rank = rank_batches(path, world_size=2, batch_size=5, num_workers=2, seed=3)
    assert [len(b) for b in per_rank] == [100, 100]
    assert {len(batch["prompts"]) for batches in per_rank for batch in batches} == {5}
    seen = Counter(p for batches in per_rank for p in prompts_of(batches))
    assert seen == Counter(prompts)
    assert not set(prompts_of(per_rank[0])) & set(prompts_of(per_rank[1]))
    for batches in per_rank:  # both worker processes took part, in turn
        assert [batch["worker"] for batch in batches[:4]] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_uneven_count_drop_gives_equal_batches_and_no_repeats(prompts_file):
    prompts = [f"p{i}" for i in range(1003)]  # blocks of 16: 62 full (2 batches a rank each), 11 left over
    per_rank = rank_batches(prompts_file(prompts), world_size=2, batch_size=4, num_workers=2)
    assert [len(b) for b in per_rank] == [124, 124]
    seen = Counter(p for batches in per_rank for p in prompts_of(batches))
    assert max(seen.values()) == 1 and len(seen) == 62 * 16


def test_uneven_count_pad_gives_equal_batches_and_every_prompt(prompts_file):
    prompts = [f"p{i}" for i in range(1003)]
    per_rank = rank_batches(prompts_file(prompts), world_size=2, batch_size=4, num_workers=2, remainder="pad")
    assert [len(b) for b in per_rank] == [126, 126]
    seen = Counter(p for batches in per_rank for p in prompts_of(batches))
    assert set(seen) == set(prompts)
    assert sum(seen.values()) - len(prompts) == 16 - 11  # only the padding repeats


def test_rank_defaults_to_single_process_and_rejects_bad_rank(prompts_file):
    path = prompts_file(["a", "b"])
    assert prompts_of(list(PromptDataModule(path, batch_size=1, shuffle=False).train_dataloader())) == ["a", "b"]
    with pytest.raises(ValueError, match="rank"):
        PromptDataModule(path, rank=2, world_size=2).train_dataloader()


# --------------------------------------------------------------------------- shuffle


def epoch_order(path, epoch: int = 0, **kwargs) -> list[str]:
    dm = PromptDataModule(path, batch_size=1, rank=0, world_size=1, **kwargs)
    dm.set_epoch(epoch)
    return prompts_of(list(dm.train_dataloader()))


def test_same_seed_same_order_other_seed_or_epoch_other_order(prompts_file):
    prompts = [f"p{i}" for i in range(500)]
    path = prompts_file(prompts)
    first = epoch_order(path, seed=7, shuffle_buffer_size=64)
    assert first == epoch_order(path, seed=7, shuffle_buffer_size=64)
    assert sorted(first) == sorted(prompts) and first != prompts
    assert first != epoch_order(path, seed=8, shuffle_buffer_size=64)
    assert first != epoch_order(path, epoch=1, seed=7, shuffle_buffer_size=64)
    assert epoch_order(path, shuffle=False) == prompts


def test_file_order_is_shuffled_by_seed(tmp_path):
    files = {}
    for name in "abcdef":
        files[name] = [f"{name}{i}" for i in range(5)]
        (tmp_path / f"{name}.txt").write_text("".join(f"{p}\n" for p in files[name]), encoding="utf-8")
    pattern = str(tmp_path / "*.txt")
    orders = set()
    for seed in range(6):
        order = epoch_order(pattern, seed=seed, shuffle_buffer_size=1)  # buffer of 1 keeps records in place
        chunks = [order[i : i + 5] for i in range(0, 30, 5)]
        assert all(chunk == files[chunk[0][0]] for chunk in chunks)  # each file whole and in order
        orders.add("".join(chunk[0][0] for chunk in chunks))
    assert len(orders) > 1 and all(sorted(o) == list("abcdef") for o in orders)


def test_shuffle_buffer_bounds_how_early_an_item_appears():
    size = 32
    out = list(buffered_shuffle(iter(range(2000)), size, random.Random(0)))
    assert sorted(out) == list(range(2000))
    assert all(item <= position + size for position, item in enumerate(out))
    assert max(item - position for position, item in enumerate(out)) > size // 2  # it does move things


# --------------------------------------------------------------------------- validation split


def val_prompts(dm: PromptDataModule) -> list[str]:
    return prompts_of(list(dm.val_dataloader()))


def test_val_fraction_is_disjoint_from_training_and_stable(prompts_file):
    prompts = [f"prompt {i}" for i in range(2000)]
    path = prompts_file(prompts)
    make = lambda: PromptDataModule(path, batch_size=1, val_fraction=0.2, rank=0, world_size=1)  # noqa: E731
    train, val = set(prompts_of(list(make().train_dataloader()))), set(val_prompts(make()))
    assert not train & val
    assert train | val == set(prompts)
    assert 0.15 < len(val) / len(prompts) < 0.25
    assert set(val_prompts(make())) == val


def test_val_files_are_removed_from_training(prompts_file):
    train_path = prompts_file([f"p{i}" for i in range(100)], name="train.txt")
    val_path = prompts_file(["p3", "p50", "only in val"], name="val.txt")
    dm = PromptDataModule(train_path, val_files=val_path, batch_size=1, rank=0, world_size=1)
    train = prompts_of(list(dm.train_dataloader()))
    assert sorted(val_prompts(dm)) == ["only in val", "p3", "p50"]
    assert len(train) == 98 and not {"p3", "p50"} & set(train)


def test_validation_is_padded_to_equal_batches_on_every_rank(prompts_file):
    path = prompts_file([f"p{i}" for i in range(300)])
    per_rank = [PromptDataModule(path, batch_size=4, val_fraction=0.1, rank=r, world_size=2).val_dataloader()
                for r in range(2)]
    batches = [list(loader) for loader in per_rank]
    assert len(batches[0]) == len(batches[1]) > 0
    no_split = PromptDataModule(path, rank=0, world_size=1)
    assert no_split.val_dataloader() == []


def test_rank_comes_from_trainer_unless_given_explicitly():
    from types import SimpleNamespace

    from lightning_grpo.datamodules.streaming import resolve_rank

    trainer = SimpleNamespace(global_rank=3, world_size=4)
    assert resolve_rank(trainer, None, None) == (3, 4)
    assert resolve_rank(trainer, 1, 2) == (1, 2)
    assert resolve_rank(None, None, None) == (0, 1)  # no trainer, no process group
