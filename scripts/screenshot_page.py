"""Screenshot of the ``dalle serve`` page for the README (docs/serve.png).

Starts the server on a free local port with a trained model, types a prompt into the
page in headless Chromium, waits for the ranked images and saves the page.

    .venv/bin/python scripts/screenshot_page.py --model runs/shapes --prompt "a red circle above a blue square"

Needs Debian's chromium and the playwright package (scripts/ci_browser_deps.sh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Same flags as tests/browser/test_page.py: keep Chromium off the network (closed networks refuse it).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt", default="a red circle above a blue square")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "serve.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        print("error: the playwright package is missing; run scripts/ci_browser_deps.sh", file=sys.stderr)
        return 1
    if not Path(args.chromium).is_file():
        print(f"error: no chromium at {args.chromium}; run scripts/ci_browser_deps.sh", file=sys.stderr)
        return 1

    from dalle.pipeline import DallePipeline
    from dalle.serve import make_server

    from dalle.io import ModelLoadError

    try:
        server = make_server(lambda: DallePipeline.from_pretrained(args.model, device=args.device), "127.0.0.1", 0,
                             quiet=True)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.set_default_timeout(600_000)  # a big model on a CPU takes its time
            page.goto(server.url)
            expect(page.locator("#model-info")).to_contain_text("token grid")
            page.fill("#gen-prompt", args.prompt)
            page.fill("#candidates", str(args.candidates))
            page.fill("#keep", str(args.keep))
            page.fill("#seed", str(args.seed))
            page.click("#gen-button")
            page.wait_for_function(
                "n => [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length === n", arg=args.keep)
            message = page.locator("#message")
            if message.is_visible():
                print(f"error: the page says: {message.inner_text()}", file=sys.stderr)
                return 1
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
