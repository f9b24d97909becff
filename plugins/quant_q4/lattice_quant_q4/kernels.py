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

from .formats import R16_SUFFIX, layout_of


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


def make_matmul(family: str, group: int, bytes_per_block: int, r16: bool = False):
    """`WeightFormat.matmul` for one format: (x float32 [M, K], packed [N, row_bytes]) ->
    float32 [M, N]. r16: the weights are in the _r16 layout (N % 16 == 0)."""
    asym = 1 if family == "q4_asym" else 0
    fn, floats = _lib.q4_matmul, _ffi.typeof("float[]")
    fb = _ffi.from_buffer
    name = f"{family}_g{group}{'_r16' if r16 else ''}"

    def matmul(x: np.ndarray, data: np.ndarray) -> np.ndarray:
        K = x.shape[-1]
        if K % group or data.shape[1] != K // group * bytes_per_block:
            raise ValueError(f"{name} matmul: x has {K} features but the weight "
                             f"rows are {data.shape[1]} bytes")
        if r16 and data.shape[0] % 16:
            raise ValueError(f"{name} matmul: the _r16 layout needs a multiple of 16 rows, "
                             f"got {data.shape[0]}")
        if x.dtype is not _F32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        M, N = x.size // K if K else 0, data.shape[0]
        out = np.empty((M, N), _F32)
        rc = fn(asym, group, int(r16), fb(floats, x), M, K, fb(data), data.strides[0], N,
                fb(floats, out, True))
        if rc:
            raise MemoryError(f"{name} matmul: out of memory for {M} x {K} activations") \
                if rc == -1 else ValueError(f"{name} matmul: bad layout ({N} rows of "
                                            f"{data.strides[0]} bytes)")
        return out

    matmul.__name__ = f"matmul_{name}_native"
    return matmul


def make_embed(family: str, group: int, bytes_per_block: int, r16: bool = False):
    """`WeightFormat.embed` for one format: (packed [rows, row_bytes], int ids [n]) ->
    float32 [n, cols]; r16: the rows are in the _r16 layout."""
    asym = 1 if family == "q4_asym" else 0

    def embed(data: np.ndarray, ids: np.ndarray) -> np.ndarray:
        cols = data.shape[1] // bytes_per_block * group
        flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        out = np.empty((flat.size, cols), _F32)
        dp, data = _rows(data)
        if _lib.q4_embed(asym, group, int(r16), dp, data.strides[0], data.shape[0], cols,
                         _ffi.from_buffer("int64_t[]", flat), flat.size,
                         _ffi.from_buffer("float[]", out, True)):
            bad = flat[(flat < 0) | (flat >= data.shape[0])]
            raise IndexError(f"embed: token id {int(bad[0]) if bad.size else '?'} is outside "
                             f"the vocabulary [0, {data.shape[0]})")
        return out

    embed.__name__ = f"embed_{family}_g{group}{'_r16' if r16 else ''}_native"
    return embed


def relayout(family: str, group: int, data: np.ndarray, cols: int, to_r16: bool) -> np.ndarray:
    """Plain blocks <-> the _r16 layout in C (bit-identical to `formats.to_r16` /
    `from_r16`): in place when `data` is a writable contiguous array, else on a copy."""
    rows = data.shape[0]
    if not (data.flags.c_contiguous and data.flags.writeable):
        data = np.array(data, dtype=np.uint8, order="C")
    rc = _lib.q4_relayout(int(family == "q4_asym"), group,
                          _ffi.from_buffer("uint8_t[]", data, True), rows, cols, int(to_r16))
    if rc == -2:
        raise MemoryError(f"{family}_g{group} _r16 conversion: out of memory for 16 rows")
    if rc:
        raise ValueError(f"{family}_g{group} _r16 conversion: needs rows % 16 == 0 and "
                         f"{cols // group} blocks per row, got {data.shape}")
    return data


def r16_pays() -> bool:
    """Whether the _r16 layout is the faster one here: with any x86 variant (the decode
    kernels then load each 16 rows' nibbles and scales as they are instead of transposing
    them on every call; the prefill kernel copies its tiles out of it). The generic C
    gathers each block back, so it keeps the plain layout. LATTICE_Q4_R16=1 / 0 forces it
    either way (A/B, tests)."""
    import os

    forced = os.environ.get("LATTICE_Q4_R16")
    if forced in ("0", "1"):
        return forced == "1"
    return _lib is not None and isa() != "generic"


def make_native_layout(r16_format):
    """`WeightFormat.native_layout` of a plain format: its matrices with a multiple of 16
    rows become `r16_format` where that pays (converted in place when writable)."""
    family, group = layout_of(r16_format.name)

    def native_layout(m):
        from lattice_engine.quant.formats import PackedMatrix
        if m.rows % 16 or not r16_pays():
            return m
        return PackedMatrix(r16_format, m.rows, m.cols,
                            relayout(family, group, m.data, m.cols, True))

    return native_layout


def attach(formats, r16_formats=()) -> bool:
    """Point `matmul` and `embed` of our formats (plain and _r16) at the C kernels (when
    built), like the core's `attach_native` does for its own formats, and give each plain
    format its `native_layout` (its _r16 twin, by name)."""
    if _lib is None:
        return False
    function = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "q4_matmul_extern")))
    grouped = int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "q4_matmul_grouped_extern")))
    twins = {f.name: f for f in r16_formats}
    for fmt in tuple(formats) + tuple(r16_formats):
        family, group = layout_of(fmt.name)  # q4_0 runs q4_sym_g32's kernels
        r16 = fmt.name.endswith(R16_SUFFIX)
        object.__setattr__(fmt, "matmul", make_matmul(family, group, fmt.bytes_per_block, r16))
        object.__setattr__(fmt, "embed", make_embed(family, group, fmt.bytes_per_block, r16))
        if not r16 and fmt.name + R16_SUFFIX in twins:
            object.__setattr__(fmt, "native_layout",
                               make_native_layout(twins[fmt.name + R16_SUFFIX]))
        # the core's fused steps call it from C (lk_extern_matmul)
        ctx = _ffi.new("q4_format *", {"asym": int(family == "q4_asym"), "group": group,
                                       "r16": int(r16)})
        _EXTERN_CONTEXTS.append(ctx)  # kept alive as long as the module
        object.__setattr__(fmt, "c_matmul", (function, int(_ffi.cast("uintptr_t", ctx))))
        # and a MoE layer's experts in one call (lk_extern_matmul_grouped, same ctx)
        object.__setattr__(fmt, "c_matmul_grouped", grouped)
    return True
