"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by playwright; no browser is
ever downloaded): a person types a prompt and watches the candidates stream."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from server_process import ServerProcess

from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "What is (58+27)*4-96?"  # seed 1: the candidates disagree (234, 244)


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "playwright is not installed" if sync_playwright is None else None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    return sync_playwright


def hsl(score: float) -> str:
    """The page's colour of a step score, as the browser reports it."""
    return f"hsl({round(max(0.0, min(1.0, score)) * 120)}, 75%, 80%)"


def test_page_streams_candidates_and_highlights_the_chosen_answer(tmp_path):
    sync_playwright = _browser_or_skip()
    with (
        ServerProcess("--max-new-tokens", "96") as server,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url + "/")
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('SPRM')", timeout=60_000
            )
            page.fill("#prompt", PROMPT)
            page.select_option("#effort", "medium")
            page.fill("#temperature", "1.0")
            page.fill("#seed", "1")
            page.click("#run")
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            shot = tmp_path / "server_page.png"
            page.screenshot(path=str(shot), full_page=True)

            with Reasoner(max_new_tokens=96) as r:
                direct = r.reason(PROMPT, ReasonOptions(effort="medium", seed=1, temperature=1.0))
            assert page.inner_text("#answer") == direct.answer
            assert page.locator(".cand").count() == direct.k == 8
            chosen = page.locator(".cand.chosen")
            assert chosen.count() == 1
            assert int(chosen.get_attribute("data-index")) == direct.chosen
            assert int(page.evaluate("document.body.dataset.chunks")) > 1  # it streamed
            for c in direct.candidates:  # every candidate's text, every step in its score's colour
                card = page.locator(f".cand[data-index='{c.index}']")
                assert card.locator("pre").inner_text() == c.text
                colours = card.locator("span.step").evaluate_all(
                    "spans => spans.map(s => s.style.background)"
                )
                expected = [hsl(s) for s in c.step_scores]
                assert [x.replace("rgb", "") for x in colours] == [_rgb(e) for e in expected], (
                    c.index
                )
            assert "medium requested" in page.inner_text("#scheduler")
            assert "tokens/s" in page.inner_text("#status")

            page.select_option("#effort", "auto")
            page.fill("#budget", "30")
            page.click("#run")
            page.wait_for_selector("#status[data-state=done]", timeout=120_000)
            assert "auto chose" in page.inner_text("#scheduler")
            page.screenshot(path=str(tmp_path / "server_page_auto.png"), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("EDGE_METASTONE_SCREENSHOTS")
    if keep:  # e.g. bench/results: the screenshots published with the README
        for name in ("server_page.png", "server_page_auto.png"):
            shutil.copy(tmp_path / name, Path(keep) / name)


def _rgb(hsl_text: str) -> str:
    """hsl(h, s%, l%) -> '(r, g, b)' as Chromium serializes a style colour."""
    import colorsys

    h, s, lightness = (float(x.strip(" %")) for x in hsl_text[4:-1].split(","))
    r, g, b = colorsys.hls_to_rgb(h / 360, lightness / 100, s / 100)
    return f"({round(r * 255)}, {round(g * 255)}, {round(b * 255)})"
