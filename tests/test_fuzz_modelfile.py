"""Fuzzed model files through inspect and score: 0 tracebacks, 0 crashes, 0 hangs, strict JSON.

CI runs 240 seeded mutants; `EDGE_METASTONE_FUZZ=2000 pytest tests/test_fuzz_modelfile.py` runs more.
"""

from __future__ import annotations

import json
import os

from fuzz_models import fuzz


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
