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


def _whole_rows(raw: np.ndarray, ggml_type: int, shape: tuple[int, int],
                cols: int) -> tuple[np.ndarray, int]:
    """raw's bytes, flat and contiguous, and how many rows of `cols` values of a type with
    `shape` (values, bytes per block) they are; ValueError when not whole rows."""
    row_bytes = cols // shape[0] * shape[1]
    src = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if src.size % row_bytes:
        raise ValueError(f"{src.size} bytes of ggml type {ggml_type} are not whole rows of "
                         f"{cols} values ({row_bytes} bytes each)")
    return src, src.size // row_bytes


def dequantize(raw: np.ndarray, ggml_type: int, cols: int) -> np.ndarray | None:
    """Rows of `ggml_type` blocks (uint8 [rows, cols / values * bytes], or the same bytes
    flat) -> float32 [rows, cols]; None when the type is not one this module takes (the
    caller falls back to `gguf.quants`). A byte count that is not whole rows of `cols`
    values raises ValueError."""
    shape = block_shape(ggml_type)
    if shape is None or cols <= 0 or cols % shape[0]:
        return None
    src, rows = _whole_rows(raw, ggml_type, shape, cols)
    out = np.empty((rows, cols), np.float32)
    if rows and _lib.lk_dequantize_ggml(int(ggml_type), _ffi.from_buffer(src), rows, cols,
                                        _ffi.from_buffer("float[]", out)) != 0:
        return None
    return out


# what `to_q8_0` takes, by `io.stored.StoredTensor.stored` name: GGUF block types (a
# Q4_K_M file's) and the float types (a BF16 safetensors checkpoint's), as ggml type ids
TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13, "q6_k": 14,
            "f32": 0, "f16": 1, "bf16": 30}
_FLOAT_SHAPES = {0: (32, 128), 1: (32, 64), 30: (32, 64)}  # 32 values and their bytes


def source_shape(ggml_type: int) -> tuple[int, int] | None:
    """(values, bytes) per block of a type `to_q8_0` takes (the float types in pieces of
    32 values), else None."""
    if _lib is None:
        return None
    return _FLOAT_SHAPES.get(int(ggml_type)) or block_shape(ggml_type)


def to_q8_0(raw: np.ndarray, ggml_type: int, cols: int,
            out: np.ndarray | None = None) -> np.ndarray:
    """Rows stored as `ggml_type` (uint8 [rows, row_bytes]: blocks of a GGUF block type,
    or f32 / f16 / bf16 values) -> q8_0 rows (uint8 [rows, cols / 32 * 34], written into
    `out` when given: C-contiguous, that shape): the bytes `dequantize` (or the exact
    widening to float32) then `kernels.quantize_q8_0` give, in one pass on the kernel
    threads without the float32 matrix in between (a Q4_K_M file, a BF16 checkpoint, load
    as q8_0 by default). ValueError when the library is not built or the type or shape is
    not one it takes (the caller then takes the float round trip)."""
    shape = source_shape(ggml_type)
    if shape is None or cols <= 0 or cols % shape[0] or shape[0] % 32:
        raise ValueError(f"ggml type {ggml_type} with {cols} columns has no native q8_0 "
                         f"conversion")
    src, rows = _whole_rows(raw, ggml_type, shape, cols)
    want = (rows, cols // 32 * 34)
    if out is None:
        out = np.empty(want, np.uint8)
    elif out.shape != want or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"q8_0 output of {want} uint8 (C-contiguous) expected, got "
                         f"{out.shape} {out.dtype}")
    if rows and _lib.lk_to_q8_0(int(ggml_type), _ffi.from_buffer(src), rows, cols,
                                _ffi.from_buffer(out)) != 0:
        raise ValueError(f"ggml type {ggml_type} with {cols} columns: lk_to_q8_0 refused it")
    return out


# GGUF block types the core multiplies as stored (`native/src/matmul_ggml.c`): a Q4_K_M
# file's, by `io.stored.StoredTensor.stored` name
AS_STORED = {"q5_0": 6, "q4_k": 12, "q6_k": 14}


def _checked(data: np.ndarray, ggml_type: int, cols: int) -> tuple[np.ndarray, int]:
    shape = block_shape(ggml_type)
    if shape is None or ggml_type not in AS_STORED.values():
        raise ValueError(f"ggml type {ggml_type} has no native matmul")
    if cols <= 0 or cols % shape[0] or data.ndim != 2 or \
            data.shape[1] != cols // shape[0] * shape[1]:
        raise ValueError(f"ggml type {ggml_type}: rows of {data.shape[1:]} bytes are not "
                         f"{cols} values ({cols // max(shape[0], 1) * shape[1]} bytes)")
    if data.strides[1] != 1 or data.dtype != np.uint8:
        data = np.ascontiguousarray(data, dtype=np.uint8)
    return data, data.strides[0]


def matmul(x: np.ndarray, data: np.ndarray, ggml_type: int) -> np.ndarray:
    """x float32 [M, cols] @ W.T -> float32 [M, rows] for W = `data` (uint8 [rows, row_bytes]
    of ggml type `ggml_type`, one of AS_STORED), from its blocks (x rounded to int16 per
    block of 32: the only error against the dequantized float weights)."""
    cols = x.shape[-1]
    data, ldw = _checked(data, ggml_type, cols)
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, cols)
    out = np.empty((x2.shape[0], data.shape[0]), np.float32)
    rc = _lib.lk_matmul_ggml(int(ggml_type), _ffi.from_buffer("float[]", x2), x2.shape[0], cols,
                             _ffi.from_buffer(data), ldw, data.shape[0],
                             _ffi.from_buffer("float[]", out))
    if rc == -5:
        raise MemoryError("ggml matmul: out of memory for the quantized activations")
    if rc:
        raise ValueError(f"ggml matmul refused type {ggml_type} with {cols} columns")
    return out.reshape(x.shape[:-1] + (data.shape[0],))


def embed(data: np.ndarray, ids: np.ndarray, ggml_type: int) -> np.ndarray:
    """Rows `ids` of `data` (ggml type `ggml_type`) as float32 [n, cols]."""
    values, nbytes = block_shape(ggml_type)
    cols = data.shape[1] // nbytes * values
    data, ldw = _checked(data, ggml_type, cols)
    flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    out = np.empty((flat.size, cols), np.float32)
    rc = _lib.lk_embed_ggml(int(ggml_type), _ffi.from_buffer(data), ldw, data.shape[0], cols,
                            _ffi.from_buffer("int64_t[]", flat), flat.size,
                            _ffi.from_buffer("float[]", out))
    if rc == -2:
        raise IndexError(f"embed: a token id is outside the vocabulary [0, {data.shape[0]})")
    if rc:
        raise ValueError(f"ggml embed refused type {ggml_type} with {cols} columns")
    return out


def c_matmul(ggml_type: int) -> tuple[int, int] | None:
    """(function, context) addresses of the C matmul for `WeightFormat.c_matmul`."""
    if _lib is None:
        return None
    ctx = _lib.lk_ggml_matmul_ctx(int(ggml_type))
    if ctx == _ffi.NULL:
        return None
    return (int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "lk_matmul_ggml_extern"))),
            int(_ffi.cast("uintptr_t", ctx)))
