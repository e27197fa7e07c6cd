"""Typed ctypes bindings to ggml's own quantization kernels (libggml-base from llama-cpp-python)."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

logger = logging.getLogger(__name__)

__all__ = [
    "QUANTIZABLE_TYPES",
    "GGMLLibrary",
    "GGMLType",
    "TensorHead",
    "block_size",
    "dequantize",
    "ggml_library",
    "is_quantized",
    "library_path",
    "quantize",
    "requires_imatrix",
    "row_size",
    "type_name",
    "type_size",
    "validate_row_data",
]

# GGML_TYPE_COUNT in the vendored ggml.h of llama-cpp-python 0.3.36; ids past it are rejected
# before they reach C, where they would index past the end of the type table.
_GGML_TYPE_COUNT = 43
# Known to ggml but not (yet) to gguf.GGMLQuantizationType.
_GGML_TYPE_Q2_0 = 42

# The cases of the switch in ggml_quantize_chunk (ggml.c); any other type aborts the process there.
QUANTIZABLE_TYPES: frozenset[int] = frozenset(
    {
        GGMLType.F32,
        GGMLType.F16,
        GGMLType.BF16,
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q2_K,
        GGMLType.Q3_K,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
        GGMLType.IQ2_XXS,
        GGMLType.IQ2_XS,
        GGMLType.IQ3_XXS,
        GGMLType.IQ1_S,
        GGMLType.IQ4_NL,
        GGMLType.IQ3_S,
        GGMLType.IQ2_S,
        GGMLType.IQ4_XS,
        GGMLType.IQ1_M,
        GGMLType.TQ1_0,
        GGMLType.TQ2_0,
        GGMLType.MXFP4,
        GGMLType.NVFP4,
        GGMLType.Q1_0,
        _GGML_TYPE_Q2_0,
    }
)

# Upper bound on the float32 source handed to one ggml_quantize_chunk call (16 MiB).
_CHUNK_BYTES = 16 << 20

_to_float_t = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64
)


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits from ggml.h."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _lib_names(stem: str) -> list[str]:
    """Platform-specific file names of one ggml shared library."""
    if sys.platform == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    if sys.platform == "darwin":
        return [f"lib{stem}.dylib", f"lib{stem}.so"]
    return [f"lib{stem}.so", f"lib{stem}.so.0"]


def _search_dirs() -> list[Path]:
    """Folders that may hold libggml: $LLAMA_CPP_LIB_PATH, then llama_cpp/lib and llama_cpp/."""
    dirs: list[Path] = []
    if env := os.environ.get("LLAMA_CPP_LIB_PATH"):
        dirs.append(Path(env))
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            dirs += [Path(loc) / "lib", Path(loc)]
    return dirs


def library_path(stem: str) -> Path | None:
    """The first ggml shared library named `stem` ("ggml-base", "ggml") next to llama_cpp."""
    for d in _search_dirs():
        for name in _lib_names(stem):
            if (d / name).is_file():
                return d / name
    return None


class TensorHead(ctypes.Structure):
    """The leading fields of `struct ggml_tensor` (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


class GGMLLibrary:
    """Owns the loaded libggml-base handle and its typed function prototypes."""

    def __init__(self, path: Path) -> None:
        if sys.platform == "win32" and hasattr(os, "add_dll_directory"):
            os.add_dll_directory(str(path.parent))
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self._initialized: set[int] = set()
        self._init_lock = threading.Lock()
        self._declare()
        logger.debug("loaded %s", path)

    @classmethod
    def find(cls) -> GGMLLibrary:
        """Locate and load libggml-base next to the installed llama_cpp package."""
        # libggml-base, or the single libggml older wheels linked everything into
        path = library_path("ggml-base") or library_path("ggml")
        if path is not None:
            return cls(path)
        dirs = _search_dirs()
        searched = ", ".join(str(d) for d in dirs) or "llama_cpp is not installed"
        raise RuntimeError(f"libggml not found next to llama_cpp: searched {searched}")

    def _declare(self) -> None:
        lib = self.lib
        c_int, i64, size_t, vp = ctypes.c_int, ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
        fptr = ctypes.POINTER(ctypes.c_float)
        protos: dict[str, tuple[object, list[object]]] = {
            "ggml_blck_size": (i64, [c_int]),
            "ggml_type_size": (size_t, [c_int]),
            "ggml_row_size": (size_t, [c_int, i64]),
            "ggml_type_name": (ctypes.c_char_p, [c_int]),
            "ggml_is_quantized": (ctypes.c_bool, [c_int]),
            "ggml_quantize_init": (None, [c_int]),
            "ggml_quantize_requires_imatrix": (ctypes.c_bool, [c_int]),
            "ggml_quantize_chunk": (size_t, [c_int, fptr, vp, i64, i64, i64, fptr]),
            "ggml_validate_row_data": (ctypes.c_bool, [c_int, vp, size_t]),
            "ggml_get_type_traits": (ctypes.POINTER(_TypeTraits), [c_int]),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def ensure_quantize_init(self, t: int) -> None:
        """Call ggml_quantize_init once per type (it builds lookup tables for the IQ formats)."""
        with self._init_lock:
            if t not in self._initialized:
                self.lib.ggml_quantize_init(t)
                self._initialized.add(t)

    def traits(self, t: int) -> _TypeTraits:
        """The ggml_type_traits entry of one type."""
        return self.lib.ggml_get_type_traits(t).contents


_lib: GGMLLibrary | None = None
_lib_lock = threading.Lock()


def ggml_library() -> GGMLLibrary:
    """The process-wide library handle, loaded on first use."""
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                _lib = GGMLLibrary.find()
    return _lib


def _check_type(t: GGMLType | int) -> int:
    """Validate a ggml type id against the type table and return it as int."""
    ti = int(t)
    if not 0 <= ti < _GGML_TYPE_COUNT or ggml_library().lib.ggml_blck_size(ti) <= 0:
        raise ValueError(f"unknown or removed ggml type id {ti}")
    return ti


def _label(t: int) -> str:
    """A readable name for error messages."""
    try:
        return GGMLType(t).name
    except ValueError:
        return type_name(t)


def block_size(t: GGMLType | int) -> int:
    """Number of values in one block of type t."""
    return int(ggml_library().lib.ggml_blck_size(_check_type(t)))


def type_size(t: GGMLType | int) -> int:
    """Bytes in one block of type t."""
    return int(ggml_library().lib.ggml_type_size(_check_type(t)))


def row_size(t: GGMLType | int, n_per_row: int) -> int:
    """Bytes in one row of n_per_row values of type t."""
    ti = _check_type(t)
    _check_row(ti, n_per_row)
    return int(ggml_library().lib.ggml_row_size(ti, n_per_row))


def type_name(t: GGMLType | int) -> str:
    """ggml's own name of type t, e.g. 'q4_0' or 'q6_K'."""
    name = ggml_library().lib.ggml_type_name(_check_type(t))
    return name.decode() if name else f"type{int(t)}"


def is_quantized(t: GGMLType | int) -> bool:
    """Whether type t is a block-quantized format."""
    return bool(ggml_library().lib.ggml_is_quantized(_check_type(t)))


def requires_imatrix(t: GGMLType | int) -> bool:
    """Whether ggml refuses to quantize type t without an importance matrix."""
    return bool(ggml_library().lib.ggml_quantize_requires_imatrix(_check_type(t)))


def _check_row(t: int, n_per_row: int) -> None:
    """Raise ValueError unless n_per_row is a positive multiple of the block size."""
    bs = int(ggml_library().lib.ggml_blck_size(t))
    if n_per_row <= 0 or n_per_row % bs != 0:
        raise ValueError(
            f"n_per_row={n_per_row} is not a positive multiple of the {_label(t)} block size {bs}"
        )


def quantize(t: GGMLType | int, data: np.ndarray) -> np.ndarray:
    """Quantize float rows [rows, n_per_row] to ggml bytes [rows, row_size] with ggml_quantize_chunk."""
    ti = _check_type(t)
    lib = ggml_library()
    if ti not in QUANTIZABLE_TYPES:
        raise ValueError(f"ggml cannot quantize to {_label(ti)}")
    if lib.lib.ggml_quantize_requires_imatrix(ti):
        raise ValueError(
            f"{_label(ti)} needs an importance matrix, which this function does not take"
        )
    if data.ndim != 2:
        raise ValueError(f"expected a 2-d array [rows, n_per_row], got shape {data.shape}")
    rows, n_per_row = data.shape
    _check_row(ti, n_per_row)
    rs = int(lib.lib.ggml_row_size(ti, n_per_row))
    out = np.empty((rows, rs), dtype=np.uint8)
    if rows == 0:
        return out
    lib.ensure_quantize_init(ti)
    fptr = ctypes.POINTER(ctypes.c_float)
    step = max(1, _CHUNK_BYTES // (4 * n_per_row))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # a no-op for contiguous float32 input; converts other dtypes one chunk at a time
        src = np.ascontiguousarray(data[r0:r1], dtype=np.float32)
        dst = out[r0:r1]
        written = lib.lib.ggml_quantize_chunk(
            ti, src.ctypes.data_as(fptr), dst.ctypes.data, 0, r1 - r0, n_per_row, None
        )
        if written != dst.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return out


def dequantize(t: GGMLType | int, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """Decode ggml bytes of type t to float32 [rows, n_per_row] with the type's to_float kernel."""
    ti = _check_type(t)
    lib = ggml_library()
    _check_row(ti, n_per_row)
    rs = int(lib.lib.ggml_row_size(ti, n_per_row))
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if flat.size % rs != 0:
        raise ValueError(
            f"{flat.size} bytes is not a whole number of {_label(ti)} rows of {rs} bytes "
            f"(n_per_row={n_per_row})"
        )
    rows = flat.size // rs
    if ti == GGMLType.F32:
        return flat.view(np.float32).reshape(rows, n_per_row).copy()
    to_float = lib.traits(ti).to_float
    if not to_float:
        raise ValueError(f"ggml has no dequantize kernel for {_label(ti)}")
    out = np.empty((rows, n_per_row), dtype=np.float32)
    if rows:
        fn = _to_float_t(to_float)
        fn(flat.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n_per_row)
    return out


def validate_row_data(t: GGMLType | int, raw: np.ndarray) -> bool:
    """Check ggml bytes of type t for NaN/inf scales and out-of-range values (ggml_validate_row_data)."""
    ti = _check_type(t)
    buf = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return bool(ggml_library().lib.ggml_validate_row_data(ti, buf.ctypes.data, buf.nbytes))
