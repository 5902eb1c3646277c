"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright):
it shows the two simulated GPUs and the pool, follows a task from running to succeeded
without a reload, cancels a running task from its button, and never turns data into markup.
A screenshot lands in bench-results/status-page.png.

`make test` installs Debian's chromium when it is missing and apt-get can (Playwright's own
browser download cannot reach its server from here); without a browser this test is reported
as skipped, with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from tests.conftest import Workspace, config, task, wait_for, wait_terminal

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "bench-results" / "status-page.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_MS = 15_000


def _chromium() -> str | None:
    """A Chromium to drive: $CHROMIUM_PATH, else the first of BROWSERS on PATH."""
    given = os.environ.get("CHROMIUM_PATH")
    if given:
        return given if os.access(given, os.X_OK) else None
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    try:
        from playwright.async_api import Error, async_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not installed ({exc}); `make .venv/.installed` installs it")
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no Chromium found (looked for $CHROMIUM_PATH and "
            f"{', '.join(BROWSERS)}); `make test` installs Debian's chromium when apt-get can"
        )
    async with async_playwright() as playwright:
        try:
            # root (as in CI) cannot use Chromium's sandbox; /dev/shm is small in containers
            launched = await playwright.chromium.launch(
                executable_path=executable,
                headless=True,
                args=["--no-sandbox", "--disable-dev-shm-usage"],
            )
        except Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            pytest.skip(f"Chromium at {executable} did not start: {first}")
        try:
            yield launched
        finally:
            await launched.close()


def _watch_for_errors(page: Page) -> list[str]:
    """Script errors and console errors (a CSP violation is one) the page reports."""
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
    )
    return problems


async def test_the_page_shows_the_gpus_and_pool_follows_a_task_live_and_cancels_one(
    workspace: Workspace, serve: Any, browser: Browser
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    # a pool whose file fails its pinned digest: its replica gives up at once (Failed, no
    # process), and must hold no VRAM on the page nor count as a replica that serves
    (workspace.root / "bad.gguf").write_bytes(b"not the pinned file")
    cfg["models"]["bad"] = {
        "ref": "file:bad.gguf",
        "size_mib": 3000,
        "digest": "sha256:" + "0" * 64,
    }
    cfg["pools"].append({"id": "broken", "engine": "sim", "model": "bad", "devices": [1]})
    workspace.write_config(cfg)
    running = await serve(ready=False)
    await wait_for(lambda: running.daemon.server is not None, 10, "the HTTP face")
    base = running.daemon.server.url
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    problems = _watch_for_errors(page)
    await page.goto(base + "/")

    # the two simulated GPUs and the pool, as soon as the first status event arrives
    await page.locator("#conn.live").wait_for()
    await page.locator("#gpus .gpu").nth(1).wait_for()
    assert await page.locator("#gpus .gpu").count() == 2
    assert "RTX 3090" in await page.locator('.gpu[data-gpu="0"] h3').inner_text()
    assert "RTX 3060" in await page.locator('.gpu[data-gpu="1"] h3').inner_text()
    assert "measured" in await page.locator('.gpu[data-gpu="0"] .vram').inner_text()
    pool = page.locator('.pool[data-pool-id="p1"]')
    await pool.locator(".badge.s-Ready").first.wait_for()
    assert await pool.locator("tr[data-replica-id]").count() == 1
    assert "1/1 replicas Ready" in await pool.locator("h3").inner_text()
    broken = page.locator('.pool[data-pool-id="broken"]')
    await broken.locator("h3 .badge.s-Failed").wait_for()
    assert "0/1 replicas Ready" in await broken.locator("h3").inner_text()
    gpu1 = await page.locator('.gpu[data-gpu="1"] .vram').inner_text()
    assert " 0.0 GiB estimated" in gpu1, gpu1  # nothing placed there runs
    await page.evaluate("window.notReloaded = true")

    # a task's row goes running → succeeded while the page stays as it is
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("live1", max_tokens=30)) as r:
            assert r.status == 202
        await page.locator('tr[data-task-id="live1"][data-status="running"]').wait_for()
        await page.locator('tr[data-task-id="live1"][data-status="succeeded"]').wait_for()
        assert await page.locator('tr[data-task-id="live1"] .tokens').inner_text() == "30"
        assert await page.locator('tr[data-task-id="live1"] button.cancel').count() == 0

        # a click on cancel cancels a running task
        async with session.post(f"{base}/v1/tasks", json=task("stop1", max_tokens=400)) as r:
            assert r.status == 202
        row = page.locator('tr[data-task-id="stop1"][data-status="running"]')
        await row.wait_for()
        await page.locator('tr[data-task-id="stop1"] .tokens:not(:text-is("0"))').wait_for()
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(SCREENSHOT), full_page=True)
        await page.locator('tr[data-task-id="stop1"] button.cancel').click()
        assert (await wait_terminal(workspace, "stop1"))["status"] == "canceled"
        await page.locator('tr[data-task-id="stop1"][data-status="canceled"]').wait_for()

    # markup in data stays text: an orch.yaml edit whose unknown key is an <img> tag
    hostile = "<img src=x onerror=window.pwned=1>"
    workspace.write_config(cfg | {hostile: 1})
    errors = page.locator("#config-errors li")
    await errors.first.wait_for()
    assert hostile in await errors.first.inner_text()
    assert await page.locator("img").count() == 0
    assert await page.evaluate("window.pwned === undefined && window.notReloaded === true")
    assert problems == []
    assert SCREENSHOT.stat().st_size > 10_000
