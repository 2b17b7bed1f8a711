"""One tiny stand-in pipeline per registered family, written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_grpo.policies.registry import FAMILIES

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def stand_in_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family name: folder of its stand-in}, built lazily (only the families a test asks for)."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = FAMILIES[name].build_stand_in(tmp_path_factory.mktemp(f"stand_in_{name}"))
            return self[name]

    return Lazy()
