"""The headless browser the UI tests drive (Playwright on the system's Chromium)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("PROTOMED_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip


def require_chromium() -> None:
    """Skip, saying what is missing, where Chromium or Playwright is absent (fail in CI)."""
    reason = None
    if not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PROTOMED_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e .[dev])"
    if reason and os.environ.get("PROTOMED_REQUIRE_SERVICES"):
        pytest.fail(f"PROTOMED_REQUIRE_SERVICES is set but {reason}")
    if reason:
        pytest.skip(reason)
