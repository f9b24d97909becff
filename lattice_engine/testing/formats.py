"""A table-driven check of a weight format against its float definition (the ggml
test-quantize-fns idea), for the core's formats and a plugin's alike.

`check_weight_format(fmt, value_bound)` runs what the engine relies on:
- `quantize` gives uint8 [rows, row_bytes(cols)]; `to_float` of it is within
  `value_bound(w)` of w, value by value (the format's own error definition);
- rows are independent: quantizing a slice of whole row groups gives that slice of the
  whole matrix's bytes, and `to_float` of a byte slice gives that slice of the floats (the
  engine quantizes and dequantizes row slices: chunked packing, embeddings, paged loads);
- `matmul`, when the format has one (the kernel the native backend calls), agrees with
  float64 arithmetic on the dequantized weights within the float32 dot-product bound plus
  what the kernel does to its activations (`activation_bound(x)`: the largest change per
  value, e.g. half a step of int8 rounding);
- `embed`, when present, returns exactly the dequantized rows;
- `c_matmul_grouped`, when present (and the core's native module is there to call it):
  several matrices, each over its own rows of one x, give each matrix the bits that
  `c_matmul` gives for the same rows (the core's expert dispatch uses either).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .tolerance import dot_bound, matmul_magnitude

ValueBound = Callable[[np.ndarray], np.ndarray]


def _weights(fmt, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, : fmt.block_size] = 0.0                          # an all-zero block
    if rows > 1:
        w[1, : fmt.block_size] = 3.0                      # a constant block
    return w


def check_weight_format(fmt, value_bound: ValueBound, *,
                        activation_bound: Optional[ValueBound] = None,
                        blocks_per_row: int = 6, row_groups: int = 5, seed: int = 0) -> None:
    """Assert that `fmt` (a WeightFormat) honours the contract above; raise AssertionError
    naming the first property that fails."""
    g = fmt.row_group
    rows, cols = row_groups * g, blocks_per_row * fmt.block_size
    w = _weights(fmt, rows, cols, seed)
    data = fmt.quantize(w)
    assert data.dtype == np.uint8 and data.shape == (rows, fmt.row_bytes(cols)), (
        f"{fmt.name}: quantize gave {data.dtype} {data.shape}, expected uint8 "
        f"{(rows, fmt.row_bytes(cols))}")
    back = fmt.to_float(data, cols)
    assert back.shape == (rows, cols) and back.dtype == np.float32, (
        f"{fmt.name}: to_float gave {back.dtype} {back.shape}, expected float32 {(rows, cols)}")
    excess = np.abs(back.astype(np.float64) - w) - np.asarray(value_bound(w), np.float64)
    assert excess.max() <= 0, (
        f"{fmt.name}: round trip off by {excess.max():.3g} beyond its bound at "
        f"{np.unravel_index(np.argmax(excess), excess.shape)}")

    a, b = g, 3 * g                                        # a slice of whole row groups
    np.testing.assert_array_equal(fmt.quantize(np.ascontiguousarray(w[a:b])), data[a:b],
                                  err_msg=f"{fmt.name}: rows are not quantized independently")
    np.testing.assert_array_equal(fmt.to_float(np.ascontiguousarray(data[a:b]), cols), back[a:b],
                                  err_msg=f"{fmt.name}: to_float of a row slice differs")

    if fmt.matmul is not None:
        rng = np.random.default_rng(seed + 1)
        dense = back.astype(np.float64)
        for m in (1, 3, 9, 33):
            x = rng.standard_normal((m, cols)).astype(np.float32)
            got = fmt.matmul(x, data)
            assert got.shape == (m, rows), f"{fmt.name}: matmul gave {got.shape}, not {(m, rows)}"
            exact = x.astype(np.float64) @ dense.T
            bound = dot_bound(cols, matmul_magnitude(x, back))
            if activation_bound is not None:
                bound = bound + np.asarray(activation_bound(x), np.float64) @ np.abs(dense).T
            worst = np.max(np.abs(got - exact) - bound)
            assert worst <= 0, f"{fmt.name}: matmul M={m} off by {worst:.3g} beyond its bound"
    if fmt.c_matmul_grouped:
        _check_grouped(fmt, data, rows, cols, seed)
    if fmt.embed is not None:
        ids = np.array([0, rows - 1, 2, 2])
        np.testing.assert_array_equal(fmt.embed(data, ids), back[ids],
                                      err_msg=f"{fmt.name}: embed differs from to_float rows")


def _check_grouped(fmt, data: np.ndarray, rows: int, cols: int, seed: int) -> None:
    """c_matmul_grouped against c_matmul, through the core's cffi declarations of
    lk_extern_matmul[_grouped]; skipped without the core's native module."""
    from ..kernels.runtime import _ffi
    if _ffi is None:
        return
    fb, floats = _ffi.from_buffer, _ffi.typeof("float[]")
    (one, ctx), grouped = fmt.c_matmul, fmt.c_matmul_grouped
    one = _ffi.cast("lk_extern_matmul", one)
    grouped = _ffi.cast("lk_extern_matmul_grouped", grouped)
    ctx = _ffi.cast("void *", ctx)
    g = fmt.row_group
    mats = [np.ascontiguousarray(data[a:b]) for a, b in ((0, rows), (g, 3 * g), (0, g))]
    counts = [3, 0, 1, 40, 2][:len(mats) + 2]
    mats += [mats[0], mats[2]]
    x = np.random.default_rng(seed + 2).standard_normal((sum(counts), cols)).astype(np.float32)
    row0 = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    outs = [np.full((c, m.shape[0]), np.nan, np.float32) for c, m in zip(counts, mats)]
    rc = grouped(ctx, fb(floats, x), cols, len(mats), _ffi.new("int64_t[]", row0.tolist()),
                 _ffi.new("int64_t[]", counts), _ffi.new("const void *[]", [fb(m) for m in mats]),
                 _ffi.new("int64_t[]", [m.strides[0] for m in mats]),
                 _ffi.new("int64_t[]", [m.shape[0] for m in mats]),
                 _ffi.new("float *[]", [fb(floats, o, True) if o.size else _ffi.NULL
                                        for o in outs]))
    assert rc == 0, f"{fmt.name}: c_matmul_grouped returned {rc}"
    for i, (r, c, m, o) in enumerate(zip(row0, counts, mats, outs)):
        if not c:
            continue
        want = np.empty_like(o)
        xs = np.ascontiguousarray(x[r:r + c])
        assert one(ctx, fb(floats, xs), c, cols, fb(m), m.strides[0], m.shape[0],
                   fb(floats, want, True)) == 0, f"{fmt.name}: c_matmul failed"
        np.testing.assert_array_equal(o, want, err_msg=f"{fmt.name}: c_matmul_grouped's "
                                      f"matrix {i} ({c} rows) differs from c_matmul")


def int_activation_bound(levels: int, block: int = 32) -> ValueBound:
    """activation_bound for kernels that round x per `block` values to integers of
    +-levels (scale amax / levels): each value moves by at most half a step."""
    def bound(x: np.ndarray) -> np.ndarray:
        blocks = np.abs(np.asarray(x, np.float64)).reshape(x.shape[0], -1, block)
        half = blocks.max(-1, keepdims=True) / levels / 2
        return np.broadcast_to(half, blocks.shape).reshape(x.shape)
    return bound
