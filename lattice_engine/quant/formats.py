"""The weight-format table: how a matrix is stored and how to multiply by it.

One `WeightFormat` per block format, in the spirit of ggml's type traits table. Every
format stores a [rows, cols] float matrix as a uint8 array [rows, row_bytes] of blocks
along each row, so the kernels, the loaders and the tests treat every format alike.
Core formats (f32, f16, q8_0) are registered by the built-in plugin
`lattice_engine.quant.core_formats`; plugins add more through `register_weight_formats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import numpy as np

from ..errors import CheckpointError

MatmulFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class WeightFormat:
    """One block format.

    Attributes:
        name: registry key, e.g. "q8_0".
        block_size: float elements per block along a row.
        bytes_per_block: storage bytes per block.
        quantize: float32 [rows, cols] -> uint8 [rows, row_bytes]. cols must be a multiple
            of block_size (see `check_shape`). The engine calls it on row slices (whole
            row groups) as well as whole matrices, and concatenates the results: rows must
            be encoded independently. Everything a row needs (its scales, offsets, any
            per-row metadata) lives in that row's bytes: there is no side channel, so a
            per-row scale is stored in the row, e.g. at the front of its first block.
        to_float: (uint8 [rows, row_bytes], cols) -> float32 [rows, cols]; also called on
            row slices (embedding lookups, the numpy backend), with the matrix's `cols`.
        matmul: optional fast kernel (x float32 [M, cols], packed [rows, row_bytes]) ->
            float32 [M, rows], i.e. x @ W.T. Only the native backend calls it; the numpy
            backend (`lattice_engine.ops`, the reference) always dequantizes with
            to_float. None means dequantize-then-numpy on either backend.
        embed: optional fast kernel (packed, int64 ids [n]) -> float32 [n, cols].
        gguf_type: GGML type id whose bytes are identical, so GGUF tensors of that type
            load without a float round trip; None if there is none.
        from_stored: optional {stored type name: re-encoder} for stored block types this
            format holds (nearly) exactly without being the same bytes, e.g. a GGUF file's
            "q4_k" in an asymmetric 4-bit format: (uint8 [rows, stored row_bytes], cols) ->
            uint8 [rows, row_bytes]. A matrix stored in such a type and kept in this format
            is re-encoded from its blocks a slice of rows at a time, not dequantized and
            quantized again (which moves values to another grid). Rows are encoded
            independently; a ValueError (a block it cannot hold) sends the loader back to
            the float round trip. The names are `io.stored.StoredTensor.stored`'s: the
            lower-case GGML type name for a GGUF block type ("q4_k", "q6_k", ...).
        c_matmul: optional (function address, context address) of a C matmul with the
            signature of `lk_extern_matmul` (native/include/lattice_kernels.h), so the
            core's fused decode steps can call a plugin format's kernel without Python in
            between; None keeps such matrices on the per-kernel path.
        c_matmul_grouped: optional function address, with c_matmul, of a C matmul with the
            signature of `lk_extern_matmul_grouped` (lattice_plugin.h) and c_matmul's
            context: several matrices of this format, each over its own rows of one input,
            in one call (a mixture-of-experts layer's selected experts). Its results must
            equal c_matmul's bit for bit. None: the core calls c_matmul once per expert.
        row_group: rows stored interleaved in groups of this many (1: row r is data[r]);
            the row count must be a multiple of it, and only whole groups can be sliced.
        native_layout: optional (PackedMatrix of this format) -> the same matrix in the
            layout this format's native kernels run fastest from (a registered format with
            the same values, e.g. rows interleaved like q8_0_r16), or the matrix itself
            where that does not pay. Called once per matrix when a model is loaded for the
            native backend; it may convert a writable buffer in place. `lattice quantize`
            loads with the numpy backend, so files keep this (the plain) format.
    """

    name: str
    block_size: int
    bytes_per_block: int
    quantize: Callable[[np.ndarray], np.ndarray]
    to_float: Callable[[np.ndarray, int], np.ndarray]
    matmul: Optional[MatmulFn] = None
    embed: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None
    gguf_type: Optional[int] = None
    from_stored: Optional[Mapping[str, Callable[[np.ndarray, int], np.ndarray]]] = None
    c_matmul: Optional[tuple[int, int]] = None
    c_matmul_grouped: Optional[int] = None
    row_group: int = 1
    native_layout: Optional[Callable[["PackedMatrix"], "PackedMatrix"]] = None

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.bytes_per_block

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] % self.block_size:
            raise CheckpointError(
                f"tensor {name!r} of shape {shape} cannot be stored as {self.name}: its rows "
                f"need a length that is a multiple of {self.block_size}; keep it in f32/f16 "
                f"or pick another quant method")
        if shape[0] % self.row_group:
            raise CheckpointError(
                f"tensor {name!r} of shape {shape} cannot be stored as {self.name}: it "
                f"interleaves rows in groups of {self.row_group}, and {shape[0]} rows are not "
                f"a multiple of that; use the plain format")


@dataclass(frozen=True)
class PackedMatrix:
    """A [rows, cols] matrix stored in a weight format; what `Linear` layers hold."""

    format: WeightFormat
    rows: int
    cols: int
    data: np.ndarray  # uint8 [rows, row_bytes]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to_float(self) -> np.ndarray:
        return self.format.to_float(self.data, self.cols)


CONVERT_CHUNK_ELEMENTS = 1 << 20  # floats converted per slice when re-quantizing a matrix (4 MB)


class DequantizedRows:
    """Row slices of a packed matrix as float32, so it can be re-packed slice by slice."""

    def __init__(self, fmt: WeightFormat, data: np.ndarray, cols: int):
        self.format, self.data, self.shape = fmt, data, (data.shape[0], cols)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.format.to_float(self.data[rows], self.shape[1])


def reencode(fmt: WeightFormat, name: str, raw_rows, convert, allocate=np.empty) -> PackedMatrix:
    """A matrix re-encoded from its stored blocks into `fmt` by `convert` (one of
    `fmt.from_stored`), a slice of rows at a time: `raw_rows` has the float `shape` and gives
    uint8 row slices of the stored bytes (`io.stored.StoredTensor.raw_rows()`)."""
    rows, cols = (int(d) for d in raw_rows.shape)
    fmt.check_shape(name, (rows, cols))
    data = allocate((rows, fmt.row_bytes(cols)), np.uint8)
    g = fmt.row_group
    step = max(1, CONVERT_CHUNK_ELEMENTS // max(cols, 1) // g) * g
    # a converter with `into(raw, cols, out)` writes the destination rows itself: no
    # temporary per slice (each a fresh allocation the kernel zeroes, then a copy)
    into = getattr(convert, "into", None)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        if into is not None:
            into(raw_rows[start:end], cols, data[start:end])
        else:
            data[start:end] = convert(raw_rows[start:end], cols)
    return PackedMatrix(fmt, rows, cols, data)


def pack(fmt: WeightFormat, name: str, weight, allocate=np.empty) -> PackedMatrix:
    """Quantize a float matrix into `fmt`, with a clear error if its shape does not fit.

    `weight` is anything with a 2-D `shape` whose row slices give floats: an ndarray, a
    memory map, `DequantizedRows`. It is converted a slice of rows at a time, so a large
    table (a 152k-row embedding) never exists as a whole float32 copy. `allocate(shape, dtype)`
    makes the uint8 result (e.g. on huge pages).
    """
    rows, cols = (int(d) for d in weight.shape)
    fmt.check_shape(name, (rows, cols))
    data = allocate((rows, fmt.row_bytes(cols)), np.uint8)
    g = fmt.row_group  # slices of whole row groups
    step = max(1, CONVERT_CHUNK_ELEMENTS // max(cols, 1) // g) * g
    for start in range(0, rows, step):
        end = min(start + step, rows)
        data[start:end] = fmt.quantize(np.ascontiguousarray(weight[start:end], dtype=np.float32))
    return PackedMatrix(fmt, rows, cols, data)
