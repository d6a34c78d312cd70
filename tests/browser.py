"""The headless browser the UI tests drive (Playwright on the system's Chromium)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("PROTOMED_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


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


def log_in(page: Any, base: str, path: str, key: str) -> None:
    """Open ``path`` on the dashboard at ``base``, logging in with ``key`` on the way (reads are
    locked: the login page sends the browser on to ``path``)."""
    page.goto(base + path)
    page.fill("#key", key)
    page.click("form.login button")
    page.wait_for_url("**" + path)


@contextmanager
def chromium_page(
    width: int = 1100, height: int = 900, base_url: str | None = None
) -> Iterator[Any]:
    """A fresh page in the system's Chromium (skips, or fails in CI, where it is absent);
    with ``base_url``, ``page.goto`` takes paths."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            viewport = {"width": width, "height": height}
            yield browser.new_page(viewport=viewport, base_url=base_url)
        finally:
            browser.close()


@contextmanager
def dashboard(env: dict[str, str], log: Path, path: str, width: int = 1100) -> Iterator[Any]:
    """The API as a real server on ``env``'s settings and a Chromium page logged in with the
    admin key, opened on ``path`` (``page.goto`` takes the server's paths)."""
    from service_procs import ApiServer

    server = ApiServer(env, log)
    try:
        server.wait_ready()
        with chromium_page(width, base_url=server.url) as page:
            log_in(page, server.url, path, env["PROTOMED_ADMIN_KEY"])
            yield page
    finally:
        server.stop()


def screenshot(base: str, key: str, path: str, out: Path, width: int = 1100) -> None:
    """A full-page picture of one dashboard page of a running server (bench scripts)."""
    with chromium_page(width) as page:
        log_in(page, base, path, key)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out), full_page=True)
