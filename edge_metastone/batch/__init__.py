"""The offline batch runner: a file of problems through `Reasoner.reason`, resumable after any
crash, locally or on Ray, with a summary and, for a sweep, the test-time scaling picture."""

from __future__ import annotations

from edge_metastone.batch.jobfile import Item, read_input, record_seed
from edge_metastone.batch.runner import BatchJob, make_record, run_batch

__all__ = ["BatchJob", "Item", "make_record", "read_input", "record_seed", "run_batch"]
