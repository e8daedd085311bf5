"""`dvc plots show`'s HTML page in headless Chromium (Debian's, driven by Playwright), as a person would open it.

The repository's page template (.dvc/config's plots.html_template) inlines Vega, Vega-Lite and Vega-Embed, so the page
must draw with no network at all: every request that is not for a file:// URL is refused and reported as an error.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

# Chromium's background services try the network at start; the machine refuses them (slowly) otherwise.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def ink(png: bytes) -> tuple[int, int]:
    """(pixels drawn, coloured pixels) of a screenshot: coloured ones are data marks (lines, bars, cells), since
    axes, grid and text are grey or black."""
    from PIL import Image

    pixels = Image.open(io.BytesIO(png)).convert("RGB").getdata()
    drawn = [p for p in pixels if min(p) < 235]
    return len(drawn), sum(max(p) - min(p) > 60 for p in drawn)


def plots_with_data(html: Path) -> list[str]:
    """The div ids of the page's plots, but those DVC wrote with an empty spec `{}` (no data: nothing to draw)."""
    plots = re.findall(r'<div id = "([^"]+)">\s*<script type = "text/javascript">\s*var spec = (\{\})?',
                       html.read_text(encoding="utf-8"))
    return [plot_id for plot_id, empty in plots if not empty]


def render(html: Path, screenshot: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Open the page offline, wait until every plot with data is drawn, take a full-page screenshot. Returns each
    plot's ink (see `ink`) by its div id, and every error the page reported, each network request it attempted
    among them."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda err: errors.append(f"page error: {err}"))
        page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        # every request the page attempts is recorded, and all but those for the page's own files are refused
        page.on("request", lambda request: None if request.url.startswith(("file:", "data:", "blob:")) else
                errors.append(f"network request: {request.method} {request.url}"))
        page.on("websocket", lambda socket: errors.append(f"network request: websocket {socket.url}"))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else
                   route.abort("internetdisconnected"))
        page.goto(html.as_uri())
        # each plot with data becomes a .vega-embed holding an svg or canvas (DVC writes `{}` for one without data)
        try:
            page.wait_for_function(f"{json.dumps(plots_with_data(html))}.every(id => document.getElementById(id)"
                                   ".querySelector('.vega-embed svg, .vega-embed canvas'))", timeout=30_000)
        except PlaywrightTimeout:
            errors.append("not every plot with data was drawn within 30 s")
        page.wait_for_timeout(500)  # the last frame
        plots = {div.get_attribute("id"): ink(div.screenshot()) for div in page.locator("body > div[id]").all()
                 if div.bounding_box() and div.bounding_box()["height"] > 0}
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return plots, errors
