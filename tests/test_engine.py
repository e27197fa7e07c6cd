"""The runtime: batched candidates, online step scores, sampling, stops, limits, control."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edge_metastone.chat import ChatTemplate
from edge_metastone.engine.engine import Engine
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.errors import ContextExceededError, InvalidRequestError
from edge_metastone.types import (
    FinishEvent,
    FinishReason,
    GenerationControl,
    GenerationSettings,
    SamplingSettings,
    StepEvent,
    TokenEvent,
)
from reference_scorer import scored_positions

PARITY_TOL = 1e-4
DELIM, THINK, THINK_END = 258, 1003, 1004  # fixture ids of ".\n\n", "<think>", "</think>"
# The tiny random model rarely samples a delimiter by itself: bias it so steps happen.
STEPPY = ((DELIM, 4.0),)


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    with Engine(tiny_gguf("f32"), parity=True) as e:
        yield e


@pytest.fixture(scope="module")
def prompt_ids(engine):
    return engine.tokenize(engine.render([{"role": "user", "content": "What is 12 + 7?"}]))


def sampled(seed: int = 3, **kw) -> SamplingSettings:
    return SamplingSettings(temperature=1.0, top_p=0.95, seed=seed, logit_bias=STEPPY, **kw)


def test_online_step_scores_equal_full_pass_score(engine, prompt_ids):
    cands = engine.generate_all(prompt_ids, 4, sampled(), GenerationSettings(max_new_tokens=120))
    n_steps = 0
    for c in cands:
        ref = score_tokens(engine.model_file, engine.model, prompt_ids + c.token_ids)
        assert c.step_positions == ref.positions
        # positions also by the reference scorer's own, independent implementation of SPEC §1
        assert c.step_positions == scored_positions(
            prompt_ids + c.token_ids, [DELIM], THINK, THINK_END
        )
        if ref.step_scores:
            diff = float(np.abs(np.subtract(c.step_scores, ref.step_scores)).max())
            assert diff < PARITY_TOL, f"candidate {c.index}: max |step diff| {diff:.2e}"
        assert c.score == pytest.approx(ref.score, abs=PARITY_TOL)
        n_steps += len(c.step_scores)
    assert n_steps >= 8, "the test must exercise scoring"


def test_prompt_without_think_scores_prompt_steps_too(engine):
    """No <think>: the window starts at 0, so delimiters in the prompt are steps as well."""
    ids = engine.tokenize("Add 3 and 4.\n\nThen double it.\n\nNow answer")
    c = engine.generate_all(ids, 1, sampled(seed=5), GenerationSettings(max_new_tokens=60))[0]
    ref = score_tokens(engine.model_file, engine.model, ids + c.token_ids)
    assert c.step_positions == ref.positions and ref.positions[0] < len(ids)
    assert np.allclose(c.step_scores, ref.step_scores, atol=PARITY_TOL)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingSettings(temperature=0.0, logit_bias=((DELIM, 2.0),)),
        sampled(seed=11),
        sampled(seed=12, top_k=40, min_p=0.02, repeat_penalty=1.2),
    ],
    ids=["greedy", "sampled", "topk-minp-penalty"],
)
def test_batched_equals_separate_runs(engine, prompt_ids, sampling):
    gen = GenerationSettings(max_new_tokens=80)
    batched = engine.generate_all(prompt_ids, 4, sampling, gen)
    for c in batched:
        alone = engine.generate_all(prompt_ids, 1, sampling, gen, candidate_offset=c.index)[0]
        assert alone.token_ids == c.token_ids, f"candidate {c.index} depends on its batch"
        assert alone.step_scores == pytest.approx(c.step_scores, abs=PARITY_TOL)


def test_seeds(engine, prompt_ids):
    gen = GenerationSettings(max_new_tokens=40)
    a = engine.generate_all(prompt_ids, 3, sampled(seed=7), gen)
    b = engine.generate_all(prompt_ids, 3, sampled(seed=7), gen)
    c = engine.generate_all(prompt_ids, 3, sampled(seed=8), gen)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) == 3, "candidates of one request differ"


def test_greedy_candidates_are_identical(engine, prompt_ids):
    cands = engine.generate_all(
        prompt_ids, 3, SamplingSettings(temperature=0), GenerationSettings(max_new_tokens=30)
    )
    assert cands[0].token_ids == cands[1].token_ids == cands[2].token_ids


def test_event_stream(engine, prompt_ids):
    texts: dict[int, str] = {}
    steps: dict[int, list[int]] = {}
    finished = []
    for ev in engine.generate(prompt_ids, 3, sampled(), GenerationSettings(max_new_tokens=60)):
        if isinstance(ev, TokenEvent):
            texts[ev.candidate] = texts.get(ev.candidate, "") + ev.text
        elif isinstance(ev, StepEvent):
            steps.setdefault(ev.candidate, []).append(ev.position)
            assert 0 < ev.score < 1 and 0 < ev.running_score < 1
        elif isinstance(ev, FinishEvent):
            finished.append(ev.result)
            texts[ev.candidate] = texts.get(ev.candidate, "") + ev.text_tail
    assert sorted(c.index for c in finished) == [0, 1, 2]
    for c in finished:
        assert texts.get(c.index, "") == c.text
        assert set(steps.get(c.index, [])) <= set(c.step_positions)


def test_stop_string(engine, prompt_ids):
    gen = GenerationSettings(max_new_tokens=60)
    free = engine.generate_all(prompt_ids, 1, sampled(seed=21), gen)[0]
    stop = free.text[20:24]
    cut = engine.generate_all(
        prompt_ids, 1, sampled(seed=21), GenerationSettings(60, stop=(stop,))
    )[0]
    assert cut.finish_reason is FinishReason.STOP
    at = free.text.find(stop)
    # the kept tokens are those that end before the stop string; text is exactly their decoding
    assert cut.token_ids == free.token_ids[: cut.n_tokens]
    assert engine.model.detokenize(cut.token_ids) == cut.text == free.text[: len(cut.text)]
    assert len(cut.text) <= at < len(engine.model.detokenize(free.token_ids[: cut.n_tokens + 1]))
    # no character of the stop string is ever streamed; the stream rebuilds the text
    streamed, tail = "", ""
    settings = GenerationSettings(60, stop=(stop,))
    for ev in engine.generate(prompt_ids, 1, sampled(seed=21), settings):
        if isinstance(ev, TokenEvent):
            streamed += ev.text
        elif isinstance(ev, FinishEvent):
            tail = ev.text_tail
    assert len(streamed) <= at and streamed + tail == cut.text


def test_answer_budget_after_think_end(engine, prompt_ids):
    sp = SamplingSettings(temperature=1.0, seed=2, logit_bias=((THINK_END, 6.0),))
    gen = GenerationSettings(max_new_tokens=200, max_answer_tokens=5)
    for c in engine.generate_all(prompt_ids, 3, sp, gen):
        assert THINK_END in c.token_ids
        after = c.token_ids[c.token_ids.index(THINK_END) + 1 :]
        assert len(after) <= 5
        assert c.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_length_limit_and_truncation_flag(engine, prompt_ids):
    sp = SamplingSettings(temperature=1.0, seed=4, logit_bias=((1002, -100.0), (1000, -100.0)))
    c = engine.generate_all(prompt_ids, 1, sp, GenerationSettings(max_new_tokens=17))[0]
    assert c.n_tokens == 17 and c.finish_reason is FinishReason.LENGTH and c.truncated


def test_prune_and_halt(engine, prompt_ids):
    control = GenerationControl()
    reasons = {}
    for ev in engine.generate(
        prompt_ids, 3, sampled(), GenerationSettings(max_new_tokens=100), control=control
    ):
        if isinstance(ev, TokenEvent) and ev.candidate == 1:
            control.prune(1)
        if isinstance(ev, FinishEvent):
            reasons[ev.candidate] = ev.result
            if ev.candidate == 1:
                control.halt()
    assert reasons[1].finish_reason is FinishReason.PRUNED and reasons[1].n_tokens == 1
    assert {reasons[i].finish_reason for i in (0, 2)} <= {FinishReason.HALTED, FinishReason.EOS}


def test_logprobs(engine, prompt_ids):
    c = engine.generate_all(
        prompt_ids, 1, sampled(), GenerationSettings(max_new_tokens=20, logprobs=True)
    )[0]
    assert c.mean_logprob is not None and math.isfinite(c.mean_logprob) and c.mean_logprob < 0


def test_bad_requests(engine, prompt_ids):
    with pytest.raises(InvalidRequestError, match="k must be"):
        engine.generate_all(prompt_ids, 0, sampled(), GenerationSettings(10))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate_all([], 1, sampled(), GenerationSettings(10))
    with pytest.raises(ContextExceededError, match="context"):
        engine.generate_all(prompt_ids * 200, 1, sampled(), GenerationSettings(10))
    with pytest.raises(ContextExceededError):
        engine.generate_all(prompt_ids, 1, sampled(), GenerationSettings(max_new_tokens=5000))
    with pytest.raises(InvalidRequestError):
        SamplingSettings(temperature=-1)
    with pytest.raises(InvalidRequestError):
        GenerationSettings(max_new_tokens=0)


def test_headless_model_generates_without_scores(tiny_untied_hf, tmp_path):
    from edge_metastone.converters.convert import convert

    path = tmp_path / "nohead.gguf"
    convert(tiny_untied_hf, path, "q8_0")
    with Engine(path) as e:
        assert not e.has_head
        ids = e.tokenize(e.render([{"role": "user", "content": "hi"}]))
        c = e.generate_all(ids, 2, sampled(), GenerationSettings(max_new_tokens=20))
    assert all(x.score is None and x.step_scores == [] and x.n_tokens > 0 for x in c)


def test_quantized_model_generates(tiny_gguf, prompt_ids):
    """A Q4_K_M model's online step scores are its own full pass's on the same tokens, its
    candidate score their aggregate, and they track the F32 model's on those tokens."""
    from edge_metastone.sprm import trajectory_score

    with Engine(tiny_gguf("q4_k_m")) as e, Engine(tiny_gguf("f32")) as full:
        c = e.generate_all(prompt_ids, 4, sampled(), GenerationSettings(max_new_tokens=50))
        assert len(c) == 4 and sum(len(x.step_scores) for x in c) >= 8
        for x in c:
            ids = prompt_ids + x.token_ids
            own = e.score_tokens(ids, parity=False).step_scores
            f32 = full.score_tokens(ids, parity=False).step_scores
            assert len(x.step_scores) == len(own) == len(f32)
            online = float(np.abs(np.subtract(x.step_scores, own)).max())
            # batched decode vs one pass through 4-bit kernels: 0.022 measured
            assert online < 0.05, f"online vs full pass: max |diff| {online:.3g}"
            assert x.score == pytest.approx(trajectory_score(x.step_scores), rel=1e-12)
            # 4-bit weights on a random model move a step by up to 0.22 (measured), the mean less
            moved = np.abs(np.subtract(x.step_scores, f32))
            assert moved.max() < 0.3 and moved.mean() < 0.15, f"vs F32: {moved.max():.3g}"


def test_chat_template_is_sandboxed():
    evil = "{{ messages.append({'role': 'x'}) }}{{ messages }}"
    with pytest.raises(InvalidRequestError, match="unsafe"):
        ChatTemplate(evil).render([{"role": "user", "content": "hi"}])
    probe = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequestError):
        ChatTemplate(probe).render([{"role": "user", "content": "hi"}])


def test_chat_template_renders_model_format(engine):
    text = engine.render([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_long_prompt_prefilled_in_several_batches(engine):
    """A prompt over 512 tokens (prefill in chunks, no <think>): online scores equal the full pass."""
    ids = engine.tokenize("Add 3 and 4.\n\nThen double it.\n\n" * 60)
    assert len(ids) > 512
    c = engine.generate_all(ids, 2, sampled(seed=8), GenerationSettings(max_new_tokens=40))
    for cand in c:
        ref = score_tokens(engine.model_file, engine.model, ids + cand.token_ids)
        assert cand.step_positions == ref.positions and len(ref.positions) > 100
        assert np.allclose(cand.step_scores, ref.step_scores, atol=PARITY_TOL)


def test_native_capture_equals_the_python_callback(engine, prompt_ids, monkeypatch):
    """The C eval callback (built with the package) copies exactly what the Python one copies:
    the features of a two-chunk prefill, and a scored k=4 generation, bit for bit."""
    import functools

    from edge_metastone.engine import capture, pool_admission
    from edge_metastone.engine.scoring import forward_features

    assert capture.native_available(), "the C feature capture was not built at install"
    layer = engine.feature_layer
    long_ids = (prompt_ids * 60)[:700]  # > PREFILL_BATCH: the capture is taken chunk by chunk
    native, _ = forward_features(engine.model, long_ids, layer)
    settings = GenerationSettings(max_new_tokens=40)
    native_cands = engine.generate_all(prompt_ids, 4, sampled(seed=8), settings)
    python_capture = functools.partial(capture.FeatureCapture, native=False)
    monkeypatch.setattr("edge_metastone.engine.scoring.FeatureCapture", python_capture)
    monkeypatch.setattr(pool_admission, "FeatureCapture", python_capture)
    engine.pool.reset()  # the next generation builds its context with the Python callback
    py, _ = forward_features(engine.model, long_ids, layer)
    py_cands = engine.generate_all(prompt_ids, 4, sampled(seed=8), settings)
    assert native.shape == py.shape == (700, engine.model.n_embd)
    assert np.array_equal(native, py)
    assert [c.step_scores for c in native_cands] == [c.step_scores for c in py_cands]
    assert [c.token_ids for c in native_cands] == [c.token_ids for c in py_cands]
    assert sum(len(c.step_scores) for c in native_cands) > 0


def test_native_capture_reports_overflow(tiny_gguf):
    """More rows than the buffer holds is an error, not a write past its end."""
    from edge_metastone.engine.capture import FeatureCapture
    from edge_metastone.engine.llama import Batch, Context, ContextSettings, Model
    from edge_metastone.errors import EdgeMetastoneError

    with Model(tiny_gguf("f32")) as model:
        cap = FeatureCapture(model.n_layer - 2, model.n_embd, capacity=4)
        settings = ContextSettings(n_ctx=64, n_batch=16)
        with (
            Context(model, settings, cb_eval=cap.callback, cb_user_data=cap.user_data) as ctx,
            Batch(16) as batch,
        ):
            list(ctx.prefill(batch, list(range(300, 316))))
            with pytest.raises(EdgeMetastoneError, match="overflowed"):
                cap.take()


@pytest.mark.parametrize("max_gap", [0, 4])
def test_per_sequence_kv_streams_keep_parity(engine, prompt_ids, monkeypatch, max_gap):
    """One KV stream per candidate: candidates equal separate runs and online step scores equal
    the one-pass scorer's, also after candidates in the middle end. The live sequence ids then have
    gaps: short ones are filled with placeholders (max_gap 4), longer ones (and all, with max_gap
    0) make llama.cpp split each decode into several ubatches."""
    from edge_metastone.engine import pool_rounds

    monkeypatch.setattr(pool_rounds, "MAX_FILLED_GAP", max_gap)
    gen = GenerationSettings(max_new_tokens=60, kv_layout="streams")
    sampling = sampled(seed=21)
    control = GenerationControl()
    made = dict.fromkeys(range(8), 0)
    ends = {1: 5, 3: 20, 2: 30, 4: 30, 5: 30}  # live 0,2,4-7 -> 0,2,4-7 -> 0,6,7 (a gap of 5)
    cands = []
    for ev in engine.generate(prompt_ids, 8, sampling, gen, control=control):
        if isinstance(ev, TokenEvent):
            made[ev.candidate] += 1
            if ends.get(ev.candidate) == made[ev.candidate]:
                control.prune(ev.candidate)
        elif isinstance(ev, FinishEvent):
            cands.append(ev.result)
    assert control.timings.kv_layout == "streams"
    assert sorted(c.n_tokens for c in cands) == [5, 20, 30, 30, 30, 60, 60, 60]
    n_steps = 0
    for c in cands:
        alone = engine.generate_all(
            prompt_ids,
            1,
            sampling,
            dataclasses.replace(gen, kv_layout="unified"),
            candidate_offset=c.index,
        )[0]
        assert alone.token_ids[: c.n_tokens] == c.token_ids, f"candidate {c.index} differs"
        ref = score_tokens(engine.model_file, engine.model, prompt_ids + c.token_ids)
        assert c.step_positions == ref.positions
        if ref.step_scores:
            diff = float(np.abs(np.subtract(c.step_scores, ref.step_scores)).max())
            assert diff < PARITY_TOL, f"candidate {c.index}: max |step diff| {diff:.2e}"
        n_steps += len(c.step_scores)
    assert n_steps > 0


def test_auto_layout_is_named_in_the_timings(engine, prompt_ids):
    """AUTO runs streams for k >= 2 and for one candidate (a stream of the shared context: the
    same work as a unified cache of one sequence), unified for a prompt that k streams would copy
    into more than 1.5x the cells, and the timings say which."""
    long_prompt = (prompt_ids * 40)[:300]  # 3 x 380 cells in streams vs 540 in one cache
    for prompt, k, layout in (
        (prompt_ids, 1, "streams"),
        (prompt_ids, 3, "streams"),
        (long_prompt, 3, "unified"),
    ):
        control = GenerationControl()
        engine.generate_all(
            prompt, k, sampled(seed=1), GenerationSettings(max_new_tokens=80), control=control
        )
        assert (control.timings.kv_layout, control.timings.kv_type) == (layout, "f32")
    with pytest.raises(InvalidRequestError, match="kv_layout"):
        GenerationSettings(kv_layout="paged")


def test_quantized_kv_cache(tiny_gguf, prompt_ids):
    """q8_0 / q4_0 KV caches run (flash attention on, as a quantized V needs) and move step
    scores only a little from the F16 cache's on the same tokens; parity mode refuses them."""
    from edge_metastone.engine.llama import ContextSettings

    with Engine(tiny_gguf("f32")) as e:
        gen = GenerationSettings(max_new_tokens=60, kv_type="q8_0")
        (cand,) = e.generate_all(prompt_ids, 1, sampled(seed=4), gen)
        assert cand.n_tokens > 0 and len(cand.step_scores) >= 4
        ids = prompt_ids + cand.token_ids
        f16 = score_tokens(e.model_file, e.model, ids, parity=False)
        assert len(f16.step_scores) >= 4 and np.std(f16.step_scores) > 0.05  # something to track
        # measured on this random model: q8_0 max 0.0075; q4_0 max 0.13, mean 0.07, correlation
        # 0.99 (bench/kv_quant.py measures a real-size one). The quantized cache must really run
        # (q4_0 moves the scores, more than q8_0) and still track F16's step by step.
        moved = {}
        for kv, tol, mean_tol in (("q8_0", 0.02, 0.01), ("q4_0", 0.2, 0.1)):
            q = score_tokens(e.model_file, e.model, ids, parity=False, kv_type=kv)
            d = np.abs(np.subtract(q.step_scores, f16.step_scores))
            moved[kv] = float(d.max())
            assert d.max() < tol and d.mean() < mean_tol, f"{kv}: max |step diff| {d.max():.3g}"
            r = np.corrcoef(q.step_scores, f16.step_scores)[0, 1]
            assert r > 0.95, f"{kv}: correlation with F16's step scores {r:.3f}"
        assert 1e-4 < moved["q8_0"] < moved["q4_0"], moved
    with pytest.raises(InvalidRequestError):
        ContextSettings(n_ctx=64, parity=True, kv_type="q8_0")
    with pytest.raises(InvalidRequestError):
        GenerationSettings(kv_type="q5_1")
