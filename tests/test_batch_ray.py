"""`batch --ray` on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU per node, on
this machine): the output equals a local run's; a worker killed mid-run is restarted and the run
finishes by itself with every record once, in input order; an input that kills its worker every
time is recorded as that input's error; a node that does not see the model file gets it sent (or,
with --no-ship, the run is refused in one line); a cluster that cannot be reached is one line."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_batch import batch, read_records, reference_run, stable

from conftest import run_cli

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from edge_metastone.batch.jobfile import Item  # noqa: E402
from edge_metastone.batch.on_ray import Driver, RayStats  # noqa: E402


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A local run over 30 problems at low effort, one at a time: the reference."""
    return reference_run(tmp_path_factory, 30)


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each, as two sets of Ray processes."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_two_nodes_equal_the_local_run(cluster, clean_run, tmp_path):
    inp, _, clean = clean_run
    out = tmp_path / "ray.jsonl"
    proc = batch(inp, out, "--effort", "low", "--ray", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert stable(read_records(out)) == stable(clean)
    assert "Ray: 2 workers on 2 nodes (model sent to 0); 0 workers lost" in proc.stdout


def _worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::BatchWorker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_worker_is_restarted_and_every_record_is_written_once(
    cluster, clean_run, tmp_path
):
    inp, _, clean = clean_run
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "edge_metastone", "batch", str(inp), "-o", str(out)]
    args = ["--effort", "low", "--ray", cluster.address, "--max-new-tokens", "96", "--threads"]
    args += ["1", "--no-progress", "--window", "1"]
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not (out.is_file() and len(out.read_bytes().splitlines()) >= 6):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        pids = _worker_pids()
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    recs = read_records(out)
    assert [r["id"] for r in recs] == [r["id"] for r in clean]  # each once, in input order
    assert stable(recs) == stable(clean)  # the units it held ran again, with the same seeds
    m = re.search(r"(\d+) workers lost, (\d+) units run again, 0 poison inputs", stdout)
    assert m and int(m[1]) == 1 and int(m[2]) >= 1, stdout
    assert "Traceback" not in stderr


class Poisoned:
    """A worker that dies (its process exits) on the item with id `poison`."""

    def run(self, unit):
        mode, item = unit
        if item.id == "poison":
            os._exit(1)
        return {"id": item.id, "line": item.line, "effort": mode.value, "answer": "ok"}

    def pid(self):
        return os.getpid()


def test_an_input_that_kills_its_worker_twice_is_recorded_and_the_run_goes_on(cluster):
    import test_batch_ray

    ray.cloudpickle.register_pickle_by_value(test_batch_ray)  # the workers cannot import it
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        actors = [
            ray.remote(Poisoned).options(num_cpus=0.5, max_restarts=4).remote() for _ in range(2)
        ]
        from edge_metastone.scheduler import Effort

        ids = ["a", "b", "poison", "c", "d", "e", "f"]
        units = [(Effort.LOW, Item(line=i + 1, id=x, prompt="p")) for i, x in enumerate(ids)]
        got, stats = [], RayStats()
        Driver(ray, actors, units, got.append, stats, window=2).run()
    finally:
        ray.shutdown()
    assert [r["id"] for r in got] == ids  # each once, in order
    poison = got[2]
    assert "died 2 times" in poison["error"] and "answer" not in poison
    assert all(r.get("answer") == "ok" for i, r in enumerate(got) if i != 2)  # none else blamed
    assert (stats.poison_inputs, stats.lost_workers) == (1, 2)


def _alive_nodes(address: str) -> int:
    ray.init(address=address, log_to_driver=False)
    try:
        return sum(bool(n["Alive"]) for n in ray.nodes())
    finally:
        ray.shutdown()


@pytest.fixture
def blind_node(cluster, tmp_path):
    """A third node whose processes see an empty `tmp_path/models` (a mount namespace with a
    tmpfs over it): a node without the model file at the path the driver has it."""
    models = tmp_path / "models"
    models.mkdir()
    ray_bin = Path(sys.executable).with_name("ray")
    script = (
        f"mount -t tmpfs none {models} && exec {ray_bin} start --address={cluster.address} "
        "--num-cpus=1 --block"
    )
    node = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while _alive_nodes(cluster.address) < 3:
        assert node.poll() is None, node.stderr.read().decode()
        assert time.monotonic() < deadline, "the third node did not join"
        time.sleep(1)
    yield models
    node.send_signal(signal.SIGTERM)
    node.wait(timeout=60)


def test_a_node_without_the_model_gets_it_sent_or_the_run_is_refused(
    cluster, blind_node, clean_run, tmp_path
):
    from edge_metastone.models import default_model_path

    model = blind_node / "nano.gguf"
    shutil.copy(default_model_path(), model)
    inp, _, clean = clean_run
    out = tmp_path / "refused.jsonl"
    proc = batch(
        inp, out, "--model", str(model), "--effort", "low", "--ray", cluster.address, "--no-ship"
    )
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert re.fullmatch(
        rf"edge-metastone batch: error: node \S+ \(\w+\) has no {re.escape(str(model))} with the "
        r"same bytes as here; copy it there, or drop --no-ship to send it",
        line,
    ), line
    assert not out.is_file() or out.read_bytes() == b""  # nothing ran
    sent = tmp_path / "sent.jsonl"
    proc = batch(inp, sent, "--model", str(model), "--effort", "low", "--ray", cluster.address)
    assert proc.returncode == 0, proc.stderr
    assert "Ray: 3 workers on 3 nodes (model sent to 1)" in proc.stdout
    assert stable(read_records(sent)) == stable(clean)  # the sent copy: the same bytes


def test_an_unreachable_cluster_is_one_line(clean_run, tmp_path):
    inp, _, _ = clean_run
    t0 = time.monotonic()
    proc = run_cli("batch", str(inp), "-o", str(tmp_path / "o.jsonl"), "--ray", "127.0.0.1:1")
    assert proc.returncode == 1 and time.monotonic() - t0 < 60
    assert proc.stderr.strip().startswith(
        "edge-metastone batch: error: cannot reach the Ray cluster at 127.0.0.1:1"
    ), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
