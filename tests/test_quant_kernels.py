"""Parity tests: ggml's quant kernels vs the numpy reference formats vs gguf.quants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
gguf_quants = pytest.importorskip("gguf.quants")

from edge_metastone.quant_kernels import ggml as qk  # noqa: E402
from edge_metastone.quant_kernels import ggml as qk_ggml  # noqa: E402
from edge_metastone.quant_kernels import reference as ref  # noqa: E402

T = qk.GGMLType

# Max |dequantize(quantize(x)) - x| allowed, as a fraction of the row's max |x|.
# Q4_K: 4-bit codes over a (min, max) range per 32 values -> half a step is ~1/30 of the range,
# plus 6-bit scale/min rounding; measured ~0.073 on Gaussian rows. Q6_K: 6-bit symmetric codes
# with 8-bit sub-scales; measured ~0.016.
ROUND_TRIP_TOL = {T.Q4_K: 0.10, T.Q6_K: 0.025}

REFERENCE = {
    T.Q4_0: (ref.quantize_q4_0, ref.dequantize_q4_0),
    T.Q8_0: (ref.quantize_q8_0, ref.dequantize_q8_0),
}


def assert_bytes_equal(got: np.ndarray, want: np.ndarray, what: str, block_bytes: int = 1) -> None:
    """Byte arrays must be identical; the message names the first differing byte and its block."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = np.argwhere(got != want)
    if diff.size:
        r, c = (int(v) for v in diff[0])
        b0 = c // block_bytes * block_bytes
        raise AssertionError(
            f"{what}: {len(diff)} bytes differ; first at row {r} byte {c} "
            f"(got {got[r, c]:#04x}, want {want[r, c]:#04x}); block bytes "
            f"got={got[r, b0 : b0 + block_bytes].tobytes().hex()} "
            f"want={want[r, b0 : b0 + block_bytes].tobytes().hex()}"
        )


def assert_floats_identical(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """float32 arrays must match bit for bit (signed zeros included); report the max difference."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = got.astype(np.float32), want.astype(np.float32)
    bad = np.argwhere(g.view(np.uint32) != w.view(np.uint32))
    if bad.size:
        idx = tuple(int(v) for v in bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} values differ, max |diff| {np.abs(g - w).max():.6g}; "
            f"first at {idx}: got {g[idx]!r}, want {w[idx]!r}"
        )


def hard_rows(rng: np.random.Generator, n_per_row: int = 256) -> np.ndarray:
    """Rows of 32-value blocks covering the edge cases of the absmax-scaled formats."""
    n_blocks = n_per_row // 32
    # Gaussian blocks whose scale varies from 1e-4 to 1e4 block by block.
    scales = np.exp(rng.uniform(np.log(1e-4), np.log(1e4), size=(24, n_blocks, 1)))
    x = (rng.standard_normal((24, n_blocks, 32)) * scales).astype(np.float32)
    x[0, 0] = 0.0  # all-zero block
    x[0, 1] = 1.0
    x[0, 1, 7] = 1e4  # a single huge outlier
    x[0, 2] = np.abs(x[0, 2])
    x[0, 2, 3] = -2 * np.abs(x[0, 2]).max()  # max by |v| is negative
    x[1] = -np.abs(x[1])  # every value negative
    x[2, 0] = 0.5
    x[2, 0, ::2] = -0.5  # exact ties: first of equal |v| wins (its sign sets d)
    x[2, 1] = -0.5
    x[2, 1, ::2] = 0.5
    # Q8_0 with amax 127 has id == 1: values on exact .5 boundaries exercise roundf.
    x[3, 0] = np.arange(32, dtype=np.float32) - 15.5
    x[3, 0, 0] = 127.0
    # Q4_0 with max -8 has id == 1: x0 + 8.5 lands on every half-integer.
    x[3, 1] = np.linspace(-8, 8, 32, dtype=np.float32)
    x[3, 1, 0] = -8.0
    x[3, 2] = np.float32(1e-3) * np.arange(-16, 16, dtype=np.float32)  # tiny but not zero
    x[4, :] = rng.uniform(-1, 1, size=(n_blocks, 32)).astype(np.float32)
    x[5, 0] = np.float32(60000.0)  # near the float16 limit: Q4_0 d = -7500, Q8_0 d ~ 472
    return x.reshape(24, n_per_row)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_quantize_matches_reference(qtype: T, rng: np.random.Generator) -> None:
    x = hard_rows(rng)
    got = qk.quantize(qtype, x)
    assert got.dtype == np.uint8
    assert got.shape == (x.shape[0], qk.row_size(qtype, x.shape[1]))
    assert_bytes_equal(
        got, REFERENCE[qtype][0](x), f"ggml vs reference {qtype.name}", qk.type_size(qtype)
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_negative_zero_block(qtype: T) -> None:
    x = np.full((1, 64), -0.0, dtype=np.float32)
    x[0, 32:] = 0.0
    got = qk.quantize(qtype, x)
    assert_bytes_equal(
        got, REFERENCE[qtype][0](x), f"-0.0 blocks {qtype.name}", qk.type_size(qtype)
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_dequantize_matches_reference(qtype: T, rng: np.random.Generator) -> None:
    x = hard_rows(rng)
    raw = qk.quantize(qtype, x)
    assert_floats_identical(
        qk.dequantize(qtype, raw, x.shape[1]),
        REFERENCE[qtype][1](raw),
        f"ggml vs reference dequantize {qtype.name}",
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_dequantize_arbitrary_bytes(qtype: T, rng: np.random.Generator) -> None:
    bs, ts = qk.block_size(qtype), qk.type_size(qtype)
    blocks = rng.integers(0, 256, size=(40 * 4, ts), dtype=np.uint8)
    blocks[:, :2] = rng.uniform(-10, 10, size=(len(blocks), 1)).astype("<f2").view(np.uint8)
    raw = blocks.reshape(40, 4 * ts)
    assert qk.validate_row_data(qtype, raw)
    assert_floats_identical(
        qk.dequantize(qtype, raw, 4 * bs),
        REFERENCE[qtype][1](raw),
        f"ggml vs reference dequantize of random {qtype.name} bytes",
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_matches_gguf_quants(qtype: T, rng: np.random.Generator) -> None:
    # hard_rows has no all -0.0 block: there gguf's Q4_0 stores d = +0.0 where ggml stores -0.0.
    x = hard_rows(rng)
    raw = qk.quantize(qtype, x)
    ts = qk.type_size(qtype)
    assert_bytes_equal(raw, gguf_quants.quantize(x, qtype), f"ggml vs gguf.quants {qtype.name}", ts)
    assert_bytes_equal(
        ref.quantize_q4_0(x) if qtype == T.Q4_0 else ref.quantize_q8_0(x),
        gguf_quants.quantize(x, qtype),
        f"reference vs gguf.quants {qtype.name}",
        ts,
    )
    assert_floats_identical(
        qk.dequantize(qtype, raw, x.shape[1]),
        gguf_quants.dequantize(raw, qtype),
        f"ggml vs gguf.quants dequantize {qtype.name}",
    )


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_k_quant_round_trip(qtype: T, rng: np.random.Generator) -> None:
    n = 1024
    x = rng.standard_normal((64, n)).astype(np.float32) * rng.uniform(1e-3, 1e3, size=(64, 1))
    x = x.astype(np.float32)
    x[0, 100] = 50 * np.abs(x[0]).max()  # outlier row
    x[1, :256] = 0.0  # an all-zero super-block
    raw = qk.quantize(qtype, x)
    assert raw.shape == (64, n // 256 * qk.type_size(qtype))
    assert qk.validate_row_data(qtype, raw)
    y = qk.dequantize(qtype, raw, n)
    assert np.all(y[1, :256] == 0)
    rel = np.abs(y - x).max(axis=1) / np.abs(x).max(axis=1)
    worst = int(rel.argmax())
    assert rel.max() <= ROUND_TRIP_TOL[qtype], (
        f"{qtype.name} round trip: max |error| / row absmax = {rel.max():.4f} on row {worst} "
        f"> tolerance {ROUND_TRIP_TOL[qtype]}"
    )


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K])
def test_chunking_does_not_change_bytes(
    qtype: T, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = rng.standard_normal((37, 512)).astype(np.float32)
    whole = qk.quantize(qtype, x)
    monkeypatch.setattr(qk_ggml, "_CHUNK_BYTES", 3 * 512 * 4)  # 3 rows per call
    assert_bytes_equal(qk.quantize(qtype, x), whole, f"chunked {qtype.name}", qk.type_size(qtype))


def test_input_dtypes_and_layouts(rng: np.random.Generator) -> None:
    x = rng.standard_normal((8, 128)).astype(np.float32)
    want = qk.quantize(T.Q8_0, x)
    assert_bytes_equal(qk.quantize(T.Q8_0, x.astype(np.float64)), want, "float64 input")
    xt = np.asfortranarray(x)
    assert_bytes_equal(qk.quantize(T.Q8_0, xt), want, "Fortran-ordered input")
    assert qk.quantize(T.Q8_0, x[:0]).shape == (0, qk.row_size(T.Q8_0, 128))


def test_float_targets(rng: np.random.Generator) -> None:
    x = rng.standard_normal((4, 96)).astype(np.float32) * 1000
    f16 = qk.quantize(T.F16, x)
    assert_bytes_equal(f16, x.astype("<f2").view(np.uint8), "F16 vs numpy astype")
    assert_floats_identical(qk.dequantize(T.F16, f16, 96), x.astype(np.float16), "F16 decode")
    f32 = qk.quantize(T.F32, x)
    assert f32.shape == (4, 96 * 4)
    assert_floats_identical(qk.dequantize(T.F32, f32, 96), x, "F32 passthrough")


def test_type_info() -> None:
    assert (qk.block_size(T.Q4_0), qk.type_size(T.Q4_0)) == (32, 18)
    assert (qk.block_size(T.Q8_0), qk.type_size(T.Q8_0)) == (32, 34)
    assert (qk.block_size(T.Q4_K), qk.type_size(T.Q4_K)) == (256, 144)
    assert qk.row_size(T.Q6_K, 512) == 2 * 210
    assert qk.type_name(T.Q4_K) == "q4_K"
    assert qk.is_quantized(T.Q4_0) and not qk.is_quantized(T.F16)
    for qtype in (T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K):
        assert (qk.block_size(qtype), qk.type_size(qtype)) == gguf_quants.GGML_QUANT_SIZES[qtype]


def test_validate_row_data(rng: np.random.Generator) -> None:
    x = rng.standard_normal((4, 64)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q8_0, T.Q4_K, T.Q6_K, T.F16):
        n = 256 if qtype in (T.Q4_K, T.Q6_K) else 64
        assert qk.validate_row_data(qtype, qk.quantize(qtype, np.resize(x, (4, n))))
    bad = qk.quantize(T.Q8_0, x)
    bad[0, :2] = np.array([np.nan], dtype="<f2").view(np.uint8)  # NaN scale
    assert not qk.validate_row_data(T.Q8_0, bad)
    assert not qk.validate_row_data(T.Q8_0, bad[:, :-1])  # not whole blocks


def test_errors() -> None:
    x = np.zeros((2, 48), dtype=np.float32)
    with pytest.raises(ValueError, match=r"n_per_row=48 .* Q4_0 block size 32"):
        qk.quantize(T.Q4_0, x)
    with pytest.raises(ValueError, match=r"n_per_row=128 .* Q4_K block size 256"):
        qk.quantize(T.Q4_K, np.zeros((1, 128), dtype=np.float32))
    with pytest.raises(ValueError, match="n_per_row=48"):
        qk.row_size(T.Q8_0, 48)
    with pytest.raises(ValueError, match="n_per_row=40"):
        qk.dequantize(T.Q8_0, np.zeros((1, 34), dtype=np.uint8), 40)
    with pytest.raises(ValueError, match="not a whole number"):
        qk.dequantize(T.Q8_0, np.zeros((1, 35), dtype=np.uint8), 32)
    with pytest.raises(ValueError, match="cannot quantize to Q8_K"):
        qk.quantize(T.Q8_K, np.zeros((1, 256), dtype=np.float32))
    with pytest.raises(ValueError, match="importance matrix"):
        qk.quantize(T.IQ2_XXS, np.zeros((1, 256), dtype=np.float32))
    with pytest.raises(ValueError, match="no dequantize kernel"):
        qk.dequantize(T.Q8_1, np.zeros((1, 36), dtype=np.uint8), 32)
    with pytest.raises(ValueError, match="unknown or removed ggml type id 4"):
        qk.block_size(4)
    with pytest.raises(ValueError, match="2-d"):
        qk.quantize(T.Q8_0, np.zeros(32, dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        ref.quantize_q4_0(x)


def test_missing_library_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    monkeypatch.setattr(qk_ggml.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="libggml not found next to llama_cpp"):
        qk.GGMLLibrary.find()
