"""The batch run: every unit of a job through a unit runner (here, one after another, or on Ray),
in input order, one record each, appended to the output log; a rerun resumes after the last
complete record."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from edge_metastone.batch.job import BatchJob, Unit, make_record, reasoner_for, units_of
from edge_metastone.batch.jobfile import ResultLog, dumps, read_input
from edge_metastone.errors import EdgeMetastoneError

logger = logging.getLogger(__name__)

# runs units and hands each record, in unit order, to the callback: `run_local`, `run_on_ray`;
# what it returns (if anything) joins the run's facts (Ray: its `ray` entry)
UnitRunner = Callable[[BatchJob, Sequence[Unit], Callable[[dict], None]], "dict[str, Any] | None"]


class Progress:
    """A tqdm bar on stderr: rate, ETA, and the running accuracy of the mode being run."""

    def __init__(self, total: int, done: Sequence[dict[str, Any]], enabled: bool) -> None:
        from tqdm import tqdm

        self.right: dict[str, int] = {}
        self.checked: dict[str, int] = {}
        for rec in done:
            self._count(rec)
        self.bar = tqdm(
            total=total, initial=len(done), unit="rec", disable=not enabled, dynamic_ncols=True
        )

    def _count(self, rec: dict[str, Any]) -> None:
        if "correct" in rec:
            m = rec["effort"]
            self.checked[m] = self.checked.get(m, 0) + 1
            self.right[m] = self.right.get(m, 0) + int(bool(rec["correct"]))

    def update(self, rec: dict[str, Any]) -> None:
        """Count one new record."""
        self._count(rec)
        m = rec["effort"]
        n = self.checked.get(m, 0)
        acc = f"{self.right.get(m, 0) / n:.3f}" if n else "n/a"
        self.bar.set_description(m, refresh=False)
        self.bar.set_postfix(acc=acc, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Finish the bar."""
        self.bar.close()


class Writer:
    """Appends records to the log in unit order and counts them."""

    def __init__(self, log: ResultLog, progress: Progress) -> None:
        self.log, self.progress = log, progress

    def put(self, rec: dict[str, Any]) -> None:
        """Write one record (a result with a non-finite number becomes an error record)."""
        try:
            text = dumps(rec)
        except ValueError as e:
            keep = ("id", "line", "effort", "seed", "time_s")
            rec = {k: rec[k] for k in keep if k in rec}
            rec["error"] = f"the result holds a non-finite number ({e})"
            text = dumps(rec)
        self.log.append(text)
        self.log.records.append(rec)
        self.progress.update(rec)


def check_prefix(log: ResultLog, units: Sequence[Unit]) -> None:
    """The records already written must be the first units, in order."""
    if len(log.records) > len(units):
        raise EdgeMetastoneError(f"{log.path} holds more records than the job has units")
    for n, (rec, (mode, item)) in enumerate(zip(log.records, units, strict=False), 1):
        if rec.get("line") != item.line or rec.get("effort") != mode.value:
            raise EdgeMetastoneError(
                f"{log.path}:{n}: record does not match input line {item.line} ({mode.value}); "
                "pass another -o"
            )


def run_local(job: BatchJob, units: Sequence[Unit], put: Callable[[dict], None]) -> None:
    """Run the units here with one model, `job.window` at a time (their candidates decode as one
    batch); records are put in input order, each as soon as it and every one before it is done."""
    with reasoner_for(job) as r, ThreadPoolExecutor(job.window, "edge-metastone-batch") as pool:
        pending: collections.deque[Future[dict[str, Any]]] = collections.deque()
        try:
            for mode, item in units:
                if len(pending) >= job.window:
                    put(pending.popleft().result())
                pending.append(pool.submit(make_record, r, item, mode, job.options, job.full))
            while pending:
                put(pending.popleft().result())
        except BaseException:  # Ctrl-C or a failure: what is in flight is not written
            for f in pending:
                f.cancel()
            r.close()  # in-flight generations unwind at their next event
            raise


def run_batch(
    job: BatchJob, run_units: UnitRunner = run_local, *, progress: bool = True
) -> tuple[list[dict[str, Any]], dict]:
    """Run (or resume) the job, its units through `run_units` (`run_local`, or `run_on_ray` from
    `edge_metastone.batch.on_ray` for a job with a `ray_address`). Returns every record of the
    output, in order, and run facts (`wall_s`, `resumed`, `ran`)."""
    items, digest = read_input(job.input)
    units = units_of(job, items)
    t0 = time.perf_counter()
    with ResultLog(job.output, job.identity(digest)) as log:
        check_prefix(log, units)
        resumed = len(log.records)
        todo = units[resumed:]
        if resumed:
            logger.info("%s: resuming after %d of %d records", job.output, resumed, len(units))
        bar = Progress(len(units), log.records, progress)
        writer = Writer(log, bar)
        extra: dict[str, Any] = {}
        try:
            if todo:
                extra = run_units(job, todo, writer.put) or {}
        finally:
            bar.close()
        records = list(log.records)
    facts = {"wall_s": time.perf_counter() - t0, "resumed": resumed, "ran": len(todo), **extra}
    return records, facts
