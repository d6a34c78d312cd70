"""Shared fixtures: real-data location, small-model settings, temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests never download anything: make the Hugging Face hub (open_clip's weight source) offline
# before any library reads the setting.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shared_data_dir() -> Path:
    """Where the real datasets live: PROTOMED_DATA_DIR, else ../shared/data beside the repo."""
    return Path(os.environ.get("PROTOMED_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-image folder; tests needing it skip, saying why, where it is absent."""
    root = shared_data_dir()
    if not (root / "derm64").is_dir() or not (root / "cells64").is_dir():
        if os.environ.get("PROTOMED_REQUIRE_REAL_DATA"):  # CI: a missing folder is a failure
            pytest.fail(f"PROTOMED_REQUIRE_REAL_DATA is set but {root} lacks derm64/cells64")
        pytest.skip(
            f"real data not found at {root} (set PROTOMED_DATA_DIR to the folder holding "
            "derm64/ and cells64/; CI provides ../shared/data)"
        )
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    """Two cores here: keep torch from oversubscribing them."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
