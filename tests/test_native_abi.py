"""The C side's contract: the cffi declarations come from the headers (one source of
truth), every `lk_` function the Python side calls is declared there, and the plugin ABI
(lattice_engine/include/lattice_plugin.h) is shipped, versioned and handed out."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import lattice_engine

ROOT = Path(__file__).resolve().parents[1]


def _build_native():
    spec = importlib.util.spec_from_file_location("_abi_build_native",
                                                  ROOT / "native" / "build_native.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BUILD = _build_native()
CDEF_FUNCTIONS = set(re.findall(r"\b(lk_\w+)\s*\(", BUILD.CDEF)) - {
    # typedef'd function pointer types, not functions
    name for name in re.findall(r"\(\s*\*\s*(lk_\w+)\s*\)", BUILD.CDEF)}


def _python_sources():
    for folder in ("lattice_engine", "plugins", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            if ".venv" not in path.parts and "build" not in path.parts:
                yield path


def called_from_python() -> dict[str, str]:
    """lk_ functions the Python sources call on a cffi lib (`_lib.lk_x`, `_L.lk_x`,
    `lib.lk_x`, `core_lib.lk_x`, `ffi.addressof(lib, "lk_x")`), with a file naming each."""
    found = {}
    pattern = re.compile(r"\b(?:\w*lib|_L)\.(lk_\w+)|addressof\(\s*\w*lib\s*,\s*[\"'](lk_\w+)")
    for path in _python_sources():
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(m.group(1) or m.group(2), str(path.relative_to(ROOT)))
    return found


def test_the_cdef_is_generated_from_the_headers():
    assert "lk_plugin_api_get" in CDEF_FUNCTIONS and "lk_decoder_step" in CDEF_FUNCTIONS
    # nothing of the internal section (LK_INTERNAL) or of the static inline helpers
    for internal in ("lk_parallel_for", "lk_scratch", "lk_exp8_avx2", "lk_r16_value",
                     "lk_step_linears"):
        assert internal not in BUILD.CDEF
    assert "#include" not in BUILD.CDEF and "/*" not in BUILD.CDEF


def test_every_lk_function_python_calls_is_declared():
    called = called_from_python()
    assert len(called) > 30, "the scan of the Python sources found too few calls"
    missing = {name: where for name, where in called.items() if name not in CDEF_FUNCTIONS}
    assert not missing, f"called from Python but not in the headers' cdef: {missing}"


def test_every_declared_function_is_in_the_built_module():
    native = pytest.importorskip("lattice_engine._native")
    absent = sorted(n for n in CDEF_FUNCTIONS if not hasattr(native.lib, n))
    assert not absent


def test_header_cdef_markers():
    text = ("int a(void);\n/* LK_CDEF_BEGIN */\n#define N 3\n#ifdef X\nint b(void); /* c */\n"
            "#endif\n/* LK_CDEF_END */\nint d(void);\n/* LK_CDEF_BEGIN x */ int e(void);\n"
            "/* LK_CDEF_END */")
    assert BUILD.header_cdef(text).split("\n")[:3] == ["#define N 3", "int b(void);",
                                                        " int e(void);"]
    with pytest.raises(ValueError, match="without LK_CDEF_END"):
        BUILD.header_cdef("/* LK_CDEF_BEGIN */ int a(void);")
    with pytest.raises(ValueError, match="unbalanced"):
        BUILD.header_cdef("/* LK_CDEF_END */")


def test_the_plugin_header_ships_in_the_package():
    header = Path(lattice_engine.native_include()) / "lattice_plugin.h"
    assert header.is_file()
    text = header.read_text()
    assert "LK_INTERNAL" not in text
    version = int(re.search(r"#define LK_PLUGIN_ABI_VERSION (\d+)", text).group(1))
    native = pytest.importorskip("lattice_engine._native")
    assert native.lib.LK_PLUGIN_ABI_VERSION == version
    assert native.lib.lk_plugin_abi_version() == version == lattice_engine.native_plugin_abi()


def test_the_api_table():
    native = pytest.importorskip("lattice_engine._native")
    ffi, lib = native.ffi, native.lib
    api = lib.lk_plugin_api_get()
    assert api != ffi.NULL and api == lib.lk_plugin_api_get()
    assert api.abi_version == lib.LK_PLUGIN_ABI_VERSION
    assert api.size == ffi.sizeof("lk_plugin_api")
    assert api.threads() == lib.lk_get_threads()
    assert api.cpu_features() == lib.lk_cpu_features()
    avx2 = lib.LK_CPU_AVX2 | lib.LK_CPU_FMA | lib.LK_CPU_F16C
    if lib.lk_isa() == lib.LK_ISA_AVX2:
        assert api.cpu_features() & avx2 == avx2

    # parallel_for runs every item exactly once, on the core's pool
    seen = []

    @ffi.callback("void(void *, int64_t, int64_t, int)")
    def task(ctx, i0, i1, ith):
        seen.extend(range(i0, i1))

    api.parallel_for(task, ffi.NULL, 1000, 10)
    assert sorted(seen) == list(range(1000))
