"""Copy one graph tensor (the SPRM features, `l_out-{L-2}`) out of every llama.cpp decode.

llama.cpp calls the context's `cb_eval` for every graph node: once to ask whether we want the
tensor (`ask=True`), then, for the ones we claimed, after it is computed. The copy goes through
`ggml_backend_tensor_get`, so it works for tensors living in GPU memory too.

The callback runs in C (`_capture.c`, built with the package) when that module is present: a
decode graph has ~35 nodes per layer, and each Python callback is a C -> Python -> C round trip.
Without it (no compiler at install time) the same logic runs in Python.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import llama_cpp
import numpy as np

from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.quant_kernels.ggml import TensorHead, ggml_library

logger = logging.getLogger(__name__)

try:
    from edge_metastone.engine import _capture as _native_module
except ImportError:  # built without a C compiler: the Python callback does the same work
    _native_module = None

_GGML_TYPE_F32 = 0


class _CaptureState(ctypes.Structure):
    """`struct em_capture` of _capture.c."""

    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("is_contiguous", ctypes.c_void_p),
        ("buf", ctypes.c_void_p),
        ("n_embd", ctypes.c_int64),
        ("cap_rows", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("target", ctypes.c_char * 64),
    ]


_NATIVE_ERRORS = {1: "is not a contiguous F32 tensor of the expected width", 2: "overflowed"}


def native_available() -> bool:
    """True when the C callback was built with the package."""
    return _native_module is not None


def _address(fn: object) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


@functools.cache
def _native_callback() -> object:
    """`em_capture_cb` as llama.cpp's callback type (loaded once per process)."""
    so = ctypes.CDLL(_native_module.__file__)
    return llama_cpp.ggml_backend_sched_eval_callback(_address(so.em_capture_cb))


@functools.cache
def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    return lib


class FeatureCapture:
    """Collects the rows of graph tensor `l_out-{layer}` ([n_embd, n_tokens]) decode by decode.

    Give the context both `callback` and `user_data`. `capacity` bounds the rows between two
    `take()`s (a context's n_ubatch); `native=False` forces the Python callback.
    """

    def __init__(
        self, layer: int, n_embd: int, *, capacity: int = 512, native: bool | None = None
    ) -> None:
        self.name = f"l_out-{layer}".encode()
        self.n_embd = n_embd
        self._lib = _declare(ggml_library().lib)
        self._chunks: list[np.ndarray] = []
        self._error: str | None = None
        self.native = native_available() if native is None else native
        self.user_data: int | None = None
        if self.native:
            if _native_module is None:
                raise EdgeMetastoneError("the C feature capture is not built in this installation")
            self._init_native(capacity)
        else:
            self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _init_native(self, capacity: int) -> None:
        if len(self.name) >= 64:
            raise EdgeMetastoneError(f"tensor name {self.name!r} is too long")
        self._buf = np.empty((capacity, self.n_embd), np.float32)
        self._state = _CaptureState(
            _address(self._lib.ggml_get_name),
            _address(self._lib.ggml_backend_tensor_get),
            _address(self._lib.ggml_is_contiguous),
            self._buf.ctypes.data,
            self.n_embd,
            capacity,
            0,
            0,
            self.name,
        )
        self.user_data = ctypes.addressof(self._state)
        self.callback = _native_callback()

    def _on_eval(self, tensor: int, ask: bool, _user_data: int) -> bool:
        # Never raise across the C boundary: remember the problem and report it in take().
        try:
            name = self._lib.ggml_get_name(tensor)
            if ask:
                return name == self.name
            if name != self.name:
                return True
            head = TensorHead.from_address(tensor)
            if head.type != _GGML_TYPE_F32 or head.ne[0] != self.n_embd:
                self._error = f"{self.name.decode()} is type {head.type} with ne0={head.ne[0]}"
                return True
            if not self._lib.ggml_is_contiguous(tensor):
                self._error = f"{self.name.decode()} is not contiguous"
                return True
            rows = int(head.ne[1]) * int(head.ne[2]) * int(head.ne[3])
            out = np.empty((rows, self.n_embd), dtype=np.float32)
            self._lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
            self._chunks.append(out)
        except Exception as e:  # a callback must return a bool to C no matter what
            self._error = f"{type(e).__name__}: {e}"
        return True

    def take(self) -> np.ndarray:
        """The rows captured since the last take(), in batch order: [n_tokens, n_embd]."""
        if self.native:
            st = self._state
            rows, error = st.rows, st.error
            st.rows = st.error = 0
            if error:
                raise EdgeMetastoneError(
                    f"feature capture failed: {self.name.decode()} {_NATIVE_ERRORS[error]}"
                )
            return self._buf[:rows].copy()
        chunks, self._chunks = self._chunks, []
        if self._error is not None:
            err, self._error = self._error, None
            raise EdgeMetastoneError(f"feature capture failed: {err}")
        if not chunks:
            return np.empty((0, self.n_embd), dtype=np.float32)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
