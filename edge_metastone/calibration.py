"""Measure this machine with this model for the budget scheduler, check the measurement, and cache
it (~20 s for a 200M model on 2 cores, ~90 s for 1B).

A measurement is cached only when it passes three checks (a loaded machine can fail each):
- a decode step does not get faster as the batch grows (beyond noise);
- two runs of each batch size, one pass apart, agree;
- a quick real run of the request's shape (its prompt length and k) takes what the calibration
  predicts for it, within 2x.
A batch size a check flags is measured again (at most `MAX_REMEASURE` rounds), the real run once
more; what still fails is named, the calibration is not cached, and this process plans with a
corrected copy (no step faster than a smaller batch's, scaled to the real run).

A cached calibration is re-checked when a run took more than 2x (or less than half) of what it
predicted (`run_disagreement`, `mark_suspect`): the next use runs the quick real run again and
measures anew when that disagrees too. Progress goes to an optional callback (`CalibrationProgress`;
the CLI draws it on stderr); the library only logs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_metastone.backend import Backend
from edge_metastone.paths import cache_dir, write_text_atomic
from edge_metastone.scheduler import MIB, Calibration, Request, predict
from edge_metastone.types import (
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    ModelFacts,
    SamplingSettings,
    Timings,
    TokenEvent,
)

logger = logging.getLogger(__name__)

CALIBRATION_BATCHES = (1, 2, 4, 8, 16, 32)
ATTENTION_BATCHES = (1, 8, 32)  # batch sizes at which the cost of an attended cell is measured

MONOTONE_SLACK = 0.15  # a larger batch's step may look this much faster (noise), no more
NOISE_S = 20e-6  # differences below this many seconds per step are timer noise
REPEAT_RATIO = 1.5  # two runs of one batch size agree within this factor
PROBE_RATIO = 2.0  # a real run of the request's shape agrees with the prediction within this
RECHECK_RATIO = 2.0  # a request's run this far from its prediction makes the cache suspect
MIN_OBSERVED_STEPS = 8  # shorter runs are too noisy to judge a calibration by
MAX_REMEASURE = 2  # rounds of measuring again the batch sizes a check flagged

_TEXT = (
    "Let us compute the sum of the divisors of 360 step by step. First factor 360 = 2^3 * 3^2 * 5. "
)

# one measurement: (backend, prompt, batch size, sampling, decode steps, layout, KV type) ->
# seconds between candidate 0's consecutive tokens
Meter = Callable[[Backend, list[int], int, SamplingSettings, int, KVLayout, KVType], np.ndarray]


class CalibrationStatus(str, enum.Enum):
    """Where a request's calibration came from, and whether getting it cost time."""

    NONE = "none"  # none was needed (a fixed effort) and none was at hand
    GIVEN = "given"  # the caller passed one (never re-checked)
    CACHED = "cached"  # from memory or disk, no work
    MEASURED = "measured"  # measured now (first use on this machine, or --recalibrate)
    RECHECKED = "rechecked"  # a suspect cache re-checked with a quick real run: it held
    REFRESHED = "refreshed"  # a suspect cache re-checked, found wrong, and measured again


@dataclass(frozen=True)
class CalibrationProgress:
    """One progress report: `done` of `total` work units (a unit ~ one decode step of one
    sequence; `total` grows when a check measures again), what runs now, the seconds since the
    calibration started, and, on the last report, `finished`: what was measured."""

    done: float
    total: float
    doing: str
    elapsed_s: float
    finished: str = ""


ProgressHook = Callable[[CalibrationProgress], None]


@dataclass(frozen=True)
class Shape:
    """The shape of the quick real run that checks a calibration: the request's prompt length,
    its k (for auto: medium's), and a few new tokens."""

    prompt_tokens: int = 64
    k: int = 8
    new_tokens: int = 16


@dataclass(frozen=True)
class Outcome:
    """A calibration, where it came from, what it cost, and what its checks found."""

    calibration: Calibration
    status: CalibrationStatus
    seconds: float = 0.0
    problems: tuple[str, ...] = ()
    stored: bool = False  # cached on disk
    summary: str = ""  # one line: what was measured and checked

    @property
    def verified(self) -> bool:
        """True when every check passed."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (a result's `calibration` field)."""
        return {
            "status": self.status.value,
            "seconds": round(self.seconds, 3),
            "verified": self.verified,
            "problems": list(self.problems),
            "cached": self.stored,
        }


def step_durations(
    backend: Backend,
    prompt: list[int],
    b: int,
    sampling: SamplingSettings,
    steps: int,
    layout: KVLayout = KVLayout.AUTO,
    kv_type: KVType = KVType.F16,
) -> np.ndarray:
    """Seconds between consecutive decode steps of a b-candidate generation (candidate 0's tokens):
    the default `Meter`."""
    stamps = []
    settings = GenerationSettings(max_new_tokens=steps + 1, kv_layout=layout, kv_type=kv_type)
    for ev in backend.generate(prompt, b, sampling, settings):
        if isinstance(ev, TokenEvent) and ev.candidate == 0:
            stamps.append(time.perf_counter())
    return np.diff(np.asarray(stamps))


def _cost(b: int, steps: int, prompt_len: int) -> float:
    """A measurement's rough work units, for the progress bar's fraction and ETA."""
    return steps * (1 + b / 4) * (1 + prompt_len / 512)


class _Session:
    """One calibration's measurements: each through the meter, each reported as progress."""

    def __init__(
        self,
        backend: Backend,
        sampling: SamplingSettings,
        meter: Meter | None,
        progress: ProgressHook | None,
    ) -> None:
        ban = tuple((t, -1e9) for t in backend.eog_ids)  # every run makes all its tokens
        self.backend = backend
        self.sampling = dataclasses.replace(sampling, seed=0, logit_bias=sampling.logit_bias + ban)
        self.meter = meter or step_durations  # looked up now: tests may replace the default
        self.progress = progress
        self.t0 = time.monotonic()
        self.done = 0.0
        self.total = 0.0
        self.runs = 0

    def expect(self, b: int, steps: int, prompt_len: int, n: int = 1) -> None:
        """Add n planned measurements to the total."""
        self.total += n * _cost(b, steps, prompt_len)

    def median(
        self,
        prompt: list[int],
        b: int,
        steps: int,
        doing: str,
        layout: KVLayout = KVLayout.AUTO,
        kv_type: KVType = KVType.F16,
    ) -> float:
        """The median step of one measurement."""
        return float(np.median(self.durations(prompt, b, steps, doing, layout, kv_type)))

    def durations(
        self,
        prompt: list[int],
        b: int,
        steps: int,
        doing: str,
        layout: KVLayout = KVLayout.AUTO,
        kv_type: KVType = KVType.F16,
    ) -> np.ndarray:
        """One measurement's step durations."""
        self.report(doing)
        d = np.asarray(self.meter(self.backend, prompt, b, self.sampling, steps, layout, kv_type))
        self.runs += 1
        self.done += _cost(b, steps, len(prompt))
        self.report(doing)
        if d.size == 0:
            raise ValueError(f"no step times measured ({doing})")
        return d

    def elapsed(self) -> float:
        """Seconds since this calibration started."""
        return time.monotonic() - self.t0

    def report(self, doing: str, finished: str = "") -> None:
        """Tell the progress hook where the calibration stands."""
        if self.progress is not None:
            total = max(self.total, self.done)
            self.progress(CalibrationProgress(self.done, total, doing, self.elapsed(), finished))


@dataclass(frozen=True)
class _Problem:
    """A check that failed, and the batch sizes to measure again."""

    text: str
    batches: tuple[int, ...]


def step_problems(runs: dict[int, list[float]]) -> list[_Problem]:
    """What is wrong with per-batch-size step times (two or more runs each): runs that disagree,
    and a larger batch measured faster per step than a smaller one."""
    found = []
    for b, rs in sorted(runs.items()):
        lo, hi = min(rs), max(rs)
        if hi > REPEAT_RATIO * lo and hi - lo > NOISE_S:
            found.append(
                _Problem(f"two runs at k={b} disagree ({lo:.4g} vs {hi:.4g} s per step)", (b,))
            )
    est = {b: statistics.fmean(rs) for b, rs in runs.items()}
    sizes = sorted(est)
    for i, small in enumerate(sizes):
        for big in sizes[i + 1 :]:
            if est[big] < est[small] * (1 - MONOTONE_SLACK) - NOISE_S:
                found.append(
                    _Problem(
                        f"a step at k={big} ({est[big]:.4g} s) measured faster than at k={small} "
                        f"({est[small]:.4g} s)",
                        (small, big),
                    )
                )
    return found


def _step_table(
    s: _Session, prompt: list[int], steps: int, own: KVLayout
) -> tuple[dict[int, float], list[str]]:
    """Step time per batch size: two passes over the sizes (a pass apart, so a load that comes
    and goes shows), the sizes a check flags measured again; what still fails."""
    batches = CALIBRATION_BATCHES
    runs: dict[int, list[float]] = {b: [] for b in batches}
    for rep in (1, 2):
        for b in batches:
            runs[b].append(s.median(prompt, b, steps, f"a decode step at k={b} ({rep}/2)", own))
    problems = step_problems(runs)
    for _ in range(MAX_REMEASURE):
        if not problems:
            break
        flagged = sorted({b for p in problems for b in p.batches})
        logger.info("calibration: measuring k=%s again (%s)", flagged, problems[0].text)
        for b in flagged:
            s.expect(b, steps, len(prompt), 2)
        for b in flagged:
            runs[b] = [s.median(prompt, b, steps, f"k={b} again", own) for _ in range(2)]
        problems = step_problems(runs)
    return {b: statistics.fmean(rs) for b, rs in runs.items()}, [p.text for p in problems]


def decode_step_prediction(
    facts: ModelFacts,
    cal: Calibration,
    prompt_tokens: int,
    new_tokens: int,
    k: int,
    layout: KVLayout = KVLayout.AUTO,
    kv_type: KVType = KVType.F16,
) -> float:
    """The calibration's seconds per decode step of k candidates over this prompt (prefill out)."""
    p = predict(facts, cal, Request(prompt_tokens, new_tokens), k, layout, kv_type)
    return max(p.latency_s - prompt_tokens / cal.prefill_tokens_per_s, 0.0) / max(new_tokens, 1)


def _off(ratio: float, limit: float) -> bool:
    return not (1 / limit <= ratio <= limit)


def _probe(s: _Session, cal: Calibration, shape: Shape, tries: int = 2) -> tuple[float, str]:
    """A quick real run of the request's shape against the calibration's prediction (once more
    when it disagrees): (measured / predicted seconds per step, what it found)."""
    facts = s.backend.facts
    text = s.backend.tokenize(_TEXT) or [0]
    p = max(1, min(shape.prompt_tokens, 512, facts.n_ctx_train - shape.new_tokens - 2))
    prompt = (text * (p // len(text) + 1))[:p]
    predicted = decode_step_prediction(facts, cal, p, shape.new_tokens, shape.k)
    ratio, measured = 1.0, predicted
    for i in range(tries):
        if i:
            s.expect(shape.k, shape.new_tokens, p)
        doing = f"a real run: k={shape.k}, {p}-token prompt"
        measured = s.median(prompt, shape.k, shape.new_tokens, doing)
        ratio = measured / max(predicted, 1e-9)
        if not _off(ratio, PROBE_RATIO):
            break
    found = (
        f"a real run of k={shape.k} over a {p}-token prompt took {measured:.4g} s per step, "
        f"the calibration predicts {predicted:.4g}"
    )
    return ratio, found


def measure(
    backend: Backend,
    n_threads: int,
    sampling: SamplingSettings,
    *,
    steps: int = 40,
    long_prompt_tokens: int = 512,
    shape: Shape = Shape(),
    progress: ProgressHook | None = None,
    meter: Meter | None = None,
) -> Outcome:
    """Decode step time (sampling included) at batch sizes 1..32, what each attended and each
    masked KV cell adds to a step, prefill speed, and the loaded process's RSS; then the checks.

    - Step time: b candidates over a 32-token prompt, one KV stream each, two runs of steps/2
      (a step's attention hardly grows over a few dozen steps): the median step.
    - Attended cells: the same b candidates over a `long_prompt_tokens` prompt, which each
      candidate attends to in full; the median step's difference / (b x the extra cells).
    - Masked cells: 32 candidates in one unified cache, where each step adds 31 cells every
      candidate is masked out of; the slope of its step times, less the attended cells' share.
    - A q8_0 cache's attended cells: the long prompt at b=8 again with q8_0 K/V.
    """
    s = _Session(backend, sampling, meter, progress)
    cal, problems = _measured(s, backend, n_threads, sampling, steps, long_prompt_tokens, shape)
    return _checked(s, cal, problems, shape)


def _measured(
    s: _Session,
    backend: Backend,
    n_threads: int,
    sampling: SamplingSettings,
    steps: int,
    long_prompt_tokens: int,
    shape: Shape,
) -> tuple[Calibration, list[str]]:
    """`measure`'s measurements as a calibration (its step table made monotone where it was
    not), and what that check found."""
    text = backend.tokenize(_TEXT)
    prompt = text[:32]
    n_long = min(long_prompt_tokens, backend.facts.n_ctx_train - steps - 2)
    long_prompt = (text * (n_long // max(len(text), 1) + 1))[:n_long]
    _plan_work(s, backend, steps, len(prompt), len(long_prompt), shape)
    s.report("warming up")
    _run(backend, prompt, s.sampling, 4)
    base_rss = current_rss_bytes()
    # one cache per candidate, named (AUTO would keep these short runs' small prompt in one cache)
    own = KVLayout.STREAMS if KVLayout.STREAMS in backend.kv_layouts else KVLayout.AUTO
    step_seconds, problems = _step_table(s, prompt, max(steps // 2, 2), own)
    extra = len(long_prompt) - len(prompt)
    attn, q8 = _attended(s, long_prompt, steps // 2, own, step_seconds, extra)
    masked = _masked(s, prompt, 2 * steps, attn)
    prefill_s = _run(backend, long_prompt, s.sampling, 1).prefill_s
    cal = Calibration(
        step_seconds=step_seconds,
        prefill_tokens_per_s=len(long_prompt) / max(prefill_s, 1e-6),
        base_rss_bytes=base_rss,
        n_threads=n_threads,
        attn_s_per_seq_cell=attn,
        masked_s_per_seq_cell=masked,
        quantized_attn_factor=q8,
        key=_key(backend, n_threads, sampling),
    )
    return (_monotone(cal) if problems else cal), problems  # the probe checks the corrected table


def _checked(s: _Session, cal: Calibration, problems: list[str], shape: Shape) -> Outcome:
    """The measured calibration after its probe (a run of the request's own shape: the step
    table scaled when the probe disagrees), as the outcome `measure` returns."""
    ratio, probe_found = _probe(s, cal, shape)
    if _off(ratio, PROBE_RATIO):
        problems.append(probe_found)
        cal = dataclasses.replace(
            cal, step_seconds={b: v * ratio for b, v in cal.step_seconds.items()}
        )
    line = _describe(cal, s.elapsed(), problems, probe_found)
    logger.info("calibration: %s", line)
    s.total = s.done = max(s.done, s.total)
    s.report("done", line)
    return Outcome(cal, CalibrationStatus.MEASURED, s.elapsed(), tuple(problems), False, line)


def _plan_work(
    s: _Session, backend: Backend, steps: int, short: int, long: int, shape: Shape
) -> None:
    """The progress bar's total: every measurement `measure` plans."""
    for b in CALIBRATION_BATCHES:
        s.expect(b, max(steps // 2, 2), short, 2)
    for b in ATTENTION_BATCHES:
        s.expect(b, steps // 2, long)
    if KVType.Q8_0 in backend.kv_types:
        s.expect(8, steps // 2, long)
    if KVLayout.UNIFIED in backend.kv_layouts:
        s.expect(CALIBRATION_BATCHES[-1], 2 * steps, short)
    s.expect(shape.k, shape.new_tokens, shape.prompt_tokens)


def _monotone(cal: Calibration) -> Calibration:
    """The step table with no batch size faster per step than a smaller one."""
    fixed, top = {}, 0.0
    for b in sorted(cal.step_seconds):
        top = max(top, cal.step_seconds[b])
        fixed[b] = top
    return dataclasses.replace(cal, step_seconds=fixed)


def _describe(cal: Calibration, seconds: float, problems: list[str], probe: str) -> str:
    """One line: what was measured, and what the checks found."""
    steps = ", ".join(f"k={b} {s * 1e3:.3g} ms" for b, s in sorted(cal.step_seconds.items()))
    head = (
        f"measured in {seconds:.1f} s: a decode step {steps}; prefill "
        f"{cal.prefill_tokens_per_s:.0f} tokens/s; RSS {cal.base_rss_bytes / MIB:.0f} MiB"
    )
    if not problems:
        return f"{head}; checks passed ({probe})"
    return (
        f"{head}; NOT cached, the checks failed: {'; '.join(problems)}; "
        "this process plans with a corrected copy"
    )


def _attended(
    s: _Session,
    long_prompt: list[int],
    steps: int,
    own: KVLayout,
    step_seconds: dict[int, float],
    extra_cells: int,
) -> tuple[dict[int, float], float]:
    """Seconds per (sequence x attended cell) per batch size, and a q8_0 cache's factor."""
    attn: dict[int, float] = {}
    extra = max(extra_cells, 1)
    for b in ATTENTION_BATCHES:
        long = s.median(long_prompt, b, steps, f"attention over a long prompt at k={b}", own)
        attn[b] = max(long - step_seconds[b], 0.0) / (b * extra)
    q8 = 1.0
    if KVType.Q8_0 in s.backend.kv_types and attn[8] > 0:
        long = s.median(long_prompt, 8, steps, "attention with a q8_0 cache", own, KVType.Q8_0)
        q8 = max(long - step_seconds[8], 0.0) / (8 * extra) / attn[8]
    return attn, q8


def _masked(s: _Session, prompt: list[int], steps: int, attn: dict[int, float]) -> float:
    """Seconds per (sequence x masked cell) in one unified cache (0 without one)."""
    if KVLayout.UNIFIED not in s.backend.kv_layouts:
        return 0.0
    b = CALIBRATION_BATCHES[-1]
    d = s.durations(prompt, b, steps, "masked cells in one cache", KVLayout.UNIFIED)
    if len(d) < 2:
        return 0.0
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


def cached_calibration(
    backend: Backend, n_threads: int, sampling: SamplingSettings
) -> Calibration | None:
    """The cached calibration of (model, machine, threads, sampling), if any; never measures."""
    return load_cached(_key(backend, n_threads, sampling))


def calibration_for(
    backend: Backend,
    n_threads: int,
    sampling: SamplingSettings,
    *,
    refresh: bool = False,
    shape: Shape = Shape(),
    progress: ProgressHook | None = None,
    meter: Meter | None = None,
) -> Outcome:
    """The cached calibration of (model, machine, threads, sampling); measured (and checked) when
    there is none or `refresh`; re-checked first when a run marked it suspect."""
    old = None if refresh else cached_calibration(backend, n_threads, sampling)
    if old is not None and not old.suspect:
        return Outcome(old, CalibrationStatus.CACHED, stored=True)
    t0 = time.monotonic()
    if old is not None:
        s = _Session(backend, sampling, meter, progress)
        s.expect(shape.k, shape.new_tokens, shape.prompt_tokens)
        ratio, found = _probe(s, old, shape)
        if not _off(ratio, PROBE_RATIO):
            cal = dataclasses.replace(old, suspect="")
            store(cal)
            line = f"re-checked in {s.elapsed():.1f} s and kept: {found}"
            s.total = s.done
            s.report("done", line)
            return Outcome(cal, CalibrationStatus.RECHECKED, s.elapsed(), (), True, line)
        wrong = f"the cached calibration is wrong ({old.suspect}; {found}): measuring again"
        if progress is not None:  # the person watching the bar reads it there, in its words
            s.report("measuring again", wrong)
        else:
            logger.warning("%s", wrong)
    else:
        logger.info("calibrating this machine for %s (once)", backend.path.name)
    out = measure(backend, n_threads, sampling, shape=shape, progress=progress, meter=meter)
    if out.verified:
        store(out.calibration)
    else:
        logger.warning("calibration not cached: %s", "; ".join(out.problems))
    status = CalibrationStatus.REFRESHED if old is not None else CalibrationStatus.MEASURED
    seconds = time.monotonic() - t0
    return dataclasses.replace(out, status=status, seconds=seconds, stored=out.verified)


def run_disagreement(facts: ModelFacts, cal: Calibration, tm: Timings) -> float | None:
    """A finished run's decode seconds per step over what `cal` predicts for the same shape (its
    prompt, its steps, its live candidates on average, its KV layout and type); None when the run
    is too short to judge."""
    if tm.decode_steps < MIN_OBSERVED_STEPS:
        return None
    measured = max(tm.total_s - tm.prefill_s, 0.0) / tm.decode_steps
    k = max(1, round(tm.generated_tokens / (tm.decode_steps + 1)))
    layout = tm.kv_layout if tm.kv_layout in {x.value for x in KVLayout} else KVLayout.AUTO
    kv_type = tm.kv_type if tm.kv_type in {x.value for x in KVType} else KVType.F16
    prompt = max(tm.prompt_tokens, 1)
    predicted = decode_step_prediction(
        facts, cal, prompt, tm.decode_steps, k, KVLayout(layout), KVType(kv_type)
    )
    return measured / max(predicted, 1e-9)


def suspicion(facts: ModelFacts, cal: Calibration, tm: Timings, k: int) -> str:
    """Why a finished run makes `cal` suspect (it took over RECHECK_RATIO x, or under 1/x, the
    predicted time per step), or "" when it agrees or is too short to judge."""
    ratio = run_disagreement(facts, cal, tm)
    if ratio is None or not _off(ratio, RECHECK_RATIO):
        return ""
    return f"a run of k={k} took {ratio:.3g}x the predicted time per step"


def mark_suspect(cal: Calibration, why: str, *, cached: bool) -> Calibration:
    """`cal` marked for a re-check before its next use (on disk too when it is the cached one)."""
    marked = dataclasses.replace(cal, suspect=why)
    if cached:
        store(marked)
    return marked


# --- the cache: one calibration per (model, machine, threads, runtime, sampling) -------------


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def calibration_key(model_path: Path, n_threads: int, runtime: str, extra: str = "") -> str:
    """Identity of (model, machine, threads, runtime build, `extra`) for the cache. A model
    directory (ONNX) is identified by each of its files: its own mtime misses rewritten files."""
    if model_path.is_dir():
        files = sorted(f for f in model_path.iterdir() if f.is_file())
        stamp = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    else:
        st = model_path.stat()
        stamp = [str(st.st_size), str(int(st.st_mtime))]
    ident = [
        str(model_path.resolve()),
        *stamp,
        platform.node(),
        platform.machine(),
        str(os.cpu_count()),
        str(n_threads),
        runtime,
        extra,
    ]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:24]


def load_cached(key: str) -> Calibration | None:
    """A cached calibration for `key`, if one is stored and readable."""
    path = cache_dir() / "calibration" / f"{key}.json"
    try:
        return Calibration.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(cal: Calibration) -> None:
    """Save a calibration (atomically) for later processes."""
    folder = cache_dir() / "calibration"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{cal.key}.json", json.dumps(cal.to_json(), indent=1))
    except OSError as e:
        logger.warning("could not cache the calibration: %s", e)
