"""Shared fixtures for rollout tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import save_tiny_moe

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("tiny_moe") / "model")
