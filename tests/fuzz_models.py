"""Seeded model-file fuzzing: mutants of a small valid GGUF through `inspect` and `score`.

    python tests/fuzz_models.py BASE.gguf TEXT_FILE --n 2000 [--seed 0]

Mutations: truncation, byte flips in the header and metadata, metadata values of the wrong type or
count (arrays, strings, NaN, empty arrays, huge numbers), absurd string/array lengths, removed keys,
and bad head arrays (NaN, wrong sizes). Each mutant runs in a worker process: a Python exception
other than the package's own errors is a traceback, a dead worker is a crash, a mutant that takes
longer than the time limit is a hang, and a result printed as JSON must be strict JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
V = gguf.GGUFValueType


# --- mutations --------------------------------------------------------------------------------


def rewrite(base: Path, out: Path, change, quantize: str | None = None, add=()) -> None:
    """Copy `base` with `change(name, types, value) -> (types, value) | None` applied per key,
    the keys `add` [(name, types, value)] set, and tensor `quantize` (1-D F32) stored as Q8_0."""
    from edge_metastone.gguf_io import ArrayGGUFWriter
    from edge_metastone.modelfile.read import read_gguf

    reader = read_gguf(base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    w = ArrayGGUFWriter(out, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] is V.ARRAY and f.types[-1] is not V.STRING:
            value = np.asarray(f.parts[f.data[0]])
        elif f.types[0] is V.ARRAY:
            value = [bytes(f.parts[i]) for i in f.data]
        elif f.types[0] is V.STRING:
            value = bytes(f.parts[f.data[0]])
        else:
            value = f.parts[f.data[0]][0]
        res = change(f.name, list(f.types), value)
        if res is None or any(f.name == name for name, _, _ in add):
            continue
        types, value = res
        _add(w, f.name, types, value)
    for name, types, value in add:
        _add(w, name, types, value)
    datas = []
    for t in reader.tensors:
        data, qtype = t.data, t.tensor_type
        if t.name == quantize:
            qtype = gguf.GGMLQuantizationType.Q8_0
            data = gguf.quants.quantize(np.asarray(t.data, np.float32).reshape(1, -1), qtype)
        datas.append(data)
        w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for data in datas:
        w.write_tensor_data(data)
    w.close()


def _add(w, name: str, types: list, value) -> None:
    if types[0] is V.ARRAY and isinstance(value, np.ndarray):
        w.add_numpy_array(name, value)
    elif types[0] is V.ARRAY:
        w.add_key_value(name, value, V.ARRAY, sub_type=types[-1])
    elif types[0] is V.STRING:
        w.add_key_value(name, value, V.STRING)
    else:
        w.add_key_value(name, value, types[0])


def _wrong_value(rng: random.Random, types: list, value):
    """A replacement of another type, count or finiteness."""
    choices = [
        ([V.STRING], "not a number"),
        ([V.STRING], b"\xff\xfe invalid utf-8"),
        ([V.FLOAT32], float("nan")),
        ([V.FLOAT32], float("inf")),
        ([V.FLOAT32], -1.0),
        ([V.INT32], -7),
        ([V.UINT64], 2**63),
        ([V.UINT32], 0),
        ([V.ARRAY, V.INT32], np.array([], dtype=np.int32)),
        ([V.ARRAY, V.INT32], np.array([1, 2, 3], dtype=np.int32)),
        ([V.ARRAY, V.FLOAT32], np.array([np.nan] * 4, dtype=np.float32)),
        ([V.ARRAY, V.STRING], [b"a", b"b"]),
        ([V.BOOL], True),
    ]
    if types[0] is V.ARRAY and isinstance(value, np.ndarray) and value.size:
        v = value.copy()
        if v.dtype.kind == "f":
            v.flat[rng.randrange(v.size)] = rng.choice([np.nan, np.inf, -np.inf])
            choices.append(([V.ARRAY, types[-1]], v))
        choices.append(([V.ARRAY, types[-1]], value[: max(0, value.size - rng.randint(1, 3))]))
        choices.append(([V.ARRAY, types[-1]], np.concatenate([value, value[:5]])))
    if types[0] is V.ARRAY and isinstance(value, list) and value:
        dup = list(value)
        dup[rng.randrange(len(dup))] = dup[rng.randrange(len(dup))]
        choices.append((types, dup))
        choices.append((types, value[: len(value) // 2]))
    return rng.choice(choices)


def _key_mutation(rng: random.Random, base: Path, out: Path) -> str:
    from edge_metastone.modelfile.read import read_gguf

    names = [
        f.name
        for f in read_gguf(base).fields.values()
        if not f.name.startswith("GGUF.") and f.name != "general.architecture"
    ]
    target = rng.choice(names)
    kind = rng.random()
    if kind < 0.15:
        rewrite(base, out, lambda n, t, v: None if n == target else (t, v))
        return f"remove {target}"
    special = {
        "tokenizer.ggml.model": (["llama", "bert", "t5", "none", ""], [V.STRING]),
        "qwen2.rope.scaling.type": (["yarn2", "dynamic", "ntk"], [V.STRING]),
    }
    if target in special and rng.random() < 0.7:
        val = rng.choice(special[target][0]).encode()
        rewrite(base, out, lambda n, t, v: (special[target][1], val) if n == target else (t, v))
        return f"{target} = {val!r}"
    replacement: list = []

    def change(n, t, v):
        if n != target:
            return t, v
        if not replacement:
            replacement.append(_wrong_value(rng, t, v))
        return replacement[0]

    rewrite(base, out, change)
    return f"{target} <- {replacement[0][0]}"


def _add_key(rng: random.Random, base: Path, out: Path) -> str:
    key, types, value = rng.choice(
        [
            ("qwen2.rope.scaling.type", [V.STRING], b"dynamic"),
            ("qwen2.rope.freq_base", [V.FLOAT32], float("nan")),
            ("qwen2.attention.layer_norm_rms_epsilon", [V.FLOAT32], float("nan")),
            ("tokenizer.ggml.bos_token_id", [V.UINT32], 10**9),
        ]
    )

    rewrite(base, out, lambda n, t, v: (t, v), add=[(key, types, value)])
    return f"set {key}"


def mutate(rng: random.Random, base: Path, data: bytes, out: Path) -> str:
    """Write one mutant of `base` to `out`; returns a description."""
    kind = rng.random()
    if kind < 0.2:
        cut = rng.randrange(0, len(data))
        out.write_bytes(data[:cut])
        return f"truncate at {cut}"
    if kind < 0.45:
        meta_end = min(len(data), _meta_len(data))
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(meta_end)
            buf[i] = rng.randrange(256)
        out.write_bytes(bytes(buf))
        return "byte flips in metadata"
    if kind < 0.55:
        buf = bytearray(data)
        i = _length_field(rng, data)
        struct.pack_into("<Q", buf, i, rng.choice([2**63, 2**40, 2**31, 0xFFFFFFFFFFFFFFFF]))
        out.write_bytes(bytes(buf))
        return f"absurd length at byte {i}"
    if kind < 0.6:
        return _add_key(rng, base, out)
    if kind < 0.65:
        from edge_metastone.modelfile.read import read_gguf

        norms = [t.name for t in read_gguf(base).tensors if t.name.endswith("norm.weight")]
        name = rng.choice(norms)
        rewrite(base, out, lambda n, t, v: (t, v), quantize=name)
        return f"{name} stored as Q8_0"
    return _key_mutation(rng, base, out)


def _meta_len(data: bytes) -> int:
    from edge_metastone.modelfile.read import read_gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        r = read_gguf(Path(f.name))
        return int(min(t.data_offset for t in r.tensors)) if r.tensors else len(data)


def _length_field(rng: random.Random, data: bytes) -> int:
    """The offset of some u64 string/array length in the metadata."""
    from edge_metastone.modelfile.read import read_gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        r = read_gguf(Path(f.name))
        f_ = rng.choice([x for x in r.fields.values() if not x.name.startswith("GGUF.")])
        return int(f_.offset) + 8 if rng.random() < 0.5 else int(f_.offset)


# --- the worker: one mutant at a time, in-process ---------------------------------------------


def worker(text_file: str) -> None:
    """Read mutant paths on stdin; print one JSON result per mutant."""
    import io
    import logging

    logging.disable(logging.CRITICAL)
    from edge_metastone.commands.inspect import model_facts
    from edge_metastone.engine.scoring import score_text
    from edge_metastone.errors import EdgeMetastoneError
    from edge_metastone.modelfile.read import open_model_file

    text = Path(text_file).read_text()

    def strict(obj) -> bool:
        try:
            json.loads(json.dumps(obj, allow_nan=False))
            return True
        except ValueError:
            return False

    for line in sys.stdin:
        path = line.strip()
        print("START", flush=True)
        outcome = {}
        for step in ("inspect", "score"):
            try:
                if step == "inspect":
                    res = model_facts(open_model_file(path))  # what `inspect` shows
                else:
                    res = score_text(path, text).to_json()
                outcome[step] = "ok" if strict(res) else "badjson"
            except EdgeMetastoneError as e:
                outcome[step] = "error" if "\n" not in str(e) else "multiline"
            except Exception as e:  # the defect this fuzzer hunts
                buf = io.StringIO()
                import traceback

                traceback.print_exc(file=buf)
                outcome[step] = "traceback"
                outcome["trace"] = buf.getvalue()[-600:]
                outcome["exc"] = f"{type(e).__name__}: {e}"[:200]
        print("DONE " + json.dumps(outcome), flush=True)


# --- the harness ------------------------------------------------------------------------------


def fuzz(base: Path, text_file: Path, n: int, seed: int, workdir: Path, timeout: float = 20.0):
    """Run n mutants; returns (Counter of outcomes, list of defect records)."""
    rng = random.Random(seed)
    data = base.read_bytes()
    counts: Counter = Counter()
    defects: list[dict] = []
    env_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(text_file)]
    proc = None
    for i in range(n):
        path = workdir / f"m{i:05d}.gguf"
        desc = mutate(rng, base, data, path)
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen(
                env_cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO,
                env=_env(),
            )
        proc.stdin.write(str(path) + "\n")
        proc.stdin.flush()
        result = _read_result(proc, timeout)
        if result is None:
            kind = "hang" if proc.poll() is None else "crash"
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc = None
            counts[kind] += 1
            defects.append({"mutant": i, "what": desc, "outcome": kind})
        else:
            for step in ("inspect", "score"):
                counts[f"{step}:{result[step]}"] += 1
            if any(
                result[s] in ("traceback", "badjson", "multiline") for s in ("inspect", "score")
            ):
                defects.append({"mutant": i, "what": desc, **result})
        path.unlink(missing_ok=True)
    if proc is not None:
        proc.stdin.close()
        proc.wait(timeout=30)
    return counts, defects


def _env() -> dict:
    import os

    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{HERE}")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, its reaped children included) a live process has used, from
    /proc; None where there is no /proc."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _read_result(
    proc: subprocess.Popen, timeout: float, stuck: float = 120.0, poll: float = 1.0
) -> dict | None:
    """The worker's next result, or None for a hang: judged by the worker's own CPU time, not the
    wall clock, so a loaded machine does not turn a slow mutant into a hang. A hang is `timeout`
    CPU seconds on one mutant, or `stuck` seconds in which it used no CPU at all (blocked)."""
    import os
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    cpu0 = cpu_seconds(proc.pid)
    last_cpu, idle_since = cpu0, time.monotonic()
    wall_deadline = time.monotonic() + timeout  # only where /proc cannot tell CPU time
    started = False
    while True:
        if not sel.select(poll):
            cpu = cpu_seconds(proc.pid)
            now = time.monotonic()
            if cpu is None or cpu0 is None:
                if proc.poll() is not None or now > wall_deadline:
                    return None
                continue
            if cpu - cpu0 > timeout:
                return None
            if cpu > last_cpu:
                last_cpu, idle_since = cpu, now
            elif now - idle_since > stuck:
                return None
            continue
        # the pipe is read with os.read, never through the file object: a readline would buffer
        # a second line (DONE right behind START) where select cannot see it
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return None
        pending = getattr(proc, "pending", b"") + chunk
        *lines, proc.pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if line.startswith("START"):
                started = True
            elif line.startswith("DONE") and started:
                proc.pending = b"\n".join([*lines[lines.index(raw) + 1 :], proc.pending])
                return json.loads(line[5:])


def main() -> None:
    """Command-line entry point."""
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("text_file")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts, defects = fuzz(Path(args.base), Path(args.text_file), args.n, args.seed, Path(tmp))
    print(json.dumps(dict(counts), indent=1))
    for d in defects[:50]:
        print(json.dumps(d))
    sys.exit(1 if defects else 0)


if __name__ == "__main__":
    main()
