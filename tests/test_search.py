"""Search strategies on hand-built scores, through the scripted fake backend (no llama.cpp)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import fake_backend
import pytest
from fake_backend import FakeBackend, Script

from edge_metastone.answers import answers_equivalent, extract_answer, group_answers
from edge_metastone.search import base as search_base
from edge_metastone.search import make_strategy
from edge_metastone.search.base import argmax_lowest_index, select_by_score, selection_pool
from edge_metastone.search.best_of_k import BestOfK
from edge_metastone.search.logprob import LogProb
from edge_metastone.search.prune import PruneRule, StepPruning
from edge_metastone.search.vote import Vote, vote
from edge_metastone.sprm import trajectory_score
from edge_metastone.types import (
    Candidate,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
    TokenEvent,
)

SAMPLING = SamplingSettings(temperature=1.0)
SETTINGS = GenerationSettings(max_new_tokens=100)


def cand(i: int, score: float | None, reason=FinishReason.EOS, logprob=None) -> Candidate:
    return Candidate(i, [1], "t", [], [], score, reason, logprob)


# --- selection ------------------------------------------------------------------------------


def test_argmax_ties_go_to_lowest_index():
    assert argmax_lowest_index([(0, 0.5), (1, 0.9), (2, 0.9)]) == 1
    assert argmax_lowest_index([(3, 0.2), (1, 0.2)]) == 1
    with pytest.raises(ValueError):
        argmax_lowest_index([])


def test_select_by_score_skips_pruned_and_none():
    cands = [cand(0, 0.9, FinishReason.PRUNED), cand(1, None), cand(2, 0.4), cand(3, 0.4)]
    assert select_by_score(cands) == 2


def test_selection_pool_after_early_stop_prefers_completed():
    cands = [cand(0, 0.9, FinishReason.HALTED), cand(1, 0.3), cand(2, 0.5, FinishReason.HALTED)]
    assert [c.index for c in selection_pool(cands)] == [1]
    only_halted = [cand(0, 0.2, FinishReason.HALTED), cand(1, 0.6, FinishReason.HALTED)]
    assert select_by_score(only_halted) == 1


# --- strategies -----------------------------------------------------------------------------


def test_best_of_k_picks_highest_trajectory_score():
    eng = FakeBackend([Script([0.5, 0.5]), Script([0.9, 0.8]), Script([0.9, 0.8]), Script([0.1])])
    res = BestOfK().search(eng, [1], 4, SAMPLING, SETTINGS)
    assert res.chosen == 1 and res.candidates[1].score == pytest.approx(
        trajectory_score([0.9, 0.8])
    )
    assert "SPRM" in res.reason


def test_best_of_k_without_head_falls_back_to_logprob():
    eng = FakeBackend([Script([0.9], logprob=-2.0), Script([0.1], logprob=-0.5)], has_head=False)
    res = BestOfK().search(eng, [1], 2, SAMPLING, SETTINGS)
    assert res.chosen == 1 and "log-probability" in res.reason


def test_logprob_strategy():
    eng = FakeBackend(
        [Script([0.9], logprob=-0.7), Script([0.1], logprob=-0.2), Script([0.5], logprob=-0.2)]
    )
    assert LogProb().search(eng, [1], 3, SAMPLING, SETTINGS).chosen == 1


def test_pruning_drops_laggards_and_saves_tokens():
    good = [0.9] * 10
    bad = [0.2] * 10
    scripts = [Script(bad), Script(good), Script(bad), Script([0.85] * 10), Script(bad)]
    full = FakeBackend(scripts)
    best = BestOfK().search(full, [1], 5, SAMPLING, SETTINGS)
    pruned_eng = FakeBackend(scripts)
    res = StepPruning(min_steps=3, ratio=0.6, keep=2).search(pruned_eng, [1], 5, SAMPLING, SETTINGS)
    assert res.chosen == best.chosen == 1
    reasons = [c.finish_reason for c in res.candidates]
    assert reasons == [
        FinishReason.PRUNED,
        FinishReason.EOS,
        FinishReason.PRUNED,
        FinishReason.EOS,
        FinishReason.PRUNED,
    ]
    # pruned at their 3rd step: 30 tokens each instead of 100
    assert [c.n_tokens for c in res.candidates] == [30, 100, 30, 100, 30]
    assert pruned_eng.generated == 290 < full.generated == 500


def test_prune_rule_keeps_a_minimum_alive():
    control = GenerationControl()
    rule = PruneRule(k=3, min_steps=1, ratio=0.9, keep=2)
    for i, s in enumerate([0.9, 0.1, 0.2]):
        rule.on_step(StepEvent(i, 5, s, 1, s), control)
    assert control.pruned == {1}  # only one dropped: two must stay alive
    rule.on_step(StepEvent(2, 9, 0.1, 2, 0.15), control)
    assert control.pruned == {1}


def test_prune_rule_waits_for_min_steps():
    control = GenerationControl()
    rule = PruneRule(k=4, min_steps=2, ratio=0.6, keep=1)
    rule.on_step(StepEvent(0, 5, 0.9, 1, 0.9), control)
    rule.on_step(StepEvent(1, 5, 0.1, 1, 0.1), control)
    assert not control.pruned
    rule.on_step(StepEvent(0, 9, 0.9, 2, 0.9), control)
    rule.on_step(StepEvent(1, 9, 0.1, 2, 0.1), control)
    assert control.pruned == {1}


def test_majority_vote():
    assert vote(["1/2", "0.5", "3", "3", "\\frac{1}{2}"], [1] * 5, [0, 1, 2, 3, 4]) == 0
    # tie between classes {0,2} and {1,3}: the class holding the lowest index wins
    assert vote(["7", "8", "7", "8"], [1] * 4, [0, 1, 2, 3]) == 0
    # empty answers never win
    assert vote(["", "", "", "5"], [1] * 4, [0, 1, 2, 3]) == 3


def test_weighted_vote_and_member_choice():
    answers = ["7", "8", "8", "7", "7"]
    weights = [0.1, 0.9, 0.8, 0.2, 0.3]
    assert vote(answers, [1] * 5, [0, 1, 2, 3, 4]) == 0  # majority: 7 (3 votes), first member
    assert vote(answers, weights, [0, 1, 2, 3, 4]) == 1  # weighted: 8 (1.7 > 0.6), heaviest member


def test_vote_strategies_end_to_end():
    scripts = [
        Script([0.2], "</think> \\boxed{4}"),
        Script([0.9], "</think> \\boxed{5}"),
        Script([0.3], "</think> the answer is \\boxed{2+2}"),
    ]
    assert Vote().search(FakeBackend(scripts), [1], 3, SAMPLING, SETTINGS).chosen == 0
    assert (
        make_strategy("weighted-vote")
        .search(FakeBackend(scripts), [1], 3, SAMPLING, SETTINGS)
        .chosen
        == 1
    )


class RoundClock:
    """Time that passes only as the fake backend's rounds do: each round's closing `sleep` moves
    it on, so a deadline test counts rounds and does not depend on how busy the machine is."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.rounds = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.rounds += 1


def test_deadline_halts_and_flags_early_stop(monkeypatch):
    """A deadline halts every candidate before it passes, but not long before: the search stops
    once the next round (at the pace it measured) would end past the deadline. It flags the early
    stop. The search and the fake backend read one clock that moves 2 ms a decode round, so the
    run is the same on any machine, however busy, and the bounds are counted in rounds."""
    clock = RoundClock()
    fake_time = SimpleNamespace(sleep=clock.sleep, perf_counter=clock.monotonic)
    monkeypatch.setattr(fake_backend, "time", fake_time)
    monkeypatch.setattr(search_base, "time", SimpleNamespace(monotonic=clock.monotonic))
    # 2 candidates x 500 tokens at 2 ms a round would take 1 s (500 rounds); the deadline is
    # 0.201 s away, so the round that starts at 0.200 s is the first that would end past it
    scripts = [Script([0.5] * 50, every=10), Script([0.6] * 50, every=10)]
    eng = FakeBackend(scripts, round_s=0.002)
    settings = GenerationSettings(max_new_tokens=1000)  # SETTINGS' 100 would end it at 0.2 s
    deadline = clock.now + 0.201
    made_at: list[float] = []  # the clock at each token the search saw

    def on_event(ev):
        if isinstance(ev, TokenEvent):
            made_at.append(clock.now)

    res = BestOfK().search(eng, [1], 2, SAMPLING, settings, deadline=deadline, on_event=on_event)
    assert res.early_stop
    assert all(c.finish_reason is FinishReason.HALTED for c in res.candidates)
    assert max(made_at) < deadline  # no token was made after the deadline
    assert max(made_at) > deadline - 2 * 0.002  # nor did the search stop rounds early
    assert 2 * 99 <= eng.generated <= 2 * 101  # of the 1000 tokens, about 100 rounds' worth
    assert clock.rounds <= 103  # the halted candidates ended within two rounds of the halt


def test_deadline_in_the_future_lets_a_short_run_finish():
    scripts = [Script([0.5] * 2, every=5), Script([0.6] * 2, every=5)]
    res = BestOfK().search(
        FakeBackend(scripts), [1], 2, SAMPLING, SETTINGS, deadline=time.monotonic() + 60
    )
    assert not res.early_stop and res.chosen == 1


# --- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>so 5</think>The answer is \\boxed{5}.", "5"),
        ("<think>a</think>\\boxed{\\frac{1}{2}} and then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("<think>\\boxed{9}</think> It is 7.", "7"),
        ("<think>9</think> It is seven.", "It is seven."),
        ("<think>a</think>" + "word " * 5000, ("word " * 40).strip()),
        ("7.\n\n", "7"),
        ("no think tags, \\boxed{x^{2}}", "x^{2}"),
        ("<think>cut off \\boxed{12", "12"),
        ("<think>a</think>\n  42  \n", "42"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answer_equivalence_via_math_verify():
    assert answers_equivalent("\\frac{1}{2}", "0.5")
    assert answers_equivalent("1170", "1,170")  # a thousands separator, not a tuple
    assert not answers_equivalent("1170", "1,171")
    assert answers_equivalent("x=3", "3")
    assert not answers_equivalent("3", "4")
    assert not answers_equivalent("", "0")
    assert group_answers(["2", "4/2", "3", "", "\\sqrt{9}"]) == [0, 0, 2, 3, 2]
