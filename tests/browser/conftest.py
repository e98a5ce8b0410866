"""Browser tests: Playwright driving Debian's Chromium (headless; no downloaded browsers)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic",
]
ARTIFACTS = Path(os.environ.get("IMAGESHARE_ARTIFACTS", ROOT / "test-artifacts"))


def chromium_path() -> str | None:
    """Debian's Chromium, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    """One headless Chromium for the whole run."""
    path = chromium_path()
    require(path is not None, "Chromium (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest):
    """Save a screenshot of a page under test-artifacts/ (named after the test)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page, label: str) -> Path:
        path = ARTIFACTS / f"{request.node.name}-{label}.png"
        page.screenshot(path=str(path), full_page=False)
        return path

    return take
