"""cffi builder for `lattice_engine._native` (API mode), the C kernels in native/src.

setuptools runs this through `cffi_modules` in setup.py when the package is installed
(editable or not). To build in place by hand: `python native/build_native.py`.

Flags: -O3 for everything, no -march: the AVX2/FMA/F16C kernels (and the AVX-VNNI /
AVX512-VNNI q8_0 kernels) carry their own `target` attributes and are picked at run
time, so the module loads on any x86-64 CPU.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = ["runtime.c", "matmul.c", "elementwise.c", "attention.c", "decoder.c",
           "gated_deltanet.c", "paged_attention.c", "rotate.c", "qwen35_decoder.c",
           "step_linear.c"]

CDEF = """
int lk_init(void);
int lk_isa(void);
const char *lk_isa_name(void);
int lk_set_isa(int isa);
void lk_set_threads(int n);
int lk_get_threads(void);

void lk_matmul_f32(const float *x, int64_t M, int64_t K,
                   const void *w, int64_t ldw, int64_t N, float *y);
void lk_matmul_f16(const float *x, int64_t M, int64_t K,
                   const void *w, int64_t ldw, int64_t N, float *y);
void lk_matmul_q8_0(const float *x, int64_t M, int64_t K,
                    const void *w, int64_t ldw, int64_t N, float *y);
void lk_matmul_q8_0_r16(const float *x, int64_t M, int64_t K,
                        const void *w, int64_t ldw, int64_t N, float *y);
int lk_q8_variant(int v);
const char *lk_q8_variant_name(int v);
int lk_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                    const void *const *w, const int64_t *ldw, const int64_t *N,
                    float *const *y);

int lk_embed_f32(const void *w, int64_t ldw, int64_t rows, int64_t K,
                 const int64_t *ids, int64_t n, float *out);
int lk_embed_f16(const void *w, int64_t ldw, int64_t rows, int64_t K,
                 const int64_t *ids, int64_t n, float *out);
int lk_embed_q8_0(const void *w, int64_t ldw, int64_t rows, int64_t K,
                  const int64_t *ids, int64_t n, float *out);
int lk_embed_q8_0_r16(const void *w, int64_t ldw, int64_t rows, int64_t K,
                      const int64_t *ids, int64_t n, float *out);

void lk_quantize_q8_0(const float *x, int64_t rows, int64_t K, void *dst);
int lk_q8_0_to_r16(const void *src, int64_t rows, int64_t K, void *dst);
int lk_r16_to_q8_0(const void *src, int64_t rows, int64_t K, void *dst);
void lk_quantize_row_q16_act(const float *x, int64_t K, int16_t *q, float *d);

void lk_rms_norm(const float *x, int64_t rows, int64_t D, const float *w,
                 float eps, float offset, float *out);
void lk_rope(const float *x, int64_t B, int64_t T, int64_t H, int64_t Dh,
             int64_t sb, int64_t st, int64_t sh,
             const float *cos_t, const float *sin_t, int64_t half, int interleaved,
             float *out);
void lk_silu(const float *x, int64_t n, float *out);
void lk_silu_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu,
                 int64_t rows, int64_t n, float *out);
void lk_softmax(const float *x, int64_t rows, int64_t n, float *out);
void lk_log_sum_exp(const float *x, int64_t rows, int64_t n, float *out);
void lk_add(const float *a, const float *b, int64_t n, float *out);

int lk_attention(const float *q, int64_t B, int64_t T, int64_t Hq, int64_t D,
                 int64_t qsb, int64_t qst, int64_t qsh,
                 const float *k, int64_t ksb, int64_t kst, int64_t ksh,
                 const float *v, int64_t vsb, int64_t vst, int64_t vsh,
                 int64_t S, int64_t Hkv, int64_t start_pos, float scale, float *out);

typedef int (*lk_extern_matmul)(const void *ctx, const float *x, int64_t M, int64_t K,
                                const void *w, int64_t ldw, int64_t N, float *y);
typedef struct {
    int32_t fmt;
    const void *w;
    int64_t ldw, rows, cols;
    const float *bias;
    lk_extern_matmul ext;
    const void *ext_ctx;
} lk_linear;
typedef struct {
    const float *mix;
    int64_t m, block;
} lk_rotation;
typedef struct {
    const float *attn_norm, *mlp_norm;
    const float *q_norm, *k_norm;
    lk_linear q, k, v, o, gate, up, down;
    lk_rotation down_in, attn_in, mlp_in, o_in;
    float *k_cache, *v_cache;
} lk_decoder_layer;
typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate;
    int64_t rope_half;
    int32_t rope_interleaved;
    float eps;
    float norm_offset;
    lk_linear embed;
    const float *final_norm;
    lk_decoder_layer *layers;
    int64_t cache_cap;
} lk_decoder;
int64_t lk_decoder_work_size(const lk_decoder *m, int64_t batch);
int lk_decoder_step(const lk_decoder *m, const int64_t *tokens, int64_t batch, int64_t pos,
                    const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                    float *hidden_out);
int lk_decoder_step_paged(const lk_decoder *m, const int64_t *tokens, int64_t n,
                          const float *cos_t, const float *sin_t, const int64_t *slots,
                          float *const *k_pools, float *const *v_pools, int64_t num_blocks,
                          int64_t block_size, int64_t nseq, const int64_t *q_start,
                          const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                          float *work, int64_t work_len, float *hidden_out);
int lk_causal_conv1d(float *x, int64_t B, int64_t T, int64_t C, int64_t sbx, int64_t stx,
                     const float *w, int64_t K, float *state, int silu);
int lk_gated_delta_rule(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                        int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int64_t sb, int64_t st,
                        const float *g, const float *beta, float *state, int64_t chunk,
                        float *out);
void lk_gated_rms_norm(const float *x, const float *z, int64_t rows, int64_t D,
                       const float *w, float eps, float *out);
void lk_sigmoid(const float *x, int64_t n, float *out);
void lk_softplus(const float *x, int64_t n, float *out);
typedef struct {
    int32_t kind;
    const float *attn_norm, *mlp_norm;
    lk_linear in_qkv, in_z, in_b, in_a, out;
    const float *conv_w;
    const float *neg_a;
    const float *dt_bias;
    const float *head_norm;
    float *conv_state;
    float *delta_state;
    lk_linear q, k, v, o;
    const float *q_norm, *k_norm;
    float *k_cache, *v_cache;
    lk_linear gate, up, down;
    lk_rotation down_in;
} lk_qwen35_layer;
typedef struct {
    int64_t n_layers, hidden, intermediate;
    int64_t n_heads, n_kv_heads, head_dim, rope_half;
    int64_t lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim, conv_kernel;
    float eps;
    lk_linear embed;
    const float *final_norm;
    lk_qwen35_layer *layers;
    int64_t cache_cap;
} lk_qwen35;
int64_t lk_qwen35_work_size(const lk_qwen35 *m, int64_t batch);
int lk_qwen35_step(const lk_qwen35 *m, const int64_t *tokens, int64_t batch, int64_t pos,
                   const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                   float *hidden_out);
int lk_qwen35_step_paged(const lk_qwen35 *m, const int64_t *tokens, int64_t n,
                         const float *cos_t, const float *sin_t, const int64_t *slots,
                         float *const *k_pools, float *const *v_pools, int64_t num_blocks,
                         int64_t block_size, float *const *conv_pools,
                         float *const *delta_pools, int64_t num_state_slots,
                         const int64_t *state_slots, int64_t nseq, const int64_t *q_start,
                         const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                         float *work, int64_t work_len, float *hidden_out);
int lk_paged_attention(const float *q, int64_t Hq, int64_t D, const float *k_pool,
                       const float *v_pool, int64_t block_size, int64_t Hkv, int64_t nseq,
                       const int64_t *q_start, const int64_t *pos_start,
                       const int32_t *block_tables, int64_t max_blocks, float scale,
                       float *out);

int lk_block_rotate(const float *x, int64_t rows, int64_t m, int64_t block, const float *mix,
                    float *out);

double lk_bench_read(const void *buf, int64_t nbytes, int prefetch);
"""


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
        include_dirs=[path("include")],
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
