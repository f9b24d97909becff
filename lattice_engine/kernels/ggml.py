"""GGUF block types to float32 in C (`native/src/ggml_dequant.c`): the load path of the
matrices of a llama.cpp file that lattice does not run as they are (a Q4_K_M file's Q4_K,
Q6_K and Q5_0 blocks). The values are, bit for bit, those of the `gguf` package's numpy
dequantizers, which remain the path for every other type and when the library is not
built; this runs on the kernel threads, ~11x faster (Qwen2.5-Coder-0.5B Q4_K_M: 7.2 ->
0.65 s).
"""

from __future__ import annotations

import numpy as np

from .runtime import _ffi, _lib


def block_shape(ggml_type: int) -> tuple[int, int] | None:
    """(values, bytes) per block of `ggml_type` when `dequantize` takes it, else None."""
    if _lib is None:
        return None
    values, nbytes = _ffi.new("int64_t *"), _ffi.new("int64_t *")
    if _lib.lk_ggml_block_shape(int(ggml_type), values, nbytes) != 0:
        return None
    return int(values[0]), int(nbytes[0])


def dequantize(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray | None:
    """Rows of `ggml_type` blocks (uint8 [rows, cols / values * bytes], or the same bytes
    flat) -> float32 [rows, cols]; None when the type is not one this module takes (the
    caller falls back to `gguf.quants`). A byte count that is not whole rows of `cols`
    values raises ValueError."""
    shape = block_shape(ggml_type)
    if shape is None or cols <= 0 or cols % shape[0]:
        return None
    row_bytes = cols // shape[0] * shape[1]
    src = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if src.size % row_bytes:
        raise ValueError(f"{src.size} bytes of ggml type {ggml_type} are not whole rows of "
                         f"{cols} values ({row_bytes} bytes each)")
    rows = src.size // row_bytes
    out = np.empty((rows, cols), np.float32)
    if rows and _lib.lk_dequantize_ggml(int(ggml_type), _ffi.from_buffer(src), rows, cols,
                                        _ffi.from_buffer("float[]", out)) != 0:
        return None
    return out
