"""The plugin's side of the C plugin ABI: it builds against lattice_plugin.h only, attaches
to the core's API table, and refuses a table of another ABI version with a message naming
both versions and the fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lattice_quant_q4 import formats as F
from lattice_quant_q4 import kernels as K

PLUGIN = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.native(probe=lambda: None if K.available() else K.LOAD_ERROR,
                                what="lattice_quant_q4._q4_native (the plugin's C kernels)")


def test_the_c_source_uses_the_public_header_only():
    source = (PLUGIN / "native" / "q4_kernels.c").read_text()
    assert '#include "lattice_plugin.h"' in source
    # the supported ABI is the plugin's own, and another header version is a build error
    assert "#if LK_PLUGIN_ABI_VERSION != Q4_PLUGIN_ABI\n#error" in source
    for forbidden in ("LK_INTERNAL", "lattice_kernels.h", "dlopen", "__builtin_cpu"):
        assert forbidden not in source
    glue = (PLUGIN / "lattice_quant_q4" / "kernels.py").read_text()
    assert "ctypes" not in glue


def test_the_build_finds_the_core_header():
    spec = importlib.util.spec_from_file_location("_abi_build_q4", PLUGIN / "build_q4.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (Path(mod.core_include()) / "lattice_plugin.h").is_file()


def _fake_table(**fields):
    from lattice_engine._native import ffi
    table = ffi.new("lk_plugin_api *", fields)
    return table, int(ffi.cast("uintptr_t", table))


def _still_works():
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    data = F.quantize("q4_sym", 32, w)
    y = K.make_matmul("q4_sym", 32, 18)(np.ones((1, 64), np.float32), data)
    assert np.isfinite(y).all()


def test_attached_to_the_core_at_import():
    from lattice_engine._native import lib
    assert K.attach_core_pool()
    assert K._lib.q4_plugin_abi() == lib.lk_plugin_abi_version()


@pytest.mark.parametrize("core", [2, 0])
def test_a_core_of_another_abi_version_is_refused(core):
    from lattice_engine._native import ffi
    ours = K._lib.q4_plugin_abi()
    table, address = _fake_table(abi_version=ours + 1 if core else ours - 1,
                                 size=ffi.sizeof("lk_plugin_api"))
    with pytest.raises(K.PluginABIError) as info:
        K.attach_api(address, table.abi_version)
    message = str(info.value)
    assert f"supports C plugin ABI {ours}" in message
    assert f"provides ABI {table.abi_version}" in message
    assert ("upgrade lattice-quant-q4" if core else "upgrade lattice-engine") in message
    _still_works()  # the refused table was not kept


def test_a_smaller_table_is_refused():
    from lattice_engine._native import ffi, lib
    table, address = _fake_table(abi_version=lib.LK_PLUGIN_ABI_VERSION,
                                 size=ffi.sizeof("lk_plugin_api") - 8)
    with pytest.raises(K.PluginABIError, match="API table is smaller"):
        K.attach_api(address, table.abi_version)
    _still_works()


def test_a_core_without_the_abi_is_named():
    assert "predates the C plugin ABI" in K.abi_error(1, None)
    assert "upgrade lattice-engine" in K.abi_error(1, None)
