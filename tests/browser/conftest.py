"""Browser fixtures: Debian's chromium at /usr/bin/chromium driven by Playwright (never ``playwright install``).

* ``browser`` (session): a headless chromium; tests using it are skipped with the reason when chromium or the
  ``playwright`` package is missing (CI installs both, so there they run).
* ``page``: a fresh page (1280x900) whose uncaught script errors are collected in ``page.errors`` and whose
  non-``file:``/``data:`` requests in ``page.external_requests``; the test decides what to assert on them.
* ``artifacts_dir``: ``test-artifacts/`` at the repository root (git-ignored) for screenshots.

Mark browser tests with ``pytest.mark.browser``; ``-m "not browser"`` leaves them out.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("UNIFILTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    out = REPO_ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}: `apt-get install -y chromium` (CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' for playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []
    page.external_requests = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on(
        "request",
        lambda req: (
            None if req.url.startswith(("file:", "data:")) else page.external_requests.append(req.url)
        ),
    )
    try:
        yield page
    finally:
        context.close()
