"""Test-wide settings: never touch the Hugging Face hub (a hub call here hangs for minutes)."""

import os

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
