"""cffi builder (API mode) for `lattice_quant_q4._q4_native`, the kernels in native/q4_kernels.c.

setuptools runs it through `cffi_modules` (setup.py) when the plugin is installed; by hand,
`python build_q4.py` builds the module in place next to the package sources. No -march:
the AVX2 / AVX-VNNI kernels carry `target` attributes and are picked at run time, so the
module loads on any x86-64 CPU (and builds on others with only the generic C).

The C code includes one core header, lattice_plugin.h (the plugin ABI), and nothing else of
the core: no link against it, no dlopen. The header is looked up, in order, in
$LATTICE_ENGINE_INCLUDE, in the installed lattice_engine package (its `include/` folder,
lattice_engine.native_include(); found without importing the package), and in the source
tree this plugin sits in (../../lattice_engine/include, for `pip install ./plugins/quant_q4`
from a checkout, where pip's isolated build environment has no lattice-engine). A core
whose ABI differs from the header's is refused at import (lattice_quant_q4/kernels.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

HEADER = "lattice_plugin.h"


def core_include() -> str:
    """The folder holding the core's lattice_plugin.h (see the module docstring)."""
    candidates = []
    if os.environ.get("LATTICE_ENGINE_INCLUDE"):
        candidates.append(os.environ["LATTICE_ENGINE_INCLUDE"])
    spec = importlib.util.find_spec("lattice_engine")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(os.path.join(location, "include"))
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(HERE)), "lattice_engine",
                                   "include"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, HEADER)):
            return os.path.abspath(folder)
    raise RuntimeError(
        f"lattice-quant-q4: cannot find the core's {HEADER} (looked in "
        f"{', '.join(candidates)}). Install lattice-engine first and build with "
        f"`pip install --no-build-isolation ...`, or set LATTICE_ENGINE_INCLUDE to the "
        f"folder lattice_engine.native_include() names.")


CDEF = """
int q4_plugin_abi(void);
int q4_attach(uintptr_t address);
int q4_isa(void);
const char *q4_isa_name(void);
int q4_set_isa(int isa);
int q4_matmul(int asym, int64_t group, int r16, const float *x, int64_t M, int64_t K,
              const void *w, int64_t ldw, int64_t N, float *y);
int q4_embed(int asym, int64_t group, int r16, const void *w, int64_t ldw, int64_t rows,
             int64_t K, const int64_t *ids, int64_t n, float *out);
int q4_relayout(int asym, int64_t group, void *data, int64_t rows, int64_t K, int to_r16);
typedef struct { int asym; int64_t group; int r16; } q4_format;
int q4_matmul_extern(const void *ctx, const float *x, int64_t M, int64_t K, const void *w,
                     int64_t ldw, int64_t N, float *y);
int q4_matmul_grouped(int asym, int64_t group, int r16, const float *x, int64_t K, int64_t n,
                      const int64_t *row0, const int64_t *M, const void *const *w,
                      const int64_t *ldw, const int64_t *N, float *const *y);
int q4_matmul_grouped_extern(const void *ctx, const float *x, int64_t K, int64_t n,
                             const int64_t *row0, const int64_t *M, const void *const *w,
                             const int64_t *ldw, const int64_t *N, float *const *y);
"""


def make_builder(relative: bool) -> FFI:
    source = os.path.join(HERE, "native", "q4_kernels.c")
    if relative:
        source = os.path.relpath(source, os.getcwd())
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source("lattice_quant_q4._q4_native", "#include <stdint.h>\n" + CDEF,
                       sources=[source], include_dirs=[core_include()],
                       extra_compile_args=["-O3", "-std=gnu11", "-Wall"],
                       libraries=["m"] if sys.platform != "win32" else [])
    return builder


ffibuilder = make_builder(relative=os.path.abspath(os.getcwd()) == HERE)

if __name__ == "__main__":
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="q4_native_")
    try:
        so = make_builder(relative=False).compile(tmpdir=tmp, verbose=False)
        dest = os.path.join(HERE, "lattice_quant_q4", os.path.basename(so))
        # a temp file then a rename: a process that has the old module mapped keeps it
        # (copying over it in place crashed a running perplexity job, measured)
        shutil.copy2(so, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
        print("built", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
