"""Measure this machine with this model (a few seconds, once), for the budget scheduler."""

from __future__ import annotations

import logging

from edge_metastone.engine.engine import Engine
from edge_metastone.engine.generate import GenerationSettings
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


def measure(
    engine: Engine, n_threads: int, *, steps: int = 8, prefill_tokens: int = 256
) -> Calibration:
    """Decode step time at batch sizes 1..32, prefill speed, and the loaded process's RSS."""
    model = engine.model
    ban = tuple((t, -1e9) for t in range(model.n_vocab) if model.is_eog(t))
    sampling = SamplingSettings(temperature=1.0, seed=0, logit_bias=ban)
    prompt = engine.tokenize(_TEXT)[:32]
    engine.generate_all(prompt, 1, sampling, GenerationSettings(max_new_tokens=4))
    base_rss = current_rss_bytes()
    step_seconds: dict[int, float] = {}
    for b in CALIBRATION_BATCHES:
        engine.generate_all(prompt, b, sampling, GenerationSettings(max_new_tokens=steps + 1))
        tm = engine.last_timings
        step_seconds[b] = (tm.total_s - tm.prefill_s) / (tm.decode_steps + 1)
    long_prompt = (engine.tokenize(_TEXT) * (prefill_tokens // 16 + 1))[:prefill_tokens]
    engine.generate_all(long_prompt, 1, sampling, GenerationSettings(max_new_tokens=1))
    prefill_tps = len(long_prompt) / max(engine.last_timings.prefill_s, 1e-6)
    cal = Calibration(
        step_seconds=step_seconds,
        prefill_tokens_per_s=prefill_tps,
        base_rss_bytes=base_rss,
        n_threads=n_threads,
        key=calibration_key(engine.model_file.path, n_threads),
    )
    logger.info(
        "calibrated: step %s s, prefill %.0f tok/s, base RSS %.0f MiB",
        {b: round(s, 4) for b, s in step_seconds.items()},
        prefill_tps,
        base_rss / 2**20,
    )
    return cal


def calibration_for(engine: Engine, n_threads: int, *, refresh: bool = False) -> Calibration:
    """The cached calibration of (model, machine, threads), measuring and caching it if needed."""
    key = calibration_key(engine.model_file.path, n_threads)
    cal = None if refresh else load_cached(key)
    if cal is None:
        logger.info("calibrating this machine for %s (once)", engine.model_file.path.name)
        cal = measure(engine, n_threads)
        store(cal)
    return cal
