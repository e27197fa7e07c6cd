"""Numpy reference Q4_0 and Q8_0 formats, bit-exact with quantize_row_q*_0_ref in ggml-quants.c.

All arithmetic is float32, as in C. Non-finite input is outside the contract (ggml itself then
converts NaN/inf to an integer, which C leaves undefined).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "Q4_0_BLOCK_BYTES",
    "Q8_0_BLOCK_BYTES",
    "QK4_0",
    "QK8_0",
    "dequantize_blocks_q4_0",
    "dequantize_blocks_q8_0",
    "dequantize_q4_0",
    "dequantize_q8_0",
    "quantize_blocks_q4_0",
    "quantize_blocks_q8_0",
    "quantize_q4_0",
    "quantize_q8_0",
]

QK4_0 = 32
QK8_0 = 32
Q4_0_BLOCK_BYTES = 2 + QK4_0 // 2  # f16 d, 16 bytes of nibbles
Q8_0_BLOCK_BYTES = 2 + QK8_0  # f16 d, 32 int8

_F16 = np.dtype("<f2")


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: nearest integer, halves away from zero (exact, unlike floor(x + 0.5))."""
    r = np.trunc(x)
    return r + np.sign(x) * (np.abs(x - r) >= 0.5)


def _inverse(d: np.ndarray) -> np.ndarray:
    """C `d ? 1.0f/d : 0.0f` in float32."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def _pack_d(d: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Lay out blocks as [f16 d | qs bytes], the memory order of block_q4_0 / block_q8_0."""
    n_blocks = d.shape[0]
    out = np.empty((n_blocks, 2 + qs.shape[1]), dtype=np.uint8)
    out[:, :2] = d.astype(_F16).reshape(n_blocks, 1).view(np.uint8)
    out[:, 2:] = qs
    return out


def _unpack_d(blocks: np.ndarray) -> np.ndarray:
    """The f16 scale of each block as float32 [n_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, :2]).view(_F16).astype(np.float32)


def _as_blocks(data: np.ndarray, qk: int) -> np.ndarray:
    """Float rows [rows, n_per_row] as float32 blocks [n_blocks, qk]."""
    if data.ndim != 2:
        raise ValueError(f"expected a 2-d array [rows, n_per_row], got shape {data.shape}")
    if data.shape[1] % qk != 0:
        raise ValueError(f"n_per_row={data.shape[1]} is not a multiple of the block size {qk}")
    return np.ascontiguousarray(data, dtype=np.float32).reshape(-1, qk)


def _as_byte_blocks(raw: np.ndarray, block_bytes: int) -> tuple[np.ndarray, int, int]:
    """Byte rows [rows, row_size] as byte blocks [n_blocks, block_bytes], rows, blocks per row."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes != 0:
        raise ValueError(
            f"expected uint8 [rows, k * {block_bytes}], got {raw.dtype} of shape {raw.shape}"
        )
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    return blocks, raw.shape[0], raw.shape[1] // block_bytes


def quantize_blocks_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 of float32 blocks [n_blocks, 32] -> bytes [n_blocks, 34]."""
    amax = np.abs(blocks).max(axis=1)
    d = amax / np.float32(127)
    x0 = blocks * _inverse(d)[:, None]
    qs = _roundf(x0).astype(np.int8).view(np.uint8)
    return _pack_d(d, qs)


def dequantize_blocks_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 bytes [n_blocks, 34] -> float32 [n_blocks, 32]."""
    qs = blocks[:, 2:].view(np.int8).astype(np.float32)
    return qs * _unpack_d(blocks)


def quantize_blocks_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 of float32 blocks [n_blocks, 32] -> bytes [n_blocks, 18]."""
    n_blocks = blocks.shape[0]
    absb = np.abs(blocks)
    # C keeps the first value whose |v| strictly beats the running max, sign included.
    imax = absb.argmax(axis=1)
    vmax = blocks[np.arange(n_blocks), imax]
    # C starts from max = +0.0f and never replaces it in an all-zero block, even for -0.0 input.
    vmax = np.where(absb[np.arange(n_blocks), imax] == 0, np.float32(0), vmax).astype(np.float32)
    d = vmax / np.float32(-8)
    x0 = blocks * _inverse(d)[:, None] + np.float32(8.5)
    # (int8_t) cast truncates toward zero, then MIN(15, .)
    q = np.minimum(np.trunc(x0), 15).astype(np.uint8)
    qs = q[:, : QK4_0 // 2] | (q[:, QK4_0 // 2 :] << np.uint8(4))
    return _pack_d(d, qs)


def dequantize_blocks_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 bytes [n_blocks, 18] -> float32 [n_blocks, 32]."""
    qs = blocks[:, 2:]
    lo = (qs & np.uint8(0x0F)).astype(np.int8) - np.int8(8)
    hi = (qs >> np.uint8(4)).astype(np.int8) - np.int8(8)
    return np.concatenate([lo, hi], axis=1).astype(np.float32) * _unpack_d(blocks)


def quantize_q8_0(data: np.ndarray) -> np.ndarray:
    """Q8_0 of float rows [rows, n_per_row] -> bytes [rows, n_per_row // 32 * 34]."""
    blocks = _as_blocks(data, QK8_0)
    return quantize_blocks_q8_0(blocks).reshape(
        data.shape[0], data.shape[1] // QK8_0 * Q8_0_BLOCK_BYTES
    )


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 bytes [rows, row_size] -> float32 [rows, n_per_row]."""
    blocks, rows, per_row = _as_byte_blocks(raw, Q8_0_BLOCK_BYTES)
    return dequantize_blocks_q8_0(blocks).reshape(rows, per_row * QK8_0)


def quantize_q4_0(data: np.ndarray) -> np.ndarray:
    """Q4_0 of float rows [rows, n_per_row] -> bytes [rows, n_per_row // 32 * 18]."""
    blocks = _as_blocks(data, QK4_0)
    return quantize_blocks_q4_0(blocks).reshape(
        data.shape[0], data.shape[1] // QK4_0 * Q4_0_BLOCK_BYTES
    )


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0 bytes [rows, row_size] -> float32 [rows, n_per_row]."""
    blocks, rows, per_row = _as_byte_blocks(raw, Q4_0_BLOCK_BYTES)
    return dequantize_blocks_q4_0(blocks).reshape(rows, per_row * QK4_0)
