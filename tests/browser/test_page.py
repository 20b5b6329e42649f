"""End-to-end tests of the ``dalle serve`` page in a real headless Chromium (Playwright, sync API).

Needs Debian's ``chromium`` and the ``playwright`` Python package (scripts/ci_browser_deps.sh
installs both; Playwright's own browser download is not used).  Set ``DALLE_SCREENSHOT=1``
to save the page as docs/serve.png.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DALLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL_HINT = "run scripts/ci_browser_deps.sh to install it"

sync_api = pytest.importorskip("playwright.sync_api", reason=f"the playwright package is not installed; {INSTALL_HINT}")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"chromium is not installed (looked for {CHROMIUM}); {INSTALL_HINT}", allow_module_level=True)

expect = sync_api.expect

sys.path.insert(0, str(ROOT / "tests"))  # for helpers/

import torch  # noqa: E402
from helpers.tiny_pipeline import build_tiny_pipeline, shapes_image  # noqa: E402

from dalle.serve import make_server  # noqa: E402

# Chromium must not try to reach the network on its own: on a closed network those
# connections are refused and slow the start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    srv = make_server(build_tiny_pipeline, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url)
    expect(page.locator("#model-info")).to_contain_text("8×8 token grid")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_sampling(page, candidates: int, keep: int, seed: int = 0) -> None:
    page.fill("#candidates", str(candidates))
    page.fill("#keep", str(keep))
    page.fill("#seed", str(seed))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expect_loaded_images(page, count: int) -> None:
    images = page.locator("#gallery img")
    expect(images).to_have_count(count)
    page.wait_for_function(
        "n => [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth === 64).length === n",
        arg=count,
    )


def test_generate_shows_ranked_images(page):
    page.fill("#gen-prompt", "a red circle above a blue square")
    set_sampling(page, candidates=8, keep=4, seed=1)
    page.click("#gen-button")
    expect_loaded_images(page, 4)
    captions = page.locator("#gallery figcaption .score").all_inner_texts()
    assert [c.split(" · ")[0] for c in captions] == ["#1", "#2", "#3", "#4"]
    scores = [float(c.split("CLIP ")[1]) for c in captions]
    assert scores == sorted(scores, reverse=True)
    expect(page.locator("#status-text")).to_contain_text("4 image(s)")
    expect(page.locator("#message")).to_be_hidden()
    if os.environ.get("DALLE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "docs" / "serve.png"), full_page=True)


def test_empty_prompt_shows_a_message(page):
    page.fill("#gen-prompt", "   ")
    page.click("#gen-button")
    expect(page.locator("#message")).to_be_visible()
    expect(page.locator("#message")).to_contain_text("the prompt is empty")
    expect(page.locator("#gallery img")).to_have_count(0)


def test_out_of_range_number_shows_a_message(page):
    page.fill("#gen-prompt", "a red circle")
    set_sampling(page, candidates=2, keep=3)
    page.click("#gen-button")
    expect(page.locator("#message")).to_contain_text("keep (3) must be at most the number of candidates (2)")
    # The form works again once corrected, and the message goes away.
    page.fill("#keep", "1")
    page.click("#gen-button")
    expect_loaded_images(page, 1)
    expect(page.locator("#message")).to_be_hidden()


def test_completion_of_an_uploaded_image(page):
    page.click("#tab-complete")
    expect(page.locator("#panel-complete")).to_be_visible()
    page.set_input_files("#complete-file", {"name": "shapes.png", "mimeType": "image/png",
                                            "buffer": png(shapes_image())})
    page.fill("#keep-rows", "3")
    page.fill("#complete-prompt", "a red circle above a blue square")
    set_sampling(page, candidates=4, keep=2)
    page.click("#complete-button")
    expect_loaded_images(page, 2)
    expect(page.locator("#gallery .prompt")).to_contain_text("completed")


def test_non_image_upload_shows_a_message(page):
    page.click("#tab-complete")
    page.set_input_files("#complete-file", {"name": "notes.png", "mimeType": "image/png",
                                            "buffer": b"these are not the pixels you are looking for"})
    page.fill("#complete-prompt", "a red circle")
    page.click("#complete-button")
    expect(page.locator("#message")).to_contain_text("not an image")
    expect(page.locator("#gallery img")).to_have_count(0)


def test_a_result_can_be_completed(page):
    """The "complete" button under a result moves it to the completion tab, and completing it works."""
    page.fill("#gen-prompt", "a red circle")
    set_sampling(page, candidates=2, keep=1)
    page.click("#gen-button")
    expect_loaded_images(page, 1)
    page.click("#gallery figcaption button")
    expect(page.locator("#panel-complete")).to_be_visible()
    expect(page.locator("#complete-prompt")).to_have_value("a red circle")
    page.click("#complete-button")
    expect(page.locator("#gallery .prompt")).to_contain_text("completed")
    expect_loaded_images(page, 1)
