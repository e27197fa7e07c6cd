"""`batch --ray` on a Ray cluster of one node against two (`ray.cluster_utils.Cluster`, on this
machine), beside a local run, on the same problems; and a transcript of a run that loses a worker.

    python bench/ray_cluster.py [--problems 60] [--effort low] [--window 8]
    python bench/ray_cluster.py --kill-after 6

Every side runs the same input file (fresh nano problems, seed 8181), effort, --max-new-tokens
96, --threads 1 per worker and --window, alone on the machine, one after another: local (one
process), Ray with one node of 1 CPU (1 worker), Ray with two nodes of 1 CPU (2 workers). On one
machine of 2 cores this shows what the distribution costs and that a second node's worker adds
throughput; it cannot show a network between nodes, or a shipped model's transfer time over one.
`--kill-after N` runs the two-node job and SIGKILLs one worker once N records are written, then
prints the command's own output (records, lost workers, retried units, exit status).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))

from task import problems  # noqa: E402


def write_input(path: Path, n: int) -> Path:
    lines = [
        json.dumps({"id": f"q{i}", "prompt": p.prompt, "answer": p.answer})
        for i, p in enumerate(problems(8181, n))
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def command(inp: Path, out: Path, a, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "edge_metastone", "batch", str(inp), "-o", str(out),
        "--effort", a.effort, "--max-new-tokens", "96", "--threads", "1",
        "--window", str(a.window), "--no-progress", "--json", *extra,
    ]  # fmt: skip


def timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, json.loads(proc.stdout)


def on_cluster(nodes: int, fn):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    try:
        return fn(c.address)
    finally:
        c.shutdown()


def throughput(a, tmp: Path) -> None:
    inp = write_input(tmp / "in.jsonl", a.problems)
    rows = {}
    wall, s = timed(command(inp, tmp / "local.jsonl", a))
    rows["local, one process"] = (wall, s)
    for n in (1, 2):
        out = tmp / f"ray{n}.jsonl"
        rows[f"Ray, {n} node(s) x 1 CPU"] = on_cluster(
            n, lambda addr, out=out: timed(command(inp, out, a, "--ray", addr))
        )
    print(
        f"{a.problems} problems, effort {a.effort}, --window {a.window}, --threads 1 per worker, "
        "max_new_tokens 96; wall time includes each command's start (model load, Ray's own)"
    )
    base = rows["Ray, 1 node(s) x 1 CPU"][1]["this_run"]["records_per_s"]
    for name, (wall, s) in rows.items():
        run = s["this_run"]
        ray = run.get("ray") or {}
        print(
            f"{name:28s} command {wall:6.1f} s, run {run['wall_s']:6.1f} s, "
            f"{run['records_per_s']:.2f} records/s ({run['records_per_s'] / base:.2f}x one node), "
            f"workers {ray.get('workers', '-')}, accuracy {s['modes'][a.effort]['accuracy']:.3f}"
        )


def kill(a, tmp: Path) -> None:
    inp = write_input(tmp / "in.jsonl", a.problems)
    out = tmp / "killed.jsonl"

    def go(addr: str) -> None:
        cmd = command(inp, out, a, "--ray", addr)
        cmd.remove("--json")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (out.is_file() and len(out.read_bytes().splitlines()) >= a.kill_after):
            time.sleep(0.2)
        pids = subprocess.run(
            ["pgrep", "-f", "ray::BatchWorker"], capture_output=True, text=True
        ).stdout.split()
        written = len(out.read_bytes().splitlines())
        os.kill(int(pids[0]), signal.SIGKILL)
        print(f"$ {' '.join(cmd[2:])}\n[SIGKILL to worker pid {pids[0]} after {written} records]")
        stdout, stderr = proc.communicate()
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        ids = [r["id"] for r in recs]
        print(stdout.strip())
        print(f"[exit status {proc.returncode}; stderr: {stderr.strip()!r}]")
        print(
            f"[{len(recs)} records, {len(set(ids))} distinct ids, in input order: "
            f"{ids == [f'q{i}' for i in range(a.problems)]}, errors: "
            f"{sum('error' in r for r in recs)}]"
        )

    on_cluster(2, go)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--effort", default="low")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--kill-after", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (kill if a.kill_after else throughput)(a, Path(d))


if __name__ == "__main__":
    main()
