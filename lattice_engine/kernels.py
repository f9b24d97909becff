"""Native kernels: the one module that touches the cffi library `lattice_engine._native`.

Functions here have the names and semantics of `lattice_engine.ops` (the numpy reference
they are tested against), plus an optional `out=` buffer so a model can reuse its
activations instead of allocating per call. Inputs that are already C-contiguous float32
go to C without a copy; anything else is converted first. Decode calls these hundreds of
times per token on small rows, so the wrappers keep to a few attribute checks (about a
microsecond) before the C call.

The module imports without the compiled library; `available()` says whether it is there,
and the kernels then raise RuntimeError naming the fix.

Threads: 2 by default, `LATTICE_THREADS` overrides it at start-up, `set_threads(n)` later.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .io import hugepages
from .quant.formats import PackedMatrix

try:  # compiled at install time from native/ (see native/build_native.py)
    from ._native import ffi as _ffi, lib as _lib
    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - only on installs without a C compiler
    _ffi = _lib = None
    # "No module named" means it was never built; anything else (an undefined symbol, a
    # CPU it was not built for) is a broken build, which tests report instead of skipping
    LOAD_ERROR = str(exc)

__all__ = [
    "available", "isa", "set_isa", "set_threads", "threads", "supports", "q8_variant",
    "q8_variants", "variant",
    "matmul", "matmul_multi", "embed", "quantize_q8_0", "format_matmul", "format_embed",
    "rms_norm", "rope_tables", "rope", "silu", "silu_mul", "softmax", "log_sum_exp",
    "attention", "add",
    "bench_read", "measure_read_bandwidth", "DecoderStep", "Qwen35Step",
    "sigmoid", "softplus", "causal_conv1d", "gated_delta_rule", "gated_rms_norm",
    "paged_attention", "block_rotate",
]

_F32 = np.dtype(np.float32)
_FMT_IDS = {"f32": 0, "f16": 1, "q8_0": 2, "q8_0_r16": 3}  # LK_FMT_* in lattice_kernels.h
_FMT_EXTERN = 100  # LK_FMT_EXTERN: a plugin format's own C matmul (WeightFormat.c_matmul)
_MULTI_MAX = 8  # LK_MATMUL_MULTI_MAX
_I64 = np.dtype(np.int64)
_ISA_NAMES = {"generic": 0, "avx2": 1}

rope_tables = ops.rope_tables  # computed once per step for all layers; numpy is fine here


def _not_built(*args, **kwargs):
    raise RuntimeError(
        f"lattice_engine._native is not available ({LOAD_ERROR}); reinstall with "
        "`pip install -e . --no-build-isolation` (needs a C compiler and cffi), or use "
        "lattice_engine.ops")


class _Missing:
    """Stands in for the cffi lib when the module is not built: any kernel call raises."""

    def __getattr__(self, name):
        _not_built()


if _lib is not None:
    _fb = _ffi.from_buffer
    _FLOATS = _ffi.typeof("float[]")
    _INT64S = _ffi.typeof("int64_t[]")
    _L = _lib
else:  # pragma: no cover
    _fb = _not_built
    _FLOATS = _INT64S = None
    _L = _Missing()


def available() -> bool:
    """True when the compiled module is importable (else see `LOAD_ERROR`)."""
    return _lib is not None


def isa() -> str:
    """The kernel variant in use: "avx2" or "generic"."""
    name = _L.lk_isa_name()
    return _ffi.string(name).decode()


def set_isa(name: str) -> str:
    """Force a kernel variant ("generic" or "avx2"; tests compare them). A variant this CPU
    cannot run is refused silently; returns the variant now in use."""
    if name not in _ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; choose one of {sorted(_ISA_NAMES)}")
    _L.lk_set_isa(_ISA_NAMES[name])
    return isa()


def q8_variants() -> list[str]:
    """The q8_0 kernels this CPU can run at the AVX2 level ("avx2", "avxvnni",
    "avx512vnni"); empty when the native module is missing."""
    if _lib is None:
        return []
    found, start = [], q8_variant()
    i = 0
    while (name := _L.lk_q8_variant_name(i)) != _ffi.NULL:
        if _L.lk_q8_variant(i) == i:
            found.append(_ffi.string(name).decode())
        i += 1
    q8_variant(start)
    return found


def q8_variant(name: str | None = None) -> str:
    """The q8_0 kernel in use while `isa()` is "avx2"; with `name`, switch to it first
    (refused silently when the CPU lacks it; tests compare the variants)."""
    idx = -1
    if name is not None:
        i = 0
        while (n := _L.lk_q8_variant_name(i)) != _ffi.NULL:
            if _ffi.string(n).decode() == name:
                idx = i
            i += 1
        if idx < 0:
            raise ValueError(f"unknown q8_0 variant {name!r}")
    return _ffi.string(_L.lk_q8_variant_name(_L.lk_q8_variant(idx))).decode()


def variant() -> str:
    """The native kernels in use, as `lattice --version` and the benches' rows report them:
    "avx2, q8_0 avx512vnni" (the q8_0 kernel is picked only at the avx2 level), "generic",
    or "not built: <why>" when the compiled module is missing."""
    if _lib is None:
        return f"not built: {LOAD_ERROR}"
    level = isa()
    return f"{level}, q8_0 {q8_variant()}" if level == "avx2" else level


def set_threads(n: int) -> None:
    """Threads used by the parallel kernels, counting the calling thread (>= 1)."""
    if int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _L.lk_set_threads(int(n))


def threads() -> int:
    return int(_L.lk_get_threads())


# ---- buffers ---------------------------------------------------------------------------

def _in(a: np.ndarray):
    """cdata over float32 input `a` and the array it views (a copy if `a` was not
    C-contiguous float32); keep the array alive while C runs."""
    if a.dtype is not _F32:
        a = np.ascontiguousarray(a, dtype=np.float32)
    try:
        return _fb(_FLOATS, a), a
    except ValueError:  # not C-contiguous
        a = np.ascontiguousarray(a)
        return _fb(_FLOATS, a), a


def _new_or_check(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, _F32)
    if out.dtype is not _F32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} "
            f"{out.shape} (C-contiguous: {out.flags.c_contiguous})")
    return out


def _packed(data: np.ndarray):
    """cdata over packed weights uint8 [rows, row_bytes], and the row stride in bytes."""
    try:
        return _fb(data), data.strides[0]
    except ValueError:
        data = np.ascontiguousarray(data)
        return _fb(data), data.strides[0]


# ---- matmul / embed --------------------------------------------------------------------

# format name -> (C matmul, C embed, values per block, bytes per block)
if _lib is not None:
    _NATIVE = {
        "f32": (_lib.lk_matmul_f32, _lib.lk_embed_f32, 1, 4),
        "f16": (_lib.lk_matmul_f16, _lib.lk_embed_f16, 1, 2),
        "q8_0": (_lib.lk_matmul_q8_0, _lib.lk_embed_q8_0, 32, 34),
        "q8_0_r16": (_lib.lk_matmul_q8_0_r16, _lib.lk_embed_q8_0_r16, 32, 34),
    }
else:  # pragma: no cover
    _NATIVE = {}


def _entry(fmt):
    e = _NATIVE.get(fmt.name)
    if e is None or e[3] != fmt.bytes_per_block or e[2] != fmt.block_size:
        return None
    return e


def supports(fmt) -> bool:
    """Whether `fmt` (a WeightFormat) has native matmul/embed kernels here."""
    return _entry(fmt) is not None


def matmul(x: np.ndarray, w: PackedMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """x [..., K] @ W.T -> [..., N] for W [N, K] in f32, f16 or q8_0.

    q8_0 rounds x to int8 blocks of 32 (float32 scale per block) and uses integer dot
    products, so it differs from `ops.matmul` by that rounding. Formats without a native
    kernel use their own `matmul` when they have one, else `ops.matmul`.
    """
    fmt = w.format
    e = _NATIVE.get(fmt.name)
    if e is None or e[3] != fmt.bytes_per_block:
        return _matmul_other(x, w, out)
    K = w.cols
    shape = x.shape
    if shape[-1] != K:
        raise ValueError(f"matmul: x has {shape[-1]} features but W is {w.rows} x {K}")
    # the common case inline: contiguous float32 x, packed rows contiguous (decode calls
    # this a few hundred times per token)
    if x.dtype is not _F32:
        x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        xp = _fb(_FLOATS, x)
    except ValueError:
        x = np.ascontiguousarray(x)
        xp = _fb(_FLOATS, x)
    if out is None:
        out = np.empty(shape[:-1] + (w.rows,), _F32)
    elif out.dtype is not _F32 or out.shape != shape[:-1] + (w.rows,):
        _new_or_check(out, shape[:-1] + (w.rows,))  # raises with the details
    data = w.data
    try:
        dp = _fb(data)
    except ValueError:
        data = np.ascontiguousarray(data)
        dp = _fb(data)
    try:
        op = _fb(_FLOATS, out, True)
    except ValueError:
        _new_or_check(out, shape[:-1] + (w.rows,))
        raise
    e[0](xp, x.size // K if K else 0, K, dp, data.strides[0], w.rows, op)
    return out


def matmul_multi(x: np.ndarray, weights: list[PackedMatrix],
                 outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """[x @ W.T for W in weights] as one parallel job (x converted once): the fused decode
    step's q/k/v and gate/up. The weights must share a native format and their column
    count; returns the outputs ([..., rows_i] each)."""
    if not weights:
        return []
    fmt, K = weights[0].format, weights[0].cols
    if any(w.format.name != fmt.name or w.cols != K for w in weights) or \
            fmt.name not in _FMT_IDS or _entry(fmt) is None:
        raise ValueError("matmul_multi: weights must share one native format and one column "
                         f"count, got {[(w.format.name, w.rows, w.cols) for w in weights]}")
    if x.shape[-1] != K:
        raise ValueError(f"matmul_multi: x has {x.shape[-1]} features, weights have {K}")
    if len(weights) > _MULTI_MAX:
        raise ValueError(f"matmul_multi: at most {_MULTI_MAX} matrices, got {len(weights)}")
    xp, x = _in(x)
    lead = x.shape[:-1]
    if outs is None:
        outs = [np.empty(lead + (w.rows,), _F32) for w in weights]
    datas = [w.data if w.data.flags.c_contiguous else np.ascontiguousarray(w.data)
             for w in weights]
    rc = _L.lk_matmul_multi(
        _FMT_IDS[fmt.name], xp, x.size // K if K else 0, K, len(weights),
        _ffi.new("const void *[]", [_fb(d) for d in datas]),
        _ffi.new("int64_t[]", [d.strides[0] for d in datas]),
        _ffi.new("int64_t[]", [w.rows for w in weights]),
        _ffi.new("float *[]", [_fb(_FLOATS, _new_or_check(o, lead + (w.rows,)), True)
                               for o, w in zip(outs, weights)]))
    if rc:
        raise ValueError(f"lk_matmul_multi refused {fmt.name} with K={K}")
    return outs


def _matmul_other(x, w, out):
    if w.format.matmul is not None:
        lead = x.shape[:-1]
        y = w.format.matmul(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]), w.data)
        y = y.reshape(*lead, w.rows)
    else:
        y = ops.matmul(x, w)
    if out is not None:
        out[...] = y
        return out
    return y


def embed(w: PackedMatrix, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows `ids` (any int shape) of W [vocab, D] as float32 [..., D]."""
    e = _entry(w.format)
    if e is None:
        y = (w.format.embed(w.data, np.asarray(ids).reshape(-1)) if w.format.embed is not None
             else ops.embed(w, ids))
        y = y.reshape(*np.shape(ids), w.cols)
        if out is not None:
            out[...] = y
            return out
        return y
    ids = np.asarray(ids)
    flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    out = _new_or_check(out, ids.shape + (w.cols,))
    dp, ldw = _packed(w.data)
    if e[1](dp, ldw, w.rows, w.cols, _fb(_INT64S, flat), flat.size, _fb(_FLOATS, out, True)):
        bad = flat[(flat < 0) | (flat >= w.rows)]
        raise IndexError(f"embed: token id {int(bad[0])} is outside the vocabulary [0, {w.rows})")
    return out


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> GGUF Q8_0 bytes [rows, cols / 32 * 34], bit-identical to
    `core_formats.quantize_q8_0` (round half away from zero, half-precision scale)."""
    wp, w = _in(w)
    rows, cols = w.shape
    if cols % 32:
        raise ValueError(f"q8_0 needs a row length that is a multiple of 32, got {cols}")
    out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
    if out.size:
        _L.lk_quantize_q8_0(wp, rows, cols, _fb(out, require_writable=True))
    return out


def q8_0_r16_convert(data: np.ndarray, cols: int, to_r16: bool) -> np.ndarray:
    """q8_0 bytes [rows, cols / 32 * 34] <-> q8_0_r16 (same shape, rows % 16 == 0), in C,
    bit-identical to `core_formats.q8_0_to_r16` / `r16_to_q8_0`. A writable contiguous
    array is converted in place (the weights never exist twice); others are copied."""
    rows = data.shape[0]
    if data.ndim != 2 or rows % 16 or cols % 32 or data.shape[1] != cols // 32 * 34:
        raise ValueError(f"q8_0_r16 needs rows % 16 == 0 and {cols // 32 * 34}-byte rows, got "
                         f"{data.shape} for {cols} columns")
    if data.dtype == np.uint8 and data.flags.c_contiguous and data.flags.writeable:
        out = src = data
    else:
        src = np.ascontiguousarray(data, dtype=np.uint8)
        out = hugepages.empty(src.shape, np.uint8)
    if src.size:
        fn = _L.lk_q8_0_to_r16 if to_r16 else _L.lk_r16_to_q8_0
        if fn(_fb(src), rows, cols, _fb(out, require_writable=True)):
            raise MemoryError("q8_0_r16 conversion: out of memory for one 16-row group")
    return out


def format_matmul(name: str):
    """A `WeightFormat.matmul` for format `name`: (x [M, cols], packed [rows, row_bytes])
    -> [M, rows]; None if there is no native kernel for it."""
    e = _NATIVE.get(name)
    if e is None:
        return None
    fn, _, block, nbytes = e

    def matmul_packed(x: np.ndarray, data: np.ndarray) -> np.ndarray:
        K = x.shape[-1]
        if K % block or data.shape[1] != K // block * nbytes:
            raise ValueError(f"{name} matmul: x has {K} features but rows are {data.shape[1]} bytes")
        xp, x = _in(x)
        out = np.empty(x.shape[:-1] + (data.shape[0],), _F32)
        dp, ldw = _packed(data)
        fn(xp, x.size // K if K else 0, K, dp, ldw, data.shape[0], _fb(_FLOATS, out, True))
        return out

    matmul_packed.__name__ = f"matmul_{name}_native"
    return matmul_packed


def format_embed(name: str):
    """A `WeightFormat.embed` for format `name`: (packed, int ids [n]) -> [n, cols]."""
    e = _NATIVE.get(name)
    if e is None:
        return None
    fn, block, nbytes = e[1], e[2], e[3]

    def embed_packed(data: np.ndarray, ids: np.ndarray) -> np.ndarray:
        cols = data.shape[1] // nbytes * block
        flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        out = np.empty((flat.size, cols), _F32)
        dp, ldw = _packed(data)
        if fn(dp, ldw, data.shape[0], cols, _fb(_INT64S, flat), flat.size, _fb(_FLOATS, out, True)):
            raise IndexError(f"embed: a token id is outside the vocabulary [0, {data.shape[0]})")
        return out

    embed_packed.__name__ = f"embed_{name}_native"
    return embed_packed


# ---- elementwise -----------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, offset: float = 0.0,
             out: np.ndarray | None = None) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last axis."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({D},)")
    xp, x = _in(x)
    wp, weight = _in(weight)
    out = _new_or_check(out, x.shape)
    _L.lk_rms_norm(xp, x.size // D if D else 0, D, wp, eps, offset, _fb(_FLOATS, out, True))
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False,
         out: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding of x [B, T, H, Dh] (see `ops.rope`). x may be a strided view (e.g.
    the q part of a fused QKV output) as long as each head is contiguous; `out` may be x
    itself when x is contiguous."""
    if x.ndim != 4:
        raise ValueError(f"rope: x must be [B, T, H, Dh], got shape {x.shape}")
    B, T, H, Dh = x.shape
    half = cos.shape[-1]
    if cos.shape != (T, half) or sin.shape != (T, half) or 2 * half > Dh:
        raise ValueError(f"rope: cos/sin must be [T={T}, half <= {Dh // 2}], got {cos.shape} and {sin.shape}")
    cp, cos = _in(cos)
    sp, sin = _in(sin)
    xp, x, strides = _strided(x)
    if out is x and not x.flags.c_contiguous:
        raise ValueError("rope: in-place rotation needs a contiguous x")
    out = _new_or_check(out, x.shape)
    _L.lk_rope(xp, B, T, H, Dh, strides[0], strides[1], strides[2], cp, sp, half,
               1 if interleaved else 0, _fb(_FLOATS, out, True))
    return out


def _strided(a: np.ndarray):
    """(cdata, array, element strides of all but the last axis) for float32 `a` whose last
    axis is contiguous, without copying views; copies anything else."""
    if a.dtype is _F32:
        try:
            return _fb(_FLOATS, a), a, [s >> 2 for s in a.strides[:-1]]
        except ValueError:
            pass
        st = a.strides
        if st[-1] == 4 and all(s >= 0 and s % 4 == 0 for s in st) and a.size:
            # cover a[0, ..., 0] .. a[-1, ..., -1] with one 1-D view; C uses the strides
            n = 1 + sum((d - 1) * (s >> 2) for d, s in zip(a.shape, st))
            span = np.lib.stride_tricks.as_strided(a, shape=(n,), strides=(4,))
            return _fb(_FLOATS, span), a, [s >> 2 for s in st[:-1]]
    a = np.ascontiguousarray(a, dtype=np.float32)
    return _fb(_FLOATS, a), a, [s >> 2 for s in a.strides[:-1]]


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_silu(xp, x.size, _fb(_FLOATS, out, True))
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up. gate and up may be views of the two halves of a fused gate_up
    output (evenly spaced contiguous rows): they are not copied."""
    shape = gate.shape
    if up.shape != shape:
        raise ValueError(f"silu_mul: gate {shape} and up {up.shape} differ")
    n = shape[-1] if shape else 1
    rows = gate.size // n if n else 0
    out = _new_or_check(out, shape)
    gp, gate, ldg = _rows(gate, n)
    up_, up, ldu = _rows(up, n)
    _L.lk_silu_mul(gp, ldg, up_, ldu, rows, n, _fb(_FLOATS, out, True))
    return out


def _rows(a: np.ndarray, n: int):
    """(cdata, array, row stride in elements) for `a` as evenly spaced rows of n floats."""
    if a.dtype is _F32:
        try:
            return _fb(_FLOATS, a), a, n
        except ValueError:
            pass
        if a.ndim >= 2:
            p, a2, st = _strided(a)
            sh = a2.shape
            if all(st[i] == sh[i + 1] * st[i + 1] for i in range(len(st) - 1)) and st[-1] >= n:
                return p, a2, st[-1]
    a = np.ascontiguousarray(a, dtype=np.float32)
    return _fb(_FLOATS, a), a, n


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax along `axis` (native for the last axis of float32 input)."""
    if x.dtype is not _F32 or axis not in (-1, x.ndim - 1):
        y = ops.softmax(x, axis=axis)
        if out is not None:
            out[...] = y
            return out
        return y
    n = x.shape[-1]
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_softmax(xp, x.size // n if n else 0, n, _fb(_FLOATS, out, True))
    return out


def log_sum_exp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, float32 [...]: a log softmax's normaliser."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 1
    out = np.empty(x.shape[:-1] if x.ndim else (), np.float32)
    _L.lk_log_sum_exp(_fb(_FLOATS, x), x.size // n if n else 0, n,
                      _fb(_FLOATS, out.reshape(-1), True))
    return out


_SMALL_ADD = 1 << 16


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a + b for float32 arrays of one shape (the residual add); out may be a or b.
    Shapes that need broadcasting go to numpy."""
    if a.shape != b.shape or a.size < _SMALL_ADD:
        # numpy's own add beats the call overhead on one decode row
        return np.add(a, b, out=out, dtype=np.float32)
    ap, a = _in(a)
    bp, b = _in(b)
    out = _new_or_check(out, a.shape)
    _L.lk_add(ap, bp, a.size, _fb(_FLOATS, out, True))
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, scale: float,
              out: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention (see `ops.attention`).

    q [B, T, Hq, D] at positions start_pos .. start_pos + T - 1; k, v [B, S, Hkv, D] for
    positions 0 .. S - 1. q, k and v may be strided views (a slice of a longer cache,
    cache[:, :S], or a head-major cache transposed) as long as each head vector is
    contiguous: they are not copied. Returns [B, T, Hq, D].
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must be 4-D, k and v alike")
    B, T, Hq, D = q.shape
    _, S, Hkv, Dk = k.shape
    if k.shape[0] != B or Dk != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {q.shape} does not fit k {k.shape} (GQA needs Hq % Hkv == 0)")
    if start_pos < 0:
        raise ValueError(f"attention: start_pos must be >= 0, got {start_pos}")
    out = _new_or_check(out, (B, T, Hq, D))
    qp, q, qs = _strided(q)
    kp, k, ks = _strided(k)
    vp, v, vs = _strided(v)
    _L.lk_attention(qp, B, T, Hq, D, qs[0], qs[1], qs[2], kp, ks[0], ks[1], ks[2],
                    vp, vs[0], vs[1], vs[2], S, Hkv, start_pos, scale, _fb(_FLOATS, out, True))
    return out


# ---- Gated DeltaNet ---------------------------------------------------------------------

def causal_conv1d(x: np.ndarray, weight_t: np.ndarray, state: np.ndarray,
                  silu_out: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Depthwise causal conv with a rolling state (see `ops.causal_conv1d`); `out` may be
    x itself (a C-contiguous float32 [B, T, C]) to convolve in place."""
    if x.ndim != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got shape {x.shape}")
    B, T, C = x.shape
    K = weight_t.shape[0]
    if weight_t.shape != (K, C) or state.shape != (B, K - 1, C):
        raise ValueError(f"causal_conv1d: weight_t {weight_t.shape} must be [K, {C}] and state "
                         f"{state.shape} must be [{B}, K-1, {C}]")
    if state.dtype is not _F32 or not state.flags.c_contiguous:
        raise ValueError("causal_conv1d: state must be C-contiguous float32 (it is updated in place)")
    if out is not x:
        out = _new_or_check(out, x.shape)
        out[...] = x
    elif x.dtype is not _F32 or not x.flags.c_contiguous:
        raise ValueError("causal_conv1d: in-place needs a C-contiguous float32 x")
    wp, weight_t = _in(weight_t)
    if _L.lk_causal_conv1d(_fb(_FLOATS, out, True), B, T, C, T * C, C, wp, K,
                           _fb(_FLOATS, state, True), 1 if silu_out else 0):
        raise ValueError(f"causal_conv1d: kernel size {K} is not supported (1..8)")
    return out


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray,
                     beta: np.ndarray, state: np.ndarray, chunk: int = 0,
                     out: np.ndarray | None = None) -> np.ndarray:
    """The gated delta rule (see `ops.gated_delta_rule`). q, k, v may be views of one fused
    qkv array [B, T, Hk*Dk*2 + Hv*Dv] (heads contiguous): they are not copied then."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or Hv % Hk:
        raise ValueError(f"gated_delta_rule: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         f"(k like q, Hv a multiple of Hk)")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"gated_delta_rule: g {g.shape} and beta {beta.shape} must be "
                         f"[{B}, {T}, {Hv}]")
    if state.shape != (B, Hv, Dk, Dv) or state.dtype is not _F32 or not state.flags.c_contiguous:
        raise ValueError(f"gated_delta_rule: state must be C-contiguous float32 "
                         f"[{B}, {Hv}, {Dk}, {Dv}], got {state.dtype} {state.shape}")
    views = [_strided(a) for a in (q, k, v)]
    # the stride of a length-1 axis is arbitrary in numpy and never used: zero it
    strides = [tuple(s if n > 1 else 0 for s, n in zip(st, a.shape[:3]))
               for (_, a, st) in views]
    if not (strides[0][:2] == strides[1][:2] == strides[2][:2]
            and strides[0][2] in (Dk, 0) and strides[1][2] in (Dk, 0)
            and strides[2][2] in (Dv, 0)):
        fused = np.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1),
                                v.reshape(B, T, -1)], axis=-1).astype(np.float32)
        n = Hk * Dk
        return gated_delta_rule(fused[..., :n].reshape(B, T, Hk, Dk),
                                fused[..., n:2 * n].reshape(B, T, Hk, Dk),
                                fused[..., 2 * n:].reshape(B, T, Hv, Dv), g, beta, state,
                                chunk, out)
    gp, g = _in(g)
    bp, beta = _in(beta)
    out = _new_or_check(out, (B, T, Hv, Dv))
    sb, st = strides[0][0], strides[0][1]
    if _L.lk_gated_delta_rule(views[0][0], views[1][0], views[2][0], B, T, Hk, Hv, Dk, Dv,
                              sb, st, gp, bp, _fb(_FLOATS, state, True), int(chunk),
                              _fb(_FLOATS, out, True)):
        raise ValueError("gated_delta_rule: inconsistent shapes")
    return out


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + e^-x) as float32 (see `ops.sigmoid`); native so the fused Qwen3.5 step
    (which computes its gates in C) and this per-kernel path agree bit for bit."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_sigmoid(xp, x.size, _fb(_FLOATS, out, True))
    return out


def softplus(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """log(1 + e^x), x itself above 20 (see `ops.softplus`), as float32; native for the
    same reason as `sigmoid`."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_softplus(xp, x.size, _fb(_FLOATS, out, True))
    return out


def gated_rms_norm(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """rms_norm(x) * weight * silu(gate) over the last axis (see `ops.gated_rms_norm`)."""
    D = x.shape[-1]
    if gate.shape != x.shape or weight.shape != (D,):
        raise ValueError(f"gated_rms_norm: x {x.shape}, gate {gate.shape}, weight "
                         f"{weight.shape} do not fit")
    xp, x = _in(x)
    zp, gate = _in(gate)
    wp, weight = _in(weight)
    out = _new_or_check(out, x.shape)
    _L.lk_gated_rms_norm(xp, zp, x.size // D if D else 0, D, wp, eps, _fb(_FLOATS, out, True))
    return out


# ---- paged attention -------------------------------------------------------------------

_I32 = np.dtype(np.int32)


def paged_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                    q_start: np.ndarray, pos_start: np.ndarray, block_tables: np.ndarray,
                    scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Causal GQA for a flat batch of sequences over a paged KV pool (see
    `ops.paged_attention`). q [N, Hq, D]; pools [num_blocks, block_size, Hkv, D], used in
    place (they must be C-contiguous float32); block_tables int32 [S, max_blocks]."""
    if q.ndim != 3 or k_pool.ndim != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"paged_attention: q {q.shape} must be [N, Hq, D] and the pools "
                         f"[blocks, block_size, Hkv, D], alike (got {k_pool.shape}, {v_pool.shape})")
    N, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_pool.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"paged_attention: q {q.shape} does not fit the pool {k_pool.shape}")
    for pool in (k_pool, v_pool):
        if pool.dtype is not _F32 or not pool.flags.c_contiguous:
            raise ValueError("paged_attention: the KV pools must be C-contiguous float32")
    qs = np.ascontiguousarray(q_start, dtype=np.int64)
    ps = np.ascontiguousarray(pos_start, dtype=np.int64)
    bt = np.ascontiguousarray(block_tables, dtype=np.int32)
    S = ps.shape[0]
    if qs.shape != (S + 1,) or bt.ndim != 2 or bt.shape[0] != S or qs[-1] != N:
        raise ValueError(f"paged_attention: q_start {qs.shape} must have S+1={S + 1} entries "
                         f"ending at N={N}; block_tables {bt.shape} must be [S, max_blocks]")
    if bt.size and (bt.min() < 0 or bt.max() >= nb):
        raise ValueError(f"paged_attention: a block id is outside the pool [0, {nb})")
    qp, q = _in(q)
    out = _new_or_check(out, (N, Hq, D))
    rc = _L.lk_paged_attention(qp, Hq, D, _fb(_FLOATS, k_pool), _fb(_FLOATS, v_pool), bs, Hkv,
                               S, _fb(_INT64S, qs), _fb(_INT64S, ps),
                               _ffi.cast("int32_t *", _fb(bt)), bt.shape[1], scale,
                               _fb(_FLOATS, out, True))
    if rc == -1:
        raise ValueError("paged_attention: a sequence's rows or positions do not fit its "
                         f"block table of {bt.shape[1]} blocks")
    if rc:
        raise MemoryError("paged_attention: out of scratch memory")
    return out


def block_rotate(x: np.ndarray, mix: np.ndarray, block: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """x @ (mix kron H_block / sqrt(block)) along the last axis (see `ops.block_rotate`)."""
    m = mix.shape[0]
    n = x.shape[-1]
    if mix.shape != (m, m) or n != m * block or block < 1 or block & (block - 1):
        raise ValueError(f"block_rotate: x has {n} features, mix is {mix.shape}, block "
                         f"{block}: need features == rows(mix) * block, block a power of two")
    xp, x = _in(x)
    mp, mix = _in(mix)
    out = _new_or_check(out, x.shape)
    if m > 1 and np.shares_memory(out, x):
        raise ValueError("block_rotate: out may alias x only when mix is 1 x 1")
    _L.lk_block_rotate(xp, x.size // n if n else 0, m, block, mp, _fb(_FLOATS, out, True))
    return out


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5,
                           prefetch: bool = False) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): the median of `repeats` streaming sums of a
    `nbytes` buffer with the current threads (the roofline's numerator)."""
    import time

    buf = np.ones(max(nbytes, 32) // 4, dtype=np.float32)
    bench_read(buf, prefetch)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bench_read(buf, prefetch)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / float(np.median(times)) / 1e9


def bench_read(buf: np.ndarray, prefetch: bool = False) -> float:
    """Stream `buf` once with all threads (a read-bandwidth probe), optionally with software
    prefetch; returns its float sum."""
    b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return float(_L.lk_bench_read(_fb(b), b.size, 1 if prefetch else 0))


# ---- whole decode step -----------------------------------------------------------------

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


def _fill_linear(keep: list, dst, w: PackedMatrix, bias=None) -> None:
    data = w.data if w.data.flags.c_contiguous else np.ascontiguousarray(w.data)
    keep.append(data)
    if w.format.name in _FMT_IDS:
        dst.fmt = _FMT_IDS[w.format.name]
    else:
        fn, ctx = w.format.c_matmul
        dst.fmt = _FMT_EXTERN
        dst.ext = _ffi.cast("lk_extern_matmul", fn)
        dst.ext_ctx = _ffi.cast("void *", ctx)
    dst.w = _fb(data)
    dst.ldw, dst.rows, dst.cols = data.strides[0], w.rows, w.cols
    dst.bias = _keep_vec(keep, bias)


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


class DecoderStep:
    """One decode step of a llama-family decoder in a single C call (`lk_decoder_step`).

    Built once per model from its weights (`PackedMatrix` in f32 / f16 / q8_0 and float32
    vectors); `bind_cache` points it at a cache's per-layer key/value arrays
    [B, capacity, H_kv, D]; calling it embeds B tokens at position `pos`, runs every layer
    (writing their keys and values at `pos`) and returns the final-norm hidden states
    [B, hidden]. The arithmetic is the per-kernel path's, kernel for kernel.

    layers: one dict per layer with matrices q, k, v, o, gate, up, down (PackedMatrix),
    optional biases q_bias / k_bias / v_bias / o_bias / gate_bias / up_bias / down_bias,
    vectors attn_norm, mlp_norm and optional q_norm / k_norm, and optionally
    down_rotation = (mix [m, m], block): `block_rotate` of the MLP activations before down.
    """

    MATRICES = ("q", "k", "v", "o", "gate", "up", "down")

    @staticmethod
    def supports(embed: PackedMatrix, *matrices: PackedMatrix) -> bool:
        """Whether the C step runs these: an embedding in a core format (it is looked up),
        matrices in a core format or a plugin format with a C matmul."""
        return _lib is not None and embed.format.name in _FMT_IDS and \
            _entry(embed.format) is not None and all(_step_format(w.format) for w in matrices)

    def __init__(self, *, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 intermediate: int, eps: float, rope_half: int, interleaved: bool = False,
                 norm_offset: float = 0.0, embed: PackedMatrix, final_norm: np.ndarray,
                 layers: list[dict]):
        if not self.supports(embed, *(L[n] for L in layers for n in self.MATRICES)):
            raise ValueError("DecoderStep: every matrix must be f32, f16, q8_0 or a plugin "
                             "format with a C matmul (the embedding a core format), with the "
                             "native module built")
        keep = self._keep = []  # arrays the C structs point into
        m = _ffi.new("lk_decoder *")
        m.n_layers, m.hidden, m.n_heads, m.n_kv_heads = len(layers), hidden, n_heads, n_kv_heads
        m.head_dim, m.intermediate, m.rope_half = head_dim, intermediate, rope_half
        m.rope_interleaved, m.eps, m.norm_offset = int(interleaved), eps, norm_offset
        _fill_linear(keep, m.embed, embed)
        m.final_norm = _keep_vec(keep, final_norm)
        self._layers = _ffi.new("lk_decoder_layer[]", max(len(layers), 1))
        for i, spec in enumerate(layers):
            L = self._layers[i]
            L.attn_norm = _keep_vec(keep, spec["attn_norm"])
            L.mlp_norm = _keep_vec(keep, spec["mlp_norm"])
            L.q_norm = _keep_vec(keep, spec.get("q_norm"))
            L.k_norm = _keep_vec(keep, spec.get("k_norm"))
            for name in self.MATRICES:
                _fill_linear(keep, getattr(L, name), spec[name], spec.get(f"{name}_bias"))
            for site, key in (("down_in", "down_rotation"), ("attn_in", "attn_in_rotation"),
                              ("mlp_in", "mlp_in_rotation"), ("o_in", "o_rotation")):
                _set_rotation(keep, getattr(L, site), spec.get(key))
        m.layers = self._layers
        m.cache_cap = 0
        self._m = m
        self._hidden = hidden
        self._cache_arrays: tuple = ()
        self._paged = None  # (pool identities, key / value pointer arrays, pool shape, pools)
        self._work = np.empty(0, _F32)

    def bind_cache(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Point the layers at these key/value arrays (re-bind after the cache grows)."""
        if len(keys) != self._m.n_layers or len(values) != self._m.n_layers:
            raise ValueError(f"bind_cache: {len(keys)} key arrays for {self._m.n_layers} layers")
        cap = keys[0].shape[1] if keys else 0
        for i, (k, v) in enumerate(zip(keys, values)):
            for a in (k, v):
                if a.dtype is not _F32 or not a.flags.c_contiguous or a.shape[1] != cap or \
                        a.shape[2:] != (self._m.n_kv_heads, self._m.head_dim):
                    raise ValueError(f"bind_cache: layer {i} cache array {a.shape} {a.dtype} "
                                     f"is not C-contiguous float32 [B, {cap}, "
                                     f"{self._m.n_kv_heads}, {self._m.head_dim}]")
            self._layers[i].k_cache = _fb(_FLOATS, k, True)
            self._layers[i].v_cache = _fb(_FLOATS, v, True)
        self._m.cache_cap = cap
        self._cache_arrays = (tuple(keys), tuple(values))

    def is_bound_to(self, keys: list[np.ndarray], values: list[np.ndarray]) -> bool:
        bound = self._cache_arrays
        return bool(bound) and all(a is b for a, b in zip(bound[0], keys)) and all(
            a is b for a, b in zip(bound[1], values)) and len(bound[0]) == len(keys)

    def __call__(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        out = _new_or_check(out, (tokens.size, self._hidden))
        self._work = _run_step(_L.lk_decoder_step, _L.lk_decoder_work_size, self._m, self._work,
                               tokens, pos, cos, sin, out, "lk_decoder_step")
        return out


    def paged(self, tokens: np.ndarray, cos: np.ndarray, sin: np.ndarray, batch,
              keys: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
        """The step over a flat batch of sequences in a paged KV cache
        (`paged_forward.PagedBatch`: rows at their own positions, prefill chunks and decode
        rows alike): cos / sin [n, rope_half] for the rows' positions, keys / values each
        layer's pool [num_blocks, block_size, H_kv, D]. Writes the rows' keys and values at
        their slots and returns the final-norm hidden states [n, hidden]."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = tokens.size
        k_ptrs, v_ptrs, (num_blocks, block_size) = self._pools(keys, values)
        slots = np.ascontiguousarray(batch.slots, dtype=np.int64)
        q_start = np.ascontiguousarray(batch.q_start, dtype=np.int64)
        pos_start = np.ascontiguousarray(batch.pos_start, dtype=np.int64)
        tables = np.ascontiguousarray(batch.block_tables, dtype=np.int32)
        if slots.shape != (n,) or q_start.shape != (pos_start.size + 1,) or \
                tables.shape[:1] != pos_start.shape or cos.shape != (n, self._m.rope_half):
            raise ValueError(f"decode step: a paged batch of {n} rows needs {n} slots, "
                             f"S + 1 q_start entries, S table rows and cos [{n}, "
                             f"{self._m.rope_half}] (got {slots.shape}, {q_start.shape}, "
                             f"{tables.shape}, {cos.shape})")
        need = _L.lk_decoder_work_size(self._m, n)
        if self._work.size < need:
            self._work = np.empty(need, _F32)
        out = np.empty((n, self._hidden), _F32)
        cp, cos = _in(cos)
        sp, sin = _in(sin)
        rc = _L.lk_decoder_step_paged(
            self._m, _fb(_INT64S, tokens), n, cp, sp, _fb(_INT64S, slots), k_ptrs, v_ptrs,
            num_blocks, block_size, pos_start.size, _fb(_INT64S, q_start),
            _fb(_INT64S, pos_start), _ffi.cast("int32_t *", _fb(tables)),
            tables.shape[1] if tables.ndim == 2 else 0, _fb(_FLOATS, self._work, True),
            self._work.size, _fb(_FLOATS, out, True))
        _raise_step_error(rc, tokens, self._m, "lk_decoder_step_paged",
                          "a row's slot, position or block table is outside the KV pool")
        return out

    def _pools(self, keys, values):
        """Pointer arrays to every layer's pools, kept while the cache keeps its arrays."""
        ident = tuple(map(id, keys)) + tuple(map(id, values))
        if self._paged is None or self._paged[0] != ident:
            n_layers = self._m.n_layers
            if len(keys) != n_layers or len(values) != n_layers:
                raise ValueError(f"decode step: {len(keys)} key pools for {n_layers} layers")
            shape = keys[0].shape if keys else (0, 1, self._m.n_kv_heads, self._m.head_dim)
            for a in list(keys) + list(values):
                if a.dtype is not _F32 or not a.flags.c_contiguous or a.shape != shape or \
                        a.shape[2:] != (self._m.n_kv_heads, self._m.head_dim):
                    raise ValueError(f"decode step: a KV pool {a.shape} {a.dtype} is not "
                                     f"C-contiguous float32 [blocks, block_size, "
                                     f"{self._m.n_kv_heads}, {self._m.head_dim}]")
            k_ptrs = _ffi.new("float *[]", [_fb(_FLOATS, a, True) for a in keys] or [_ffi.NULL])
            v_ptrs = _ffi.new("float *[]", [_fb(_FLOATS, a, True) for a in values] or [_ffi.NULL])
            # the arrays themselves are kept too: the pointers must not outlive them
            self._paged = (ident, k_ptrs, v_ptrs, shape[:2], (tuple(keys), tuple(values)))
        return self._paged[1], self._paged[2], self._paged[3]


class Qwen35Step:
    """One Qwen3.5 decode step in a single C call (`lk_qwen35_step`): embed, every Gated
    DeltaNet and gated-attention layer, final norm, for a batch of rows at T = 1.

    Built once per model from its weights (`PackedMatrix` in f32 / f16 / q8_0, float32
    vectors); `bind_cache` points it at a hybrid cache's arrays; calling it embeds B tokens
    at position `pos`, updates the conv / delta states and writes keys and values at `pos`,
    and returns the final-norm hidden states [B, hidden]. The arithmetic is the per-kernel
    path's, kernel for kernel.

    layers: one dict per layer, with "kind" ("linear_attention" or "full_attention"),
    vectors attn_norm, mlp_norm, matrices gate, up, down (optional down_rotation =
    (mix, block)), and
    - linear: matrices in_qkv, in_z, in_b, in_a, out; conv_w [K, conv_dim], neg_a and
      dt_bias [v_heads], head_norm [v_dim];
    - full: matrices q (query and gate rows per head), k, v, o with optional biases
      q_bias ... o_bias; vectors q_norm, k_norm.
    """

    LINEAR, FULL = "linear_attention", "full_attention"
    MATRICES = {LINEAR: ("in_qkv", "in_z", "in_b", "in_a", "out", "gate", "up", "down"),
                FULL: ("q", "k", "v", "o", "gate", "up", "down")}

    @classmethod
    def supports(cls, embed: PackedMatrix, *matrices: PackedMatrix) -> bool:
        """As DecoderStep.supports."""
        return DecoderStep.supports(embed, *matrices)

    @classmethod
    def matrices_of(cls, layers: list[dict]) -> list[PackedMatrix]:
        return [L[n] for L in layers for n in cls.MATRICES[L["kind"]]]

    def __init__(self, *, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, rope_half: int, lin_k_heads: int, lin_v_heads: int,
                 lin_k_dim: int, lin_v_dim: int, conv_kernel: int, eps: float,
                 embed: PackedMatrix, final_norm: np.ndarray, layers: list[dict]):
        if not self.supports(embed, *self.matrices_of(layers)):
            raise ValueError("Qwen35Step: every matrix must be f32, f16 or q8_0 with the "
                             "native module built")
        keep = self._keep = []
        m = _ffi.new("lk_qwen35 *")
        m.n_layers, m.hidden, m.intermediate = len(layers), hidden, intermediate
        m.n_heads, m.n_kv_heads, m.head_dim, m.rope_half = n_heads, n_kv_heads, head_dim, rope_half
        m.lin_k_heads, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim = (lin_k_heads, lin_v_heads,
                                                                 lin_k_dim, lin_v_dim)
        m.conv_kernel, m.eps = conv_kernel, eps
        _fill_linear(keep, m.embed, embed)
        m.final_norm = _keep_vec(keep, final_norm)
        self._layers = _ffi.new("lk_qwen35_layer[]", max(len(layers), 1))
        self._kinds = [spec["kind"] for spec in layers]
        for i, spec in enumerate(layers):
            L = self._layers[i]
            L.kind = 0 if spec["kind"] == self.LINEAR else 1
            L.attn_norm = _keep_vec(keep, spec["attn_norm"])
            L.mlp_norm = _keep_vec(keep, spec["mlp_norm"])
            for name in self.MATRICES[spec["kind"]]:
                _fill_linear(keep, getattr(L, name), spec[name], spec.get(f"{name}_bias"))
            if spec["kind"] == self.LINEAR:
                for name in ("conv_w", "neg_a", "dt_bias", "head_norm"):
                    setattr(L, name, _keep_vec(keep, spec[name]))
            else:
                L.q_norm = _keep_vec(keep, spec["q_norm"])
                L.k_norm = _keep_vec(keep, spec["k_norm"])
            _set_rotation(keep, L.down_in, spec.get("down_rotation"))
        m.layers = self._layers
        m.cache_cap = 0
        self._m = m
        self._hidden = hidden
        self._bound: tuple = ()
        self._paged = None
        self._work = np.empty(0, _F32)

    def bind_cache(self, keys: list[np.ndarray], values: list[np.ndarray],
                   conv: list[np.ndarray], delta: list[np.ndarray]) -> None:
        """Point the layers at a hybrid cache's arrays: keys / values [B, capacity, H_kv, D]
        of the attention layers and conv [B, K-1, conv_dim] / delta [B, Hv, Dk, Dv] states
        of the DeltaNet layers, each list in layer order (re-bind after the KV grows)."""
        m = self._m
        n_full = self._kinds.count(self.FULL)
        if len(keys) != n_full or len(values) != n_full or \
                len(conv) != len(delta) or len(conv) != len(self._kinds) - n_full:
            raise ValueError(f"bind_cache: {len(keys)} key / {len(conv)} state arrays for "
                             f"{n_full} attention and {len(self._kinds) - n_full} DeltaNet layers")
        cap = keys[0].shape[1] if keys else 1 << 62
        batch = (keys or conv)[0].shape[0] if (keys or conv) else 0
        conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
        want = {"kv": (batch, cap, m.n_kv_heads, m.head_dim),
                "conv": (batch, m.conv_kernel - 1, conv_dim),
                "delta": (batch, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim)}
        for kind, arrays in (("kv", keys), ("kv", values), ("conv", conv), ("delta", delta)):
            for a in arrays:
                if a.dtype is not _F32 or not a.flags.c_contiguous or a.shape != want[kind]:
                    raise ValueError(f"bind_cache: a {kind} array {a.dtype} {a.shape} is not "
                                     f"C-contiguous float32 {want[kind]}")
        full = linear = 0
        for i, kind in enumerate(self._kinds):
            L = self._layers[i]
            if kind == self.FULL:
                L.k_cache = _fb(_FLOATS, keys[full], True)
                L.v_cache = _fb(_FLOATS, values[full], True)
                full += 1
            else:
                L.conv_state = _fb(_FLOATS, conv[linear], True)
                L.delta_state = _fb(_FLOATS, delta[linear], True)
                linear += 1
        m.cache_cap = cap
        self._bound = (batch, tuple(keys), tuple(values), tuple(conv), tuple(delta))

    def is_bound_to(self, keys, values, conv, delta) -> bool:
        if not self._bound:
            return False
        arrays = self._bound[1:]
        return all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
                   for a, b in zip(arrays, (keys, values, conv, delta)))

    def __call__(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        B = tokens.size
        if not self._bound or B != self._bound[0]:
            raise ValueError(f"decode step: {B} tokens for a cache bound with "
                             f"{self._bound[0] if self._bound else 'no'} rows; bind_cache first")
        out = _new_or_check(out, (B, self._hidden))
        self._work = _run_step(_L.lk_qwen35_step, _L.lk_qwen35_work_size, self._m, self._work,
                               tokens, pos, cos, sin, out, "lk_qwen35_step")
        return out

    def paged(self, tokens: np.ndarray, cos: np.ndarray, sin: np.ndarray, batch,
              keys: list[np.ndarray], values: list[np.ndarray],
              states: list[np.ndarray]) -> np.ndarray:
        """The step over a flat batch of sequences in a paged cache (`lk_qwen35_step_paged`;
        `paged_forward.PagedBatch`: rows at their own positions, prefill chunks and decode
        rows alike): cos / sin [n, rope_half] for the rows' positions; keys / values the
        attention layers' pools [num_blocks, block_size, H_kv, D] and states the DeltaNet
        layers' state slots (conv [slots, K-1, conv_dim], delta [slots, Hv, Dk, Dv] per
        layer, alternating), each in layer order. Writes keys and values at the rows' slots,
        advances each sequence's states in its slot, and returns the final-norm hidden
        states [n, hidden]."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = tokens.size
        ptrs, (num_blocks, block_size), num_slots = self._pools(keys, values, states)
        slots = np.ascontiguousarray(batch.slots, dtype=np.int64)
        q_start = np.ascontiguousarray(batch.q_start, dtype=np.int64)
        pos_start = np.ascontiguousarray(batch.pos_start, dtype=np.int64)
        state_slots = np.ascontiguousarray(batch.state_slots, dtype=np.int64)
        tables = np.ascontiguousarray(batch.block_tables, dtype=np.int32)
        if slots.shape != (n,) or q_start.shape != (pos_start.size + 1,) or \
                state_slots.shape != pos_start.shape or tables.shape[:1] != pos_start.shape \
                or cos.shape != (n, self._m.rope_half):
            raise ValueError(f"decode step: a paged batch of {n} rows needs {n} slots, "
                             f"S + 1 q_start entries, S state slots and table rows and cos "
                             f"[{n}, {self._m.rope_half}] (got {slots.shape}, {q_start.shape}, "
                             f"{state_slots.shape}, {tables.shape}, {cos.shape})")
        need = _L.lk_qwen35_work_size(self._m, n)
        if self._work.size < need:
            self._work = np.empty(need, _F32)
        out = np.empty((n, self._hidden), _F32)
        cp, cos = _in(cos)
        sp, sin = _in(sin)
        rc = _L.lk_qwen35_step_paged(
            self._m, _fb(_INT64S, tokens), n, cp, sp, _fb(_INT64S, slots), ptrs[0], ptrs[1],
            num_blocks, block_size, ptrs[2], ptrs[3], num_slots, _fb(_INT64S, state_slots),
            pos_start.size, _fb(_INT64S, q_start), _fb(_INT64S, pos_start),
            _ffi.cast("int32_t *", _fb(tables)), tables.shape[1] if tables.ndim == 2 else 0,
            _fb(_FLOATS, self._work, True), self._work.size, _fb(_FLOATS, out, True))
        _raise_step_error(rc, tokens, self._m, "lk_qwen35_step_paged",
                          "a row's slot, position, block table or recurrent-state slot is "
                          "outside the cache")
        return out

    def _pools(self, keys, values, states):
        """Per-layer pointer arrays (k, v, conv, delta; NULL where a layer has none), kept
        while the cache keeps its arrays; the KV pools' (blocks, block_size), state slots."""
        arrays = (tuple(keys), tuple(values), tuple(states))
        ident = tuple(id(a) for group in arrays for a in group)
        if self._paged is not None and self._paged[0] == ident:
            return self._paged[1:4]
        m = self._m
        n_full = self._kinds.count(self.FULL)
        n_linear = len(self._kinds) - n_full
        if len(keys) != n_full or len(values) != n_full or len(states) != 2 * n_linear:
            raise ValueError(f"decode step: {len(keys)} key pools and {len(states)} state "
                             f"arrays for {n_full} attention and {n_linear} DeltaNet layers")
        kv = keys[0].shape[:2] if keys else (0, 1)
        slots = states[0].shape[0] if states else 0
        conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
        want = {"kv": kv + (m.n_kv_heads, m.head_dim),
                "conv": (slots, m.conv_kernel - 1, conv_dim),
                "delta": (slots, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim)}
        for kind, group in (("kv", keys), ("kv", values), ("conv", states[0::2]),
                            ("delta", states[1::2])):
            for a in group:
                if a.dtype is not _F32 or not a.flags.c_contiguous or a.shape != want[kind]:
                    raise ValueError(f"decode step: a {kind} pool {a.dtype} {a.shape} is not "
                                     f"C-contiguous float32 {want[kind]}")
        ptrs = [_ffi.new("float *[]", max(len(self._kinds), 1)) for _ in range(4)]
        full = linear = 0
        for i, kind in enumerate(self._kinds):
            if kind == self.FULL:
                ptrs[0][i] = _fb(_FLOATS, keys[full], True)
                ptrs[1][i] = _fb(_FLOATS, values[full], True)
                full += 1
            else:
                ptrs[2][i] = _fb(_FLOATS, states[2 * linear], True)
                ptrs[3][i] = _fb(_FLOATS, states[2 * linear + 1], True)
                linear += 1
        # the arrays themselves are kept too: the pointers must not outlive them
        self._paged = (ident, ptrs, kv, slots, arrays)
        return self._paged[1:4]
