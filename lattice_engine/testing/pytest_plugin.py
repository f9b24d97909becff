"""pytest plugin for suites that test native code: the core's and every plugin's.

Enable it in the suite's root conftest.py: `pytest_plugins = ["lattice_engine.testing.pytest_plugin"]`.

The `native` marker. A test (or a parametrized case, or a module through `pytestmark`)
that needs a compiled module carries `@pytest.mark.native`, or
`@pytest.mark.native(probe=fn, what="lattice_quant_q4 kernels")` for a plugin's own module,
where fn() returns None when the module loads and the load error's text otherwise. When the
module is missing the test is skipped with that text, so a user without a C compiler still
gets a clean run. One switch makes that a failure everywhere: LATTICE_REQUIRE_NATIVE=1
(which CI sets), so a broken build cannot leave CI green. A module that was built but does
not load (an undefined symbol, say) always fails: that is a bug, not a missing compiler.

A fresh plugin manager. The autouse fixture `fresh_plugin_manager` resets the process-wide
plugin manager around every test, so a test that registers a plugin cannot leak it.

Kernel variants. `KERNEL_VARIANTS` lists the SIMD variants the kernels have, in one naming
for the core and the plugins ("generic", "avx2", "avxvnni", "avx512vnni"). A test
parametrizes over all of them and calls `variant_skip_reason(name)`: a variant this CPU
lacks is a skip that names the missing CPU flags (read from /proc/cpuinfo, independently of
the kernels' own detection), so the report shows what was not covered; a variant the CPU
has must then be selectable, and the test fails if the kernels refuse it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator, Optional

import pytest

REQUIRE_NATIVE_ENV = "LATTICE_REQUIRE_NATIVE"
CORE_MODULE = "lattice_engine._native (the core's C kernels)"

KERNEL_VARIANTS = ("generic", "avx2", "avxvnni", "avx512vnni")
# /proc/cpuinfo flags each variant's code needs (the kernels check the same features with
# __builtin_cpu_supports; "avxvnni" is the VEX-encoded AVX-VNNI of Alder Lake / Zen 5)
_BASE = ("avx2", "fma", "f16c")
VARIANT_FLAGS = {
    "generic": (),
    "avx2": _BASE,
    "avxvnni": _BASE + ("avx_vnni",),
    "avx512vnni": _BASE + ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "native(probe=None, what=None): needs a compiled module; skipped when it "
        f"is missing, a failure under {REQUIRE_NATIVE_ENV}=1")


def require_native() -> bool:
    return os.environ.get(REQUIRE_NATIVE_ENV) == "1"


def core_probe() -> Optional[str]:
    """None when the core's kernels load, else why not."""
    from lattice_engine import kernels
    return None if kernels.available() else (kernels.LOAD_ERROR or "not built")


def native_missing(what: str, error: str) -> None:
    """End the current test because `what` does not load: skip, or fail when it was built but
    is broken or when LATTICE_REQUIRE_NATIVE=1."""
    message = f"{what} not available: {error}"
    if not error.startswith("No module named"):
        pytest.fail(f"{message} (the module exists but does not load: a broken build)",
                    pytrace=False)
    if require_native():
        pytest.fail(f"{message} ({REQUIRE_NATIVE_ENV}=1: a missing native module is a "
                    "failure, not a skip)", pytrace=False)
    pytest.skip(message)


def require(probe: Callable[[], Optional[str]] = core_probe, what: str = CORE_MODULE) -> None:
    """The marker's check, callable from a fixture or a test body."""
    error = probe()
    if error is not None:
        native_missing(what, error)


def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers("native"):
        require(mark.kwargs.get("probe", core_probe), mark.kwargs.get("what", CORE_MODULE))


@lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags from /proc/cpuinfo; None where that file does not exist."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def variant_skip_reason(name: str) -> Optional[str]:
    """Why kernel variant `name` cannot run here (None: it can, and must)."""
    if name not in VARIANT_FLAGS:
        raise ValueError(f"unknown kernel variant {name!r}; choose one of {KERNEL_VARIANTS}")
    if name == "generic":
        return None
    if os.environ.get("LATTICE_ISA") == "generic":
        return f"the {name} kernels are disabled by LATTICE_ISA=generic"
    flags = cpu_flags()
    if flags is None:
        return f"no /proc/cpuinfo to tell whether this CPU runs the {name} kernels"
    missing = [f for f in VARIANT_FLAGS[name] if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (needed by the {name} kernels)"
    return None


@contextmanager
def core_variant(name: str) -> Iterator[str]:
    """Run the core's kernels as variant `name` (skip when this CPU lacks it; fail when it
    has it and the kernels refuse), restoring the previous one after."""
    reason = variant_skip_reason(name)
    if reason:
        pytest.skip(reason)
    require()
    from lattice_engine import kernels
    before_isa, before_q8 = kernels.isa(), kernels.q8_variant()
    try:
        isa = "generic" if name == "generic" else "avx2"
        got = kernels.set_isa(isa)
        if got != isa:
            pytest.fail(f"the CPU has the flags of {name} but the kernels refused ISA {isa}")
        if isa == "avx2":
            q8 = kernels.q8_variant(name)
            if q8 != name:
                pytest.fail(f"the CPU has the flags of {name} but the kernels run q8_0 as {q8}")
        yield name
    finally:
        kernels.set_isa(before_isa)
        kernels.q8_variant(before_q8)


@pytest.fixture(autouse=True)
def fresh_plugin_manager(monkeypatch) -> Iterator[None]:
    """Each test builds its own process-wide plugin manager (LATTICE_PLUGINS unset), so no
    test leaks a registration or an allowlist into another."""
    from lattice_engine import plugins
    monkeypatch.delenv(plugins.ALLOWLIST_ENV, raising=False)
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


@pytest.fixture(params=KERNEL_VARIANTS)
def kernel_variant(request) -> Iterator[str]:
    """Each of the core's kernel variants in turn (see `core_variant`)."""
    with core_variant(request.param) as name:
        yield name
