"""GGUF writing shared by the converter and the runtime: a writer that packs numpy metadata arrays
in one block, the SPRM head and step keys (SPEC §2), and atomic output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from edge_metastone import keys

_NUMPY_ARRAY_TYPES = {
    np.dtype(np.uint8): gguf.GGUFValueType.UINT8,
    np.dtype(np.int8): gguf.GGUFValueType.INT8,
    np.dtype(np.uint16): gguf.GGUFValueType.UINT16,
    np.dtype(np.int16): gguf.GGUFValueType.INT16,
    np.dtype(np.uint32): gguf.GGUFValueType.UINT32,
    np.dtype(np.int32): gguf.GGUFValueType.INT32,
    np.dtype(np.float32): gguf.GGUFValueType.FLOAT32,
    np.dtype(np.uint64): gguf.GGUFValueType.UINT64,
    np.dtype(np.int64): gguf.GGUFValueType.INT64,
    np.dtype(np.float64): gguf.GGUFValueType.FLOAT64,
}


class ArrayGGUFWriter(gguf.GGUFWriter):
    """GGUFWriter that accepts numpy arrays as metadata arrays.

    The stock writer packs arrays element by element in Python; the SPRM head is 2C^2 numbers
    (52M for a 32B model), so numpy arrays are written as one block of little-endian bytes.
    """

    def add_numpy_array(self, key: str, arr: np.ndarray) -> None:
        """Store a 1-D numeric array under `key` (its dtype decides the GGUF element type)."""
        arr = np.ascontiguousarray(arr).reshape(-1)
        if arr.dtype not in _NUMPY_ARRAY_TYPES:
            raise TypeError(f"unsupported metadata array dtype {arr.dtype}")
        self.add_key_value(
            key, arr, gguf.GGUFValueType.ARRAY, sub_type=_NUMPY_ARRAY_TYPES[arr.dtype]
        )

    def _pack_val(
        self,
        val: Any,
        vtype: gguf.GGUFValueType,
        add_vtype: bool,
        sub_type: gguf.GGUFValueType | None = None,
    ) -> bytes:
        if vtype is gguf.GGUFValueType.ARRAY and isinstance(val, np.ndarray):
            assert sub_type is not None
            head = self._pack("I", vtype) if add_vtype else b""
            head += self._pack("I", sub_type) + self._pack("Q", val.size)
            order = ">" if self.endianess == gguf.GGUFEndian.BIG else "<"
            return head + val.astype(val.dtype.newbyteorder(order), copy=False).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def write_tensor_chunks(self, chunks: Iterable[np.ndarray], nbytes: int) -> None:
        """Write the next planned tensor from consecutive row blocks (streamed, never whole)."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
            raise ValueError(
                f"Expected output file to contain tensor info or weights, got {self.state}"
            )
        assert self.fout is not None and len(self.fout) == 1, "split output is not supported"
        fout = self.fout[0]
        name = next(iter(self.tensors[0]))
        info = self.tensors[0].pop(name)
        if info.nbytes != nbytes:
            raise ValueError(f"{name}: planned {info.nbytes} bytes, asked to write {nbytes}")
        self.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, planned {nbytes}")
        self.write_padding(fout, nbytes)
        self.state = WriterState.WEIGHTS


def add_head_keys(
    writer: ArrayGGUFWriter,
    arrays: Sequence[np.ndarray],
    dtype: str,
    feature_layer: int,
) -> None:
    """The head's SPEC §2 keys: `arrays` are fc1.weight [2C, C], fc1.bias, fc2.weight, fc2.bias,
    stored exactly (float32, or float16 bit patterns when `dtype` is 'f16')."""
    inner, c = arrays[0].shape
    writer.add_uint32(keys.SPRM_VERSION, keys.SPRM_FORMAT_VERSION)
    writer.add_int32(keys.SPRM_FEATURE_LAYER, feature_layer)
    writer.add_uint32(keys.SPRM_HIDDEN_SIZE, c)
    writer.add_uint32(keys.SPRM_INNER_SIZE, inner)
    writer.add_string(keys.SPRM_DTYPE, dtype)
    for key, arr in zip(keys.SPRM_ARRAYS, arrays, strict=True):
        if dtype == "f16":
            stored = np.asarray(arr, dtype=np.float16).view(np.uint16)
        else:
            stored = np.asarray(arr, dtype=np.float32)
        writer.add_numpy_array(key, stored)


def add_step_keys(
    writer: ArrayGGUFWriter, step_ids: Sequence[int], think_start: int, think_end: int
) -> None:
    """The delimiter ids and the think ids (useful with or without a head)."""
    writer.add_numpy_array(keys.STEP_TOKEN_IDS, np.asarray(step_ids, dtype=np.int32))
    writer.add_int32(keys.THINK_START_ID, think_start)
    writer.add_int32(keys.THINK_END_ID, think_end)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds,
    and remove it on any error (Ctrl-C included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a model file is not
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
