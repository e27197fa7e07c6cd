"""Measure this machine with this model (a few seconds, once), for the budget scheduler."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from edge_metastone.engine.engine import Engine
from edge_metastone.engine.generate import GenerationSettings, TokenEvent
from edge_metastone.engine.sampling import SamplingSettings
from edge_metastone.scheduler import (
    CALIBRATION_BATCHES,
    Calibration,
    calibration_key,
    current_rss_bytes,
    load_cached,
    store,
)

logger = logging.getLogger(__name__)

_TEXT = (
    "Let us compute the sum of the divisors of 360 step by step. First factor 360 = 2^3 * 3^2 * 5. "
)


def _step_durations(
    engine: Engine, prompt: list[int], b: int, sampling: SamplingSettings, steps: int
) -> np.ndarray:
    """Seconds between consecutive decode steps of a b-candidate generation (candidate 0's tokens)."""
    stamps = []
    settings = GenerationSettings(max_new_tokens=steps + 1)
    for ev in engine.generate(prompt, b, sampling, settings):
        if isinstance(ev, TokenEvent) and ev.candidate == 0:
            stamps.append(time.perf_counter())
    return np.diff(np.asarray(stamps))


def measure(
    engine: Engine,
    n_threads: int,
    sampling: SamplingSettings,
    *,
    steps: int = 40,
    prefill_tokens: int = 256,
) -> Calibration:
    """Decode step time (sampling included) at batch sizes 1..32 and how it grows as the shared
    cache fills, prefill speed, and the loaded process's RSS."""
    model = engine.model
    ban = tuple((t, -1e9) for t in model.eog_ids)
    sampling = dataclasses.replace(sampling, seed=0, logit_bias=sampling.logit_bias + ban)
    prompt = engine.tokenize(_TEXT)[:32]
    engine.generate_all(prompt, 1, sampling, GenerationSettings(max_new_tokens=4))
    base_rss = current_rss_bytes()
    step_seconds: dict[int, float] = {}
    attn: dict[int, float] = {}
    for b in CALIBRATION_BATCHES:
        d = _step_durations(engine, prompt, b, sampling, steps)
        # step i attends over ~(prompt + b*i) cells: fit duration = a + slope * i
        slope, a = np.polyfit(np.arange(len(d)), d, 1)
        step_seconds[b] = float(max(a, d.min()))
        attn[b] = float(max(slope, 0.0) / (b * b))  # each step adds b cells for each of b sequences
    long_prompt = (engine.tokenize(_TEXT) * (prefill_tokens // 16 + 1))[:prefill_tokens]
    engine.generate_all(long_prompt, 1, sampling, GenerationSettings(max_new_tokens=1))
    prefill_tps = len(long_prompt) / max(engine.last_timings.prefill_s, 1e-6)
    cal = Calibration(
        step_seconds=step_seconds,
        prefill_tokens_per_s=prefill_tps,
        base_rss_bytes=base_rss,
        n_threads=n_threads,
        attn_s_per_seq_cell=attn,
        key=calibration_key(engine.model_file.path, n_threads, _cost_key(engine, sampling)),
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


def _cost_key(engine: Engine, sampling: SamplingSettings) -> str:
    # layers offloaded to a GPU change every timing: a CPU calibration never serves a GPU run
    return f"{sampling_cost_key(sampling)}-gpu{getattr(engine, 'n_gpu_layers', 0)}"


def calibration_for(
    engine: Engine, n_threads: int, sampling: SamplingSettings, *, refresh: bool = False
) -> Calibration:
    """The cached calibration of (model, machine, threads, sampling), measured once if needed."""
    key = calibration_key(engine.model_file.path, n_threads, _cost_key(engine, sampling))
    cal = None if refresh else load_cached(key)
    if cal is None:
        logger.info("calibrating this machine for %s (once)", engine.model_file.path.name)
        cal = measure(engine, n_threads, sampling)
        store(cal)
    return cal
