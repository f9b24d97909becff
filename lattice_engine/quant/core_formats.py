"""The core weight formats: f32, f16 and q8_0, as numpy reference implementations.

q8_0 is byte-identical to GGUF's Q8_0 (blocks of 32 int8 with one f16 scale in front,
34 bytes per block), so a Q8_0 GGUF tensor loads as-is. The native kernels, when built,
replace `matmul` and `embed` with C versions (see `lattice_engine.kernels`).
"""

from __future__ import annotations

import numpy as np

from .formats import WeightFormat

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


F32 = WeightFormat("f32", 1, 4, quantize_f32, f32_to_float, gguf_type=GGML_TYPE_F32)
F16 = WeightFormat("f16", 1, 2, quantize_f16, f16_to_float, gguf_type=GGML_TYPE_F16)
Q8_0 = WeightFormat("q8_0", Q8_0_BLOCK, Q8_0_BYTES, quantize_q8_0, q8_0_to_float,
                    gguf_type=GGML_TYPE_Q8_0)

CORE_FORMATS = (F32, F16, Q8_0)


def attach_native(formats=CORE_FORMATS) -> bool:
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
    return True
