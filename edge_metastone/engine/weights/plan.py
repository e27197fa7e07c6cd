"""One load's plan: the request decided against this build and, for auto, confirmed by the canary
(a real decode of the model in a child process, its verdict cached per llama.cpp build, CPU, mode
and weight types), stepping down repack -> plain when the child crashes. The canary and the plan
share this module: the plan reads `run_child_decode` and `_verdicts` from here."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge_metastone.engine.weights.build import BuildReport, build_report, tensor_table
from edge_metastone.engine.weights.decision import REPACK, WeightPlan, decide
from edge_metastone.engine.weights.placement import Placement, repack_patterns
from edge_metastone.paths import cache_dir, write_text_atomic
from edge_metastone.types import WeightBuffers, requested_mode

logger = logging.getLogger(__name__)

CANARY_TIMEOUT_S = 180.0
CANARY_VERSION = 1


# ---------------------------------------------------------------- the canary


@dataclass(frozen=True)
class CanaryResult:
    """How one child-process decode went."""

    ok: bool
    detail: str  # "decoded 40 tokens in 0.4 s", "killed by signal 11 (SIGSEGV)", ...


def weight_types(path: Path | str) -> tuple[str, ...]:
    """The ggml types of a GGUF's tensors (what a canary vouches for)."""
    from gguf import GGMLQuantizationType

    names = set()
    for _, t, _ in tensor_table(path):
        try:
            names.add(GGMLQuantizationType(t).name)
        except ValueError:
            names.add(f"type{t}")
    return tuple(sorted(names))


def canary_key(report: BuildReport, mode: WeightBuffers, types: tuple[str, ...]) -> str:
    """Identity of (llama.cpp build, CPU, mode, weight types)."""
    ident = [
        str(CANARY_VERSION),
        report.build,
        report.cpu,
        json.dumps(report.features, sort_keys=True),
    ]
    ident += [mode.value, ",".join(types)]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:24]


def run_child_decode(
    path: Path | str,
    mode: WeightBuffers | None,
    *,
    gpu_layers: int = 0,
    timeout: float = CANARY_TIMEOUT_S,
) -> CanaryResult:
    """Load `path` and decode a few tokens in a child process (`edge_metastone.engine.canary`), so
    a crash is a result, not the end of this process. `mode` None: the package's default path."""
    cmd = [
        sys.executable,
        "-m",
        "edge_metastone.engine.canary",
        str(path),
        "--gpu-layers",
        str(gpu_layers),
    ]
    if mode is not None:
        cmd += ["--weight-buffers", mode.value]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return CanaryResult(False, f"no answer in {timeout:.0f} s")
    except OSError as e:
        return CanaryResult(False, f"could not start a child process: {e}")
    if proc.returncode < 0:
        import signal

        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = "?"
        return CanaryResult(False, f"killed by signal {-proc.returncode} ({name})")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return CanaryResult(False, f"failed (exit {proc.returncode}): {last}")
    try:
        return CanaryResult(True, json.loads(proc.stdout.strip().splitlines()[-1])["detail"])
    except (ValueError, KeyError, IndexError):
        return CanaryResult(False, f"unreadable answer: {proc.stdout.strip()[-200:]!r}")


def _canary_path(key: str) -> Path:
    return cache_dir() / "canary" / f"{key}.json"


def cached_canary(key: str) -> CanaryResult | None:
    """A stored canary verdict, if any."""
    try:
        d = json.loads(_canary_path(key).read_text())
        return CanaryResult(bool(d["ok"]), str(d["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_canary(
    key: str, result: CanaryResult, mode: WeightBuffers, types: tuple[str, ...], build: str
) -> None:
    path = _canary_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "ok": result.ok,
            "detail": result.detail,
            "mode": mode.value,
            "types": list(types),
            "build": build,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_text_atomic(path, json.dumps(record))
    except OSError as e:
        logger.info("could not cache the weight-buffer canary: %s", e)


def canary_entries() -> list[dict]:
    """Every stored canary verdict (for `doctor`)."""
    folder = cache_dir() / "canary"
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append({"key": f.stem, **json.loads(f.read_text())})
        except (OSError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- one load's plan

_FALLBACK = {WeightBuffers.EXTRA: WeightBuffers.REPACK, WeightBuffers.REPACK: WeightBuffers.PLAIN}
_lock = threading.Lock()
_verdicts: dict[str, CanaryResult] = {}  # this process's canaries, cached or not


def _canary(path: Path, mode: WeightBuffers, report: BuildReport, gpu_layers: int) -> CanaryResult:
    types = weight_types(path)
    key = canary_key(report, mode, types)
    with _lock:
        if key in _verdicts:
            return _verdicts[key]
        result = cached_canary(key)
        if result is None:
            t0 = time.perf_counter()
            logger.info(
                "weight buffers: a test decode of %s with %s, once (child process)",
                path.name,
                mode.value,
            )
            result = run_child_decode(path, mode, gpu_layers=gpu_layers)
            logger.info(
                "weight buffers: test decode %s (%.1f s)", result.detail, time.perf_counter() - t0
            )
            if _decides(result):  # a time-out, a refused start or a failed decode: nothing
                _store_canary(key, result, mode, types, report.build)
        if _decides(result):  # the rest say nothing of the next model with these weight types
            _verdicts[key] = result
        return result


def _decides(result: CanaryResult) -> bool:
    """Only a success or a crash (a signal) speaks for the mode; a decode that failed cleanly
    (e.g. a model whose weights are broken) or timed out says nothing of it."""
    return result.ok or result.detail.startswith("killed by signal")


def _mode_at_fault(path: Path, result: CanaryResult, report: BuildReport, gpu_layers: int) -> bool:
    """True when a failed canary is the mode's fault: a crash, or a clean failure that the plain
    path does not share (when it fails too, the model is broken whatever the mode)."""
    if _decides(result):
        return True
    return _canary(path, WeightBuffers.PLAIN, report, gpu_layers).ok


def plan_for(
    path: Path | str, requested: WeightBuffers | str | None = None, *, gpu_layers: int = 0
) -> Placement:
    """The placement a load of `path` uses: the request (or $EDGE_METASTONE_WEIGHT_BUFFERS, or
    auto) decided against this build; auto's choice confirmed by a cached canary decode."""
    path = Path(path)
    req = requested_mode(requested)
    report = build_report()
    plan = decide(req, report, gpu_layers=gpu_layers)
    if req is WeightBuffers.AUTO:
        notes = []
        while plan.mode is not WeightBuffers.PLAIN:
            result = _canary(path, plan.mode, report, gpu_layers)
            if result.ok:
                break
            if not _mode_at_fault(path, result, report, gpu_layers):
                logger.info(
                    "weight buffers: %s and plain both failed a test decode of %s (%s): the "
                    "model, not the mode; keeping %s",
                    plan.mode.value,
                    path.name,
                    result.detail,
                    plan.mode.value,
                )
                break
            step = _FALLBACK[plan.mode]
            notes.append(f"{plan.mode.value} {result.detail} in a test decode")
            logger.warning(
                "weight buffers: %s %s in a test decode of %s; using %s",
                plan.mode.value,
                result.detail,
                path.name,
                step.value,
            )
            plan = WeightPlan(step, req, plan.reason)
            if step is WeightBuffers.REPACK and REPACK not in report.extra_bufts:
                plan = WeightPlan(WeightBuffers.PLAIN, req, plan.reason)
        if notes:
            plan = WeightPlan(plan.mode, req, f"{plan.reason}; {'; '.join(notes)}")
    patterns: list[str] = []
    if plan.mode is WeightBuffers.REPACK:
        patterns, n = repack_patterns(path)
        plan = WeightPlan(plan.mode, req, plan.reason, repacked=n)
    logger.info("weight buffers: %s", plan.summary())
    return Placement(plan, patterns)
