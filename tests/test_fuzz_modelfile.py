"""Fuzzed model files through inspect and score: 0 tracebacks, 0 crashes, 0 hangs, strict JSON.

CI runs 240 seeded mutants; `EDGE_METASTONE_FUZZ=2000 pytest tests/test_fuzz_modelfile.py` runs more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fuzz_models import _read_result, cpu_seconds, fuzz


def test_fuzzed_model_files_fail_cleanly(tiny_gguf, tmp_path):
    n = int(os.environ.get("EDGE_METASTONE_FUZZ", "240"))
    text = tmp_path / "t.txt"
    text.write_text("<|im_start|>user\nHi<|im_end|>\n<think>\nOne.\n\nTwo.\n\n</think>\nDone.")
    work = tmp_path / "mutants"
    work.mkdir()
    counts, defects = fuzz(tiny_gguf("q8_0"), text, n, seed=0, workdir=work)
    print(json.dumps(dict(counts)))
    assert (
        counts["inspect:ok"]
        + counts["inspect:error"]
        + sum(v for k, v in counts.items() if k in ("hang", "crash"))
        + counts["inspect:traceback"]
        + counts["inspect:badjson"]
        + counts["inspect:multiline"]
        == n
    )
    assert counts["inspect:ok"] > 0 and counts["inspect:error"] > n // 4  # both paths exercised
    assert not defects, json.dumps(defects[:5], indent=1)


def _worker(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )


def test_a_slow_mutant_on_a_loaded_machine_is_not_a_hang():
    # 2 s of waiting with no CPU used (what a starved worker looks like): the old wall-clock limit
    # of 1 s called it a hang; its CPU time is far below the limit, so it is not one
    proc = _worker(
        "import time; print('START', flush=True); time.sleep(2); "
        'print(\'DONE {"inspect": "ok", "score": "ok"}\', flush=True)'
    )
    try:
        assert _read_result(proc, timeout=1.0, poll=0.1) == {"inspect": "ok", "score": "ok"}
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(cpu_seconds(os.getpid()) is None, reason="no /proc: wall clock only")
def test_a_busy_mutant_is_a_hang_by_cpu_time():
    proc = _worker("print('START', flush=True)\nwhile True: pass")
    try:
        assert _read_result(proc, timeout=0.5, poll=0.1) is None
        assert cpu_seconds(proc.pid) >= 0.5  # it was judged by the CPU time it burnt
    finally:
        proc.kill()
        proc.wait()


def test_a_blocked_mutant_is_a_hang():
    proc = _worker("import time; print('START', flush=True); time.sleep(60)")
    try:
        assert _read_result(proc, timeout=5.0, stuck=0.5, poll=0.1) is None
    finally:
        proc.kill()
        proc.wait()
