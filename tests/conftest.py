"""Test-wide settings: never touch the Hugging Face hub (a hub call here hangs for minutes)."""

import os

import pytest
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Under mutmut (which sets MUTANT_UNDER_TEST), run the quick unit tests before the Lightning
    fits and the DataLoader tests: mutmut stops at the first failure (-x), so a mutant that a
    hand-worked test kills costs that test only. Ordinary runs keep pytest's order."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    order = ("/test_learning_direction.py", "tests/training/", "tests/datamodules/test_datamodule_")
    rank = {item.nodeid: next((k + 1 for k, part in enumerate(order) if part in item.nodeid), 0) for item in items}
    items.sort(key=lambda item: rank[item.nodeid])  # stable: pytest's order within each rank


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@pytest.fixture(autouse=True)
def no_process_group_outlives_its_test():
    """A test that runs a distributed strategy in this process (e.g. DenoiserFSDPStrategy on one
    rank) leaves Lightning's MASTER_PORT in os.environ and its process group's store listening on
    it: every later `lightning-grpo --trainer.devices=2` subprocess inherited the port and died
    with EADDRINUSE. The group a test created is destroyed and the variables restored after it
    (a group made by a module-scoped fixture, alive when the test starts, is left to it)."""
    alive = dist.is_available() and dist.is_initialized()
    saved = {name: os.environ.get(name) for name in RENDEZVOUS}
    yield
    if not alive and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
