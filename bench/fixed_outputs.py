"""Fixed-seed outputs of every front and both runtimes, hashed: run it on two commits to show a
change left behaviour alone.

    python bench/fixed_outputs.py WORK [--n 20]

What it runs (timings, the scheduler's predictions and server ids/clock fields are left out of the
hash; everything else, every candidate's tokens, text, step scores and finish reason, is in):

- `reason`: the embedded model on n arithmetic problems (seed 777, as bench/nano_eval.py) at
  low/medium/high, through the Python API (`Reasoner.reason(...).to_json()`, what `reason --json`
  prints), plus five variants that exercise the decode loop's other paths on 5 of them: prune,
  vote, logprob with log-probabilities, a stop string, a short max_new_tokens, a q8_0 KV cache;
- `batch`: `edge-metastone batch` on the same n problems (medium);
- `server`: one streamed `/v1/chat/completions` request to `edge-metastone serve` (its events in
  order, the streamed content and the final extension; how they group into chunks is timing);
- `tiny-gguf` and `tiny-onnx`: a tiny random checkpoint (tests/fixtures) converted to Q4_0 GGUF and
  to an f32 ONNX directory, reasoned on at low and medium (the ONNX runtime's own decode path),
  plus both KV layouts through the backend's `generate` (unified and streams).

Each section's SHA-256 and the combined one are printed; the canonical JSON goes to WORK/outputs/.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "nano"))
sys.path.insert(0, str(REPO / "tests"))

from task import problems  # noqa: E402

CLI = [sys.executable, "-m", "edge_metastone"]
DROP = {"timings", "predicted", "id", "created", "system_fingerprint", "usage", "time_s"}


def clean(obj: Any) -> Any:
    """`obj` without the fields that measure time or name a request."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items() if k not in DROP}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj


def digest(obj: Any) -> str:
    """SHA-256 of `obj`'s canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def reason_section(prompts: list[str]) -> list[Any]:
    """The embedded model at every effort, and the loop's other paths on five prompts."""
    from edge_metastone import Reasoner

    out = []
    with Reasoner() as r:
        for effort in ("low", "medium", "high"):
            for p in prompts:
                out.append(clean(r.reason(p, effort=effort, seed=0).to_json()))
        variants: list[dict[str, Any]] = [
            {"strategy": "prune"},
            {"strategy": "vote"},
            {"strategy": "logprob", "logprobs": True},
            {"stop": ("=",)},
            {"max_new_tokens": 7},
            {"kv_cache": "q8_0"},
        ]
        for v in variants:
            for p in prompts[:5]:
                out.append(clean(r.reason(p, effort="medium", seed=3, **v).to_json()))
    return out


def batch_section(prompts: list[str], work: Path, extra: tuple[str, ...] = ()) -> list[Any]:
    """`edge-metastone batch` on the prompts (medium)."""
    src, dst = work / "batch-in.jsonl", work / "batch-out.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    dst.unlink(missing_ok=True)
    subprocess.run(
        [*CLI, "batch", str(src), "-o", str(dst), "--no-progress", *extra],
        check=True,
        capture_output=True,
    )
    return [clean(json.loads(line)) for line in dst.read_text().splitlines()]


def server_section(prompt: str) -> list[Any]:
    """One streamed chat completion from `edge-metastone serve`, every chunk."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "seed": 5,
            "effort": "medium",
        }
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        chunks = []
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(clean(json.loads(line[6:])))
        # how events group into chunks depends on timing: keep their order, not the grouping
        events = [e for c in chunks for e in c.get("metastone", {}).get("events", [])]
        final = [
            c["metastone"] for c in chunks if "events" not in c.get("metastone", {"events": 0})
        ]
        choices = [ch for c in chunks for ch in c["choices"]]
        content = "".join(ch["delta"].get("content") or "" for ch in choices)
        finish = [ch["finish_reason"] for ch in choices if ch["finish_reason"] is not None]
        return [{"events": events, "content": content, "finish": finish, "final": final}]
    finally:
        proc.terminate()
        proc.wait()


def _first(*names: str) -> Any:
    """The first of these modules that exists."""
    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    return importlib.import_module(names[-1])


def tiny_section(work: Path, prompts: list[str]) -> dict[str, list[Any]]:
    """A tiny random checkpoint on both runtimes: reason, and both KV layouts through generate."""
    from edge_metastone import Reasoner

    # the same run on both sides of the redesign, whose modules moved
    open_backend = _first("edge_metastone.runtime", "edge_metastone.backend").open_backend
    types = _first("edge_metastone.types")
    GenerationSettings, SamplingSettings = types.GenerationSettings, types.SamplingSettings

    hf = work / "tiny-hf"
    if not (hf / "config.json").is_file():
        script = REPO / "tests" / "fixtures" / "make_tiny_metastone.py"
        subprocess.run([sys.executable, str(script), str(hf)], check=True, capture_output=True)
    models = {"tiny-gguf": work / "tiny-q4_0.gguf", "tiny-onnx": work / "tiny-onnx"}
    if not models["tiny-gguf"].exists():
        subprocess.run(
            [*CLI, "convert", str(hf), "-o", str(models["tiny-gguf"]), "--outtype", "q4_0"],
            check=True,
            capture_output=True,
        )
    if not models["tiny-onnx"].exists():
        subprocess.run(
            [
                *CLI,
                "convert",
                str(hf),
                "--format",
                "onnx",
                "-o",
                str(models["tiny-onnx"]),
                "--outtype",
                "f32",
            ],
            check=True,
            capture_output=True,
        )
    out: dict[str, list[Any]] = {}
    for name, path in models.items():
        rows = []
        with Reasoner(path, max_new_tokens=40) as r:
            for effort in ("low", "medium"):
                for p in prompts[:5]:
                    rows.append(clean(r.reason(p, effort=effort, seed=1).to_json()))
        backend = open_backend(path)
        try:
            _, ids = backend.encode_chat([{"role": "user", "content": prompts[0]}])
            for layout in backend.kv_layouts:
                settings = GenerationSettings(
                    max_new_tokens=30, kv_layout=layout, logprobs=True, stop=("ab",)
                )
                events = backend.generate(ids, 4, SamplingSettings(seed=9), settings)
                rows.append([clean(repr(e)) for e in events])
        finally:
            backend.close()
        out[name] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument(
        "--batch-window",
        type=int,
        default=None,
        help="batch's --window (a commit before it ran one problem at a time: compare with 1)",
    )
    args = ap.parse_args(argv)
    work = args.work
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGE_METASTONE_CACHE", str(work / "cache"))
    prompts = [p.prompt for p in problems(777, args.n)]
    sections: dict[str, Any] = {}
    t0 = time.perf_counter()
    sections["reason"] = reason_section(prompts)
    window = () if args.batch_window is None else ("--window", str(args.batch_window))
    sections["batch"] = batch_section(prompts, work, window)
    sections["server"] = server_section(prompts[0])
    sections.update(tiny_section(work, prompts))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"commit {commit}, {args.n} prompts, {time.perf_counter() - t0:.0f} s")
    for name, rows in sections.items():
        (work / "outputs" / f"{name}.json").write_text(json.dumps(rows, sort_keys=True, indent=1))
        print(f"{name:10s} {len(rows):4d} outputs  sha256 {digest(rows)[:16]}")
    print(
        f"{'all':10s} {sum(len(r) for r in sections.values()):4d} outputs  sha256 {digest(sections)[:16]}"
    )


if __name__ == "__main__":
    main()
