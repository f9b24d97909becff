"""cffi builder for `lattice_engine._native` (API mode), the C kernels in native/src.

setuptools runs this through `cffi_modules` in setup.py when the package is installed
(editable or not). To build in place by hand: `python native/build_native.py`.

Flags: -O3 for everything, no -march: the AVX2/FMA/F16C kernels (and the AVX-VNNI /
AVX512-VNNI q8_0 kernels) carry their own `target` attributes and are picked at run
time, so the module loads on any x86-64 CPU.
"""

from __future__ import annotations

import os
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = ["runtime.c", "matmul.c", "matmul_generic.c", "matmul_f_avx2.c", "matmul_f_avx512.c",
           "matmul_q8_0_avx2.c", "matmul_q8_0_avxvnni.c", "matmul_q8_0_avx512vnni.c",
           "weights.c", "elementwise.c", "attention.c", "decoder.c", "gated_deltanet.c",
           "paged_attention.c", "rotate.c", "qwen35_decoder.c", "step_linear.c",
           "distance.c", "moe.c", "lora.c", "encoder_attention.c", "kv_format.c", "matmul_amx.c",
           "ggml_dequant.c", "matmul_panels.c", "matmul_ggml.c"]

INCLUDE_DIRS = [os.path.join(HERE, "include"),                  # lattice_kernels.h
                os.path.join(ROOT, "lattice_engine", "include")]  # lattice_plugin.h
# The cdef is read from these headers, between their LK_CDEF_BEGIN / LK_CDEF_END markers:
# the headers are the only source of truth for what Python can call.
HEADERS = [os.path.join(ROOT, "lattice_engine", "include", "lattice_plugin.h"),
           os.path.join(HERE, "include", "lattice_kernels.h")]

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_INT_DEFINE = re.compile(r"#\s*define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*$")


def header_cdef(text: str, name: str = "header") -> str:
    """The cffi declarations of one header: the text between each `LK_CDEF_BEGIN` and
    `LK_CDEF_END` comment, without comments and preprocessor lines (integer #defines are
    kept: cffi reads them as constants)."""
    parts = re.split(r"/\*\s*LK_CDEF_(BEGIN|END)\b.*?\*/", text, flags=re.S)
    # parts: text, "BEGIN", text, "END", text, ...
    out, inside = [], False
    for i in range(1, len(parts), 2):
        marker = parts[i]
        if (marker == "BEGIN") == inside:
            raise ValueError(f"{name}: unbalanced LK_CDEF_{marker}")
        inside = marker == "BEGIN"
        if inside:
            out.append(parts[i + 1])
    if inside:
        raise ValueError(f"{name}: LK_CDEF_BEGIN without LK_CDEF_END")
    lines = []
    for line in _COMMENT.sub(" ", "".join(out)).splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        if stripped:
            lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def generated_cdef() -> str:
    """The cdef of lattice_engine._native, generated from HEADERS."""
    chunks = []
    for path in HEADERS:
        with open(path, encoding="utf-8") as f:
            chunks.append(header_cdef(f.read(), os.path.basename(path)))
    return "".join(chunks)


CDEF = generated_cdef()


def make_builder(relative: bool) -> FFI:
    """The FFI builder; `relative` gives project-root-relative paths, as setuptools wants
    when it builds from the project root."""

    def path(*parts: str) -> str:
        p = os.path.join(HERE, *parts)
        return os.path.relpath(p, ROOT) if relative else p

    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "lattice_engine._native",
        '#include "lattice_kernels.h"\n',
        sources=[path("src", name) for name in SOURCES],
        include_dirs=[path(os.path.relpath(d, HERE)) for d in INCLUDE_DIRS],
        extra_compile_args=["-O3", "-std=gnu11", "-Wall",
                            "-Wno-unused-function"],
        libraries=["m", "pthread"] if sys.platform != "win32" else [],
    )
    return builder


ffibuilder = make_builder(relative=os.path.abspath(os.getcwd()) == ROOT)

if __name__ == "__main__":
    # Build in place: lattice_engine/_native*.so next to the package sources.
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="lattice_native_")
    try:
        so = make_builder(relative=False).compile(tmpdir=tmp, verbose=True)
        pkg = os.path.join(ROOT, "lattice_engine")
        dest = os.path.join(pkg, os.path.basename(so))
        # an older build under another suffix (e.g. .abi3.so from pip) could shadow this one
        for name in os.listdir(pkg):
            if name.startswith("_native.") and name.endswith(".so") and name != os.path.basename(so):
                os.remove(os.path.join(pkg, name))
        # a temp file then a rename: a process that has the old module mapped keeps it
        shutil.copy2(so, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        print("built", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
