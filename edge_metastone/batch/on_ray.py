"""The batch job on a Ray cluster.

- **Reaching it:** `ray.init` on the address; a cluster that cannot be reached (no such address,
  another Ray version) is one line before anything starts.
- **The model on every node:** before any worker starts, a task pinned to each node with CPUs
  checks the model file (and a sidecar head) at its path there by sha256. A node without the same
  bytes is sent the file through Ray's object store in 64 MiB chunks, written into its own cache
  (`~/.cache/edge-metastone/ray-models/<sha256>`) and checked again before a worker loads it;
  `--no-ship` refuses instead, in one line naming the node and the path.
- **Workers:** actors pinned to the nodes, `cpus // threads` per node (`--workers` caps the total),
  each loading the model once and keeping `window` problems in flight in it (a threaded actor: the
  problems' candidates decode as one batch, as a local `--window` run).
- **A lost worker** (its process killed, its node gone) is Ray's to restart (`max_restarts`); the
  driver sends the unit it held to a worker again. A unit whose worker died `MAX_ATTEMPTS` times is
  a poison input: it is recorded as that input's error and the run goes on. An exception a unit
  raises in a live worker is that input's error at once. The summary counts lost workers, retried
  units and poison inputs.
- Results come back in any order and are written in unit order, so the output, and its resume
  after the driver itself is killed, are exact: each unit once, in input order.

Ray's task retries (`max_task_retries`) would resend a unit by themselves, but without telling
the driver how often a unit has killed its worker, which is what tells a poison input from bad
luck; Ray Data's `map_batches` over an actor pool retries too, but it reorders results and owns
the loop, where the log must be appended in input order as records arrive.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_metastone.batch.job import BatchJob, Unit, make_record, reasoner_for
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.paths import cache_dir

logger = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray: pip install 'edge-metastone[ray]'"
MAX_ATTEMPTS = 2  # a unit whose worker died this many times is recorded as a poison input
MAX_RESTARTS = 4  # per worker: Ray restarts a lost worker's process this many times
CHUNK = 64 * 2**20  # bytes of a model file per object-store chunk
CONNECT_TIMEOUT_S = 5.0
RESTART_WAIT_S = 120.0  # how long a lost worker may take to come back (it loads the model again)


def import_ray() -> Any:
    """The `ray` module, or an error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EdgeMetastoneError(INSTALL_HINT) from None
    return ray


class BatchWorker:
    """A Ray actor: the job's model, opened once; several units run in it at once (threads)."""

    def __init__(self, job: BatchJob, threads: int) -> None:
        logging.getLogger("llama_cpp.native").setLevel(logging.CRITICAL)
        self.job = job
        self.reasoner = reasoner_for(job, threads)

    def run(self, unit: Unit) -> dict[str, Any]:
        """One unit's record."""
        mode, item = unit
        return make_record(self.reasoner, item, mode, self.job.options, self.job.full)

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()


@dataclass
class RayStats:
    """What the run met on the cluster (the summary's `ray` entry)."""

    nodes: int = 0
    workers: int = 0
    shipped: int = 0  # nodes the model was sent to
    lost_workers: int = 0
    retried_units: int = 0
    poison_inputs: int = 0
    failed_inputs: int = 0


def reachable(address: str) -> None:
    """A `HOST:PORT` (or `ray://HOST:PORT`) address must accept a connection within
    `CONNECT_TIMEOUT_S`: `ray.init` itself retries a dead address for minutes, printing as it goes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise EdgeMetastoneError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e}; is `ray start` "
            "running there, and is the address its head's?"
        ) from None


def _quiet_raylet() -> None:
    """Ray prints its raylet's error messages (a worker died, with advice on the OOM killer) to
    the driver's stdout, where `--json`'s output goes: they go to the log instead, at debug level
    (the summary counts lost workers)."""
    try:
        from ray._private import worker
    except ImportError:
        return
    show = worker.print_to_stdstream
    if getattr(show, "_edge_metastone", False):
        return

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines", ()):
                logger.debug("Ray: %s", line)
            return
        show(data, ignore_prefix)

    print_to_stdstream._edge_metastone = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster (True when this call started Ray); one line when it cannot be reached."""
    if ray.is_initialized():
        return False
    if address:
        reachable(address)
    _quiet_raylet()
    try:
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"at {address}" if address else "(a local one)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeMetastoneError(f"cannot reach the Ray cluster {where}: {first}") from None
    return True


def run_on_ray(job: BatchJob, units: Sequence[Unit], put: Callable[[dict], None]) -> dict[str, Any]:
    """Run the units on Ray actors; `put` gets the records in unit order. Returns the run's
    `ray` facts (nodes, workers, shipped, lost workers, retried units, poison inputs)."""
    ray = import_ray()
    started = connect(ray, job.ray_address)
    stats = RayStats()
    actors: list[Any] = []
    try:
        threads = job.threads or 1
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        if not nodes:
            raise EdgeMetastoneError("the Ray cluster has no node with a CPU")
        sent: dict[Path, list[Any]] = {}
        paths = {n["NodeID"]: place_model(ray, job, n, stats, sent) for n in nodes}
        actors = start_workers(ray, job, nodes, paths, threads, len(units))
        stats.nodes, stats.workers = len(nodes), len(actors)
        logger.info(
            "Ray: %d workers on %d nodes, %d threads each", len(actors), len(nodes), threads
        )
        Driver(ray, actors, units, put, stats, job.window).run()
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise EdgeMetastoneError(
            f"the Ray run failed ({first}); rerun the same command to resume"
        ) from None
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
    return {"ray": dataclasses.asdict(stats)}


def start_workers(
    ray: Any, job: BatchJob, nodes: list[dict], paths: dict[str, dict], threads: int, units: int
) -> list[Any]:
    """`cpus // threads` actors per node (at least one), pinned there, each with the node's copy
    of the model; `--workers` caps the total, spread over the nodes in turn."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    per_node = [max(1, int(n["Resources"]["CPU"]) // threads) for n in nodes]
    total = min(sum(per_node), job.ray_workers or sum(per_node), max(units, 1))
    order = [i for r in range(max(per_node)) for i, c in enumerate(per_node) if r < c][:total]
    cls = ray.remote(BatchWorker)
    actors = []
    for i in order:
        node = nodes[i]["NodeID"]
        here = dataclasses.replace(job, **paths[node])
        opts = cls.options(
            num_cpus=threads,
            max_restarts=MAX_RESTARTS,
            max_concurrency=job.window,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        actors.append(opts.remote(here, threads))
    return actors


def place_model(
    ray: Any, job: BatchJob, node: dict, stats: RayStats, sent: dict[Path, list[Any]]
) -> dict[str, Path | None]:
    """The model (and head) paths a worker on `node` loads: the job's own where the node has the
    same bytes there, else a copy sent to the node's cache (or, `--no-ship`, a refusal). `sent`
    holds the object-store chunks of each file already put there this run."""
    out: dict[str, Path | None] = {"model": job.model, "head": job.head}
    for field in ("model", "head"):
        path = job.model_path if field == "model" else job.head
        if path is None:
            continue
        digest = _digest(path)
        found = _on(ray, node, _has_file).remote(str(path), digest)
        if ray.get(found):
            continue
        where = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
        if not job.ray_ship:
            raise EdgeMetastoneError(
                f"{where} has no {path} with the same bytes as here; copy it there, or drop "
                "--no-ship to send it"
            )
        logger.info("sending %s to %s", path.name, where)
        if path not in sent:  # into the object store once, for every node that lacks it
            sent[path] = [ray.put(c) for c in _chunks(path)]
        copy = ray.get(_on(ray, node, _receive).remote(sent[path], path.name, digest))
        stats.shipped += field == "model"
        out[field] = Path(copy)
    return out


def _on(ray: Any, node: dict, fn: Callable) -> Any:
    """`fn` as a Ray task that runs on `node` only."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    return ray.remote(fn).options(num_cpus=0, scheduling_strategy=strategy)


@functools.cache
def _digest(path: Path) -> str:
    """The driver's sha256 of a file (once per run and file, not once per node)."""
    return sha256_of(path)


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _has_file(path: str, digest: str) -> bool:
    """On a node: the file is there, with these bytes."""
    p = Path(path)
    return p.is_file() and sha256_of(p) == digest


def _chunks(path: Path) -> Iterator[bytes]:
    """The file in `CHUNK`-byte pieces, one read at a time (each is put before the next)."""
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(CHUNK), b"")


def _receive(chunks: list[Any], name: str, digest: str) -> str:
    """On a node: write the sent file into this node's cache (atomically), check its sha256, and
    return its path (a copy already there is reused)."""
    import ray

    folder = cache_dir() / "ray-models" / digest
    dst = folder / name
    if dst.is_file() and sha256_of(dst) == digest:
        return str(dst)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        for ref in chunks:
            f.write(ray.get(ref))
    if sha256_of(tmp) != digest:
        tmp.unlink()
        raise EdgeMetastoneError(f"the copy of {name} sent to this node does not match its sha256")
    os.replace(tmp, dst)
    return str(dst)


class Driver:
    """Keeps every actor `window` units busy, resends a lost worker's unit (or records a poison
    input), holds results that arrive early and writes the ready prefix in unit order.

    A unit whose worker died runs again alone on a worker with nothing else in flight: the units
    that died beside a poison input are not blamed for it, and a second death is its own."""

    def __init__(
        self,
        ray: Any,
        actors: list[Any],
        units: Sequence[Unit],
        put: Callable[[dict], None],
        stats: RayStats,
        window: int,
    ) -> None:
        self.ray, self.actors, self.units, self.put, self.stats = ray, actors, units, put, stats
        self.per_actor = window + 1  # one queued beyond the window: a worker never waits
        # object ref -> (unit position, actor, the actor's epoch: its deaths counted when sent)
        self.pending: dict[Any, tuple[int, int, int]] = {}
        self.epoch = [0] * len(actors)
        self.load = [0] * len(actors)
        self.alone: set[int] = set()  # actors running a unit whose worker died, by itself
        self.dead: set[int] = set()  # actors that will not come back: never sent a unit again
        self.deaths = [0] * len(units)  # how often each unit's worker died under it
        self.retry: list[int] = []  # units to run again, alone
        self.ready: dict[int, dict[str, Any]] = {}
        self.next = self.written = 0

    def run(self) -> None:
        """Until every unit's record is written."""
        while self.written < len(self.units):
            self._submit()
            done, _ = self.ray.wait(list(self.pending), num_returns=1)
            for ref in done:
                self._collect(ref)
            while self.written in self.ready:
                self.put(self.ready.pop(self.written))
                self.written += 1

    def _send(self, pos: int, a: int) -> None:
        self.pending[self.actors[a].run.remote(self.units[pos])] = (pos, a, self.epoch[a])
        self.load[a] += 1

    def _live(self) -> list[int]:
        return [a for a in range(len(self.actors)) if a not in self.dead]

    def _submit(self) -> None:
        while self.retry:
            idle = [a for a in self._live() if self.load[a] == 0]
            if not idle:
                break
            self.alone.add(idle[0])
            self._send(self.retry.pop(0), idle[0])
        bound = self.written + 2 * self.per_actor * len(self.actors)  # results held stay bounded
        while self.next < min(len(self.units), bound):
            room = [a for a in self._live() if a not in self.alone]
            a = min(room, key=self.load.__getitem__, default=None)
            if a is None or self.load[a] >= self.per_actor:
                return
            self._send(self.next, a)
            self.next += 1

    def _collect(self, ref: Any) -> None:
        errors = self.ray.exceptions
        pos, a, epoch = self.pending.pop(ref)
        self.load[a] -= 1
        if self.load[a] == 0:
            self.alone.discard(a)
        try:
            self.ready[pos] = self.ray.get(ref)
        except errors.RayActorError:  # its worker died (killed, out of memory, node lost)
            self._lost(pos, a, epoch)
        except errors.RayTaskError as e:  # the unit raised in a live worker: its own error
            self.stats.failed_inputs += 1
            self.ready[pos] = self._error(pos, f"it failed on its Ray worker: {_last_line(e)}")

    def _lost(self, pos: int, a: int, epoch: int) -> None:
        """The worker running unit `pos` died: run the unit again alone, or, when it died alone
        with it before, record a poison input."""
        if epoch == self.epoch[a]:  # the other units it held when it died fail too: one death
            self.epoch[a] += 1
            self.stats.lost_workers += 1
            self._check_alive(a)
        self.deaths[pos] += 1
        if self.deaths[pos] >= MAX_ATTEMPTS:
            self.stats.poison_inputs += 1
            why = f"its Ray worker died {self.deaths[pos]} times running it (a poison input?)"
            self.ready[pos] = self._error(pos, why)
            return
        self.stats.retried_units += 1
        self.retry.append(pos)

    def _check_alive(self, a: int) -> None:
        """Wait for Ray to restart worker `a` (its calls queue meanwhile); one that will not come
        back (its restarts spent, its node gone) takes no more units."""
        try:
            self.ray.get(self.actors[a].pid.remote(), timeout=RESTART_WAIT_S)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
            self.dead.add(a)
            if not self._live():
                raise EdgeMetastoneError(
                    "every Ray worker died and none restarts; rerun the same command to resume"
                ) from None

    def _error(self, pos: int, why: str) -> dict[str, Any]:
        mode, item = self.units[pos]
        return {"id": item.id, "line": item.line, "effort": mode.value, "error": why}


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
