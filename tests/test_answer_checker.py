"""The answer checker off the main thread: starting its process is never a check's time, a check
that does run out of time falls back to text and is counted, and the count reaches the result."""

from __future__ import annotations

import threading
import time

import pytest
from fake_backend import FakeBackend, Script

from edge_metastone import answers
from edge_metastone.answers import counting_fallbacks, group_answers
from edge_metastone.reasoner import Reasoner

EQUAL = ["1/2", "0.5", "\\frac{1}{2}"]  # one class for math-verify; three for text equality


def in_thread(fn):
    """fn() in a worker thread (where the checker's process and limits apply)."""
    out: dict = {}

    def run() -> None:
        with counting_fallbacks() as c:
            out["value"] = fn()
        out["fallbacks"] = c.n

    t = threading.Thread(target=run)
    t.start()
    t.join(300)
    return out["value"], out["fallbacks"]


@pytest.fixture
def cold_checker(monkeypatch):
    """A fresh checker whose process is not started, with a check limit far below what starting
    a Python process that imports math-verify takes."""
    checker = answers._Checker()
    monkeypatch.setattr(answers, "_checker", checker)
    monkeypatch.setattr(answers, "CHECK_TIMEOUT_S", 0.3)
    yield checker
    if checker._pool is not None:
        checker._pool.shutdown(wait=True)


def test_starting_the_checker_is_not_a_check_that_ran_out_of_time(cold_checker):
    labels, fallbacks = in_thread(lambda: group_answers(EQUAL))
    assert labels == [0, 0, 0] and fallbacks == 0
    labels, fallbacks = in_thread(lambda: group_answers(EQUAL))  # warm now: stays warm
    assert labels == [0, 0, 0] and fallbacks == 0


def test_a_check_over_its_limit_falls_back_and_is_counted(cold_checker):
    cold_checker.warm()
    value, fallbacks = in_thread(lambda: cold_checker.run(time.sleep, 3))
    assert value is None and fallbacks == 1
    # the killed worker is replaced, warm, for the next check
    labels, fallbacks = in_thread(lambda: group_answers(EQUAL))
    assert labels == [0, 0, 0] and fallbacks == 0


def test_fallbacks_reach_the_result(monkeypatch, tmp_path):
    def broken(fn, *args):
        answers._fell_back()
        return None

    monkeypatch.setattr(answers._checker, "run", broken)
    scripts = [Script([0.5], text=f"</think> \\boxed{{{a}}}", every=2) for a in EQUAL]
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"")
    with Reasoner(backend=FakeBackend(scripts, has_head=False, path=fake)) as r:
        res, _ = in_thread(lambda: r.reason("q", effort="low", strategy="vote"))
        assert res.answer_check_fallbacks == 1
        assert res.to_json()["answer_check_fallbacks"] == 1
        res, _ = in_thread(lambda: r.reason("q", effort="low", strategy="logprob"))
        assert res.answer_check_fallbacks == 0
