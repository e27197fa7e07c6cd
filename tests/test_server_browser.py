"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by playwright; no browser is
ever downloaded): a person types a prompt and watches the candidates stream."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
OFF_TASK = "What is the capital of France?"  # MetaStone-nano answers it with a number
SCREENSHOTS = (
    "server_page.png",
    "server_page_auto.png",
    "server_page_420.png",
    "server_page_warning.png",
    "server_page_warning_420.png",
)


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


@contextlib.contextmanager
def _served_page(*serve_args: str) -> Iterator[Any]:
    """A headless Chromium page (1280 x 860) at the root of `edge-metastone serve *serve_args`;
    the browser and the server are closed after."""
    sync_playwright = _browser_or_skip()
    with ServerProcess(*serve_args) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def hsl(score: float) -> str:
    """The page's colour of a value in 0..1, as the browser reports it."""
    return f"hsl({round(max(0.0, min(1.0, score)) * 120)}, 75%, 80%)"


def confidence_colour(confidence: float) -> str:
    """The page's colour of a step confidence (0.5 or less red, 1 green)."""
    return hsl((confidence - 0.5) / 0.5)


# while a run streams, remember every token count a live card showed (the page's tests read it)
WATCH_COUNTS = """() => {
  window.liveCounts = [];
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('.cand.live .info')) {
      const n = parseInt(el.textContent, 10);
      if (n > 0) window.liveCounts.push(n);
    }
  }).observe(document.getElementById('candidates'), {subtree: true, childList: true, characterData: true});
}"""


def _tally(candidates) -> str:
    counts: dict[str, int] = {}
    for c in candidates:
        counts[c.answer] = counts.get(c.answer, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])  # stable, as the page's sort
    return ", ".join(f"{a or 'no answer'} ×{n}" for a, n in ordered)


def _check_first_run(page, direct) -> None:
    """The finished run: answer, cards, colours by the signal that informs, tally, grouping."""
    assert page.inner_text("#answer") == direct.answer
    assert page.locator(".cand").count() == direct.k == 8
    chosen = page.locator(".cand.chosen")
    assert chosen.count() == 1
    assert int(chosen.get_attribute("data-index")) == direct.chosen
    assert int(page.evaluate("document.body.dataset.chunks")) > 1  # it streamed
    # the embedded model's head is measured uninformative: steps show the model's confidence,
    # SPRM stays available, labelled
    assert "step confidence" in page.inner_text("#legend")
    assert "SPRM (not informative on this model)" in page.inner_text("#model")
    for c in direct.candidates:
        card = page.locator(f".cand[data-index='{c.index}']")
        assert card.locator("pre").text_content() == c.text
        colours = card.locator("span.step").evaluate_all(
            "spans => spans.map(s => s.style.background)"
        )
        expected = [confidence_colour(x) for x in c.step_confidence]
        assert [x.replace("rgb", "") for x in colours] == [_rgb(e) for e in expected], c.index
        titles = card.locator("span.step").evaluate_all("spans => spans.map(s => s.title)")
        assert all("SPRM (not informative on this model)" in t for t in titles)
    best = direct.candidates[direct.chosen]
    # the chosen card's header shows the number the selector used
    assert (
        f"mean token log-prob {best.mean_logprob:.3f}" in chosen.locator(".selector").inner_text()
    )
    assert _tally(direct.candidates) in " ".join(page.inner_text("#tally").split())
    distinct = len({c.text for c in direct.candidates})
    assert page.locator(".cand:visible").count() == distinct < direct.k
    page.locator(".cand.group-head .same").first.click()
    assert page.locator(".cand:visible").count() > distinct  # the identical ones unfold


def _check_stop(page) -> None:
    """Stop mid-run: the partial candidates stay, marked stopped; no answer is shown."""
    page.select_option("#effort", "high")
    page.fill("#temperature", "2.0")
    page.click("#run")
    page.wait_for_function(
        "[...document.querySelectorAll('.cand.live .info')].some(e => parseInt(e.textContent) > 3)",
        timeout=120_000,
    )
    page.click("#stop")
    page.wait_for_selector("#status[data-state=stopped]", timeout=30_000)
    assert page.locator(".cand").count() > 0
    assert page.locator(".cand.stopped").count() > 0
    assert page.locator(".cand.live").count() == 0
    assert "stopped" in page.locator(".cand.stopped .state").first.inner_text()
    assert not page.locator("#answer-box").is_visible()


def _check_off_task(page) -> None:
    """A prompt outside the model's task: the server's warning stands above the answer, which
    is still shown, but not as a confident one."""
    page.fill("#prompt", OFF_TASK)
    page.select_option("#effort", "low")
    page.click("#run")
    page.wait_for_selector("#status[data-state=done]", timeout=120_000)
    warning = page.inner_text("#warning")
    assert page.locator("#warning").is_visible()
    assert "outside what MetaStone-nano can do" in warning, warning
    assert "operands of one or two digits" in warning and "do not trust the answer" in warning
    assert page.locator("#answer-box").is_visible()
    assert "doubtful" in page.get_attribute("#answer-box", "class")
    # nothing sticks out sideways (the page's width is the window's)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_page_streams_candidates_and_highlights_the_chosen_answer(tmp_path):
    with _served_page("--max-new-tokens", "96") as page:
        page.wait_for_function(
            "document.getElementById('model').textContent.includes('SPRM')", timeout=60_000
        )
        assert not page.locator("#answer-box").is_visible()  # no answer before a result
        assert "MetaStone-nano" in page.inner_text("#model")
        assert "operands of one or two digits" in page.inner_text("#domain")
        page.fill("#prompt", PROMPT)
        page.select_option("#effort", "medium")
        page.fill("#temperature", "1.0")
        page.fill("#seed", "1")
        page.evaluate(WATCH_COUNTS)
        page.click("#run")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        counts = page.evaluate("window.liveCounts")
        assert len(set(counts)) > 2, counts  # a card's token count rose while it streamed
        page.screenshot(path=str(tmp_path / "server_page.png"), full_page=True)

        with Reasoner(max_new_tokens=96) as r:
            direct = r.reason(PROMPT, ReasonOptions(effort="medium", seed=1, temperature=1.0))
        _check_first_run(page, direct)
        assert "medium requested" in page.inner_text("#scheduler")
        assert "tokens/s" in page.inner_text("#status")
        assert not page.locator("#warning").is_visible()  # an arithmetic prompt: no warning

        _check_off_task(page)
        page.screenshot(path=str(tmp_path / "server_page_warning.png"), full_page=True)
        page.fill("#prompt", PROMPT)

        # an error: the old answer and tally do not stay on screen under it
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=400, json={"error": {"message": "bad request", "type": "x"}}
            ),
        )
        page.click("#run")
        page.wait_for_selector("#status[data-state=error]", timeout=30_000)
        assert not page.locator("#answer-box").is_visible()
        assert not page.locator("#tally").is_visible()
        assert not page.locator("#warning").is_visible()  # nor the last run's warning
        page.unroute("**/v1/chat/completions")

        _check_stop(page)

        page.select_option("#effort", "auto")
        page.fill("#temperature", "1.0")
        page.fill("#budget", "30")
        page.click("#run")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        assert "auto chose" in page.inner_text("#scheduler")
        assert not page.locator("#warning").is_visible()
        assert "doubtful" not in page.get_attribute("#answer-box", "class")
        page.screenshot(path=str(tmp_path / "server_page_auto.png"), full_page=True)

        page.select_option("#effort", "adaptive")  # waves: the result says how many and why
        page.fill("#budget", "")
        page.click("#run")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        meta = page.inner_text("#answer-meta")
        assert re.search(r"\d+ waves?, ", meta), meta
        cards = page.locator(".cand").count()
        assert 2 <= cards <= 32, cards  # the candidates the waves ran, not a fixed k

        page.set_viewport_size({"width": 420, "height": 860})
        title = page.locator("header#top h1").bounding_box()
        assert title["height"] < 30, title  # one line: not "edge-" / "metastone"
        page.screenshot(path=str(tmp_path / "server_page_420.png"), full_page=True)
        page.fill("#budget", "")
        _check_off_task(page)
        page.screenshot(path=str(tmp_path / "server_page_warning_420.png"), full_page=True)
    keep = os.environ.get("EDGE_METASTONE_SCREENSHOTS")
    if keep:  # e.g. bench/results: the screenshots published with the README
        for name in SCREENSHOTS:
            shutil.copy(tmp_path / name, Path(keep) / name)


def _rgb(hsl_text: str) -> str:
    """hsl(h, s%, l%) -> '(r, g, b)' as Chromium serializes a style colour."""
    import colorsys

    h, s, lightness = (float(x.strip(" %")) for x in hsl_text[4:-1].split(","))
    r, g, b = colorsys.hls_to_rgb(h / 360, lightness / 100, s / 100)
    return f"({round(r * 255)}, {round(g * 255)}, {round(b * 255)})"


def test_the_page_says_how_a_vote_chose(tmp_path):
    """A model whose default selector is a vote the page never named (confidence-vote): the
    chosen card says how many candidates gave its answer, from `/v1/models`' `strategies`, not a
    list of vote names written into the page."""
    from edge_metastone import keys
    from edge_metastone.modelfile.copy import write_model_copy
    from edge_metastone.models import default_model_path

    _browser_or_skip()
    model = write_model_copy(
        default_model_path(),
        tmp_path / "nano-confidence-vote.gguf",
        extra={keys.DEFAULT_STRATEGY: "confidence-vote"},
    )
    with _served_page("--model", str(model), "--max-new-tokens", "96") as page:
        page.wait_for_function(
            "document.getElementById('model').textContent.includes('confidence-vote')",
            timeout=60_000,
        )
        page.fill("#prompt", PROMPT)
        page.select_option("#effort", "medium")
        page.fill("#seed", "1")
        page.click("#run")
        page.wait_for_selector("#status[data-state=done]", timeout=120_000)
        with Reasoner(model, max_new_tokens=96) as r:
            direct = r.reason(PROMPT, ReasonOptions(effort="medium", seed=1))
        assert direct.strategy == "confidence-vote"
        best = direct.candidates[direct.chosen]
        n = sum(c.answer == best.answer for c in direct.candidates)
        said = page.locator(".cand.chosen .selector").first.inner_text()
        assert f"selected by confidence-vote: {n} of {direct.k} candidates answer" in said, said
        page.screenshot(path=str(tmp_path / "server_page_vote.png"), full_page=True)
