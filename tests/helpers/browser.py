"""The dashboard's browser tests' tools: headless Chromium (Debian's ``chromium``, driven
by Playwright's driver from PyPI, no browser download), what went wrong in a page,
logging in, screenshots and reading table cells."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Request, Response, async_playwright

from tests.conftest import ADMIN

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".artifacts" / "screenshots"


@pytest.fixture(scope="module")
def chromium_installed() -> None:
    assert os.path.exists(CHROMIUM), "no /usr/bin/chromium: run scripts/browser.sh (make test does)"


@pytest.fixture
async def browser(chromium_installed: None) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


class Problems:
    """Everything that went wrong in the browser, as readable lines."""

    def __init__(self, page: Page) -> None:
        self.lines: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.lines.append(f"page error: {error}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.lines.append(f"console {message.type}: {message.text}")

    def _failed(self, request: Request) -> None:
        # A poll still in flight when the page navigates away is aborted, not failed.
        if request.failure != "net::ERR_ABORTED":
            self.lines.append(f"request failed: {request.method} {request.url} {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.lines.append(f"HTTP {response.status}: {response.url}")


async def log_in(page: Page) -> None:
    """Submit the admin token on the login form shown, and land on the overview."""
    await page.fill("#token", ADMIN)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r".*/dashboard/$"))


async def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def cells(page: Page, rows: str) -> list[list[str]]:
    """The text of each cell of each row that ``rows`` selects, row by row."""
    found = page.locator(rows)
    return [
        [text.strip() for text in await found.nth(i).locator("td").all_text_contents()]
        for i in range(await found.count())
    ]
