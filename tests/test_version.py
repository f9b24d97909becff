"""`lattice --version`: the engine release, the plugin hook contract and the native kernels."""

import subprocess
import sys

import pytest

import lattice_engine
from lattice_engine import kernels
from lattice_engine.cli import main


def test_version_names_engine_plugin_api_and_kernels(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"lattice-engine {lattice_engine.__version__}",
                     f"plugin API {lattice_engine.PLUGIN_API_VERSION}",
                     f"native kernels {kernels.variant()}",
                     f"C plugin ABI {lattice_engine.native_plugin_abi()}"]
    if kernels.available():
        assert lattice_engine.native_plugin_abi() >= 1


def test_version_needs_no_command():
    # the subcommand is required for everything else; --version must exit before that check
    out = subprocess.run([sys.executable, "-m", "lattice_engine.cli", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"lattice-engine {lattice_engine.__version__}\n")


def test_plugin_api_version_is_major_dot_minor():
    major, minor = lattice_engine.PLUGIN_API_VERSION.split(".")
    assert major.isdigit() and minor.isdigit()


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
def test_kernel_variant_follows_the_isa_in_use():
    start = kernels.isa()
    try:
        assert kernels.set_isa("generic") == "generic"
        assert kernels.variant() == "generic"
        if kernels.set_isa("avx2") == "avx2":
            assert kernels.variant() == f"avx2, q8_0 {kernels.q8_variant()}"
    finally:
        kernels.set_isa(start)


def test_kernel_variant_without_the_native_module(monkeypatch):
    monkeypatch.setattr(kernels.runtime, "_lib", None)  # the library state lives there
    monkeypatch.setattr(kernels.runtime, "LOAD_ERROR", "No module named 'lattice_engine._native'")
    assert kernels.variant() == "not built: No module named 'lattice_engine._native'"
