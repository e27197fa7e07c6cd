"""Numbers several layers must agree on (no backend imports here)."""

from __future__ import annotations

import os

PREFILL_BATCH = 512  # tokens per prompt decode; the scheduler's compute-buffer model depends on it
MAX_THREADS = 256  # llama.cpp aborts (std::bad_alloc) on absurd thread counts


def default_threads() -> int:
    """Physical-ish core count: decode runs fastest without hyper-threads."""
    n = os.cpu_count() or 1
    return max(1, n if n <= 4 else n // 2)
