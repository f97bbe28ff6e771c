"""A real headless Chromium for the UI tests: Debian's ``chromium`` driven by Playwright.

Never a downloaded browser build: Playwright is pointed at ``/usr/bin/chromium``
(``apt-get install chromium``; ``.ci/run`` installs it). Without it the browser tests skip
locally and fail under CI. Screenshots go to ``<pytest basetemp>/ui-artifacts``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("STATEHUB_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    # A fresh profile, outside pytest's basetemp: Chromium writes to it in the background,
    # and other tests watch basetemp for files that change.
    with tempfile.TemporaryDirectory(
        prefix="statehub-chromium-", ignore_cleanup_errors=True
    ) as profile:
        yield from _launch(sync_api, profile)


def _launch(sync_api: Any, profile: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1366, "height": 860},
        )
        try:
            yield context
        finally:
            context.close()


class Tab:
    """One browser page with what a test checks beside the content: dialogs (an
    ``alert`` means injected script ran) and console errors (CSP violations among them)."""

    def __init__(self, page: Any, artifacts: Path) -> None:
        self.page = page
        self.artifacts = artifacts
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-artifacts", numbered=False)


@pytest.fixture
def tab(browser: Any, artifacts: Path) -> Iterator[Tab]:
    browser.clear_cookies()
    page = browser.new_page()
    opened = Tab(page, artifacts)
    try:
        yield opened
    finally:
        page.close()
    assert not opened.dialogs, f"a page ran script: {opened.dialogs}"
    assert not opened.errors, f"console errors: {opened.errors}"
