"""The shared sequence pool: several generations decode together in one long-lived context.

Each test runs real generations on the tiny fixture model (F32 KV cache, no flash attention) in
threads, checks they really shared decodes (`Timings.shared_rounds`), and compares each one with
the same generation run alone (same seeds): token for token, and the online step scores against
the one-pass reference scorer within the parity tolerance.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import wait_until
from edge_metastone.engine import pool_admission
from edge_metastone.engine.engine import Engine
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.types import (
    FinishEvent,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    TokenEvent,
)

PARITY_TOL = 1e-4
DELIM = 258  # the fixture's ".\n\n"
SETTINGS = GenerationSettings(max_new_tokens=48, kv_layout="streams")


def sampling(seed: int) -> SamplingSettings:
    return SamplingSettings(temperature=1.0, top_p=0.95, seed=seed, logit_bias=((DELIM, 4.0),))


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    # room for the tests' three requests at once from the start (a pool grows only when idle)
    with Engine(tiny_gguf("f32"), parity=True, min_sequences=16) as e:
        yield e


@pytest.fixture(scope="module")
def prompts(engine):
    texts = ["What is 12 + 7?", "Add 3 and 4, then double it.", "Count to five."]
    return [engine.tokenize(engine.render([{"role": "user", "content": t}])) for t in texts]


def _alone(engine, prompt, k, seed):
    return engine.generate_all(prompt, k, sampling(seed), SETTINGS)


class Run(threading.Thread):
    """One generation in a thread; `hold` (an Event) pauses it after its first token until set;
    `stop_after` tokens, it stops listening (closes the generator)."""

    def __init__(self, engine, prompt, k, seed, hold=None, stop_after=None):
        super().__init__()
        self.args = (engine, prompt, k, seed)
        self.hold, self.stop_after = hold, stop_after
        self.control = GenerationControl()
        self.cands: list = []
        self.error: BaseException | None = None
        self.tokens = 0

    def run(self) -> None:
        engine, prompt, k, seed = self.args
        try:
            gen = engine.generate(prompt, k, sampling(seed), SETTINGS, control=self.control)
            for ev in gen:
                if isinstance(ev, TokenEvent):
                    self.tokens += 1
                    if self.tokens == 1 and self.hold is not None:
                        self.hold.wait(60)
                    if self.stop_after is not None and self.tokens >= self.stop_after:
                        gen.close()
                        return
                elif isinstance(ev, FinishEvent):
                    self.cands.append(ev.result)
            self.cands.sort(key=lambda c: c.index)
        except BaseException as e:
            self.error = e


def _check_against_reference(engine, prompt, cands):
    for c in cands:
        ref = score_tokens(engine.model_file, engine.model, prompt + c.token_ids)
        assert c.step_positions == ref.positions
        if ref.step_scores:
            diff = float(np.abs(np.subtract(c.step_scores, ref.step_scores)).max())
            assert diff < PARITY_TOL, f"candidate {c.index}: max |step diff| {diff:.2e}"


def test_interleaved_requests_get_what_they_get_alone(engine, prompts):
    alone = [_alone(engine, p, 4, seed) for p, seed in zip(prompts, (5, 6, 7), strict=True)]
    hold = threading.Event()
    first = Run(engine, prompts[0], 4, 5, hold=hold)
    first.start()
    wait_until(lambda: first.tokens >= 1, "the first request to start")
    others = [Run(engine, p, 4, s) for p, s in zip(prompts[1:], (6, 7), strict=True)]
    for r in others:
        r.start()
    wait_until(lambda: engine.pool.busy == 3, "both requests to be admitted beside it")
    hold.set()  # admitted while the first one runs; all three now decode together
    runs = [first, *others]
    for r in runs:
        r.join()
    for r, want, prompt in zip(runs, alone, prompts, strict=True):
        assert r.error is None, r.error
        assert r.control.timings.shared_rounds > 0, "the requests never shared a decode"
        assert [c.token_ids for c in r.cands] == [c.token_ids for c in want]
        _check_against_reference(engine, prompt, r.cands)
    assert engine.pool.busy == 0


def test_a_cancelled_request_frees_its_sequences_and_leaves_the_other_alone(engine, prompts):
    want = _alone(engine, prompts[1], 4, 11)
    free_before = len(engine.pool._free)
    hold = threading.Event()
    keep = Run(engine, prompts[1], 4, 11)
    quit_ = Run(engine, prompts[0], 4, 12, hold=hold, stop_after=6)
    quit_.start()
    wait_until(lambda: quit_.tokens >= 1, "the request that quits to start")
    keep.start()
    wait_until(lambda: engine.pool.busy == 2, "the other request to be admitted beside it")
    hold.set()  # it goes on for 5 more tokens beside the other, then stops listening
    quit_.join()
    keep.join()
    assert keep.error is None and quit_.error is None
    assert keep.control.timings.shared_rounds > 0
    assert [c.token_ids for c in keep.cands] == [c.token_ids for c in want]
    assert engine.pool.busy == 0 and len(engine.pool._free) >= free_before


def test_a_request_waits_for_sequences_when_the_pool_is_full(engine, prompts, monkeypatch):
    want = _alone(engine, prompts[2], 4, 21)
    monkeypatch.setattr(pool_admission, "MAX_SEQUENCES", 4)
    engine.pool.reset()
    hold = threading.Event()
    first = Run(engine, prompts[0], 4, 20, hold=hold)
    first.start()
    wait_until(lambda: first.tokens >= 1, "the first request to start")
    second = Run(engine, prompts[2], 4, 21)
    second.start()
    # the pool holds 4 sequences and cannot grow: the second request queues for them
    wait_until(lambda: len(engine.pool._queue) == 1, "the second request to queue")
    assert second.tokens == 0
    hold.set()
    first.join()
    second.join()
    assert second.error is None and first.error is None
    assert second.control.timings.queue_s > 0
    assert [c.token_ids for c in second.cands] == [c.token_ids for c in want]
    engine.pool.reset()


def test_the_pool_grows_for_concurrent_requests_and_then_keeps_its_context(engine, prompts):
    engine.pool.reset()
    before = engine.pool.rebuilds
    for _ in range(2):
        runs = [Run(engine, p, 2, 30 + i) for i, p in enumerate(prompts)]
        for r in runs:
            r.start()
        for r in runs:
            r.join()
        assert all(r.error is None for r in runs)
    # the first burst may rebuild it wider (at most once per request); the second fits
    grown = engine.pool.rebuilds
    assert grown - before <= 1 + len(prompts)
    runs = [Run(engine, p, 2, 40 + i) for i, p in enumerate(prompts)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    assert engine.pool.rebuilds == grown
    assert engine.pool.shape.n_seq >= 2 * len(prompts)


def test_a_prompt_that_starts_like_a_finished_one_reuses_its_cells(engine, prompts):
    """The next turn of a chat: its prompt starts with the last one's, whose cells the pool kept.
    It decodes only the new tokens, and its candidates equal a fresh prefill's (the tiny model in
    F32: token for token; step scores against the one-pass reference)."""
    first = prompts[0]
    turn = engine.tokenize(
        engine.render(
            [
                {"role": "user", "content": "What is 12 + 7?"},
                {"role": "assistant", "content": "19"},
                {"role": "user", "content": "And 19 + 5?"},
            ]
        )
    )
    shared = next(i for i, (a, b) in enumerate(zip(first, turn, strict=False)) if a != b)
    assert shared > 4, "the fixture's template should give the turns a common prefix"
    engine.pool.reset()
    cached_settings = GenerationSettings(max_new_tokens=48, kv_layout="streams", cache_prompt=True)
    engine.generate_all(first, 2, sampling(50), cached_settings)
    control = GenerationControl()
    reused = engine.generate_all(turn, 2, sampling(51), cached_settings, control=control)
    tm = control.timings
    assert tm.cached_prompt_tokens == shared  # what the first prompt and this one share
    assert tm.prefill_tokens == len(turn) - shared
    engine.pool.reset()
    fresh_settings = GenerationSettings(max_new_tokens=48, kv_layout="streams", cache_prompt=False)
    fresh_control = GenerationControl()
    fresh = engine.generate_all(turn, 2, sampling(51), fresh_settings, control=fresh_control)
    assert fresh_control.timings.cached_prompt_tokens == 0
    assert [c.token_ids for c in reused] == [c.token_ids for c in fresh]
    _check_against_reference(engine, turn, reused)


def test_reason_many_batches_prompts_and_keeps_their_order():
    from edge_metastone.reasoner import Reasoner

    prompts = [
        f"What is {a}+{b}*3?" for a, b in [(3, 4), (12, 7), (9, 9), (41, 3), (5, 15), (6, 2)]
    ]
    with Reasoner(n_threads=1) as r:
        many = r.reason_many(prompts, effort="low", seed=3, window=3)
        alone = [r.reason(p, effort="low", seed=3) for p in prompts]
        with pytest.raises(Exception, match="window"):
            r.reason_many(prompts, effort="low", window=0)
    assert [m.prompt_text for m in many] == [a.prompt_text for a in alone]
    assert any(m.timings["shared_rounds"] for m in many), "the prompts never shared a decode"
    same = sum(m.answer == a.answer for m, a in zip(many, alone, strict=True))
    assert same >= len(prompts) - 1, [
        (m.answer, a.answer) for m, a in zip(many, alone, strict=True)
    ]


def test_the_governor_caps_the_batch_below_the_size_that_gave_fewer_rows_per_second():
    from edge_metastone.engine.pool_types import BatchGovernor

    g = BatchGovernor()
    assert g.cap() is None
    for _ in range(g.MIN_SEEN):
        g.observe(8, 8 / 3000)  # 8 rows: 3000 rows/s
    assert g.cap() is None  # one size seen: no basis yet
    for _ in range(g.MIN_SEEN - 1):
        g.observe(4, 4 / 2000)
    assert g.cap() is None  # the second size not seen often enough
    g.observe(5, 5 / 2000)
    assert g.cap() == 16  # 8-15 rows best so far: try up to 16
    for _ in range(g.MIN_SEEN):
        g.observe(16, 16 / 2500)  # 16 rows gave less than 8
    assert g.cap() == 15  # two k=8 requests no longer run together
    for _ in range(40):
        g.observe(16, 16 / 5000)  # a memory-bound model: more rows, more rows/s
    assert g.cap() == 32
