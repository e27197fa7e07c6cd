"""Our server against llama-server, built from the llama.cpp that the installed llama-cpp-python
vendors, on the same GGUF, threads, prompts, sampling and max_tokens. Never run in CI.

    python bench/peer_llama_server.py build          # once: sdist -> cmake -> ~/.cache (minutes)
    python bench/peer_llama_server.py run --model F.gguf [--cases a,b,c]

Cases (every choice's tokens are counted on both sides: ours from `usage`, which counts every
candidate; llama-server's `usage` counts one choice of n, so each of its choices' text is counted
with its own `/tokenize`, outside the timed request: a re-tokenized text can differ from the
sampled ids by a token or so, and the end-of-turn token is in neither count):
  (a) one request: llama-server `n=8` (one prompt cache, `n_cmpl`) against ours at medium (k=8);
  (b) 16 clients at once, 2 requests each: llama-server `n=1` against ours at low (k=2, its
      lowest effort): tokens/s counts every candidate, latency is the request's;
  (c) the same 16 clients with `n=8` against ours at medium.
The two servers never run at once (llama.cpp's threads busy-wait). llama-server runs with its own
defaults except: the weight buffers our engine uses on this machine (`peer_weight_flags`),
--threads, --parallel (the slots each case needs), -c (512 cells a slot), the
sampling below (top_k 0, min_p 0 so both sample from top-p 0.95 at T 0.7), and cache_prompt on
(its default). Ours: `edge-metastone serve --threads N` with the same sampling per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-metastone-peer"
SAMPLING = {"temperature": 0.7, "top_p": 0.95}
PEER_SAMPLING = {**SAMPLING, "top_k": 0, "min_p": 0.0}


def build() -> Path:
    """llama-server from the vendored llama.cpp of the installed llama-cpp-python (cached)."""
    import llama_cpp

    version = llama_cpp.__version__
    exe = CACHE / f"llama-server-{version}"
    if exe.exists():
        return exe
    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / "src"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"llama-cpp-python=={version}",
            "-d",
            str(src),
        ],
        check=True,
    )
    tar = next(src.glob(f"llama_cpp_python-{version}.tar.gz"))
    subprocess.run(["tar", "xzf", str(tar), "-C", str(src)], check=True)
    root = src / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    out = CACHE / "build"
    subprocess.run(
        [
            "cmake",
            "-S",
            str(root),
            "-B",
            str(out),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
        ],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(out), "--target", "llama-server", "-j2"], check=True)
    shutil.copy(out / "bin" / "llama-server", exe)
    return exe


def peer_exe() -> Path:
    import llama_cpp

    for p in (
        CACHE / f"llama-server-{llama_cpp.__version__}",
        CACHE / "build" / "bin" / "llama-server",
    ):
        if p.exists():
            return p
    raise SystemExit("no llama-server built: run `python bench/peer_llama_server.py build`")


class Proc:
    """A server subprocess; `url` once it answers /health."""

    def __init__(self, cmd: list[str], env: dict | None = None, port: int | None = None) -> None:
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = ""
        for _ in range(1200):
            if self.proc.poll() is not None:
                break
            if port is None:
                self.log.seek(0)
                m = re.search(r"on http://127\.0\.0\.1:(\d+)/", self.log.read())
                if m:
                    self.url = f"http://127.0.0.1:{m.group(1)}"
            else:
                self.url = f"http://127.0.0.1:{port}"
            if self.url:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.log.seek(0)
        tail = self.log.read()[-2000:]
        self.stop()
        raise SystemExit(f"{cmd[0]} did not start:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"What is {rng.randint(10, 99)} plus {rng.randint(10, 99)}? Answer briefly."
        for _ in range(n)
    ]


def drive(url: str, bodies: list[dict], clients: int, *, peer: bool = False) -> dict:
    """`clients` clients sending `bodies` (one after another each); tokens are every choice's."""
    lat, tokens = [0.0] * len(bodies), [0] * len(bodies)
    texts: list[list[str]] = [[] for _ in bodies]
    it, lock, errors = iter(range(len(bodies))), threading.Lock(), []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=1800) as http:
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                t = time.perf_counter()
                r = http.post("/v1/chat/completions", json=bodies[i])
                lat[i] = time.perf_counter() - t
                if r.status_code != 200:
                    errors.append(r.text[:300])
                    return
                out = r.json()
                texts[i] = [c["message"]["content"] for c in out["choices"]]
                tokens[i] = out["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server error: {errors[0]}")
    if peer:  # its usage counts one choice of n: count each choice's text (after the timing)
        with httpx.Client(base_url=url, timeout=60) as http:
            tokens = [
                sum(len(http.post("/tokenize", json={"content": t}).json()["tokens"]) for t in ts)
                for ts in texts
            ]
    lat.sort()
    return {
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
    }


def peer_weight_flags(model: Path) -> tuple[list[str], str]:
    """llama-server's flags for the weight buffers our engine loads `model` with here
    (`plan_for`, as `serve` does), and that plan in words. `extra` is llama.cpp's default, no
    flag; plain and repack turn the extra buffer types off (`--no-repack`: on an AMX CPU the
    default puts weights in AMX buffers, whose matmul segfaults in the first decode, llama.cpp
    issue 20824), and repack puts each matmul weight CPU_REPACK takes there by `-ot`, the same
    overrides our `Placement` sets."""
    from edge_metastone.engine.weights.plan import plan_for
    from edge_metastone.types import WeightBuffers

    placement = plan_for(model)
    mode = placement.plan.mode
    if mode is WeightBuffers.EXTRA:
        return [], placement.plan.summary()
    flags = ["--no-repack"]
    if mode is WeightBuffers.REPACK and placement.patterns:
        flags += ["-ot", ",".join(f"{p}=CPU_REPACK" for p in placement.patterns)]
    return flags, placement.plan.summary()


CASES = {  # name: (clients, requests per client, peer n, our effort)
    "a": (1, 3, 8, "medium"),
    "b": (16, 2, 1, "low"),
    "c": (16, 1, 8, "medium"),
}


def run(a: argparse.Namespace) -> None:
    exe = peer_exe()
    model = a.model.resolve()
    mid = model.name.removesuffix(".gguf")
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    print(
        f"model {model.name}; threads {a.threads}; max_tokens {a.max_tokens}; sampling "
        f"{SAMPLING} (peer also top_k 0, min_p 0); chat prompts 'What is A plus B? Answer "
        f"briefly.', seeds = request index"
    )
    print(f"peer: {exe} ({(version.stdout + version.stderr).strip().splitlines()[-1]})")
    weight_flags, weights = peer_weight_flags(model)
    print(f"weights on both sides: {weights}; peer flags {' '.join(weight_flags) or '(none)'}")
    rows = []
    for name in a.cases.split(","):
        clients, per, n, effort = CASES[name]
        prompts = texts(clients * per, ord(name))
        base = {"model": mid, "max_tokens": a.max_tokens}
        ours = [
            {
                **base,
                **SAMPLING,
                "messages": [{"role": "user", "content": t}],
                "seed": i,
                "effort": effort,
            }
            for i, t in enumerate(prompts)
        ]
        peer = [
            {
                **base,
                **PEER_SAMPLING,
                "messages": [{"role": "user", "content": t}],
                "seed": i,
                "n": n,
            }
            for i, t in enumerate(prompts)
        ]
        slots = clients * n
        port = free_port()
        res = {}
        for side in ("peer", "ours") if a.peer_first else ("ours", "peer"):
            if side == "peer":
                cmd = [
                    str(exe),
                    "-m",
                    str(model),
                    "--threads",
                    str(a.threads),
                    "--threads-batch",
                    str(a.threads),
                    "--parallel",
                    str(slots),
                    "-c",
                    str(512 * slots),
                    "--port",
                    str(port),
                    "--host",
                    "127.0.0.1",
                    *weight_flags,
                ]
                srv = Proc(cmd, port=port)
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "edge_metastone",
                    "serve",
                    "--port",
                    "0",
                    "--model",
                    str(model),
                    "--threads",
                    str(a.threads),
                    "--parallel",
                    str(clients),
                    "--max-queue",
                    "256",
                ]
                srv = Proc(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
            try:
                bodies = peer if side == "peer" else ours
                drive(srv.url, bodies[:1], 1, peer=side == "peer")  # warm up
                res[side] = drive(srv.url, bodies, clients, peer=side == "peer")
            finally:
                srv.stop()
        ratio = res["ours"]["tokens_per_s"] / res["peer"]["tokens_per_s"]
        print(
            f"\n({name}) {clients} client(s) x {per} request(s): peer n={n} --parallel {slots}"
            f" vs ours effort={effort}"
        )
        for side in ("peer", "ours"):
            r = res[side]
            print(
                f"  {side:4}: {r['tokens']} tokens in {r['wall_s']:.1f} s = "
                f"{r['tokens_per_s']:.1f} tokens/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s"
            )
        print(f"  ours / peer tokens/s = {ratio:.2f}x")
        rows.append(
            {
                "case": name,
                "clients": clients,
                "per_client": per,
                "n": n,
                "effort": effort,
                **{s: res[s] for s in res},
                "ratio": ratio,
            }
        )
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": model.name,
                    "threads": a.threads,
                    "max_tokens": a.max_tokens,
                    "rows": rows,
                },
                indent=1,
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=96)
    r.add_argument("--cases", default="a,b,c")
    r.add_argument("--peer-first", action="store_true")
    r.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    if a.cmd == "build":
        print(build())
    else:
        run(a)


if __name__ == "__main__":
    main()
