"""Numbers several layers must agree on (no backend imports here)."""

from __future__ import annotations

PREFILL_BATCH = 512  # tokens per prompt decode; the scheduler's compute-buffer model depends on it
MAX_THREADS = 256  # llama.cpp aborts (std::bad_alloc) on absurd thread counts
