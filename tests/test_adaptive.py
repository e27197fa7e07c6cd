"""Adaptive test-time compute: waves in the one decode loop over a kept prompt cache, online
termination of doubtful candidates, the stopping rule, and the recorded settings."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fake_backend import FakeBackend, Script

from edge_metastone.engine.engine import Engine
from edge_metastone.errors import InvalidRequestError
from edge_metastone.search.adaptive import (
    Adaptive,
    AdaptiveSettings,
    consensus,
    first_wave_floor,
    settled,
)
from edge_metastone.search.base import StrategyName, select_by_logprob
from edge_metastone.search.confidence import Signal, VoteRule, confidence, window_means
from edge_metastone.search.logprob import LogProb
from edge_metastone.types import (
    Candidate,
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    TokenEvent,
    WaveEvent,
)

SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0, seed=5)


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with Engine(tiny_gguf("f32"), parity=True) as e:
        yield e


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return engine.tokenize(engine.render([{"role": "user", "content": "What is 12 + 7?"}]))


def _cand(i: int, answer: str, lp: float = -0.1, n: int = 5, reason=FinishReason.EOS) -> Candidate:
    return Candidate(
        index=i,
        token_ids=list(range(n)),
        text=f"</think> \\boxed{{{answer}}}" if answer else "",
        step_positions=[],
        step_scores=[],
        score=None,
        finish_reason=reason,
        mean_logprob=lp,
        token_logprobs=[lp] * (n + 1),
    )


# --- the loop: waves over one prompt pass ---------------------------------------------------
def _run_waves(engine, prompt_ids, settings, first, more, control=None):
    control = control or GenerationControl()
    plan = iter(more)
    events, done = [], []
    waved = dataclasses.replace(settings, max_candidates=first + sum(more))
    for ev in engine.generate(prompt_ids, first, SAMPLING, waved, control=control):
        events.append(ev)
        if isinstance(ev, WaveEvent) and ev.phase == "end":
            control.extend(next(plan, 0))
        elif isinstance(ev, FinishEvent):
            done.append(ev.result)
    return sorted(done, key=lambda c: c.index), events, control


@pytest.mark.parametrize("layout", ["unified", "streams"])
def test_waves_reuse_the_prompt_cache_and_equal_one_batch(engine, prompt_ids, layout):
    settings = GenerationSettings(max_new_tokens=12, logprobs=True, kv_layout=layout)
    whole = engine.generate_all(prompt_ids, 8, SAMPLING, settings)
    waved, events, control = _run_waves(engine, prompt_ids, settings, 2, [2, 4])
    assert [c.token_ids for c in waved] == [c.token_ids for c in whole]
    # one pass over the prompt, then only its last token again in each later candidate's slot
    assert control.timings.prefill_tokens == len(prompt_ids) + 6
    assert control.timings.waves == 3
    marks = [(e.wave, e.phase, e.size, e.candidates) for e in events if isinstance(e, WaveEvent)]
    assert marks == [
        (1, "start", 2, 2),
        (1, "end", 2, 2),
        (2, "start", 2, 4),
        (2, "end", 2, 4),
        (3, "start", 4, 8),
    ]
    # a later wave's candidates start after every earlier one has ended
    first_of_3 = next(i for i, e in enumerate(events) if isinstance(e, WaveEvent) and e.wave == 3)
    assert not any(isinstance(e, TokenEvent) and e.candidate < 4 for e in events[first_of_3:])


def test_a_wave_nobody_asks_for_never_runs(engine, prompt_ids):
    settings = GenerationSettings(max_new_tokens=8, max_candidates=32)
    done, _, control = _run_waves(engine, prompt_ids, settings, 3, [])
    assert len(done) == 3 and control.timings.waves == 1
    assert control.timings.prefill_tokens == len(prompt_ids)


def test_a_fixed_k_yields_no_wave_events(engine, prompt_ids):
    events = list(engine.generate(prompt_ids, 2, SAMPLING, GenerationSettings(max_new_tokens=4)))
    assert not any(isinstance(e, WaveEvent) for e in events)


def test_a_pruned_candidate_frees_its_slot_and_leaves_the_rest_untouched(engine, prompt_ids):
    settings = GenerationSettings(max_new_tokens=16, logprobs=True, kv_layout="streams")
    whole = engine.generate_all(prompt_ids, 4, SAMPLING, settings)
    control = GenerationControl()
    seen = {i: 0 for i in range(4)}
    done = []
    for ev in engine.generate(prompt_ids, 4, SAMPLING, settings, control=control):
        if isinstance(ev, TokenEvent):
            seen[ev.candidate] += 1
            if ev.candidate == 1 and seen[1] == 3:
                control.prune(1, "test")
        elif isinstance(ev, FinishEvent):
            done.append(ev.result)
    done.sort(key=lambda c: c.index)
    assert done[1].finish_reason is FinishReason.PRUNED and done[1].stop_note == "test"
    assert done[1].token_ids == whole[1].token_ids[:3]
    for i in (0, 2, 3):
        assert done[i].token_ids == whole[i].token_ids, i
    # its slot was freed at once: fewer rows decoded than the untouched run
    assert sum(c.n_tokens for c in done) < sum(c.n_tokens for c in whole)


def test_online_termination_prunes_below_the_floor(engine, prompt_ids):
    settings = GenerationSettings(max_new_tokens=24, logprobs=True)
    whole = engine.generate_all(prompt_ids, 6, SAMPLING, settings)
    window = 4
    lows = [window_means(c.token_logprobs[:-1], window) for c in whole]
    runs = [w for w in lows if len(w) > 1]
    assert runs, "the fixture generated too little"
    floor = sorted(float(w.min()) for w in runs)[len(runs) // 2]  # about half fall below
    control = GenerationControl()
    control.window, control.min_confidence = window, floor
    cut = engine.generate_all(prompt_ids, 6, SAMPLING, settings, control=control)
    n_pruned = 0
    for a, b in zip(whole, cut, strict=True):
        w = window_means(a.token_logprobs, window) if len(a.token_logprobs) >= window else []
        below = [j for j, v in enumerate(w) if v < floor and j + window <= a.n_tokens]
        if below:  # pruned at the first window below the floor, its tokens a prefix
            n_pruned += 1
            assert b.finish_reason is FinishReason.PRUNED and "low confidence" in b.stop_note
            assert b.token_ids == a.token_ids[: below[0] + window - 1]
        else:
            assert b.token_ids == a.token_ids
    assert n_pruned >= 1


# --- the stopping rule on hand-built candidates ----------------------------------------------
def test_stopping_rule_stops_continues_and_ignores_the_unfinished():
    s = AdaptiveSettings(waves=(2, 8, 32), consensus=0.6, min_agree=2)
    assert settled([_cand(0, "86"), _cand(1, "86")], s)[0]
    assert not settled([_cand(0, "86"), _cand(1, "84")], s)[0]
    # truncated, pruned and empty candidates do not vote
    cut = [_cand(0, "86"), _cand(1, "86", reason=FinishReason.LENGTH), _cand(2, "")]
    assert not settled(cut, s)[0]
    assert consensus(cut) == ("86", 1.0, 1, 1)
    # 5 of 8 is 62%: settled at 0.6, not at 0.7
    eight = [_cand(i, "86" if i < 5 else str(i)) for i in range(8)]
    assert settled(eight, s)[0]
    assert not settled(eight, dataclasses.replace(s, consensus=0.7))[0]
    # confidence weighting: two doubtful agreeing candidates lose to one sure one
    mixed = [_cand(0, "86", lp=-2.0), _cand(1, "86", lp=-2.0), _cand(2, "84", lp=-0.01)]
    sharp = dataclasses.replace(s, sharpness=5.0)
    assert consensus(mixed)[0] == "86" and consensus(mixed, 5.0)[0] == "84"
    assert not settled(mixed, sharp)[0]


def _adaptive_run(answers, settings, **fake):
    scripts = [Script([0.5], text=f"</think> \\boxed{{{a}}}", every=3) for a in answers]
    backend = FakeBackend(scripts, has_head=False, **fake)
    strategy = Adaptive(settings, LogProb())
    cands, early = strategy.run(backend, [1, 2], settings.max_k, SAMPLING, GenerationSettings())
    return strategy.choose(backend, cands, settings.max_k, early), backend


def test_adaptive_stops_at_the_first_settled_wave():
    res, backend = _adaptive_run(["7", "7", "5"], AdaptiveSettings(waves=(3, 8, 32)))
    assert len(res.candidates) == 3 and res.waves == [{"candidates": 3, "tokens": 9}]
    assert res.stop_reason.startswith("settled: 2 of 3")
    assert backend.prefills == 1 and backend.calls == 1


def test_adaptive_continues_until_settled_or_max_k():
    # wave 1 (3 different answers) is not settled, 8 candidates (7,5,3 repeating: 3 of 8) neither
    res, _ = _adaptive_run(["7", "5", "3"], AdaptiveSettings(waves=(3, 8, 16)))
    assert [w["candidates"] for w in res.waves] == [3, 8, 16]
    assert res.stop_reason.startswith("reached max_k=16")
    assert [c.index for c in res.candidates] == list(range(16))
    res, _ = _adaptive_run(["7", "5", "3", "7", "7", "7", "7", "7"], AdaptiveSettings())
    assert [w["candidates"] for w in res.waves] == [3, 8] and res.stop_reason.startswith("settled")


def test_adaptive_respects_max_k():
    res, _ = _adaptive_run(["7", "5", "3"], AdaptiveSettings(waves=(3, 8, 32)).capped(5))
    assert [w["candidates"] for w in res.waves] == [3, 5]


def test_first_wave_floor_is_the_least_confident_finished_window():
    s = AdaptiveSettings(window=2, floor_margin=0.1)
    cands = [_cand(0, "1", lp=-0.2), _cand(1, "1", lp=-0.5), _cand(2, "", lp=-9.0)]
    assert first_wave_floor(cands, s) == pytest.approx(-0.6)


# --- selection: the log-probability rule and confidence-weighted voting ---------------------
def test_logprob_ranks_empty_and_truncated_candidates_last():
    empty = _cand(0, "", lp=-0.001, n=0)  # ended its turn at once: once the best possible mean
    cut = _cand(1, "9", lp=-0.01, reason=FinishReason.LENGTH)
    real = _cand(2, "86", lp=-0.4)
    assert select_by_logprob([empty, cut, real]) == 2
    assert select_by_logprob([empty, cut]) in (0, 1)


def test_confidence_vote_weights_and_filters():
    cands = [_cand(0, "1", lp=-1.0), _cand(1, "1", lp=-1.2), _cand(2, "2", lp=-0.05)]
    assert VoteRule(sharpness=0.0).choose(cands) == 0  # a plain vote: 2 against 1
    # weights exp(lp - best): 0.39 + 0.32 for "1" against 1.0 for "2"
    assert VoteRule(sharpness=1.0).choose(cands) == 2
    assert VoteRule(keep=0.34).choose(cands) == 2  # only the most confident third votes


def test_confidence_signals():
    c = dataclasses.replace(_cand(0, "1"), token_logprobs=[-0.1, -0.1, -2.0, -2.0, -0.1])
    assert confidence(c, Signal.MEAN) == pytest.approx(-0.86)
    assert confidence(c, Signal.LOWEST, 2) == pytest.approx(-2.0)
    assert confidence(c, Signal.TAIL, 2) == pytest.approx(-1.05)


# --- the recorded settings -------------------------------------------------------------------
def test_settings_round_trip_and_bad_ones_fall_back():
    s = AdaptiveSettings(waves=(2, 6, 24), consensus=0.7, floor=-0.2, selector="confidence-vote")
    assert AdaptiveSettings.from_json(s.to_json()) == s
    assert s.selector is StrategyName.CONFIDENCE_VOTE
    assert AdaptiveSettings.from_json('{"waves": [8, 2]}') == AdaptiveSettings()
    assert AdaptiveSettings.from_json("not json") == AdaptiveSettings()
    assert AdaptiveSettings.from_json(json.dumps({"consensus": 0.8, "new_key": 1})).consensus == 0.8
    with pytest.raises(InvalidRequestError):
        AdaptiveSettings(waves=(4, 4))


# --- the fronts: Reasoner, --json, server, batch ---------------------------------------------
def test_recorded_settings_are_read_and_used(tiny_gguf, tmp_path):
    from edge_metastone import keys
    from edge_metastone.modelfile.copy import write_model_copy
    from edge_metastone.reasoner import Reasoner

    recorded = AdaptiveSettings(waves=(2, 5), consensus=1.0, min_agree=99, window=4)
    model = tmp_path / "with-adaptive.gguf"
    write_model_copy(tiny_gguf("q8_0"), model, extra={keys.ADAPTIVE: recorded.to_json()})
    with Reasoner(model, max_new_tokens=6) as r:
        assert AdaptiveSettings.from_json(r.backend.policy_keys.adaptive) == recorded
        res = r.reason("What is 2+3?", effort="adaptive", seed=1)
        # never settles (min_agree 99): both recorded waves run, then max_k
        assert [w["candidates"] for w in res.waves] == [2, 5] and res.k == 5
        assert res.stop_reason.startswith("reached max_k=5")
        assert sum(w["tokens"] for w in res.waves) == sum(c.tokens for c in res.candidates)
        out = res.to_json()
        assert out["waves"] == res.waves and all("stopped_early" in c for c in out["candidates"])
        assert r.reason("What is 2+3?", effort="adaptive", max_k=3).k <= 3
    with Reasoner(tiny_gguf("q8_0"), max_new_tokens=6) as r:  # no key: the safe defaults
        assert r.backend.policy_keys.adaptive is None
        res = r.reason("What is 2+3?", effort="adaptive", seed=1)
        assert res.waves and res.waves[0]["candidates"] == AdaptiveSettings().waves[0]


def test_server_accepts_adaptive_and_streams_waves(tiny_gguf):
    from starlette.testclient import TestClient

    from edge_metastone.reasoner import Reasoner
    from edge_metastone.server.app import create_app

    with (
        Reasoner(tiny_gguf("q8_0"), max_new_tokens=6) as r,
        TestClient(create_app(r), base_url="http://127.0.0.1") as http,
    ):
        body = {"messages": [{"role": "user", "content": "2+3?"}], "effort": "adaptive"}
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        ms = resp.json()["metastone"]
        assert ms["effort"] == "adaptive" and ms["waves"] and ms["stop_reason"]
        resp = http.post("/v1/chat/completions", json={**body, "stream": True})
        assert resp.status_code == 200
        waves = [
            json.loads(line[6:])
            for line in resp.text.splitlines()
            if line.startswith("data: {") and '"wave"' in line
        ]
        assert waves, resp.text[:500]
        resp = http.post("/v1/chat/completions", json={**body, "effort": "sometimes"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "effort"


def test_batch_sweep_accepts_adaptive(tmp_path):
    from conftest import run_cli

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "\n".join(
            json.dumps({"id": str(i), "prompt": f"What is {i}+{i + 3}?", "answer": str(2 * i + 3)})
            for i in range(3)
        )
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    proc = run_cli("batch", str(inp), "-o", str(out), "--sweep", "low,adaptive", "--json")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["effort"] for r in recs] == ["low"] * 3 + ["adaptive"] * 3
    assert all(r.get("ran_effort", r["effort"]) == "adaptive" for r in recs[3:])
