"""Headless Chromium for browser tests: Debian's ``chromium`` driven by Playwright.

A module of browser tests calls :func:`require_chromium` at import (it skips the module,
with the reason, where Playwright or Chromium is missing), takes the ``browser`` fixture
(registered for every test by ``tests/conftest.py``) and saves screenshots with
:func:`screenshot` as test artefacts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]


def require_chromium() -> Any:
    """Playwright's sync API; skips the calling module where Chromium is not installed."""
    api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium)",
                    allow_module_level=True)
    return api


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium for one test."""
    api = require_chromium()
    with api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def screenshot(page: Any, name: str) -> None:
    """Save the whole page as ``test-artifacts/<name>.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
