"""The plugin's C kernels (`lattice_quant_q4._q4_native`), bound to the weight formats.

Threads come from the core's pool: the address of the core's exported `lk_parallel_for`
(declared in native/include/lattice_kernels.h) is handed to our C code once, so our
matmuls split their rows over the same workers as the core's kernels and obey
`lattice_engine.kernels.set_threads`. A second pool would spin against the core's between
kernels on a 2-core machine. Without the core's native module every call runs on the
calling thread.

Without the compiled module, `available()` is False and the formats keep their numpy
reference (dequantize, then matmul).
"""

from __future__ import annotations

import ctypes

import numpy as np

try:
    from ._q4_native import ffi as _ffi, lib as _lib
    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - installs without a C compiler
    _ffi = _lib = None
    LOAD_ERROR = str(exc)

_F32 = np.dtype(np.float32)
_ISA = {"generic": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
_pool_attached = False
_EXTERN_CONTEXTS: list = []  # the q4_format structs WeightFormat.c_matmul points at


def available() -> bool:
    return _lib is not None


def attach_core_pool() -> bool:
    """Give our kernels the core's thread pool; True if it is now attached."""
    global _pool_attached
    if _lib is None or _pool_attached:
        return _pool_attached
    try:
        from lattice_engine import kernels as core
        if not core.available():
            return False
        import lattice_engine._native as native
        # dlopen of an already loaded library returns the same handle: the same pool
        handle = ctypes.CDLL(native.__file__)
        address = ctypes.cast(handle.lk_parallel_for, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return False
    _lib.q4_set_parallel_for(_ffi.cast("void *", address))
    _pool_attached = True
    return True


def isa() -> str:
    return _ffi.string(_lib.q4_isa_name()).decode()


def set_isa(name: str) -> str:
    """Force "generic", "avx2", "avxvnni" or "avx512vnni" (tests compare them); a variant
    this CPU cannot run is refused silently. Returns the variant now in use."""
    if name not in _ISA:
        raise ValueError(f"unknown ISA {name!r}; choose one of {sorted(_ISA)}")
    _lib.q4_set_isa(_ISA[name])
    return isa()


def isas() -> list[str]:
    """Variants this CPU can run."""
    start, found = isa(), []
    for name in _ISA:
        if set_isa(name) == name:
            found.append(name)
    set_isa(start)
    return found


def _rows(data: np.ndarray):
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    return _ffi.from_buffer(data), data


def make_matmul(family: str, group: int, bytes_per_block: int):
    """`WeightFormat.matmul` for one format: (x float32 [M, K], packed [N, row_bytes]) ->
    float32 [M, N]."""
    asym = 1 if family == "q4_asym" else 0
    fn, floats = _lib.q4_matmul, _ffi.typeof("float[]")
    fb = _ffi.from_buffer

    def matmul(x: np.ndarray, data: np.ndarray) -> np.ndarray:
        K = x.shape[-1]
        if K % group or data.shape[1] != K // group * bytes_per_block:
            raise ValueError(f"{family}_g{group} matmul: x has {K} features but the weight "
                             f"rows are {data.shape[1]} bytes")
        if x.dtype is not _F32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        M, N = x.size // K if K else 0, data.shape[0]
        out = np.empty((M, N), _F32)
        if fn(asym, group, fb(floats, x), M, K, fb(data), data.strides[0], N,
              fb(floats, out, True)):
            raise MemoryError(f"{family}_g{group} matmul: out of memory for {M} x {K} "
                              f"activations")
        return out

    matmul.__name__ = f"matmul_{family}_g{group}_native"
    return matmul


def make_embed(family: str, group: int, bytes_per_block: int):
    """`WeightFormat.embed` for one format: (packed [rows, row_bytes], int ids [n]) ->
    float32 [n, cols]."""
    asym = 1 if family == "q4_asym" else 0

    def embed(data: np.ndarray, ids: np.ndarray) -> np.ndarray:
        cols = data.shape[1] // bytes_per_block * group
        flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        out = np.empty((flat.size, cols), _F32)
        dp, data = _rows(data)
        if _lib.q4_embed(asym, group, dp, data.strides[0], data.shape[0], cols,
                         _ffi.from_buffer("int64_t[]", flat), flat.size,
                         _ffi.from_buffer("float[]", out, True)):
            bad = flat[(flat < 0) | (flat >= data.shape[0])]
            raise IndexError(f"embed: token id {int(bad[0]) if bad.size else '?'} is outside "
                             f"the vocabulary [0, {data.shape[0]})")
        return out

    embed.__name__ = f"embed_{family}_g{group}_native"
    return embed


def attach(formats) -> bool:
    """Point `matmul` and `embed` of our formats at the C kernels (when built), like the
    core's `attach_native` does for its own formats."""
    if _lib is None:
        return False
    attach_core_pool()
    from .formats import layout_of
    function = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "q4_matmul_extern")))
    for fmt in formats:
        family, group = layout_of(fmt.name)  # q4_0 runs q4_sym_g32's kernels
        object.__setattr__(fmt, "matmul", make_matmul(family, group, fmt.bytes_per_block))
        object.__setattr__(fmt, "embed", make_embed(family, group, fmt.bytes_per_block))
        if _pool_attached:  # the core's fused steps call it from C: only on the core's pool
            ctx = _ffi.new("q4_format *", {"asym": int(family == "q4_asym"), "group": group})
            _EXTERN_CONTEXTS.append(ctx)  # kept alive as long as the module
            object.__setattr__(fmt, "c_matmul",
                               (function, int(_ffi.cast("uintptr_t", ctx))))
    return True
