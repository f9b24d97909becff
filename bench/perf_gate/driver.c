/* The perf gate's driver: a fixed set of kernel calls, each counted by callgrind alone.
 *
 * Built by bench/perf_gate/gate.py from the sources in native/src and the quant_q4 plugin's
 * q4_kernels.c with the flags the Python modules are built with, and run as
 *
 *   valgrind --tool=callgrind --collect-atstart=no ... driver <variant> <model dims...>
 *
 * For every entry: the inputs are made (not counted), the call runs once to warm up
 * (lk_init, scratch growth), stateful inputs are restored, then the call runs once more
 * between two CALLGRIND_TOGGLE_COLLECTs and CALLGRIND_DUMP_STATS_AT(entry name) writes
 * its count to a dump of its own. Single-threaded (lk_set_threads(1)): no worker spins or
 * waits, so a count does not depend on scheduling. Inputs come from a fixed xorshift
 * seed, so two runs of one binary count exactly the same instructions.
 *
 * The kernel variant is forced, never detected: `avx2` (runtime ISA AVX2, the q8_0 avx2
 * kernel, quant_q4's avx2 kernels) or `generic` (the scalar C everywhere). If the CPU
 * (under valgrind: valgrind's emulated CPU) cannot run the requested variant the driver
 * says so on stderr and exits 3 without counting anything.
 *
 * Without valgrind the client requests do nothing: `driver avx2 ...` runs natively as a
 * quick check that every call succeeds (it prints each entry's name and return code).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <valgrind/callgrind.h>

#include "lattice_kernels.h"

/* the quant_q4 plugin's kernels (plugins/quant_q4/native/q4_kernels.c) */
int q4_attach(uintptr_t address);
int q4_isa(void);
const char *q4_isa_name(void);
int q4_set_isa(int isa);
int q4_matmul(int asym, int64_t group, int r16, const float *x, int64_t M, int64_t K,
              const void *w, int64_t ldw, int64_t N, float *y);
int q4_relayout(int asym, int64_t group, void *data, int64_t rows, int64_t K, int to_r16);

/* ---- inputs ------------------------------------------------------------------------ */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
/* Each group of entries starts from its own seed, so adding or removing an entry does not
   change the inputs (and so, slightly, the counts: libm and a few branches depend on
   values) of the others. */
static void reseed(uint64_t s) { rng = 0x9E3779B97F4A7C15ull ^ (s * 0xBF58476D1CE4E5B9ull); }
/* uniform in [lo, hi) */
static float uni(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() >> 8) / 16777216.0f; }

static void *xalloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
        fprintf(stderr, "driver: out of memory\n");
        exit(2);
    }
    return p;
}
static float *randf(int64_t n, float lo, float hi) {
    float *p = (float *)xalloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = uni(lo, hi);
    return p;
}
static float *copyf(const float *src, int64_t n) {
    float *p = (float *)xalloc((size_t)n * sizeof(float));
    memcpy(p, src, (size_t)n * sizeof(float));
    return p;
}
/* a half float of magnitude in [2^-6, 2^-2), random sign and mantissa */
static uint16_t rand_half(void) {
    uint32_t r = next_u32();
    return (uint16_t)(((r & 1) << 15) | ((9u + (r >> 1) % 4) << 10) | ((r >> 8) & 0x3ff));
}
static void *q8_0_matrix(int64_t N, int64_t K) {
    float *f = randf(N * K, -1.0f, 1.0f);
    void *w = xalloc((size_t)(N * (K / LK_QK8_0)) * sizeof(lk_block_q8_0));
    lk_quantize_q8_0(f, N, K, w);
    free(f);
    return w;
}
static uint16_t *f16_matrix(int64_t N, int64_t K) {
    uint16_t *w = (uint16_t *)xalloc((size_t)(N * K) * 2);
    for (int64_t i = 0; i < N * K; i++) w[i] = rand_half();
    return w;
}
/* q4_sym_g32: per 32 values an f16 scale and 16 bytes of nibbles */
static uint8_t *q4_sym_g32_matrix(int64_t N, int64_t K) {
    const int64_t nb = K / 32, ldw = nb * 18;
    uint8_t *w = (uint8_t *)xalloc((size_t)(N * ldw));
    for (int64_t r = 0; r < N; r++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *blk = w + r * ldw + b * 18;
            uint16_t d = rand_half();
            memcpy(blk, &d, 2);
            for (int i = 0; i < 16; i++) blk[2 + i] = (uint8_t)next_u32();
        }
    return w;
}
static lk_linear q8_linear(int64_t rows, int64_t cols) {
    lk_linear l;
    memset(&l, 0, sizeof l);
    l.fmt = LK_FMT_Q8_0;
    l.w = q8_0_matrix(rows, cols);
    l.ldw = cols / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0);
    l.rows = rows;
    l.cols = cols;
    return l;
}

/* ---- measuring --------------------------------------------------------------------- */

static int failures = 0;

/* An entry's call runs once unmeasured, `reset` (if any) restores its state, then it
   runs once counted. A call returns 0 on success. */
#define MEASURE(name, reset, call)                                                        \
    do {                                                                                  \
        int rc_ = (call);                                                                 \
        reset;                                                                            \
        CALLGRIND_TOGGLE_COLLECT;                                                         \
        rc_ |= (call);                                                                    \
        CALLGRIND_TOGGLE_COLLECT;                                                         \
        CALLGRIND_DUMP_STATS_AT(name);                                                    \
        printf("entry %s rc %d\n", name, rc_);                                            \
        if (rc_) failures++;                                                              \
    } while (0)

static int mm_q8(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    lk_matmul_q8_0(x, M, K, w, K / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0), N, y);
    return 0;
}
static int mm_f16(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    lk_matmul_f16(x, M, K, w, K * 2, N, y);
    return 0;
}
static int mm_f32(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    lk_matmul_f32(x, M, K, w, K * 4, N, y);
    return 0;
}
static int mm_q4(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    return q4_matmul(0, 32, 0, x, M, K, w, K / 32 * 18, N, y);
}
/* the same matrix in the _r16 layout, the one the x86 kernels run from after loading */
static int mm_q4_r16(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    return q4_matmul(0, 32, 1, x, M, K, w, K / 32 * 18, N, y);
}
/* q8_0 in the _r16 layout (16 rows interleaved), which the AVX512-VNNI and AMD CPUs run */
static int mm_q8_r16(const float *x, int64_t M, int64_t K, const void *w, int64_t N, float *y) {
    lk_matmul_q8_0_r16(x, M, K, w, K / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0), N, y);
    return 0;
}
static void *q8_0_r16_matrix(int64_t N, int64_t K) {
    void *w = q8_0_matrix(N, K);
    void *r = xalloc((size_t)(N * (K / LK_QK8_0)) * sizeof(lk_block_q8_0));
    if (lk_q8_0_to_r16(w, N, K, r) != 0) {
        fprintf(stderr, "lk_q8_0_to_r16 failed\n");
        exit(1);
    }
    free(w);
    return r;
}
static void *q4_sym_g32_r16_matrix(int64_t N, int64_t K) {
    void *w = q4_sym_g32_matrix(N, K);
    if (q4_relayout(0, 32, w, N, K, 1) != 0) {
        fprintf(stderr, "q4_relayout failed\n");
        exit(1);
    }
    return w;
}

/* a matrix of GGUF block type `type` (Q5_0 6, Q4_K 12, Q6_K 14): random bytes with the
   blocks' f16 scales set to random halves (random bytes there could be NaN / infinity) */
static uint8_t *ggml_matrix(int type, int64_t N, int64_t K, int64_t *ldw) {
    int64_t values, bytes;
    if (lk_ggml_block_shape(type, &values, &bytes) != 0) exit(1);
    const int halves[3] = {type == 6 ? 0 : type == 12 ? 0 : 208, type == 12 ? 2 : -1, -1};
    *ldw = K / values * bytes;
    uint8_t *w = (uint8_t *)xalloc((size_t)(N * *ldw));
    for (int64_t i = 0; i < N * *ldw; i++) w[i] = (uint8_t)next_u32();
    for (int64_t b = 0; b < N * (K / values); b++)
        for (int h = 0; h < 3 && halves[h] >= 0; h++) {
            const uint16_t d = rand_half();
            memcpy(w + b * bytes + halves[h], &d, 2);
        }
    return w;
}

/* the GGUF block types the `gguf` quant method runs as stored (matmul_ggml.c) */
static void ggml_matmuls(void) {
    reseed(10);
    const int64_t N = 512, K = 1024, M = 4;
    float *x = randf(M * K, -1.0f, 1.0f), *y = xalloc((size_t)(M * N) * sizeof(float));
    static const int types[3] = {12, 14, 6};
    static const char *const names[3][2] = {{"q4_k matvec 1x1024x512", "q4_k few-rows 4x1024x512"},
                                            {"q6_k matvec 1x1024x512", "q6_k few-rows 4x1024x512"},
                                            {"q5_0 matvec 1x1024x512", "q5_0 few-rows 4x1024x512"}};
    for (int t = 0; t < 3; t++) {
        int64_t ldw;
        uint8_t *w = ggml_matrix(types[t], N, K, &ldw);
        MEASURE(names[t][0], , lk_matmul_ggml(types[t], x, 1, K, w, ldw, N, y));
        MEASURE(names[t][1], , lk_matmul_ggml(types[t], x, M, K, w, ldw, N, y));
        free(w);
    }
    free(x), free(y);
}

static int prefill_entries; /* the generic C has no prefill kernel (M rows of its matvec) */

static void matmuls(void) {
    reseed(1);
    const int64_t N = 1024, K = 1024, M = 4;
    float *x = randf(M * K, -1.0f, 1.0f), *y = xalloc((size_t)(M * N) * sizeof(float));
    void *wq8 = q8_0_matrix(N, K);
    void *wf16 = f16_matrix(N, K);
    void *wq4 = q4_sym_g32_matrix(N, K);
    MEASURE("q8_0 matvec 1x1024x1024", , mm_q8(x, 1, K, wq8, N, y));
    MEASURE("q8_0 few-rows 4x1024x1024", , mm_q8(x, M, K, wq8, N, y));
    free(wq8);
    wq8 = q8_0_r16_matrix(N, K);
    MEASURE("q8_0_r16 matvec 1x1024x1024", , mm_q8_r16(x, 1, K, wq8, N, y));
    MEASURE("q8_0_r16 few-rows 4x1024x1024", , mm_q8_r16(x, M, K, wq8, N, y));
    MEASURE("f16 matvec 1x1024x1024", , mm_f16(x, 1, K, wf16, N, y));
    MEASURE("f16 few-rows 4x1024x1024", , mm_f16(x, M, K, wf16, N, y));
    MEASURE("q4_sym_g32 matvec 1x1024x1024", , mm_q4(x, 1, K, wq4, N, y));
    MEASURE("q4_sym_g32 few-rows 4x1024x1024", , mm_q4(x, M, K, wq4, N, y));
    free(wq4);
    wq4 = q4_sym_g32_r16_matrix(N, K);
    MEASURE("q4_sym_g32_r16 matvec 1x1024x1024", , mm_q4_r16(x, 1, K, wq4, N, y));
    MEASURE("q4_sym_g32_r16 few-rows 4x1024x1024", , mm_q4_r16(x, M, K, wq4, N, y));
    free(x), free(y), free(wq8), free(wf16), free(wq4);
    if (!prefill_entries) return;
    reseed(2);
    /* prefill tiles: 96 rows, above every few-rows limit (q8_0 64, f16 8, q4 16) */
    const int64_t Np = 512, Kp = 512, Mp = 96;
    x = randf(Mp * Kp, -1.0f, 1.0f), y = xalloc((size_t)(Mp * Np) * sizeof(float));
    wq8 = q8_0_matrix(Np, Kp), wf16 = f16_matrix(Np, Kp), wq4 = q4_sym_g32_matrix(Np, Kp);
    MEASURE("q8_0 prefill 96x512x512", , mm_q8(x, Mp, Kp, wq8, Np, y));
    MEASURE("f16 prefill 96x512x512", , mm_f16(x, Mp, Kp, wf16, Np, y));
    MEASURE("q4_sym_g32 prefill 96x512x512", , mm_q4(x, Mp, Kp, wq4, Np, y));
    free(wq4);
    wq4 = q4_sym_g32_r16_matrix(Np, Kp);
    MEASURE("q4_sym_g32_r16 prefill 96x512x512", , mm_q4_r16(x, Mp, Kp, wq4, Np, y));
    free(x), free(y), free(wq8), free(wf16), free(wq4);
    /* the encoders' float32 matmul (BERT-family embedders, vision towers), all-MiniLM's
       FFN-up shape; valgrind's CPU reports no AVX-512, so the kernel is ready on every
       machine under the gate (a refusal is a failed entry, not a skipped one) */
    const int64_t Ne = 1536, Ke = 384, Me = 96;
    x = randf(Me * Ke, -1.0f, 1.0f), y = xalloc((size_t)(Me * Ne) * sizeof(float));
    float *we = randf(Ne * Ke, -0.1f, 0.1f);
    float *panels = xalloc((size_t)lk_f32_panels_size(Ne, Ke) * sizeof(float));
    lk_f32_panels_pack(we, Ne, Ke, panels);
    MEASURE("f32 panels 96x384x1536 (encoders)", , lk_matmul_f32_panels(x, Me, Ke, panels, Ne, y));
    free(x), free(y), free(we), free(panels);
    /* f32 weights with rows 4 KiB apart (K = 1024): each K slice is copied into a tile */
    const int64_t Kf = 1024;
    x = randf(Mp * Kf, -1.0f, 1.0f), y = xalloc((size_t)(Mp * Np) * sizeof(float));
    float *wf32 = randf(Np * Kf, -1.0f, 1.0f);
    MEASURE("f32 prefill 96x1024x512", , mm_f32(x, Mp, Kf, wf32, Np, y));
    free(x), free(y), free(wf32);
}

static void attention(void) {
    reseed(3);
    /* one decode query over 384 cached positions, GQA 8 / 2 heads of 64 */
    const int64_t Hq = 8, Hkv = 2, D = 64, S = 384;
    float *q = randf(Hq * D, -1.0f, 1.0f), *out = xalloc((size_t)(Hq * D) * sizeof(float));
    float *k = randf(S * Hkv * D, -1.0f, 1.0f), *v = randf(S * Hkv * D, -1.0f, 1.0f);
    MEASURE("attention decode 8/2 heads x64, 384 positions", ,
            lk_attention(q, 1, 1, Hq, D, Hq * D, Hq * D, D, k, S * Hkv * D, Hkv * D, D, v,
                         S * Hkv * D, Hkv * D, D, S, Hkv, S - 1, 0.125f, out));
    free(q), free(out), free(k), free(v);

    /* the same over a paged pool (continuous batching): two sequences' decode rows, each
       over 384 positions in blocks of 16 */
    reseed(4);
    const int64_t bs = 16, nblk = 2 * S / bs;
    float *qp = randf(2 * Hq * D, -1.0f, 1.0f), *op = xalloc((size_t)(2 * Hq * D) * sizeof(float));
    float *kp = randf(nblk * bs * Hkv * D, -1.0f, 1.0f), *vp = randf(nblk * bs * Hkv * D, -1.0f, 1.0f);
    int32_t *tables = (int32_t *)xalloc((size_t)nblk * sizeof(int32_t));
    for (int64_t i = 0; i < nblk; i++) /* interleaved, as a shared pool hands blocks out */
        tables[(i % 2) * (nblk / 2) + i / 2] = (int32_t)i;
    const int64_t q_start[3] = {0, 1, 2}, pos_start[2] = {S - 1, S - 1};
    MEASURE("paged attention decode 2 seqs, 8/2 heads x64, 384 positions", ,
            lk_paged_attention(qp, Hq, D, kp, vp, bs, Hkv, 2, q_start, pos_start, tables,
                               nblk / 2, 0.125f, op));
    free(qp), free(op), free(kp), free(vp), free(tables);

    /* an encoder's bidirectional attention over packed sequences (all-MiniLM: 12 heads of
       32), two texts of 48 and 80 tokens */
    reseed(9);
    const int64_t He = 12, De = 32, Ne = 128, offsets[3] = {0, 48, 128};
    float *qe = randf(Ne * He * De, -1.0f, 1.0f), *ke = randf(Ne * He * De, -1.0f, 1.0f);
    float *ve = randf(Ne * He * De, -1.0f, 1.0f), *oe = xalloc((size_t)(Ne * He * De) * sizeof(float));
    MEASURE("encoder attention 48 + 80 tokens, 12 heads x32", ,
            lk_encoder_attention_packed(qe, ke, ve, 2, offsets, He, De, 0.1767767f, oe));
    free(qe), free(ke), free(ve), free(oe);
}

static void delta_rule(void) {
    reseed(5);
    /* Qwen3.5's Gated DeltaNet shapes: 16 key / 16 value heads of 128 */
    const int64_t Hk = 16, Hv = 16, Dk = 128, Dv = 128, T = 64;
    const int64_t st = 2 * Hk * Dk + Hv * Dv, ns = Hv * Dk * Dv;
    float *qkv = randf(T * st, -1.0f, 1.0f);
    float *g = randf(T * Hv, -0.5f, -0.01f), *beta = randf(T * Hv, 0.05f, 0.95f);
    float *state0 = randf(ns, -0.05f, 0.05f), *state = copyf(state0, ns);
    float *out = xalloc((size_t)(T * Hv * Dv) * sizeof(float));
    const size_t sbytes = (size_t)ns * sizeof(float);
    MEASURE("gated delta rule step (T=1) 16/16 heads x128", memcpy(state, state0, sbytes),
            lk_gated_delta_rule(qkv, qkv + Hk * Dk, qkv + 2 * Hk * Dk, 1, 1, Hk, Hv, Dk, Dv,
                                st, st, g, beta, state, 0, out));
    MEASURE("gated delta rule chunk (T=64, chunk 64) 16/16 heads x128",
            memcpy(state, state0, sbytes),
            lk_gated_delta_rule(qkv, qkv + Hk * Dk, qkv + 2 * Hk * Dk, 1, T, Hk, Hv, Dk, Dv,
                                T * st, st, g, beta, state, 64, out));
    free(qkv), free(g), free(beta), free(state0), free(state), free(out);
}

/* ---- fused decode steps of the tiny checkpoints' shapes ------------------------------ */

#define CACHE_CAP 128
#define STEP_POS 100

typedef struct {
    int64_t vocab, hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim, rope_half;
} llama_dims;

static void llama_step(const char *name, const llama_dims *c) {
    reseed(6);
    const int64_t h = c->hidden, D = c->head_dim, qd = c->n_heads * D, kvd = c->n_kv_heads * D;
    const int64_t f = c->intermediate, kv_n = CACHE_CAP * kvd;
    lk_decoder m;
    memset(&m, 0, sizeof m);
    m.n_layers = c->n_layers, m.hidden = h, m.n_heads = c->n_heads;
    m.n_kv_heads = c->n_kv_heads, m.head_dim = D, m.intermediate = f;
    m.rope_half = c->rope_half, m.eps = 1e-5f, m.norm_offset = 0.0f;
    m.embed = q8_linear(c->vocab, h);
    m.final_norm = randf(h, 0.5f, 1.5f);
    m.cache_cap = CACHE_CAP;
    lk_decoder_layer *layers = calloc((size_t)c->n_layers, sizeof *layers);
    for (int64_t i = 0; i < c->n_layers; i++) {
        lk_decoder_layer *L = &layers[i];
        L->attn_norm = randf(h, 0.5f, 1.5f);
        L->mlp_norm = randf(h, 0.5f, 1.5f);
        L->q = q8_linear(qd, h), L->k = q8_linear(kvd, h), L->v = q8_linear(kvd, h);
        L->o = q8_linear(h, qd);
        L->gate = q8_linear(f, h), L->up = q8_linear(f, h), L->down = q8_linear(h, f);
        L->k_cache = randf(kv_n, -1.0f, 1.0f);
        L->v_cache = randf(kv_n, -1.0f, 1.0f);
    }
    m.layers = layers;
    const int64_t wn = lk_decoder_work_size(&m, 1);
    float *work = xalloc((size_t)wn * sizeof(float)), *out = xalloc((size_t)h * sizeof(float));
    float *cos_t = randf(c->rope_half, -1.0f, 1.0f), *sin_t = randf(c->rope_half, -1.0f, 1.0f);
    const int64_t token = 7;
    /* the step writes position STEP_POS of the caches: the same every call */
    MEASURE(name, , lk_decoder_step(&m, &token, 1, STEP_POS, cos_t, sin_t, work, wn, out));
}

typedef struct {
    int64_t vocab, hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim, rope_half;
    int64_t lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim, conv_kernel;
    const char *kinds; /* one letter per layer: 'l' linear attention, 'f' full attention */
} qwen35_dims;

static void qwen35_step(const char *name, const qwen35_dims *c) {
    reseed(7);
    const int64_t h = c->hidden, D = c->head_dim, f = c->intermediate;
    const int64_t qd = c->n_heads * D, kvd = c->n_kv_heads * D, kv_n = CACHE_CAP * kvd;
    const int64_t kd = c->lin_k_heads * c->lin_k_dim, vd = c->lin_v_heads * c->lin_v_dim;
    const int64_t conv_dim = 2 * kd + vd, conv_n = (c->conv_kernel - 1) * conv_dim;
    const int64_t delta_n = c->lin_v_heads * c->lin_k_dim * c->lin_v_dim;
    lk_qwen35 m;
    memset(&m, 0, sizeof m);
    m.n_layers = c->n_layers, m.hidden = h, m.intermediate = f;
    m.n_heads = c->n_heads, m.n_kv_heads = c->n_kv_heads, m.head_dim = D;
    m.rope_half = c->rope_half;
    m.lin_k_heads = c->lin_k_heads, m.lin_v_heads = c->lin_v_heads;
    m.lin_k_dim = c->lin_k_dim, m.lin_v_dim = c->lin_v_dim, m.conv_kernel = c->conv_kernel;
    m.eps = 1e-6f;
    m.embed = q8_linear(c->vocab, h);
    m.final_norm = randf(h, -0.2f, 0.2f);
    m.cache_cap = CACHE_CAP;
    lk_qwen35_layer *layers = calloc((size_t)c->n_layers, sizeof *layers);
    float **states = calloc((size_t)(4 * c->n_layers), sizeof *states);
    for (int64_t i = 0; i < c->n_layers; i++) {
        lk_qwen35_layer *L = &layers[i];
        L->attn_norm = randf(h, -0.2f, 0.2f);
        L->mlp_norm = randf(h, -0.2f, 0.2f);
        L->gate = q8_linear(f, h), L->up = q8_linear(f, h), L->down = q8_linear(h, f);
        if (c->kinds[i] == 'l') {
            L->kind = 0;
            L->in_qkv = q8_linear(conv_dim, h);
            L->in_z = q8_linear(vd, h);
            L->in_b = q8_linear(c->lin_v_heads, h);
            L->in_a = q8_linear(c->lin_v_heads, h);
            L->out = q8_linear(h, vd);
            L->conv_w = randf(c->conv_kernel * conv_dim, -0.5f, 0.5f);
            L->neg_a = randf(c->lin_v_heads, -2.0f, -0.5f);
            L->dt_bias = randf(c->lin_v_heads, -0.5f, 0.5f);
            L->head_norm = randf(c->lin_v_dim, 0.5f, 1.5f);
            states[4 * i] = randf(conv_n, -1.0f, 1.0f);
            states[4 * i + 1] = randf(delta_n, -0.05f, 0.05f);
            L->conv_state = copyf(states[4 * i], conv_n);
            L->delta_state = copyf(states[4 * i + 1], delta_n);
        } else {
            L->kind = 1;
            L->q = q8_linear(2 * qd, h), L->k = q8_linear(kvd, h), L->v = q8_linear(kvd, h);
            L->o = q8_linear(h, qd);
            L->q_norm = randf(D, -0.2f, 0.2f), L->k_norm = randf(D, -0.2f, 0.2f);
            L->k_cache = randf(kv_n, -1.0f, 1.0f);
            L->v_cache = randf(kv_n, -1.0f, 1.0f);
        }
    }
    m.layers = layers;
    const int64_t wn = lk_qwen35_work_size(&m, 1);
    float *work = xalloc((size_t)wn * sizeof(float)), *out = xalloc((size_t)h * sizeof(float));
    float *cos_t = randf(c->rope_half, -1.0f, 1.0f), *sin_t = randf(c->rope_half, -1.0f, 1.0f);
    const int64_t token = 7;
    /* the DeltaNet states move on every call: restored before the counted one */
#define RESTORE_STATES                                                                     \
    for (int64_t i = 0; i < c->n_layers; i++)                                              \
        if (c->kinds[i] == 'l') {                                                          \
            memcpy(layers[i].conv_state, states[4 * i], (size_t)conv_n * sizeof(float));   \
            memcpy(layers[i].delta_state, states[4 * i + 1], (size_t)delta_n * sizeof(float)); \
        }
    MEASURE(name, RESTORE_STATES,
            lk_qwen35_step(&m, &token, 1, STEP_POS, cos_t, sin_t, work, wn, out));
#undef RESTORE_STATES
}

/* ---- main ------------------------------------------------------------------------ */

/* The CPU this process sees (under valgrind: the CPU valgrind emulates), for the record. */
/* ---- the mixture-of-experts MLP (moe.c): routing, grouping, the grouped matmuls --------- */

static int moe_rows(const lk_moe *m, const float *x, int64_t n, float *out) {
    return lk_moe_forward(m, x, n, out);
}

static void moe(void) {
    reseed(8);
    /* small on purpose (callgrind): 16 experts of 128, top-4, hidden 256 */
    const int64_t h = 256, e = 16, f = 128, n = 8;
    lk_moe m;
    memset(&m, 0, sizeof m);
    m.hidden = h, m.n_experts = e, m.top_k = 4, m.inter = f, m.normalize = 1;
    m.router.fmt = LK_FMT_F32, m.router.w = randf(e * h, -0.2f, 0.2f);
    m.router.ldw = h * 4, m.router.rows = e, m.router.cols = h;
    lk_linear *gate = calloc((size_t)e, sizeof *gate), *up = calloc((size_t)e, sizeof *up);
    lk_linear *down = calloc((size_t)e, sizeof *down);
    for (int64_t i = 0; i < e; i++)
        gate[i] = q8_linear(f, h), up[i] = q8_linear(f, h), down[i] = q8_linear(h, f);
    m.gate = gate, m.up = up, m.down = down;
    float *x = randf(n * h, -1.0f, 1.0f), *out = xalloc((size_t)(n * h) * sizeof(float));
    MEASURE("moe forward 1 row, 16 experts top-4 (q8_0 256/128)", , moe_rows(&m, x, 1, out));
    MEASURE("moe forward 8 rows, 16 experts top-4 (q8_0 256/128)", , moe_rows(&m, x, n, out));
}

static void print_cpu(void) {
#if defined(__x86_64__)
    unsigned r[12] = {0}, a, b, c, d;
    char vendor[13] = {0}, brand[49] = {0};
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
    memcpy(vendor, &b, 4), memcpy(vendor + 4, &d, 4), memcpy(vendor + 8, &c, 4);
    for (unsigned i = 0; i < 3; i++)
        __asm__ volatile("cpuid"
                         : "=a"(r[4 * i]), "=b"(r[4 * i + 1]), "=c"(r[4 * i + 2]), "=d"(r[4 * i + 3])
                         : "a"(0x80000002u + i), "c"(0));
    memcpy(brand, r, 48);
    char *p = brand;
    while (*p == ' ') p++;
    printf("cpu %s %s\n", vendor, p);
#else
    printf("cpu (not x86-64)\n");
#endif
}

static int64_t arg(char **argv, int i) { return strtoll(argv[i], NULL, 10); }

int main(int argc, char **argv) {
    if (argc != 24) {
        fprintf(stderr,
                "usage: driver avx2|generic  llama: vocab hidden intermediate layers heads "
                "kv_heads head_dim rope_half  qwen35: vocab hidden intermediate layers heads "
                "kv_heads head_dim rope_half lin_k_heads lin_v_heads lin_k_dim lin_v_dim "
                "conv_kernel kinds(l/f per layer)\n");
        return 2;
    }
    const char *variant = argv[1];
    int isa, q4;
    if (strcmp(variant, "avx2") == 0) isa = LK_ISA_AVX2, q4 = 1;
    else if (strcmp(variant, "generic") == 0) isa = LK_ISA_GENERIC, q4 = 0;
    else {
        fprintf(stderr, "driver: unknown variant %s (avx2 or generic)\n", variant);
        return 2;
    }
    print_cpu();
    lk_init();
    lk_set_threads(1);
    /* the core's plugin API (its pool, its CPU features), as lattice_quant_q4/kernels.py
       attaches it */
    if (q4_attach((uintptr_t)lk_plugin_api_get()) != 0) {
        fprintf(stderr, "driver: quant_q4 refused the core's plugin ABI %d\n",
                lk_plugin_abi_version());
        return 2;
    }
    /* forced, and checked: a refused variant is reported, never measured as another */
    int got_isa = lk_set_isa(isa), got_q8 = isa == LK_ISA_AVX2 ? lk_q8_variant(0) : 0;
    int got_q4 = q4_set_isa(q4);
    if (got_isa != isa || got_q8 != 0 || got_q4 != q4) {
        fprintf(stderr,
                "driver: variant %s cannot run on this CPU (as this process sees it): core "
                "ISA %s, q8_0 kernel %s, q4 kernels %s\n",
                variant, lk_isa_name(), lk_q8_variant_name(lk_q8_variant(-1)), q4_isa_name());
        return 3;
    }
    prefill_entries = isa == LK_ISA_AVX2;
    printf("variant %s: core %s, q8_0 %s, q4 %s, threads %d\n", variant, lk_isa_name(),
           isa == LK_ISA_AVX2 ? lk_q8_variant_name(got_q8) : "generic", q4_isa_name(),
           lk_get_threads());

    matmuls();
    ggml_matmuls();
    attention();
    delta_rule();
    llama_dims ld = {arg(argv, 2), arg(argv, 3), arg(argv, 4), arg(argv, 5),
                     arg(argv, 6), arg(argv, 7), arg(argv, 8), arg(argv, 9)};
    qwen35_dims qd = {arg(argv, 10), arg(argv, 11), arg(argv, 12), arg(argv, 13),
                      arg(argv, 14), arg(argv, 15), arg(argv, 16), arg(argv, 17),
                      arg(argv, 18), arg(argv, 19), arg(argv, 20), arg(argv, 21),
                      arg(argv, 22), argv[23]};
    if ((int64_t)strlen(qd.kinds) != qd.n_layers) {
        fprintf(stderr, "driver: %zu layer kinds for %lld layers\n", strlen(qd.kinds),
                (long long)qd.n_layers);
        return 2;
    }
    llama_step("llama fixture decode step (q8_0, pos 100)", &ld);
    qwen35_step("qwen3.5 fixture decode step (q8_0, pos 100)", &qd);
    moe();
    if (failures) {
        fprintf(stderr, "driver: %d entries failed\n", failures);
        return 1;
    }
    return 0;
}
