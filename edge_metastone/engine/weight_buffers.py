"""Where llama.cpp keeps a model's weights on the CPU: the weight-buffer mode, decided per load.

llama.cpp's CPU backend offers "extra" buffer types that re-lay weights for faster matmuls:
`CPU_REPACK` (AVX2/AVX-512/NEON interleaved Q4_0, Q4_K, IQ4_NL, ...) and, on CPUs with AMX,
`AMX`, which comes first and takes every weight it can. The AMX matmul segfaults in the first
decode on some Xeons (llama.cpp issue 20824, open) and has given wrong Q4_0 results (PR 16315),
so the package never lets it hold weights unless asked to.

Modes (`WeightBuffers`):
  extra   llama.cpp's default: every extra buffer type the build offers (AMX included)
  repack  extra buffer types off, and each matmul weight that CPU_REPACK takes put there by a
          `tensor_buft_overrides` entry (llama.cpp's own `supports_op` decides which): the
          default's layout minus AMX
  plain   extra buffer types off: plain CPU buffers
  auto    extra where the build offers no buffer type known to fail, else repack (plain when
          the build has no CPU_REPACK, or with GPU offload); then a one-time canary: a real
          decode of the model in a child process, cached per (llama.cpp build, CPU, mode, weight
          types), steps down repack -> plain if the child crashes

The mode comes from the caller, else `$EDGE_METASTONE_WEIGHT_BUFFERS`, else auto.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge_metastone.errors import BadModelFileError
from edge_metastone.paths import cache_dir, write_text_atomic
from edge_metastone.types import WeightBuffers, requested_mode

logger = logging.getLogger(__name__)

# Extra buffer types auto never uses, and why.
KNOWN_BAD = {
    "AMX": "llama.cpp's AMX matmul segfaults in the first decode on some CPUs "
    "(llama.cpp issue 20824)"
}
REPACK = "CPU_REPACK"
CANARY_TIMEOUT_S = 180.0
CANARY_VERSION = 1
# The tensors llama.cpp runs through GGML_OP_MUL_MAT in every architecture (llama-arch.cpp's
# LLM_TENSOR_INFOS): only these may be re-laid; a norm or an embedding read by get_rows may not.
_MATMUL_WEIGHT = re.compile(
    r"^(?:blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down"
    r"|ffn_gate_shexp|ffn_up_shexp|ffn_down_shexp)|output)\.weight$"
)


# ---------------------------------------------------------------- what this build offers


@dataclass(frozen=True)
class BuildReport:
    """What llama.cpp's CPU backend offers on this machine (the facts a mode is decided from)."""

    cpu: str  # the CPU device's description (the CPU's model name)
    extra_bufts: tuple[str, ...]  # the CPU's extra buffer types, in llama.cpp's order
    features: dict[str, str] = field(default_factory=dict)  # CPU backend features (AVX2=1, ...)
    devices: tuple[str, ...] = ()  # every ggml device: "CPU", "CUDA0", ...
    build: str = ""  # identity of the llama.cpp build (version and library stamps)


class _Ggml:
    """Typed prototypes of the ggml registry/backend functions the mode decision needs."""

    def __init__(self) -> None:
        import llama_cpp  # noqa: F401  (loads libllama, and with it libggml*)

        from edge_metastone.quant_kernels.ggml import TensorHead, ggml_library, library_path

        self.head = TensorHead
        base = ggml_library()
        self.base = base.lib
        # the registry lives in libggml; in a one-library build, in libggml-base's file
        reg_path = library_path("ggml")
        self.reg = ctypes.CDLL(str(reg_path)) if reg_path is not None else self.base
        self.lib_dir = Path(base.path).parent
        vp, cp, sz, i64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64
        for lib, name, res, args in [
            (self.reg, "ggml_backend_dev_count", sz, []),
            (self.reg, "ggml_backend_dev_get", vp, [sz]),
            (self.reg, "ggml_backend_dev_by_type", vp, [ctypes.c_int]),
            (self.base, "ggml_backend_dev_name", cp, [vp]),
            (self.base, "ggml_backend_dev_description", cp, [vp]),
            (self.base, "ggml_backend_dev_backend_reg", vp, [vp]),
            (self.base, "ggml_backend_reg_get_proc_address", vp, [vp, cp]),
            (self.base, "ggml_backend_buft_name", cp, [vp]),
            (self.base, "ggml_backend_buft_alloc_buffer", vp, [vp, sz]),
            (self.base, "ggml_backend_buffer_free", None, [vp]),
            (self.base, "ggml_backend_dev_supports_op", ctypes.c_bool, [vp, vp]),
            (self.base, "ggml_init", vp, [_InitParams]),
            (self.base, "ggml_free", None, [vp]),
            (self.base, "ggml_tensor_overhead", sz, []),
            (self.base, "ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
            (self.base, "ggml_mul_mat", vp, [vp, vp, vp]),
            (self.base, "ggml_get_tensor", vp, [vp, cp]),
            (self.base, "gguf_init_from_file", vp, [cp, _GgufParams]),
            (self.base, "gguf_free", None, [vp]),
            (self.base, "gguf_get_n_tensors", i64, [vp]),
            (self.base, "gguf_get_tensor_name", cp, [vp, i64]),
            (self.base, "gguf_get_tensor_type", ctypes.c_int, [vp, i64]),
        ]:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.cpu = self.reg.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        self.cpu_reg = self.base.ggml_backend_dev_backend_reg(self.cpu)

    def _proc(self, name: str) -> int | None:
        return self.base.ggml_backend_reg_get_proc_address(self.cpu_reg, name.encode())

    def extra_bufts(self) -> dict[str, int]:
        """The CPU device's extra buffer types by name, in llama.cpp's order."""
        addr = self._proc("ggml_backend_dev_get_extra_bufts")
        if not addr:
            return {}
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
        arr, out = fn(self.cpu), {}
        i = 0
        while arr and arr[i]:
            out[self.base.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
            i += 1
        return out

    def features(self) -> dict[str, str]:
        """The CPU backend's feature list (what the build compiled and the CPU has)."""
        addr = self._proc("ggml_backend_get_features")
        if not addr:
            return {}
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)
        arr, out = fn(self.cpu_reg), {}
        i = 0
        while arr[i].name:
            out[arr[i].name.decode()] = (arr[i].value or b"").decode()
            i += 1
        return out

    def devices(self) -> tuple[str, ...]:
        """Every registered ggml device's name."""
        n = self.reg.ggml_backend_dev_count()
        return tuple(
            self.base.ggml_backend_dev_name(self.reg.ggml_backend_dev_get(i)).decode()
            for i in range(n)
        )

    def tensor_table(self, path: Path) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
        """(name, ggml type, shape) of every tensor of a GGUF, read by ggml's own parser (C:
        fast on a 150k-token vocabulary, where a Python reader takes seconds)."""
        meta = ctypes.c_void_p()
        gg = self.base.gguf_init_from_file(
            str(path).encode(), _GgufParams(True, ctypes.pointer(meta))
        )
        if not gg:
            raise BadModelFileError(f"{path}: ggml cannot read this GGUF file")
        try:
            out = []
            for i in range(self.base.gguf_get_n_tensors(gg)):
                name = self.base.gguf_get_tensor_name(gg, i)
                head = self.head.from_address(self.base.ggml_get_tensor(meta, name))
                shape = tuple(int(n) for n in head.ne)
                out.append((name.decode(), int(self.base.gguf_get_tensor_type(gg, i)), shape))
            return tuple(out)
        finally:
            self.base.gguf_free(gg)
            if meta:
                self.base.ggml_free(meta)

    def supports_matmul(self, buft: int, ggml_type: int, ne0: int, ne1: int) -> bool:
        """Would llama.cpp run `w @ x` from buffer type `buft` for a weight [ne0, ne1] of this
        type? The same question its loader asks (`weight_buft_supported`), asked the same way."""
        ctx = self.base.ggml_init(_InitParams(self.base.ggml_tensor_overhead() * 8, None, True))
        if not ctx:
            return False
        try:
            w = self.base.ggml_new_tensor_2d(ctx, ggml_type, ne0, ne1)
            x = self.base.ggml_new_tensor_2d(ctx, 0, ne0, 512)  # F32 activations, 512 rows
            op = self.base.ggml_mul_mat(ctx, w, x)
            head = self.head.from_address(w)
            buf = self.base.ggml_backend_buft_alloc_buffer(buft, 0)
            head.buffer = buf
            try:
                return bool(self.base.ggml_backend_dev_supports_op(self.cpu, op))
            finally:
                head.buffer = None
                self.base.ggml_backend_buffer_free(buf)
        finally:
            self.base.ggml_free(ctx)


class _InitParams(ctypes.Structure):
    """struct ggml_init_params (ggml.h)."""

    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class _Feature(ctypes.Structure):
    """struct ggml_backend_feature (ggml-backend.h)."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


class _GgufParams(ctypes.Structure):
    """struct gguf_init_params (gguf.h)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@functools.lru_cache(maxsize=16)
def _tensors(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    return _ggml().tensor_table(Path(path))


def tensor_table(path: Path | str) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, ggml type id, shape) of a GGUF's tensors, cached per file version."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise BadModelFileError(f"{path}: {e.strerror or e}") from None
    return _tensors(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.cache
def _ggml() -> _Ggml:
    return _Ggml()


def _build_stamp(lib_dir: Path) -> str:
    import llama_cpp

    parts = []
    for f in sorted(lib_dir.glob("*ggml*")) + sorted(lib_dir.glob("*llama*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    stamp = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return f"llama-cpp-python {llama_cpp.__version__} ({lib_dir}, libraries {stamp})"


@functools.cache
def build_report() -> BuildReport:
    """This process's llama.cpp build and CPU, as its CPU backend reports them."""
    g = _ggml()
    return BuildReport(
        cpu=(g.base.ggml_backend_dev_description(g.cpu) or b"").decode().strip(),
        extra_bufts=tuple(g.extra_bufts()),
        features=g.features(),
        devices=g.devices(),
        build=_build_stamp(g.lib_dir),
    )


# ---------------------------------------------------------------- the decision


@dataclass(frozen=True)
class WeightPlan:
    """The weight-buffer mode a model loads with, and why."""

    mode: WeightBuffers  # extra, repack or plain (never auto)
    requested: WeightBuffers
    reason: str
    repacked: int = 0  # weights placed in CPU_REPACK by override (repack mode)

    def summary(self) -> str:
        """One line: `repack (auto: ...)`."""
        return f"{self.mode.value} ({self.requested.value}: {self.reason})"

    def to_json(self) -> dict[str, str | int]:
        """JSON-ready."""
        return {
            "mode": self.mode.value,
            "requested": self.requested.value,
            "reason": self.reason,
            "repacked": self.repacked,
        }


def decide(requested: WeightBuffers, report: BuildReport, *, gpu_layers: int = 0) -> WeightPlan:
    """The mode for a load, from the request and what the build offers (no canary, no I/O)."""
    offered = report.extra_bufts
    bad = [b for b in offered if b in KNOWN_BAD]
    if requested is WeightBuffers.EXTRA:
        why = "as asked: llama.cpp's default"
        if bad:
            why += f", including {', '.join(bad)} ({KNOWN_BAD[bad[0]]})"
        return WeightPlan(WeightBuffers.EXTRA, requested, why)
    if requested is WeightBuffers.PLAIN:
        return WeightPlan(WeightBuffers.PLAIN, requested, "as asked: no extra buffer types")
    if requested is WeightBuffers.REPACK:
        if REPACK not in offered:
            return WeightPlan(WeightBuffers.PLAIN, requested, f"this build has no {REPACK}")
        if gpu_layers:
            return WeightPlan(
                WeightBuffers.PLAIN, requested, "GPU offload: overrides would pin layers to the CPU"
            )
        return WeightPlan(WeightBuffers.REPACK, requested, f"as asked: {REPACK} without the rest")
    # auto
    if not bad:
        listed = ", ".join(offered) if offered else "none"
        return WeightPlan(
            WeightBuffers.EXTRA, requested, f"llama.cpp's default; extra buffer types: {listed}"
        )
    skipped = f"{', '.join(bad)} skipped: {KNOWN_BAD[bad[0]]}"
    if gpu_layers:
        return WeightPlan(WeightBuffers.PLAIN, requested, f"{skipped}; GPU offload")
    if REPACK not in offered:
        return WeightPlan(WeightBuffers.PLAIN, requested, f"{skipped}; no {REPACK} in this build")
    return WeightPlan(WeightBuffers.REPACK, requested, f"{skipped}; {REPACK} kept")


# ---------------------------------------------------------------- repack overrides


def repack_patterns(path: Path | str) -> tuple[list[str], int]:
    """Regexes naming every matmul weight of `path` that CPU_REPACK takes on this machine, one
    per tensor kind (`^blk\\.(?:0|1|5)\\.ffn_down\\.weight$`), as llama.cpp's own check says;
    and how many weights they name."""
    g = _ggml()
    buft = g.extra_bufts().get(REPACK)
    if not buft:
        return [], 0
    layers: dict[str, list[str]] = defaultdict(list)
    checked: dict[tuple[int, int, int], bool] = {}
    for name, ggml_type, shape in tensor_table(path):
        m = _MATMUL_WEIGHT.match(name)
        if m is None or shape[2:] != (1, 1):
            continue
        key = (ggml_type, shape[0], shape[1])
        if key not in checked:
            checked[key] = g.supports_matmul(buft, *key)
        if checked[key]:
            layers[m.group(2) or "output"].append(m.group(1) or "")
    patterns = []
    for kind, ids in layers.items():
        if kind == "output":
            patterns.append(r"^output\.weight$")
        else:
            patterns.append(rf"^blk\.(?:{'|'.join(ids)})\.{kind}\.weight$")
    return patterns, sum(len(ids) for ids in layers.values())


class _Override(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class Placement:
    """A plan applied to `llama_model_params`; keeps the override array alive for the load."""

    def __init__(self, plan: WeightPlan, patterns: list[str]) -> None:
        self.plan = plan
        self.patterns = patterns
        self._keep: object = None

    def apply(self, params: object) -> None:
        """Set `use_extra_bufts` and `tensor_buft_overrides` on a llama_model_params."""
        params.use_extra_bufts = self.plan.mode is WeightBuffers.EXTRA
        if self.plan.mode is not WeightBuffers.REPACK or not self.patterns:
            params.tensor_buft_overrides = None
            return
        buft = _ggml().extra_bufts()[REPACK]
        arr = (_Override * (len(self.patterns) + 1))()
        encoded = [p.encode() for p in self.patterns]
        for i, p in enumerate(encoded):
            arr[i].pattern, arr[i].buft = p, buft
        self._keep = (arr, encoded)
        params.tensor_buft_overrides = ctypes.addressof(arr)


# ---------------------------------------------------------------- the canary


@dataclass(frozen=True)
class CanaryResult:
    """How one child-process decode went."""

    ok: bool
    detail: str  # "decoded 40 tokens in 0.4 s", "killed by signal 11 (SIGSEGV)", ...


def weight_types(path: Path | str) -> tuple[str, ...]:
    """The ggml types of a GGUF's tensors (what a canary vouches for)."""
    from gguf import GGMLQuantizationType

    names = set()
    for _, t, _ in tensor_table(path):
        try:
            names.add(GGMLQuantizationType(t).name)
        except ValueError:
            names.add(f"type{t}")
    return tuple(sorted(names))


def canary_key(report: BuildReport, mode: WeightBuffers, types: tuple[str, ...]) -> str:
    """Identity of (llama.cpp build, CPU, mode, weight types)."""
    ident = [
        str(CANARY_VERSION),
        report.build,
        report.cpu,
        json.dumps(report.features, sort_keys=True),
    ]
    ident += [mode.value, ",".join(types)]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()[:24]


def run_child_decode(
    path: Path | str,
    mode: WeightBuffers | None,
    *,
    gpu_layers: int = 0,
    timeout: float = CANARY_TIMEOUT_S,
) -> CanaryResult:
    """Load `path` and decode a few tokens in a child process (`edge_metastone.engine.canary`), so
    a crash is a result, not the end of this process. `mode` None: the package's default path."""
    cmd = [
        sys.executable,
        "-m",
        "edge_metastone.engine.canary",
        str(path),
        "--gpu-layers",
        str(gpu_layers),
    ]
    if mode is not None:
        cmd += ["--weight-buffers", mode.value]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return CanaryResult(False, f"no answer in {timeout:.0f} s")
    except OSError as e:
        return CanaryResult(False, f"could not start a child process: {e}")
    if proc.returncode < 0:
        import signal

        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = "?"
        return CanaryResult(False, f"killed by signal {-proc.returncode} ({name})")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return CanaryResult(False, f"failed (exit {proc.returncode}): {last}")
    try:
        return CanaryResult(True, json.loads(proc.stdout.strip().splitlines()[-1])["detail"])
    except (ValueError, KeyError, IndexError):
        return CanaryResult(False, f"unreadable answer: {proc.stdout.strip()[-200:]!r}")


def _canary_path(key: str) -> Path:
    return cache_dir() / "canary" / f"{key}.json"


def cached_canary(key: str) -> CanaryResult | None:
    """A stored canary verdict, if any."""
    try:
        d = json.loads(_canary_path(key).read_text())
        return CanaryResult(bool(d["ok"]), str(d["detail"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_canary(
    key: str, result: CanaryResult, mode: WeightBuffers, types: tuple[str, ...], build: str
) -> None:
    path = _canary_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "ok": result.ok,
            "detail": result.detail,
            "mode": mode.value,
            "types": list(types),
            "build": build,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_text_atomic(path, json.dumps(record))
    except OSError as e:
        logger.info("could not cache the weight-buffer canary: %s", e)


def canary_entries() -> list[dict]:
    """Every stored canary verdict (for `doctor`)."""
    folder = cache_dir() / "canary"
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append({"key": f.stem, **json.loads(f.read_text())})
        except (OSError, ValueError):
            continue
    return out


# ---------------------------------------------------------------- one load's plan

_FALLBACK = {WeightBuffers.EXTRA: WeightBuffers.REPACK, WeightBuffers.REPACK: WeightBuffers.PLAIN}
_lock = threading.Lock()
_verdicts: dict[str, CanaryResult] = {}  # this process's canaries, cached or not


def _canary(path: Path, mode: WeightBuffers, report: BuildReport, gpu_layers: int) -> CanaryResult:
    types = weight_types(path)
    key = canary_key(report, mode, types)
    with _lock:
        if key in _verdicts:
            return _verdicts[key]
        result = cached_canary(key)
        if result is None:
            t0 = time.perf_counter()
            logger.info(
                "weight buffers: a test decode of %s with %s, once (child process)",
                path.name,
                mode.value,
            )
            result = run_child_decode(path, mode, gpu_layers=gpu_layers)
            logger.info(
                "weight buffers: test decode %s (%.1f s)", result.detail, time.perf_counter() - t0
            )
            if _decides(result):  # a time-out, a refused start or a failed decode: nothing
                _store_canary(key, result, mode, types, report.build)
        if _decides(result):  # the rest say nothing of the next model with these weight types
            _verdicts[key] = result
        return result


def _decides(result: CanaryResult) -> bool:
    """Only a success or a crash (a signal) speaks for the mode; a decode that failed cleanly
    (e.g. a model whose weights are broken) or timed out says nothing of it."""
    return result.ok or result.detail.startswith("killed by signal")


def _mode_at_fault(path: Path, result: CanaryResult, report: BuildReport, gpu_layers: int) -> bool:
    """True when a failed canary is the mode's fault: a crash, or a clean failure that the plain
    path does not share (when it fails too, the model is broken whatever the mode)."""
    if _decides(result):
        return True
    return _canary(path, WeightBuffers.PLAIN, report, gpu_layers).ok


def plan_for(
    path: Path | str, requested: WeightBuffers | str | None = None, *, gpu_layers: int = 0
) -> Placement:
    """The placement a load of `path` uses: the request (or $EDGE_METASTONE_WEIGHT_BUFFERS, or
    auto) decided against this build; auto's choice confirmed by a cached canary decode."""
    path = Path(path)
    req = requested_mode(requested)
    report = build_report()
    plan = decide(req, report, gpu_layers=gpu_layers)
    if req is WeightBuffers.AUTO:
        notes = []
        while plan.mode is not WeightBuffers.PLAIN:
            result = _canary(path, plan.mode, report, gpu_layers)
            if result.ok:
                break
            if not _mode_at_fault(path, result, report, gpu_layers):
                logger.info(
                    "weight buffers: %s and plain both failed a test decode of %s (%s): the "
                    "model, not the mode; keeping %s",
                    plan.mode.value,
                    path.name,
                    result.detail,
                    plan.mode.value,
                )
                break
            step = _FALLBACK[plan.mode]
            notes.append(f"{plan.mode.value} {result.detail} in a test decode")
            logger.warning(
                "weight buffers: %s %s in a test decode of %s; using %s",
                plan.mode.value,
                result.detail,
                path.name,
                step.value,
            )
            plan = WeightPlan(step, req, plan.reason)
            if step is WeightBuffers.REPACK and REPACK not in report.extra_bufts:
                plan = WeightPlan(WeightBuffers.PLAIN, req, plan.reason)
        if notes:
            plan = WeightPlan(plan.mode, req, f"{plan.reason}; {'; '.join(notes)}")
    patterns: list[str] = []
    if plan.mode is WeightBuffers.REPACK:
        patterns, n = repack_patterns(path)
        plan = WeightPlan(plan.mode, req, plan.reason, repacked=n)
    logger.info("weight buffers: %s", plan.summary())
    return Placement(plan, patterns)


@contextlib.contextmanager
def stock_defaults(
    path: Path | str, requested: WeightBuffers | str | None = None, *, gpu_layers: int = 0
) -> Iterator[Placement]:
    """Within the block, llama-cpp-python's own `Llama(path, ...)` loads with this package's
    placement for `path` (its constructor has no weight-buffer options): for baselines and
    tests that must run stock llama-cpp-python in the same mode as the engine."""
    import llama_cpp.llama_cpp as lc

    placement = plan_for(path, requested, gpu_layers=gpu_layers)
    original = lc.llama_model_default_params

    def defaults() -> object:
        params = original()
        placement.apply(params)
        return params

    lc.llama_model_default_params = defaults
    try:
        yield placement
    finally:
        lc.llama_model_default_params = original
