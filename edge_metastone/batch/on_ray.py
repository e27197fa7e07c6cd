"""The batch job on a Ray cluster: one actor per worker loads the model once and runs units with
the same `make_record` as a local run; results come back in any order and are written in unit
order, so the output (and its resume) is the local run's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from edge_metastone.batch.job import BatchJob, Unit, make_record, reasoner_for
from edge_metastone.errors import EdgeMetastoneError

logger = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray: pip install 'edge-metastone[ray]'"
IN_FLIGHT_PER_WORKER = 2  # one running, one queued: a worker never waits for the driver


def import_ray() -> Any:
    """The `ray` module, or an error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EdgeMetastoneError(INSTALL_HINT) from None
    return ray


class BatchWorker:
    """A Ray actor: the job's model, opened once."""

    def __init__(self, job: BatchJob, threads: int) -> None:
        logging.getLogger("llama_cpp.native").setLevel(logging.CRITICAL)
        self.job = job
        self.reasoner = reasoner_for(job, threads)

    def run(self, unit: Unit) -> dict[str, Any]:
        """One unit's record."""
        mode, item = unit
        return make_record(self.reasoner, item, mode, self.job.options, self.job.full)


def run_on_ray(job: BatchJob, units: Sequence[Unit], put: Callable[[dict], None]) -> None:
    """Run the units on Ray actors; `put` gets the records in unit order."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=job.ray_address or None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    actors: list[Any] = []
    try:
        threads = job.threads or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n = job.ray_workers or max(1, cpus // threads)
        n = min(n, len(units))
        worker_cls = ray.remote(num_cpus=threads)(BatchWorker)
        actors = [worker_cls.remote(job, threads) for _ in range(n)]
        logger.info("Ray: %d workers x %d threads for %d units", n, threads, len(units))
        _drive(ray, actors, units, put)
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise EdgeMetastoneError(
            f"a Ray worker failed ({first}); rerun the same command to resume"
        ) from None
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def _drive(ray: Any, actors: list[Any], units: Sequence[Unit], put: Callable[[dict], None]) -> None:
    """Keep every actor busy, hold results that arrive early, write the ready prefix."""
    pending: dict[Any, tuple[int, int]] = {}  # object ref -> (unit position, actor)
    load = [0] * len(actors)
    ready: dict[int, dict[str, Any]] = {}
    nxt = written = 0
    window = IN_FLIGHT_PER_WORKER * len(actors)
    while written < len(units):
        # submit while some actor has room and results held back stay bounded
        while nxt < len(units) and nxt - written < 2 * window:
            a = min(range(len(actors)), key=load.__getitem__)
            if load[a] >= IN_FLIGHT_PER_WORKER:
                break
            pending[actors[a].run.remote(units[nxt])] = (nxt, a)
            load[a] += 1
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            pos, a = pending.pop(ref)
            load[a] -= 1
            ready[pos] = ray.get(ref)
        while written in ready:
            put(ready.pop(written))
            written += 1
