"""The web app in a real browser: Debian's Chromium driven by Playwright, on the offline tiny model."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# screenshots go to docs/screenshots only when asked (ATTNEDIT_SCREENSHOTS=1), so test runs leave the tree clean
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"), reason="Debian chromium not installed (CI installs it)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_pipe):
    from attnedit.webapp import build_app

    demo = build_app(tiny_pipe("sd15"), "tiny:sd15")
    demo.queue(default_concurrency_limit=1, max_size=16)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.wait_for_selector("text=Generate", timeout=60_000)
        yield page
        browser.close()


def test_generation_shows_an_image_and_token_maps(page, tmp_path):
    page.get_by_label("Prompt").fill("a red circle")
    page.get_by_role("button", name="Generate").click()
    image = page.locator("#maps-image img")
    image.wait_for(state="visible", timeout=120_000)
    assert image.evaluate("img => img.naturalWidth") == 64
    page.locator("#maps-gallery img").first.wait_for(state="visible", timeout=60_000)
    assert page.locator("#maps-gallery img").count() >= 3
    folder = SCREENSHOTS if os.environ.get("ATTNEDIT_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "attention-maps.png"), full_page=True)
    assert (folder / "attention-maps.png").stat().st_size > 10_000


def test_bad_input_shows_a_message(page):
    page.get_by_label("Prompt").fill("   ")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("text=the prompt is empty", timeout=60_000)
