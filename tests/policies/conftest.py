"""Fixtures for the policy-adapter tests: tiny random pipelines written once per session.

The builders live in tests/policies/tiny.py (importable as `tiny` once this folder is on
sys.path) so other tests can write their own tiny checkpoints too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from tiny import build_tiny_flux, build_tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion 1.x checkpoint folder (see tiny.build_tiny_sd)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-dev-like checkpoint folder (guidance embedding on)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-schnell-like checkpoint folder (no guidance embedding)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_schnell"), guidance_embeds=False)
