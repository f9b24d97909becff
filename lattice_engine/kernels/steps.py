"""What the fused decode steps share: filling the C model descriptions (`lk_decoder`,
`lk_qwen35`) from weights (`_fill_linear`, `_keep_vec`, `_set_rotation`), which formats the
steps can run (`_supports`), and calling a step and turning its return code into an error
(`_run_step`, `_raise_step_error`), the index arrays of a paged batch (`_paged_arrays`).

The steps themselves sit beside their models: `models/transformer_step.py` (DecoderStep,
the llama family) and `models/qwen3_5_step.py` (Qwen35Step).
"""

from __future__ import annotations

import numpy as np

from ..quant.formats import PackedMatrix
from ..quant.ggml_formats import is_core_ggml
from .buffers import _F32, _FMT_EXTERN, _FMT_IDS, _in
from .matmuls import _entry
from .runtime import _FLOATS, _INT64S, _fb, _ffi, _lib


def _supports(embed: PackedMatrix, *matrices: PackedMatrix) -> bool:
    """Whether the C step runs these: an embedding in a core format (it is looked up),
    matrices in a core format or a plugin format with a C matmul."""
    looked_up = (embed.format.name in _FMT_IDS and _entry(embed.format) is not None) or \
        is_core_ggml(embed.format)  # the step dequantizes those rows itself (step_linear.c)
    return _lib is not None and looked_up and all(_step_format(w.format) for w in matrices)


def _keep_vec(keep: list, v):
    """cdata over float32 vector v (NULL for None), kept alive in `keep`."""
    if v is None:
        return _ffi.NULL
    v = np.ascontiguousarray(v, dtype=np.float32)
    keep.append(v)
    return _fb(_FLOATS, v)


def _set_rotation(keep: list, dst, rotation) -> None:
    """An lk_rotation from (mix [m, m], block), or none."""
    if rotation is not None:
        mix, block = rotation
        dst.mix, dst.m, dst.block = _keep_vec(keep, mix), mix.shape[0], block


def _step_format(fmt) -> bool:
    """Whether the fused steps can multiply by a matrix of this format: a core format with
    a native kernel, or a plugin format that hands over a C matmul."""
    return (fmt.name in _FMT_IDS and _entry(fmt) is not None) or fmt.c_matmul is not None


def _fill_linear(keep: list, dst, w: PackedMatrix, bias=None, adapters=None) -> None:
    """dst (an lk_linear) from a matrix, its bias and its resident adapters (a
    `lattice_engine.adapters.LinearAdapters`: the C table follows later loads)."""
    data = w.data if w.data.flags.c_contiguous else np.ascontiguousarray(w.data)
    keep.append(data)
    if w.format.name in _FMT_IDS:
        dst.fmt = _FMT_IDS[w.format.name]
    else:
        fn, ctx = w.format.c_matmul
        dst.fmt = _FMT_EXTERN
        dst.ext = _ffi.cast("lk_extern_matmul", fn)
        dst.ext_ctx = _ffi.cast("void *", ctx)
        if w.format.c_matmul_grouped:
            dst.ext_grouped = _ffi.cast("lk_extern_matmul_grouped", w.format.c_matmul_grouped)
    dst.w = _fb(data)
    dst.ldw, dst.rows, dst.cols = data.strides[0], w.rows, w.cols
    dst.bias = _keep_vec(keep, bias)
    if adapters is not None:
        table = adapters.c_struct()
        keep.append(adapters)
        dst.lora = table


def _raise_step_error(rc: int, tokens: np.ndarray, m, name: str, outside: str) -> None:
    """A fused step's return code as an error that says what was wrong (0: nothing)."""
    if rc == -1:
        bad = tokens[(tokens < 0) | (tokens >= m.embed.rows)]
        raise IndexError(f"decode step: token id {int(bad[0])} is outside the "
                         f"vocabulary [0, {m.embed.rows})")
    if rc == -2:
        raise ValueError(f"decode step: {outside}")
    if rc == -5:
        raise MemoryError(f"{name}: out of scratch memory")
    if rc:
        raise RuntimeError(f"{name} failed with code {rc} (weights or workspace "
                           f"inconsistent with the model description)")


def _run_step(step_fn, work_size_fn, m, work: np.ndarray, tokens: np.ndarray, pos: int,
              cos: np.ndarray, sin: np.ndarray, out: np.ndarray, name: str) -> np.ndarray:
    """Call a fused decode step (`lk_decoder_step`, `lk_qwen35_step`) and turn its return
    code into an error that says what was wrong; returns the (possibly grown) workspace."""
    B = tokens.size
    need = work_size_fn(m, B)
    if work.size < need:
        work = np.empty(need, _F32)
    cp, cos = _in(cos)
    sp, sin = _in(sin)
    rc = step_fn(m, _fb(_INT64S, tokens), B, pos, cp, sp, _fb(_FLOATS, work, True),
                 work.size, _fb(_FLOATS, out, True))
    _raise_step_error(rc, tokens, m, name, f"position {pos} is outside the bound cache "
                                           f"(capacity {m.cache_cap}); bind a larger cache")
    return work


def _run_rows(rows_fn, work_size_fn, m, work: np.ndarray, tokens: np.ndarray, pos: int,
              cos: np.ndarray, sin: np.ndarray, out: np.ndarray, name: str,
              trails=None) -> np.ndarray:
    """Call a multi-row step of one sequence (`lk_decoder_step_rows`,
    `lk_qwen35_step_rows`: trails given, NULL or the pointer array) with cos / sin
    [T, rope_half]; returns the (possibly grown) workspace."""
    T = tokens.size
    half = m.rope_half
    if cos.shape != (T, half) or sin.shape != (T, half):
        raise ValueError(f"decode step: {T} rows need cos / sin [{T}, {half}] (got "
                         f"{cos.shape}, {sin.shape})")
    need = work_size_fn(m, T)
    if work.size < need:
        work = np.empty(need, _F32)
    cp, cos = _in(cos)
    sp, sin = _in(sin)
    args = (m, _fb(_INT64S, tokens), T, pos, cp, sp) + (() if trails is None else (trails,))
    rc = rows_fn(*args, _fb(_FLOATS, work, True), work.size, _fb(_FLOATS, out, True))
    _raise_step_error(rc, tokens, m, name, f"rows {pos} .. {pos + T - 1} are outside the "
                                           f"bound cache (capacity {m.cache_cap}); bind a "
                                           f"larger cache")
    return work


def _paged_arrays(batch, n: int, cos: np.ndarray, rope_half: int, states: bool = False):
    """A paged batch's index arrays as the C steps take them (slots, q_start, pos_start,
    block tables int32, and the recurrent-state slots when `states`), checked against the
    batch's n rows and S sequences; a ValueError naming every shape otherwise."""
    slots = np.ascontiguousarray(batch.slots, dtype=np.int64)
    q_start = np.ascontiguousarray(batch.q_start, dtype=np.int64)
    pos_start = np.ascontiguousarray(batch.pos_start, dtype=np.int64)
    tables = np.ascontiguousarray(batch.block_tables, dtype=np.int32)
    state_slots = np.ascontiguousarray(batch.state_slots, dtype=np.int64) if states else None
    if slots.shape != (n,) or q_start.shape != (pos_start.size + 1,) or \
            (states and state_slots.shape != pos_start.shape) or \
            tables.shape[:1] != pos_start.shape or cos.shape != (n, rope_half):
        what = "S state slots and table rows" if states else "S table rows"
        got = (slots.shape, q_start.shape) + ((state_slots.shape,) if states else ()) + \
            (tables.shape, cos.shape)
        raise ValueError(f"decode step: a paged batch of {n} rows needs {n} slots, S + 1 "
                         f"q_start entries, {what} and cos [{n}, {rope_half}] (got "
                         f"{', '.join(map(str, got))})")
    return slots, q_start, pos_start, tables, state_slots


# ---- KV storage of the fused steps (`[model] kv_cache`, LK_KV_* in lattice_kernels.h) ----
_KV_CODES = {"f32": 0, "f16": 1, "q8_0": 2}
_KV_ITEM = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "q8_0": np.dtype(np.uint8)}


def _kv_row(dtype: str, head_dim: int) -> int:
    """Items of one stored head vector."""
    return head_dim // 32 * 34 if dtype == "q8_0" else head_dim


def _kv_array_ok(a: np.ndarray, dtype: str, shape: tuple) -> bool:
    """a is a C-contiguous KV array of `dtype` with `shape` (the last axis the stored row)."""
    return a.dtype == _KV_ITEM[dtype] and a.flags.c_contiguous and a.shape == shape


def _kv_pointer(a: np.ndarray):
    return _ffi.cast("void *", _ffi.from_buffer(a, require_writable=True))


def _set_kv_format(step, layers, dtype: str, transforms) -> None:
    """Make `step` (a DecoderStep / Qwen35Step, its C struct step._m) store keys and values
    as dtype, with per-layer key transforms [(k_shift, k_scale) or None] for `layers` (the
    C layer structs that attend, in order)."""
    if dtype not in _KV_CODES:
        raise ValueError(f"kv dtype {dtype!r} is not one of {', '.join(_KV_CODES)}")
    step._m.kv_dtype = _KV_CODES[dtype]
    step.kv_dtype = dtype
    transforms = transforms or [None] * len(layers)
    if len(transforms) != len(layers):
        raise ValueError(f"{len(transforms)} key transforms for {len(layers)} attention layers")
    for L, t in zip(layers, transforms):
        shift, scale = t if t is not None else (None, None)
        L.k_shift = _keep_vec(step._keep, shift)
        L.k_scale = _keep_vec(step._keep, scale)


# the most rows of one sequence a dense forward runs through the multi-row fused step
# (`lk_decoder_step_rows`, `lk_qwen35_step_rows`): a verify of speculative.MAX_DRAFT_TOKENS
# drafts and the pending token, a draft model catching up; longer runs (prompts) take the
# per-kernel path, whose tiled / chunked kernels suit them
FUSED_ROWS = 17

