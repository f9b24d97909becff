"""cffi builder (API mode) for `lattice_quant_q4._q4_native`, the kernels in native/q4_kernels.c.

setuptools runs it through `cffi_modules` (setup.py) when the plugin is installed; by hand,
`python build_q4.py` builds the module in place next to the package sources. No -march:
the AVX2 / AVX-VNNI kernels carry `target` attributes and are picked at run time, so the
module loads on any x86-64 CPU (and builds on others with only the generic C).
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
void q4_set_parallel_for(void *fn);
int q4_isa(void);
const char *q4_isa_name(void);
int q4_set_isa(int isa);
int q4_matmul(int asym, int64_t group, const float *x, int64_t M, int64_t K,
              const void *w, int64_t ldw, int64_t N, float *y);
int q4_embed(int asym, int64_t group, const void *w, int64_t ldw, int64_t rows, int64_t K,
             const int64_t *ids, int64_t n, float *out);
typedef struct { int asym; int64_t group; } q4_format;
int q4_matmul_extern(const void *ctx, const float *x, int64_t M, int64_t K, const void *w,
                     int64_t ldw, int64_t N, float *y);
"""


def make_builder(relative: bool) -> FFI:
    source = os.path.join(HERE, "native", "q4_kernels.c")
    if relative:
        source = os.path.relpath(source, os.getcwd())
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source("lattice_quant_q4._q4_native", "#include <stdint.h>\n" + CDEF,
                       sources=[source],
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
