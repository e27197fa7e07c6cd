"""Measure this machine with this model (a few seconds, once), for the budget scheduler."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from edge_metastone.backend import Backend
from edge_metastone.scheduler import (
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
    SamplingSettings,
    Timings,
    TokenEvent,
)

logger = logging.getLogger(__name__)

_TEXT = (
    "Let us compute the sum of the divisors of 360 step by step. First factor 360 = 2^3 * 3^2 * 5. "
)


def _step_durations(
    backend: Backend, prompt: list[int], b: int, sampling: SamplingSettings, steps: int
) -> np.ndarray:
    """Seconds between consecutive decode steps of a b-candidate generation (candidate 0's tokens)."""
    stamps = []
    settings = GenerationSettings(max_new_tokens=steps + 1)
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
    prefill_tokens: int = 256,
) -> Calibration:
    """Decode step time (sampling included) at batch sizes 1..32 and how it grows as the shared
    cache fills, prefill speed, and the loaded process's RSS."""
    ban = tuple((t, -1e9) for t in backend.eog_ids)
    sampling = dataclasses.replace(sampling, seed=0, logit_bias=sampling.logit_bias + ban)
    prompt = backend.tokenize(_TEXT)[:32]
    _run(backend, prompt, sampling, 4)
    base_rss = current_rss_bytes()
    step_seconds: dict[int, float] = {}
    attn: dict[int, float] = {}
    for b in CALIBRATION_BATCHES:
        d = _step_durations(backend, prompt, b, sampling, steps)
        # step i attends over ~(prompt + b*i) cells: fit duration = a + slope * i
        slope, a = np.polyfit(np.arange(len(d)), d, 1)
        step_seconds[b] = float(max(a, d.min()))
        attn[b] = float(max(slope, 0.0) / (b * b))  # each step adds b cells for each of b sequences
    long_prompt = (backend.tokenize(_TEXT) * (prefill_tokens // 16 + 1))[:prefill_tokens]
    prefill_s = _run(backend, long_prompt, sampling, 1).prefill_s
    prefill_tps = len(long_prompt) / max(prefill_s, 1e-6)
    cal = Calibration(
        step_seconds=step_seconds,
        prefill_tokens_per_s=prefill_tps,
        base_rss_bytes=base_rss,
        n_threads=n_threads,
        attn_s_per_seq_cell=attn,
        key=_key(backend, n_threads, sampling),
    )
    logger.info(
        "calibrated: step %s s, prefill %.0f tok/s, base RSS %.0f MiB",
        {b: round(s, 4) for b, s in step_seconds.items()},
        prefill_tps,
        base_rss / 2**20,
    )
    return cal


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
