"""The C dequantizers of GGUF block types (kernels.ggml) against the gguf package's numpy
ones, bit for bit, on random blocks with finite scales; and the GGUF reader's use of them."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lattice_engine import kernels  # noqa: E402
from lattice_engine.kernels import ggml  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")

T = gguf.GGMLQuantizationType
# ggml type -> byte offsets of its half-precision fields in a block
HALVES = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
          T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // values, nbytes), dtype=np.uint8)
    for off in HALVES[qtype]:  # every bit pattern elsewhere; scales finite, some subnormal
        halves = (rng.standard_normal((rows, cols // values)) *
                  rng.choice([1e-6, 1e-2, 1.0], (rows, cols // values))).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(rows, cols // values, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(HALVES), ids=lambda t: t.name)
def test_c_dequantizers_equal_the_gguf_package_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    assert ggml.block_shape(qtype) == (values, nbytes)
    # 40 rows of 16 blocks of 256 values (or 64 of 32): enough rows to split over threads
    cols = 4096 if values == 256 else 2048
    raw = random_blocks(qtype, 40, cols, rng)
    want = np.asarray(gguf.dequantize(raw, qtype), np.float32).reshape(40, cols)
    got = ggml.dequantize(raw, qtype, cols)
    assert got.dtype == np.float32 and got.shape == (40, cols)
    assert np.isfinite(want).all()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # a slice of rows (the reader converts matrices a slice at a time) and flat bytes
    assert np.array_equal(ggml.dequantize(raw[7:9], qtype, cols), want[7:9])
    assert np.array_equal(ggml.dequantize(raw.reshape(-1), qtype, cols), want)


def test_types_it_does_not_take_and_bad_lengths():
    assert ggml.block_shape(T.F16) is None and ggml.block_shape(T.IQ4_NL) is None
    raw = np.zeros((2, 18), np.uint8)
    assert ggml.dequantize(raw, T.IQ4_NL, 32) is None  # the caller falls back to gguf
    assert ggml.dequantize(raw, T.Q4_0, 48) is None    # not whole blocks per row
    with pytest.raises(ValueError, match="not whole rows"):
        ggml.dequantize(np.zeros(30, np.uint8), T.Q4_0, 32)


@pytest.mark.parametrize("qtype", [t for t in HALVES if t != T.Q8_0], ids=lambda t: t.name)
def test_blocks_to_q8_0_in_one_pass_equal_the_float_round_trip(qtype):
    """What a Q4_K_M file's matrices load as by default: `to_q8_0` gives the bytes of
    dequantizing and quantizing again, into a new array or the caller's."""
    from lattice_engine.kernels import matmuls

    rng = np.random.default_rng(100 + int(qtype))
    values, _ = gguf.GGML_QUANT_SIZES[qtype]
    cols = 4096 if values == 256 else 2048
    raw = random_blocks(qtype, 40, cols, rng)
    want = matmuls.quantize_q8_0(ggml.dequantize(raw, qtype, cols))
    assert np.array_equal(ggml.to_q8_0(raw, qtype, cols), want)
    out = np.full(want.shape, 7, np.uint8)
    assert ggml.to_q8_0(raw[3:11], qtype, cols, out[3:11]) is not None
    assert np.array_equal(out[3:11], want[3:11]) and (out[:3] == 7).all()


def test_blocks_to_q8_0_refusals():
    with pytest.raises(ValueError, match="no native q8_0"):
        ggml.to_q8_0(np.zeros((2, 18), np.uint8), T.IQ4_NL, 32)
    with pytest.raises(ValueError, match="not whole rows"):
        ggml.to_q8_0(np.zeros(30, np.uint8), T.Q4_0, 32)
    with pytest.raises(ValueError, match="C-contiguous"):
        ggml.to_q8_0(np.zeros((2, 18), np.uint8), T.Q4_0, 32, np.zeros((2, 35), np.uint8))


def test_the_loader_takes_the_one_pass_for_q8_0_only():
    from lattice_engine.quant.core_formats import F16, Q8_0, requantizer

    assert requantizer(Q8_0, "q4_k") is not None and requantizer(Q8_0, "q5_0") is not None
    assert requantizer(Q8_0, "q8_0") is None      # kept as it is, no conversion
    assert requantizer(Q8_0, "iq4_nl") is None    # the float round trip through gguf
    assert requantizer(F16, "q4_k") is None


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_floats_to_q8_0_in_one_pass_equal_quantizing_the_floats(dtype):
    """What a BF16 (or F16, F32) checkpoint's matrices load as under q8_0: the bytes of
    widening to float32 (exact) and quantizing, including blocks holding an infinity, a
    NaN or subnormals (the quantizer's scalar path)."""
    from lattice_engine.kernels import matmuls

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((24, 256)) * rng.choice([1e-3, 1.0, 40.0], (24, 1))).astype(np.float32)
    w[3, 5], w[4, 40], w[5, 7] = np.inf, np.nan, 3e-39
    if dtype == "f16":
        w[3, 5] = 7.0  # an f16 of it overflows on the way in, not in the kernel
        stored = w.astype(np.float16)
    elif dtype == "bf16":
        stored = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated: any bf16 will do
    else:
        stored = w
    floats = (stored.astype(np.uint32) << 16).view(np.float32) if dtype == "bf16" else \
        stored.astype(np.float32)
    with np.errstate(invalid="ignore"):
        want = matmuls.quantize_q8_0(floats)
    got = ggml.to_q8_0(stored.view(np.uint8).reshape(24, -1), ggml.TYPE_IDS[dtype], 256)
    assert np.array_equal(got, want)
