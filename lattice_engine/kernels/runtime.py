"""The compiled library and its global settings: loading `lattice_engine._native`, the
kernel variant (ISA, q8_0 kernel) and the thread count.

The package imports without the compiled library; `available()` says whether it is there
(else `LOAD_ERROR` says why), and the kernels then raise RuntimeError naming the fix: `_L`
stands in for the cffi lib and `_fb` for `ffi.from_buffer`, so the op modules bind them once
and call them directly.

Threads: 2 by default, `LATTICE_THREADS` overrides it at start-up, `set_threads(n)` later.

The state lives here and nowhere else: code (and tests) that replace `_lib` or
`LOAD_ERROR` patch this module, not the `kernels` package that re-exports its functions.
"""

from __future__ import annotations

try:  # compiled at install time from native/ (see native/build_native.py)
    from .._native import ffi as _ffi, lib as _lib
    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - only on installs without a C compiler
    _ffi = _lib = None
    # "No module named" means it was never built; anything else (an undefined symbol, a
    # CPU it was not built for) is a broken build, which tests report instead of skipping
    LOAD_ERROR = str(exc)

_ISA_NAMES = {"generic": 0, "avx2": 1}


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


def cpu_is_amd() -> bool:
    """Whether the CPU is an AMD one (False without the compiled module)."""
    return _lib is not None and bool(_L.lk_cpu_is_amd())


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
