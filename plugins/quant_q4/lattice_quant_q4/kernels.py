"""The plugin's C kernels (`lattice_quant_q4._q4_native`), bound to the weight formats.

Our C code uses the core through the C plugin ABI (lattice_engine/include/lattice_plugin.h)
only: at import the address of the core's API table (`lk_plugin_api_get()` of the core's
cffi module) is handed to `q4_attach`, which checks the ABI version and then takes the
core's thread pool (our matmuls split their rows over the same workers as the core's
kernels and obey `lattice_engine.kernels.set_threads`; a second pool would spin against the
core's on a 2-core machine) and the CPU features the core detected. A core with another ABI
version is refused: importing this module raises `PluginABIError`, naming both versions.

Without the compiled module, or without the core's native module (the plugin's kernels run
only on the core's pool and CPU detection), `available()` is False and the formats keep
their numpy reference (dequantize, then matmul), as the core's own formats do then.
"""

from __future__ import annotations

import numpy as np


class PluginABIError(ImportError):
    """The installed lattice-engine core offers a C plugin ABI this build does not support."""


# q4_attach's return codes (native/q4_kernels.c)
_ATTACH_OK, _ATTACH_NULL, _ATTACH_VERSION, _ATTACH_SIZE = 0, 1, 2, 3


def abi_error(ours: int, core: "int | None", code: int = _ATTACH_VERSION) -> str:
    """The message for a core whose C plugin ABI we cannot use."""
    if core is None:
        return (f"lattice-quant-q4 supports C plugin ABI {ours}, but the installed "
                f"lattice-engine core predates the C plugin ABI (no lk_plugin_api_get): "
                f"upgrade lattice-engine")
    if code == _ATTACH_SIZE:
        return (f"lattice-quant-q4 was built against a newer C plugin ABI {ours} header than "
                f"the installed lattice-engine core provides (its API table is smaller): "
                f"upgrade lattice-engine, or reinstall lattice-quant-q4 against this core")
    if code == _ATTACH_NULL:
        return "lattice-quant-q4: the lattice-engine core returned no plugin API table"
    fix = "upgrade lattice-quant-q4" if core > ours else "upgrade lattice-engine"
    return (f"lattice-quant-q4 supports C plugin ABI {ours}, the installed lattice-engine "
            f"core provides ABI {core}: {fix}")


def attach_api(address: int, core_version: "int | None") -> None:
    """Hand our C code the core's lk_plugin_api table at `address`; raises PluginABIError
    when q4_attach refuses it (the C side checks; core_version is only for the message)."""
    code = _lib.q4_attach(address)
    if code != _ATTACH_OK:
        raise PluginABIError(abi_error(int(_lib.q4_plugin_abi()), core_version, code))


def _attach_core() -> "str | None":
    """Attach to the core's native module; None when attached, else why the kernels are
    not usable (the core's module missing). Raises PluginABIError for a core we refuse."""
    try:
        from lattice_engine._native import ffi as core_ffi, lib as core_lib
    except ImportError as exc:
        return f"the lattice-engine core's native module is not available ({exc})"
    if not hasattr(core_lib, "lk_plugin_api_get"):
        raise PluginABIError(abi_error(int(_lib.q4_plugin_abi()), None))
    attach_api(int(core_ffi.cast("uintptr_t", core_lib.lk_plugin_api_get())),
               int(core_lib.lk_plugin_abi_version()))
    return None


try:
    from ._q4_native import ffi as _ffi, lib as _lib
    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - installs without a C compiler
    _ffi = _lib = None
    LOAD_ERROR = str(exc)
if _lib is not None:
    LOAD_ERROR = _attach_core()
    if LOAD_ERROR is not None:  # pragma: no cover - a core built without its C kernels
        _lib = None

_F32 = np.dtype(np.float32)
_ISA = {"generic": 0, "avx2": 1, "avxvnni": 2, "avx512vnni": 3}
_EXTERN_CONTEXTS: list = []  # the q4_format structs WeightFormat.c_matmul points at


def available() -> bool:
    return _lib is not None


def attach_core_pool() -> bool:
    """Whether our kernels run on the core's thread pool: they do whenever they are
    available (attached at import)."""
    return _lib is not None


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
    from .formats import layout_of
    function = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "q4_matmul_extern")))
    for fmt in formats:
        family, group = layout_of(fmt.name)  # q4_0 runs q4_sym_g32's kernels
        object.__setattr__(fmt, "matmul", make_matmul(family, group, fmt.bytes_per_block))
        object.__setattr__(fmt, "embed", make_embed(family, group, fmt.bytes_per_block))
        # the core's fused steps call it from C (lk_extern_matmul)
        ctx = _ffi.new("q4_format *", {"asym": int(family == "q4_asym"), "group": group})
        _EXTERN_CONTEXTS.append(ctx)  # kept alive as long as the module
        object.__setattr__(fmt, "c_matmul", (function, int(_ffi.cast("uintptr_t", ctx))))
    return True
