"""What this llama.cpp build offers on this CPU: its extra buffer types, features and devices, and
a GGUF's tensor table, read through ggml's own C functions (ctypes)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from edge_metastone.errors import BadModelFileError


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
    return ggml().tensor_table(Path(path))


def tensor_table(path: Path | str) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """(name, ggml type id, shape) of a GGUF's tensors, cached per file version."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise BadModelFileError(f"{path}: {e.strerror or e}") from None
    return _tensors(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.cache
def ggml() -> _Ggml:
    """This process's ggml handle (loads llama.cpp on first use)."""
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
    g = ggml()
    return BuildReport(
        cpu=(g.base.ggml_backend_dev_description(g.cpu) or b"").decode().strip(),
        extra_bufts=tuple(g.extra_bufts()),
        features=g.features(),
        devices=g.devices(),
        build=_build_stamp(g.lib_dir),
    )
