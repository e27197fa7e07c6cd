"""Measure this machine with this model for the budget scheduler (once, then cached: ~20 s for
a 200M model on 2 cores, ~90 s for 1B)."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from edge_metastone.backend import Backend
from edge_metastone.scheduler import (
    ATTENTION_BATCHES,
    CALIBRATION_BATCHES,
    Calibration,
    calibration_key,
    current_rss_bytes,
    load_cached,
    store,
)
from edge_metastone.types import (
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
    Timings,
    TokenEvent,
)

logger = logging.getLogger(__name__)

_TEXT = (
    "Let us compute the sum of the divisors of 360 step by step. First factor 360 = 2^3 * 3^2 * 5. "
)


def _step_durations(
    backend: Backend,
    prompt: list[int],
    b: int,
    sampling: SamplingSettings,
    steps: int,
    layout: KVLayout = KVLayout.AUTO,
    kv_type: KVType = KVType.F16,
) -> np.ndarray:
    """Seconds between consecutive decode steps of a b-candidate generation (candidate 0's tokens)."""
    stamps = []
    settings = GenerationSettings(max_new_tokens=steps + 1, kv_layout=layout, kv_type=kv_type)
    for ev in backend.generate(prompt, b, sampling, settings):
        if isinstance(ev, TokenEvent) and ev.candidate == 0:
            stamps.append(time.perf_counter())
    return np.diff(np.asarray(stamps))


def measure(
    backend: Backend,
    n_threads: int,
    sampling: SamplingSettings,
    *,
    steps: int = 40,
    long_prompt_tokens: int = 512,
) -> Calibration:
    """Decode step time (sampling included) at batch sizes 1..32, what each attended and each
    masked KV cell adds to a step, prefill speed, and the loaded process's RSS.

    - Step time: b candidates over a 32-token prompt, one KV stream each (a step's attention
      hardly grows over a few dozen steps): the intercept of a line fit.
    - Attended cells: the same b candidates over a `long_prompt_tokens` prompt, which each
      candidate attends to in full; the median step's difference / (b x the extra cells).
    - Masked cells: 32 candidates in one unified cache, where each step adds 31 cells every
      candidate is masked out of; the slope of its step times, less the attended cells' share.
    - A q8_0 cache's attended cells: the long prompt at b=8 again with q8_0 K/V.
    """
    ban = tuple((t, -1e9) for t in backend.eog_ids)
    sampling = dataclasses.replace(sampling, seed=0, logit_bias=sampling.logit_bias + ban)
    text = backend.tokenize(_TEXT)
    prompt = text[:32]
    n_long = min(long_prompt_tokens, backend.facts.n_ctx_train - steps - 2)
    long_prompt = (text * (n_long // max(len(text), 1) + 1))[:n_long]
    extra_cells = len(long_prompt) - len(prompt)
    _run(backend, prompt, sampling, 4)
    base_rss = current_rss_bytes()
    # one cache per candidate, named (AUTO would keep these short runs' small prompt in one cache)
    own = KVLayout.STREAMS if KVLayout.STREAMS in backend.kv_layouts else KVLayout.AUTO
    step_seconds, median = _step_times(backend, prompt, sampling, steps, own)
    attn, q8 = _attended(backend, long_prompt, sampling, steps // 2, own, median, extra_cells)
    masked = _masked(backend, prompt, sampling, 2 * steps, attn)
    prefill_s = _run(backend, long_prompt, sampling, 1).prefill_s
    prefill_tps = len(long_prompt) / max(prefill_s, 1e-6)
    cal = Calibration(
        step_seconds=step_seconds,
        prefill_tokens_per_s=prefill_tps,
        base_rss_bytes=base_rss,
        n_threads=n_threads,
        attn_s_per_seq_cell=attn,
        masked_s_per_seq_cell=masked,
        quantized_attn_factor=q8,
        key=_key(backend, n_threads, sampling),
    )
    logger.info(
        "calibrated: step %s s, attended cell %s s, masked cell %.2e s, q8_0 x%.2f, "
        "prefill %.0f tok/s, base RSS %.0f MiB",
        {b: round(s, 4) for b, s in step_seconds.items()},
        {b: f"{s:.2e}" for b, s in attn.items()},
        masked,
        q8,
        prefill_tps,
        base_rss / 2**20,
    )
    return cal


def _step_times(
    backend: Backend, prompt: list[int], sampling: SamplingSettings, steps: int, own: KVLayout
) -> tuple[dict[int, float], dict[int, float]]:
    """Per batch size: a step's time (the intercept of a line fit) and the median step."""
    step_seconds: dict[int, float] = {}
    median: dict[int, float] = {}
    for b in CALIBRATION_BATCHES:
        d = _step_durations(backend, prompt, b, sampling, steps, own)
        _, a = np.polyfit(np.arange(len(d)), d, 1)
        step_seconds[b] = float(max(a, d.min()))
        median[b] = float(np.median(d))
    return step_seconds, median


def _attended(
    backend: Backend,
    long_prompt: list[int],
    sampling: SamplingSettings,
    steps: int,
    own: KVLayout,
    median: dict[int, float],
    extra_cells: int,
) -> tuple[dict[int, float], float]:
    """Seconds per (sequence x attended cell) per batch size, and a q8_0 cache's factor."""
    attn: dict[int, float] = {}
    for b in ATTENTION_BATCHES:
        d = _step_durations(backend, long_prompt, b, sampling, steps, own)
        attn[b] = max(float(np.median(d)) - median[b], 0.0) / (b * extra_cells)
    q8 = 1.0
    if KVType.Q8_0 in backend.kv_types and attn[8] > 0:
        d = _step_durations(backend, long_prompt, 8, sampling, steps, own, KVType.Q8_0)
        q8 = max(float(np.median(d)) - median[8], 0.0) / (8 * extra_cells) / attn[8]
    return attn, q8


def _masked(
    backend: Backend,
    prompt: list[int],
    sampling: SamplingSettings,
    steps: int,
    attn: dict[int, float],
) -> float:
    """Seconds per (sequence x masked cell) in one unified cache (0 without one)."""
    if KVLayout.UNIFIED not in backend.kv_layouts:
        return 0.0
    b = CALIBRATION_BATCHES[-1]
    d = _step_durations(backend, prompt, b, sampling, steps, KVLayout.UNIFIED)
    slope = float(np.polyfit(np.arange(len(d)), d, 1)[0])
    # each step adds 1 attended and b-1 masked cells to each of b sequences
    return max(slope - attn[b] * b, 0.0) / (b * (b - 1))


def sampling_cost_key(s: SamplingSettings) -> str:
    """The sampling settings that change the cost of a step (not the seed or the biases)."""
    return f"t{s.temperature > 0}-k{s.top_k}-p{s.top_p}-m{s.min_p}-r{s.repeat_penalty != 1.0}"


def _key(backend: Backend, n_threads: int, sampling: SamplingSettings) -> str:
    # the runtime names its build and any GPU offload: a CPU calibration never serves a GPU run
    return calibration_key(backend.path, n_threads, backend.runtime, sampling_cost_key(sampling))


def _run(backend: Backend, prompt: list[int], sampling: SamplingSettings, n: int) -> Timings:
    """Generate n tokens for one candidate; this run's own timings."""
    control = GenerationControl()
    for _ in backend.generate(
        prompt, 1, sampling, GenerationSettings(max_new_tokens=n), control=control
    ):
        pass
    return control.timings


def calibration_for(
    backend: Backend, n_threads: int, sampling: SamplingSettings, *, refresh: bool = False
) -> Calibration:
    """The cached calibration of (model, machine, threads, sampling), measured once if needed."""
    key = _key(backend, n_threads, sampling)
    cal = None if refresh else load_cached(key)
    if cal is None:
        logger.info("calibrating this machine for %s (once)", backend.path.name)
        cal = measure(backend, n_threads, sampling)
        store(cal)
    return cal
