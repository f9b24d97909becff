"""The core weight formats: f32, f16 and q8_0, as numpy reference implementations.

q8_0 is byte-identical to GGUF's Q8_0 (blocks of 32 int8 with one f16 scale in front,
34 bytes per block), so a Q8_0 GGUF tensor loads as-is. The native kernels, when built,
replace `matmul` and `embed` with C versions (see `lattice_engine.kernels`).

q8_0_r16 holds q8_0's blocks with 16 rows interleaved (layout in lattice_kernels.h), the
order the batched kernels multiply in: q8_0 weights are converted to it when a model is
loaded for the native backend (`native_layout`), so batched decode stops re-packing every
weight block on every step. Same bytes, same results bit for bit; files keep q8_0.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .formats import PackedMatrix, WeightFormat

Q8_0_BLOCK = 32
Q8_0_BYTES = 2 + Q8_0_BLOCK  # f16 scale + 32 int8

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round like C's roundf (ggml's reference quantizers use it), not numpy's half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_f32(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8)


def f32_to_float(data: np.ndarray, cols: int) -> np.ndarray:
    return data.view(np.float32).reshape(data.shape[0], cols)


def quantize_f16(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float16).view(np.uint8)


def f16_to_float(data: np.ndarray, cols: int) -> np.ndarray:
    return data.view(np.float16).reshape(data.shape[0], cols).astype(np.float32)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    blocks = np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols // Q8_0_BLOCK, Q8_0_BLOCK)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = (amax / 127.0).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.clip(round_half_away(blocks * inv), -127, 127).astype(np.int8)
    out = np.empty((rows, cols // Q8_0_BLOCK, Q8_0_BYTES), dtype=np.uint8)
    out[..., :2] = scale.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(rows, -1)


def q8_0_to_float(data: np.ndarray, cols: int) -> np.ndarray:
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // Q8_0_BLOCK, Q8_0_BYTES)
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
    return (q * scale).reshape(rows, cols)


R16_ROWS = 16


def _r16_value_order() -> np.ndarray:
    """Value index (within a block) of byte 32 i + 2 l + e of a record's quants, per (i, e):
    the pair of values the activations' int16 dword i holds (q16_pos order in native/src/matmul_internal.h)."""
    i = np.arange(16)[:, None]
    e = np.arange(2)[None, :]
    return np.where(i < 8, 4 * i + 2 * e, 4 * (i - 8) + 1 + 2 * e).reshape(-1)


R16_ORDER = _r16_value_order()


def q8_0_to_r16(data: np.ndarray) -> np.ndarray:
    """q8_0 bytes [rows, nb * 34] -> q8_0_r16 bytes of the same shape (rows % 16 == 0)."""
    rows, nbytes = data.shape
    nb = nbytes // Q8_0_BYTES
    blocks = data.reshape(rows // R16_ROWS, R16_ROWS, nb, Q8_0_BYTES)
    quants = blocks[..., 2:][..., R16_ORDER].reshape(rows // R16_ROWS, R16_ROWS, nb, 16, 2)
    out = np.empty((rows // R16_ROWS, nb, 16 * R16_ROWS * 2 + 2 * R16_ROWS), np.uint8)
    out[..., :512] = quants.transpose(0, 2, 3, 1, 4).reshape(rows // R16_ROWS, nb, 512)
    out[..., 512:] = blocks[..., :2].transpose(0, 2, 1, 3).reshape(rows // R16_ROWS, nb, 32)
    return out.reshape(rows, nbytes)


def r16_to_q8_0(data: np.ndarray) -> np.ndarray:
    """The inverse of `q8_0_to_r16`."""
    rows, nbytes = data.shape
    nb = nbytes // Q8_0_BYTES
    rec = data.reshape(rows // R16_ROWS, nb, R16_ROWS * Q8_0_BYTES)
    quants = rec[..., :512].reshape(rows // R16_ROWS, nb, 16, R16_ROWS, 2).transpose(0, 3, 1, 2, 4)
    out = np.empty((rows // R16_ROWS, R16_ROWS, nb, Q8_0_BYTES), np.uint8)
    out[..., 2 + R16_ORDER] = quants.reshape(rows // R16_ROWS, R16_ROWS, nb, 32)
    out[..., :2] = rec[..., 512:].reshape(rows // R16_ROWS, nb, R16_ROWS, 2).transpose(0, 2, 1, 3)
    return out.reshape(rows, nbytes)


F32 = WeightFormat("f32", 1, 4, quantize_f32, f32_to_float, gguf_type=GGML_TYPE_F32)
F16 = WeightFormat("f16", 1, 2, quantize_f16, f16_to_float, gguf_type=GGML_TYPE_F16)
Q8_0 = WeightFormat("q8_0", Q8_0_BLOCK, Q8_0_BYTES, quantize_q8_0, q8_0_to_float,
                    gguf_type=GGML_TYPE_Q8_0)

Q8_0_R16 = WeightFormat("q8_0_r16", Q8_0_BLOCK, Q8_0_BYTES,
                        lambda w: q8_0_to_r16(quantize_q8_0(w)),
                        lambda data, cols: q8_0_to_float(r16_to_q8_0(data), cols),
                        row_group=R16_ROWS)

CORE_FORMATS = (F32, F16, Q8_0)
# formats a model is converted to at load, never chosen by a quant method (registered all
# the same, so every name a PackedMatrix can carry resolves)
LAYOUT_FORMATS = (Q8_0_R16,)


def r16_pays() -> bool:
    """Whether q8_0_r16 is the faster layout here. With the AVX512-VNNI q8_0 kernel it is
    (Qwen2.5-0.5B q8_0, engine alone: 1 stream 20.7 vs ~23 ms/step, 8 streams 35-37 vs
    50 ms). The 256-bit kernels widen its int8 weights with vpmovsxbw, a shuffle: on an
    Intel core (one shuffle port) that cost the single stream ~8% (26.1 vs 23.8 ms/step,
    Sapphire Rapids with the AVX2 kernel forced) for ~9% at 8 streams, so Intel CPUs
    without AVX512-VNNI keep plain q8_0; an AMD core has two shuffle pipes, and there r16
    wins at every batch size (Zen 3, AVX2 kernel, `bench/batch_step.py`: Qwen2.5-0.5B 1
    stream 22.5 vs 25.2 ms/step, 8 streams 68 vs 86 ms; Qwen3.5-0.8B 34 vs 39 and 106 vs
    139 ms). LATTICE_R16=1 / 0 forces it either way (A/B, tests)."""
    import os

    from .. import kernels

    forced = os.environ.get("LATTICE_R16")
    if forced in ("0", "1"):
        return forced == "1"
    if not kernels.available() or kernels.isa() == "generic":
        return False
    return kernels.q8_variant() == "avx512vnni" or kernels.cpu_is_amd()


def native_layout(m: PackedMatrix, force: bool = False) -> PackedMatrix:
    """`m` in the layout the native kernels run fastest from: q8_0 with a multiple of 16
    rows becomes q8_0_r16 where that pays (`r16_pays`, or `force`; converted in place when
    its buffer is writable); a format with a `native_layout` (a plugin's) decides itself;
    anything else is returned as it is. Only for models run by the native backend."""
    from .. import kernels

    if m.format.native_layout is not None:
        return m.format.native_layout(m)
    if m.format.name != "q8_0" or m.rows % R16_ROWS or not kernels.supports(Q8_0_R16) or \
            not (force or r16_pays()):
        return m
    return PackedMatrix(Q8_0_R16, m.rows, m.cols, kernels.q8_0_r16_convert(m.data, m.cols, True))


def requantizer(fmt: WeightFormat, stored: str) -> Optional[Callable[[np.ndarray, int],
                                                                      np.ndarray]]:
    """For a matrix stored as a GGUF block type (`stored`: "q4_k", "q6_k", "q5_0", ...) or
    as floats ("bf16", "f16", "f32") and kept as q8_0 (the default for a Q4_K_M file, and
    for a BF16 checkpoint under the q8_0 method): a converter (raw rows, cols) -> q8_0 rows
    with the bytes of decoding to float32 and quantizing, in one native pass with no
    float32 copy of the matrix (loading Qwen2.5-Coder-0.5B Q4_K_M spent ~1.2 s of its ~4 s
    in the two passes and their copies). None for any other pair, or without the native
    library: the loader then takes the float round trip, which gives the same bytes."""
    if fmt.name != "q8_0":
        return None
    from ..kernels import ggml

    ggml_type = ggml.TYPE_IDS.get(stored)
    if ggml_type is None or ggml.source_shape(ggml_type) is None:
        return None

    def convert(raw: np.ndarray, cols: int) -> np.ndarray:
        return ggml.to_q8_0(raw, ggml_type, cols)

    # `quant.formats.reencode` writes through this into the matrix's own buffer
    convert.into = lambda raw, cols, out: ggml.to_q8_0(raw, ggml_type, cols, out)
    return convert


def attach_native(formats=CORE_FORMATS + LAYOUT_FORMATS) -> bool:
    """Point `matmul` and `embed` of the core formats (and q8_0's `quantize`, which is
    bit-identical to `quantize_q8_0`) at the C kernels, when they are built.

    The formats are frozen dataclasses shared by every PackedMatrix, so the fields are set
    in place. Formats without a native kernel are left alone. Returns whether the native
    module is available.
    """
    from .. import kernels

    if not kernels.available():
        return False
    for fmt in formats:
        if not kernels.supports(fmt):
            continue
        object.__setattr__(fmt, "matmul", kernels.format_matmul(fmt.name))
        object.__setattr__(fmt, "embed", kernels.format_embed(fmt.name))
        if fmt.name == "q8_0":
            object.__setattr__(fmt, "quantize", kernels.quantize_q8_0)
        elif fmt.name == "q8_0_r16":
            object.__setattr__(fmt, "quantize", lambda w: kernels.q8_0_r16_convert(
                kernels.quantize_q8_0(w), w.shape[1], True))
    return True
