/*
 * q4_kernels.c: matmul and embedding lookup for the 4-bit block formats of
 * lattice-quant-q4. The only core header it includes is the public plugin ABI,
 * lattice_plugin.h (found in the installed lattice_engine package, see build_q4.py).
 *
 * Block layout, group size G in {32, 64, 128}:
 *   q4_sym : [d: f16][G/2 bytes of nibbles]            x = d * (q - 8)
 *   q4_asym: [d: f16][m: f16][G/2 bytes of nibbles]    x = d * q + m
 * The nibbles come in sub-blocks of 32 values, 16 bytes each: byte i of sub-block j holds
 * value 32j + i in its low nibble and value 32j + 16 + i in its high nibble. At G = 32 the
 * blocks are byte for byte GGUF's Q4_0 (sym) and Q4_1 (asym).
 *
 * matmul y[M, N] = x[M, K] @ W[N, K]^T quantizes each row of x per 32 values to int8 with
 * a float scale dx = amax / 127 (like ggml's Q8_0/Q8_1 activations). Per 32 values the
 * integer dot sum(q_w * q_x) is exact in int32 (the nibbles are the unsigned operand of
 * maddubs / dpbusd); the sym offset is folded in exactly as -8 * sum(q_x). Every kernel
 * then runs, for each (x row, weight row), the same float chain over the row's blocks:
 *   acc = fma(float(idot_b), d_g * dx_b, acc)        for each 32 values b of group g,
 *   acc = fma(m_g, sg_g, acc)                        after group g (asym only),
 * where sg_g = sum over the group's b of dx_b * sum(q_x) (computed once per x row). So
 * the decode kernel (few rows, weights streamed), the prefill kernel (tiles unpacked
 * once, many rows) and every x86 variant give bit-identical results for a given row:
 * a row's output does not depend on how many rows came with it.
 *
 * The core: q4_attach() receives the address of the core's lk_plugin_api table (see
 * lattice_quant_q4/kernels.py), checks its ABI version, and from then on our matmuls split
 * their rows over the core's thread pool (api->parallel_for) and pick their x86 variant
 * from the CPU features the core detected (api->cpu_features). Two pools on a 2-core
 * machine would spin against each other between the core's kernels and ours, so we do not
 * start our own. Before a successful attach every call runs the generic C on the calling
 * thread (Python never binds the kernels in that state).
 *
 * The x86 kernels are written once, in the second part of this file (below
 * Q4_TEMPLATE), and compiled once per variant: AVX2 (maddubs + madd), AVX-VNNI (256-bit
 * vpdpbusd) and AVX512-VNNI (512-bit prefill). No -march: each carries a target
 * attribute and the best one the CPU runs is picked at run time.
 */
#ifndef Q4_TEMPLATE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lattice_plugin.h"

/* The plugin ABI this code is written for. It is ours to state, not the header's: built
   against a header of another major version, the code would still be written for this
   one, so that is a build error, and a core of another version is refused at attach. */
#define Q4_PLUGIN_ABI 1
#if LK_PLUGIN_ABI_VERSION != Q4_PLUGIN_ABI
#error "lattice-quant-q4 supports C plugin ABI 1; this lattice_plugin.h has another LK_PLUGIN_ABI_VERSION: install a lattice-quant-q4 release made for this lattice-engine"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define Q4_X86 1
#else
#define Q4_X86 0
#endif

#define QK 32

enum { Q4_ATTACH_OK = 0, Q4_ATTACH_NULL = 1, Q4_ATTACH_VERSION = 2, Q4_ATTACH_SIZE = 3 };

typedef lk_range_fn q4_range_fn;

static const lk_plugin_api *core = NULL; /* set by q4_attach */

/* Decode streams the weights once per token: prefetch the same block this many bytes
   further on in each of the rows being read (default 0: the next group of eight or
   sixteen rows; Q4_PF overrides, < 0 = off). */
static int64_t prefetch_bytes = 0;

/* Prefill: weight rows per chunk, and the K slice (32-value sub-blocks) unpacked to
   bytes and kept in L1 (32 x 1024 bytes) while every x row passes over it (Q4_SLICE
   overrides, tuning; 16 and 64 measured the same). */
#define PF_ROWS 32
static int64_t slice_subs = 32;

/* Up to this many x rows use the few-rows kernels (weights streamed, each block unpacked
   once for all x rows); more use the tiled prefill kernel. All linears of Qwen2.5-0.5B,
   q4_asym g32, 2 threads, ms (tiles -> few rows): M = 9 46.4 -> 39.2, 12 48.1 -> 42.5,
   16 53.4 -> 51.5, 24 65.9 -> 72.5, 32 79.3 -> 98.5 (Q4_FEW_ROWS overrides, tuning). A
   batch of decoders plus a small prefill slice lands in 9..16. */
static int64_t few_rows = 16;
/* The same over the _r16 layout, whose few-rows kernels need no transposes: up to 24 x
   rows with AVX512-VNNI, 32 with the 256-bit variants (Qwen2.5-0.5B's linears, q4_asym
   g32, one thread, thread CPU time, ms few rows / tiles: AVX512-VNNI M = 20 5.6 / 6.1,
   24 6.7 / 6.7, 32 8.7 / 8.5; AVX2 M = 20 7.8 / 9.8, 32 11.8 / 14.2). 0: by variant;
   Q4_FEW_ROWS sets both. */
static int64_t few_rows_r16 = 0;
/* x rows per pass of the few-rows kernel over a group of weight rows */
#define FEW_MR 8

static void run_range(q4_range_fn fn, void *ctx, int64_t n, int64_t grain) {
    if (n <= 0) return;
    if (core) core->parallel_for(fn, ctx, n, grain);
    else fn(ctx, 0, n, 0);
}

/* ---- half precision --------------------------------------------------------------- */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- ISA selection --------------------------------------------------------------- */

enum { Q4_GENERIC = 0, Q4_AVX2 = 1, Q4_AVXVNNI = 2, Q4_AVX512VNNI = 3, Q4_NISA };
static int best_isa = -1, active_isa = -1, isa_mask = 0; /* bit i: the CPU runs ISA i */

/* The variants the CPU runs, from the core's feature bits (none before q4_attach). */
static void detect(void) {
    if (best_isa >= 0) return;
    int mask = 1 << Q4_GENERIC;
#if Q4_X86
    const uint32_t f = core ? core->cpu_features() : 0;
    const uint32_t avx2 = LK_CPU_AVX2 | LK_CPU_FMA | LK_CPU_F16C;
    const uint32_t avx512vnni = LK_CPU_AVX512F | LK_CPU_AVX512BW | LK_CPU_AVX512VL |
                                LK_CPU_AVX512VNNI;
    if ((f & avx2) == avx2) {
        mask |= 1 << Q4_AVX2;
        if (f & LK_CPU_AVXVNNI) mask |= 1 << Q4_AVXVNNI;
        if ((f & avx512vnni) == avx512vnni) mask |= 1 << Q4_AVX512VNNI;
    }
#endif
    const char *pf = getenv("Q4_PF");
    if (pf && *pf) prefetch_bytes = atol(pf);
    const char *sl = getenv("Q4_SLICE");
    if (sl && atol(sl) >= 4 && atol(sl) % 4 == 0) slice_subs = atol(sl);
    const char *fr = getenv("Q4_FEW_ROWS");
    if (fr && *fr) few_rows = few_rows_r16 = atol(fr);
    int best = Q4_GENERIC;
    for (int i = 0; i < Q4_NISA; i++)
        if (mask & (1 << i)) best = i;
    isa_mask = mask;
    best_isa = best;
    const char *env = getenv("LATTICE_ISA");
    active_isa = (env && strcmp(env, "generic") == 0) ? Q4_GENERIC : best_isa;
}

/* ---- attaching to the core (lattice_plugin.h) ------------------------------------ */

/* The plugin ABI this plugin supports. */
int q4_plugin_abi(void) { return Q4_PLUGIN_ABI; }

/* Attach to the core's API table at `address` (lk_plugin_api_get() of the core's module,
   as an integer). Returns Q4_ATTACH_OK, Q4_ATTACH_NULL, Q4_ATTACH_VERSION (the core's
   abi_version is not ours: nothing else in the table is read) or Q4_ATTACH_SIZE (the
   table is smaller than the one we were built against). On failure the previous state is
   kept. Not thread-safe: call once, at import, before any kernel. */
int q4_attach(uintptr_t address) {
    const lk_plugin_api *api = (const lk_plugin_api *)address;
    if (!api) return Q4_ATTACH_NULL;
    if (api->abi_version != Q4_PLUGIN_ABI) return Q4_ATTACH_VERSION;
    if (api->size < sizeof(lk_plugin_api)) return Q4_ATTACH_SIZE;
    core = api;
    best_isa = -1; /* the variants follow the core's feature bits from now on */
    detect();
    return Q4_ATTACH_OK;
}

int q4_isa(void) { detect(); return active_isa; }
const char *q4_isa_name(void) {
    static const char *names[] = {"generic", "avx2", "avxvnni", "avx512vnni"};
    return names[q4_isa()];
}
/* Force a variant (tests compare them); one the CPU lacks is refused. */
int q4_set_isa(int isa) {
    detect();
    if (isa >= 0 && isa < Q4_NISA && (isa_mask & (1 << isa))) active_isa = isa;
    return active_isa;
}

/* ---- the job ---------------------------------------------------------------------- */

typedef struct {
    int asym;                 /* 0: q4_sym, 1: q4_asym */
    int r16;                  /* 1: rows interleaved in groups of 16 (the _r16 layout) */
    int64_t subs, hdr, bpb;   /* 32-value sub-blocks per group, header / block bytes */
    const uint8_t *w;
    int64_t ldw, N, K, M;
    int64_t nb, ng;           /* 32-value blocks and groups per row */
    /* x quantized, row m at xq + m K, dx / xo + m nb, sg + m ng */
    int8_t *xq;               /* int8 values */
    float *dx;                /* per 32 values: scale */
    int32_t *xo;              /* per 32 values: -8 * sum of the int8 values (sym) */
    float *sg;                /* per group: sum of dx * (sum of the int8 values) (asym) */
    const float *x;
    float *y;
} q4_mm;

/* ---- activation quantization ----------------------------------------------------- */

/* sg and xo of one row from its scales dx and its per-block integer sums, which arrive
   in xo (replaced in place by -8 times themselves) */
static void act_sums(const q4_mm *c, const float *dx, int32_t *xo, float *sg) {
    for (int64_t g = 0; g < c->ng; g++) {
        float s = 0.0f;
        for (int64_t j = 0; j < c->subs; j++) {
            const int64_t b = g * c->subs + j;
            s += dx[b] * (float)xo[b];
        }
        sg[g] = s;
    }
    for (int64_t b = 0; b < c->nb; b++) xo[b] *= -8;
}

/* One row x[K] -> q int8 [K], dx [K/32], isum [K/32]. */
static void quantize_act_generic(const float *x, int64_t K, int8_t *q, float *dx,
                                 int32_t *isum) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < QK; i++) {
            int v = (int)lrintf(xb[i] * id);
            q[b * QK + i] = (int8_t)v;
            sum += v;
        }
        dx[b] = d;
        isum[b] = sum;
    }
}

#if Q4_X86
__attribute__((target("avx2,fma,f16c")))
static void quantize_act_avx2(const float *x, int64_t K, int8_t *q, float *dx,
                              int32_t *isum) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0),
                                               _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2),
                                               _mm256_andnot_ps(signbit, v3)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        /* cvtps rounds to nearest even, like lrintf in the generic version */
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        /* pack 32 int32 -> 32 int8 in order */
        __m256i p01 = _mm256_packs_epi32(i0, i1), p23 = _mm256_packs_epi32(i2, i3);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + b * QK), p);
        dx[b] = d;
        isum[b] = _mm_cvtsi128_si32(s4);
    }
}
#endif

/* x rows [m0, m1) -> xq, dx, xo, sg */
static void quantize_rows(void *vctx, int64_t m0, int64_t m1, int ith) {
    (void)ith;
    const q4_mm *c = (const q4_mm *)vctx;
    for (int64_t m = m0; m < m1; m++) {
        float *dx = c->dx + m * c->nb;
        int32_t *xo = c->xo + m * c->nb;
#if Q4_X86
        if (active_isa >= Q4_AVX2)
            quantize_act_avx2(c->x + m * c->K, c->K, c->xq + m * c->K, dx, xo);
        else
#endif
            quantize_act_generic(c->x + m * c->K, c->K, c->xq + m * c->K, dx, xo);
        act_sums(c, dx, xo, c->sg + m * c->ng);
    }
}

/* ---- the _r16 layout ------------------------------------------------------------------ */

/* Row r's block of weight group g as plain bytes: a pointer into the rows (plain layout,
   rows ldw bytes apart) or, for the _r16 layout (rows ldw = row bytes apart, a multiple of
   16 of them), gathered into tmp[bpb]. The _r16 record of 16 rows and one weight group
   (16 bpb bytes, at byte 16 g bpb of the 16 rows' span) is
     [16 scales d f16] [16 offsets m f16, asym] then per 32-value sub-block j 256 bytes:
     [dword i = 0..3][row jj = 0..15][4 bytes] = bytes 4i .. 4i + 3 of row jj's sub-block j,
   so one 512-bit load is dword i of 16 rows, lane jj = row jj (what tr16 builds), and one
   cvtph load gives the 16 rows' scales. */
static const uint8_t *block_at(const uint8_t *w, int64_t ldw, int asym, int r16, int64_t hdr,
                               int64_t subs, int64_t bpb, int64_t r, int64_t g, uint8_t *tmp) {
    if (!r16) return w + r * ldw + g * bpb;
    const int64_t jj = r % 16;
    const uint8_t *rec = w + (r - jj) * ldw + g * 16 * bpb;
    memcpy(tmp, rec + 2 * jj, 2);
    if (asym) memcpy(tmp + 2, rec + 32 + 2 * jj, 2);
    for (int64_t j = 0; j < subs; j++)
        for (int i = 0; i < 4; i++)
            memcpy(tmp + hdr + 16 * j + 4 * i, rec + 16 * hdr + 256 * j + 64 * i + 4 * jj, 4);
    return tmp;
}

/* Plain rows [rows, ldw] <-> the _r16 layout, in place, 16 rows at a time (rows % 16 == 0,
   ldw = the row bytes). Returns 0, -1 for a bad layout, -2 out of memory. The numpy
   reference is lattice_quant_q4.formats.to_r16 / from_r16. */
int q4_relayout(int asym, int64_t group, void *data, int64_t rows, int64_t K, int to_r16) {
    if ((group != 32 && group != 64 && group != 128) || K % group || rows % 16) return -1;
    const int64_t hdr = asym ? 4 : 2, subs = group / QK, bpb = hdr + group / 2;
    const int64_t ng = K / group, ldw = ng * bpb, span = 16 * ldw;
    uint8_t *tmp = (uint8_t *)malloc((size_t)span);
    if (!tmp) return -2;
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        uint8_t *w = (uint8_t *)data + r0 * ldw;
        memcpy(tmp, w, (size_t)span);
        for (int64_t jj = 0; jj < 16; jj++)
            for (int64_t g = 0; g < ng; g++) {
                uint8_t *plain = (to_r16 ? tmp : w) + jj * ldw + g * bpb;
                uint8_t *rec = (to_r16 ? w : tmp) + g * 16 * bpb;
                uint8_t *pairs[2][2] = {{rec + 2 * jj, plain}, {rec + 32 + 2 * jj, plain + 2}};
                for (int h = 0; h < (asym ? 2 : 1); h++) {
                    if (to_r16) memcpy(pairs[h][0], pairs[h][1], 2);
                    else memcpy(pairs[h][1], pairs[h][0], 2);
                }
                for (int64_t j = 0; j < subs; j++)
                    for (int i = 0; i < 4; i++) {
                        uint8_t *a = rec + 16 * hdr + 256 * j + 64 * i + 4 * jj;
                        uint8_t *b = plain + hdr + 16 * j + 4 * i;
                        if (to_r16) memcpy(a, b, 4);
                        else memcpy(b, a, 4);
                    }
            }
    }
    free(tmp);
    return 0;
}

/* ---- generic C: one weight row against one x row ------------------------------------ */

static float dot_generic(const q4_mm *c, int64_t n, int64_t m) {
    /* the fields in locals: tmp is written through a byte pointer, which may alias *c, so
       without them every block would reload them (7% more instructions on the plain
       layout, measured by the perf gate) */
    const int asym = c->asym;
    const int64_t hdr = c->hdr, subs = c->subs, bpb = c->bpb, ng = c->ng, nb = c->nb;
    const int8_t *xq = c->xq + m * c->K;
    const float *dx = c->dx + m * nb, *sg = c->sg + m * ng;
    const int32_t *xo = c->xo + m * nb;
    const uint8_t *row = c->r16 ? NULL : c->w + n * c->ldw; /* plain: blocks in place */
    uint8_t tmp[2 * 2 + 128 / 2];
    float acc = 0.0f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *w = row ? row + g * bpb
                               : block_at(c->w, c->ldw, asym, 1, hdr, subs, bpb, n, g, tmp);
        const float d = f16_to_f32(rd16(w));
        const uint8_t *qs = w + hdr;
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            const int8_t *y = xq + b * QK;
            int32_t dot = asym ? 0 : xo[b];
            for (int i = 0; i < 16; i++) {
                dot += (qs[16 * j + i] & 0x0F) * y[i];
                dot += (qs[16 * j + i] >> 4) * y[16 + i];
            }
            acc += (float)dot * (d * dx[b]);
        }
        if (asym) acc += f16_to_f32(rd16(w + 2)) * sg[g];
    }
    return acc;
}

static void rows_generic(const q4_mm *c, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < c->M; m++)
            c->y[m * c->N + n] = dot_generic(c, n, m);
}

/* ---- the x86 variants --------------------------------------------------------------- */
#if Q4_X86
#define Q4_TEMPLATE 1
#define Q4_TARGET __attribute__((target("avx2,fma,f16c")))
#define Q4_LEVEL 0
#define Q4_NAME(n) n##_avx2
#include "q4_kernels.c"
#undef Q4_TARGET
#undef Q4_LEVEL
#undef Q4_NAME
#define Q4_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define Q4_LEVEL 1
#define Q4_NAME(n) n##_avxvnni
#include "q4_kernels.c"
#undef Q4_TARGET
#undef Q4_LEVEL
#undef Q4_NAME
#define Q4_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define Q4_LEVEL 2
#define Q4_NAME(n) n##_avx512vnni
#include "q4_kernels.c"
#undef Q4_TARGET
#undef Q4_LEVEL
#undef Q4_NAME
#undef Q4_TEMPLATE
#endif

/* ---- matmul ---------------------------------------------------------------------- */

typedef struct {
    const q4_mm *c;
    int isa;
    int fail;       /* set when a task could not get its scratch */
} mm_task;

/* Few rows: the threads take units of FEW_UNIT output rows, so a range never splits the
   row group of a kernel (8 or 16 rows). */
#define FEW_UNIT 16
static void few_range(void *vctx, int64_t u0, int64_t u1, int ith) {
    (void)ith;
    const mm_task *t = (const mm_task *)vctx;
    const int64_t n0 = u0 * FEW_UNIT, n1 = u1 * FEW_UNIT < t->c->N ? u1 * FEW_UNIT : t->c->N;
    const int r16 = t->c->r16;
    switch (t->isa) {
#if Q4_X86
    case Q4_AVX512VNNI:
        (r16 ? rows_few_r16_avx512vnni : rows_few_avx512vnni)(t->c, n0, n1);
        return;
    case Q4_AVXVNNI: (r16 ? rows_few_r16_avxvnni : rows_few_avxvnni)(t->c, n0, n1); return;
    case Q4_AVX2: (r16 ? rows_few_r16_avx2 : rows_few_avx2)(t->c, n0, n1); return;
#endif
    default: rows_generic(t->c, n0, n1);
    }
}

/* prefill: chunks [k0, k1) of PF_ROWS output rows */
static void prefill_range(void *vctx, int64_t k0, int64_t k1, int ith) {
    (void)ith;
    mm_task *t = (mm_task *)vctx;
    const q4_mm *c = t->c;
    const int64_t n0 = k0 * PF_ROWS, n1 = k1 * PF_ROWS < c->N ? k1 * PF_ROWS : c->N;
#if Q4_X86
    if (t->isa >= Q4_AVX2) {
        /* one tile: the slice of PF_ROWS rows as bytes, plus their scales and offsets */
        const size_t bytes = (size_t)(PF_ROWS * slice_subs) * (QK + 2 * sizeof(float));
        void *scratch = NULL;
        if (posix_memalign(&scratch, 64, bytes) != 0) {
            t->fail = 1;
            return;
        }
        for (int64_t n = n0; n < n1; n += PF_ROWS) {
            const int64_t e = n + PF_ROWS < n1 ? n + PF_ROWS : n1;
            if (t->isa == Q4_AVX512VNNI) prefill_avx512vnni(c, n, e, scratch);
            else if (t->isa == Q4_AVXVNNI) prefill_avxvnni(c, n, e, scratch);
            else prefill_avx2(c, n, e, scratch);
        }
        free(scratch);
        return;
    }
#endif
    rows_generic(c, n0, n1);
}

/* r16: W in the _r16 layout (N % 16 == 0, ldw = the row bytes). Returns 0, -1 out of
   memory, -2 on a bad layout. */
int q4_matmul(int asym, int64_t group, int r16, const float *x, int64_t M, int64_t K,
              const void *w, int64_t ldw, int64_t N, float *y) {
    if ((group != 32 && group != 64 && group != 128) || K % group) return -2;
    const int64_t nb = K / QK, ng = K / group;
    if (r16 && (N % 16 || ldw != ng * ((asym ? 4 : 2) + group / 2))) return -2;
    if (M <= 0 || N <= 0) return 0;
    detect();
    /* x as int8 [M, K], then per row its block scales, offsets and group sums */
    const size_t qbytes = ((size_t)(M * K) + 63) & ~(size_t)63;
    uint8_t *buf = (uint8_t *)malloc(qbytes + (size_t)(M * (2 * nb + ng)) * 4);
    if (!buf) return -1;
    q4_mm c = {asym, r16 ? 1 : 0, group / QK, asym ? 4 : 2, (asym ? 4 : 2) + group / 2,
               (const uint8_t *)w, ldw, N, K, M, nb, ng,
               (int8_t *)buf, NULL, NULL, NULL, x, y};
    c.dx = (float *)(buf + qbytes);
    c.xo = (int32_t *)(c.dx + M * nb);
    c.sg = (float *)(c.xo + M * nb);
    if (M * K >= (1 << 16)) run_range(quantize_rows, &c, M, 1);
    else quantize_rows(&c, 0, M, 0);

    mm_task t = {&c, active_isa, 0};
    const int64_t few = !r16 ? few_rows : few_rows_r16 ? few_rows_r16
                                                       : active_isa == Q4_AVX512VNNI ? 24 : 32;
    if (M <= few || active_isa == Q4_GENERIC) {
        /* grain: enough row-dots per task (>= 64 dots of 256 values) that the pool's
           hand-off is amortised */
        const int64_t work = (K / 256 + 1) * M * FEW_UNIT;
        run_range(few_range, &t, (N + FEW_UNIT - 1) / FEW_UNIT, work >= 64 ? 1 : 64 / work);
    } else {
        run_range(prefill_range, &t, (N + PF_ROWS - 1) / PF_ROWS, 1);
    }
    free(buf);
    return t.fail ? -1 : 0;
}

/* ---- grouped: matrices each over their own rows of one x (expert dispatch) -------- */

typedef struct {
    q4_mm *mats;          /* the few-rows matrices, each reading its rows of the shared x */
    const int64_t *first; /* [n + 1]: the first FEW_UNIT unit of each */
    int64_t n;
    int isa;
} grouped_task;

static void grouped_range(void *vctx, int64_t u0, int64_t u1, int ith) {
    const grouped_task *g = (const grouped_task *)vctx;
    int64_t lo = 0, hi = g->n - 1; /* the matrix whose units hold u0 */
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (g->first[mid] <= u0) lo = mid;
        else hi = mid - 1;
    }
    for (int64_t i = lo, u = u0; u < u1; i++) {
        const int64_t e = g->first[i + 1] < u1 ? g->first[i + 1] : u1;
        const mm_task t = {&g->mats[i], g->isa, 0};
        if (e > u) few_range((void *)&t, u - g->first[i], e - g->first[i], ith);
        u = e;
    }
}

/* For i in [0, n): y[i][M[i], N[i]] = x[row0[i] .. + M[i], :K] @ w[i]^T, every w[i] in one
   layout (as q4_matmul). x is quantized once for all of them, and every matrix that takes
   the few-rows kernel goes to the pool as ONE job (a MoE layer's experts at decode: one
   hand-off instead of one per expert); a matrix with more rows runs its prefill tiles
   over the same quantized rows. Each y[i] is bit for bit q4_matmul's over the same rows
   (the same kernel for the same row count, and the same quantized x rows). Returns 0, -1
   out of memory, -2 on a bad layout. */
int q4_matmul_grouped(int asym, int64_t group, int r16, const float *x, int64_t K, int64_t n,
                      const int64_t *row0, const int64_t *M, const void *const *w,
                      const int64_t *ldw, const int64_t *N, float *const *y) {
    if ((group != 32 && group != 64 && group != 128) || K % group || n < 0) return -2;
    const int64_t nb = K / QK, ng = K / group, bpb = (asym ? 4 : 2) + group / 2;
    int64_t rows = 0;
    for (int64_t i = 0; i < n; i++) {
        if (row0[i] < 0 || M[i] < 0 || N[i] < 0) return -2;
        if (r16 && M[i] > 0 && (N[i] % 16 || ldw[i] != ng * bpb)) return -2;
        if (M[i] > 0 && N[i] > 0 && row0[i] + M[i] > rows) rows = row0[i] + M[i];
    }
    if (rows == 0) return 0;
    detect();
    const size_t qbytes = ((size_t)(rows * K) + 63) & ~(size_t)63;
    uint8_t *buf = (uint8_t *)malloc(qbytes + (size_t)(rows * (2 * nb + ng)) * 4 +
                                     (size_t)n * sizeof(q4_mm) + (size_t)(n + 1) * 8);
    if (!buf) return -1;
    q4_mm all = {asym, r16 ? 1 : 0, group / QK, asym ? 4 : 2, bpb, NULL, 0, 0, K, rows, nb,
                 ng, (int8_t *)buf, NULL, NULL, NULL, x, NULL};
    all.dx = (float *)(buf + qbytes);
    all.xo = (int32_t *)(all.dx + rows * nb);
    all.sg = (float *)(all.xo + rows * nb);
    q4_mm *mats = (q4_mm *)(all.sg + rows * ng);
    int64_t *first = (int64_t *)(mats + n);
    if (rows * K >= (1 << 16)) run_range(quantize_rows, &all, rows, 1);
    else quantize_rows(&all, 0, rows, 0);

    const int64_t few = !r16 ? few_rows : few_rows_r16 ? few_rows_r16
                                                       : active_isa == Q4_AVX512VNNI ? 24 : 32;
    int64_t nfew = 0, fail = 0;
    first[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        if (M[i] == 0 || N[i] == 0) continue;
        q4_mm c = all;
        c.w = (const uint8_t *)w[i], c.ldw = ldw[i], c.N = N[i], c.M = M[i], c.y = y[i];
        c.x = x + row0[i] * K, c.xq = all.xq + row0[i] * K;
        c.dx = all.dx + row0[i] * nb, c.xo = all.xo + row0[i] * nb, c.sg = all.sg + row0[i] * ng;
        if (M[i] <= few || active_isa == Q4_GENERIC) {
            mats[nfew] = c;
            first[nfew + 1] = first[nfew] + (N[i] + FEW_UNIT - 1) / FEW_UNIT;
            nfew++;
        } else { /* enough rows for the tiles: its own job, as q4_matmul runs it */
            mm_task t = {&c, active_isa, 0};
            run_range(prefill_range, &t, (N[i] + PF_ROWS - 1) / PF_ROWS, 1);
            fail |= t.fail;
        }
    }
    if (nfew) {
        grouped_task g = {mats, first, nfew, active_isa};
        run_range(grouped_range, &g, first[nfew], 1);
    }
    free(buf);
    return fail ? -1 : 0;
}

/* ---- embed ----------------------------------------------------------------------- */

/* out[i, :] = float(W[ids[i], :]). Returns 0, or -1 (writing nothing) for an id outside
   [0, rows) or a bad layout. */
/* q4_matmul with the signature of the core's lk_extern_matmul (ctx: a q4_format), so the
   core's fused decode steps call our kernel directly (WeightFormat.c_matmul). */
typedef struct { int asym; int64_t group; int r16; } q4_format;
int q4_matmul_extern(const void *ctx, const float *x, int64_t M, int64_t K, const void *w,
                     int64_t ldw, int64_t N, float *y) {
    const q4_format *f = (const q4_format *)ctx;
    return q4_matmul(f->asym, f->group, f->r16, x, M, K, w, ldw, N, y) ? -1 : 0;
}
/* q4_matmul_grouped with the signature of lk_extern_matmul_grouped (same ctx), so the
   core's expert dispatch gives a layer's experts to us in one call
   (WeightFormat.c_matmul_grouped). */
int q4_matmul_grouped_extern(const void *ctx, const float *x, int64_t K, int64_t n,
                             const int64_t *row0, const int64_t *M, const void *const *w,
                             const int64_t *ldw, const int64_t *N, float *const *y) {
    const q4_format *f = (const q4_format *)ctx;
    return q4_matmul_grouped(f->asym, f->group, f->r16, x, K, n, row0, M, w, ldw, N, y) ? -1
                                                                                       : 0;
}

/* r16: W in the _r16 layout (rows % 16 == 0, ldw = the row bytes). */
int q4_embed(int asym, int64_t group, int r16, const void *w, int64_t ldw, int64_t rows,
             int64_t K, const int64_t *ids, int64_t n, float *out) {
    if ((group != 32 && group != 64 && group != 128) || K % group) return -1;
    int64_t hdr = asym ? 4 : 2, bpb = hdr + group / 2;
    if (r16 && (rows % 16 || ldw != K / group * bpb)) return -1;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    uint8_t tmp[2 * 2 + 128 / 2];
    for (int64_t i = 0; i < n; i++) {
        float *o = out + i * K;
        for (int64_t b = 0; b < K / group; b++) {
            const uint8_t *wr = block_at((const uint8_t *)w, ldw, asym, r16, hdr, group / QK,
                                         bpb, ids[i], b, tmp);
            float d = f16_to_f32(rd16(wr));
            float m = asym ? f16_to_f32(rd16(wr + 2)) : 0.0f;
            const uint8_t *qs = wr + hdr;
            for (int64_t j = 0; j < group / QK; j++) {
                float *ob = o + b * group + j * QK;
                if (asym) {
                    for (int k = 0; k < 16; k++) {
                        ob[k] = d * (float)(qs[16 * j + k] & 0x0F) + m;
                        ob[16 + k] = d * (float)(qs[16 * j + k] >> 4) + m;
                    }
                } else { /* d * (q - 8): one rounding, as the numpy reference */
                    for (int k = 0; k < 16; k++) {
                        ob[k] = d * (float)((qs[16 * j + k] & 0x0F) - 8);
                        ob[16 + k] = d * (float)((qs[16 * j + k] >> 4) - 8);
                    }
                }
            }
        }
    }
    return 0;
}

#else /* Q4_TEMPLATE */
/* ---- the kernels for one x86 variant ------------------------------------------------
 * Included by the main part above once per variant, with Q4_NAME (a suffix), Q4_TARGET
 * (its target attribute) and Q4_LEVEL (0: AVX2 maddubs + madd, 1: AVX-VNNI, 2:
 * AVX512-VNNI).
 */
#define Q4_INLINE Q4_TARGET __attribute__((always_inline)) static inline

/* Sub-block bytes at offset o of eight rows p[0..7] -> v[0..7], lane q of v[i] holding
   the codes of values 4i .. 4i + 3 of row q: raw dword i of each row is gathered by a
   4 x 4 dword transpose per 128-bit lane (lanes hold rows q and q + 4), then its low
   nibbles are values 4i .. 4i + 3 and its high nibbles values 16 + 4i .. 16 + 4i + 3. */
Q4_INLINE void Q4_NAME(tr8)(const uint8_t *const *p, int64_t o, __m256i *v) {
#define Q4_LD2(a, b) _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p[b] + o)), \
                                      _mm_loadu_si128((const __m128i *)(p[a] + o)))
    const __m256i a0 = Q4_LD2(0, 4), a1 = Q4_LD2(1, 5), a2 = Q4_LD2(2, 6), a3 = Q4_LD2(3, 7);
#undef Q4_LD2
    const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpacklo_epi32(a2, a3);
    const __m256i t2 = _mm256_unpackhi_epi32(a0, a1), t3 = _mm256_unpackhi_epi32(a2, a3);
    const __m256i d0 = _mm256_unpacklo_epi64(t0, t1), d1 = _mm256_unpackhi_epi64(t0, t1);
    const __m256i d2 = _mm256_unpacklo_epi64(t2, t3), d3 = _mm256_unpackhi_epi64(t2, t3);
    const __m256i lo = _mm256_set1_epi8(0x0F);
    v[0] = _mm256_and_si256(d0, lo);
    v[1] = _mm256_and_si256(d1, lo);
    v[2] = _mm256_and_si256(d2, lo);
    v[3] = _mm256_and_si256(d3, lo);
    v[4] = _mm256_and_si256(_mm256_srli_epi32(d0, 4), lo);
    v[5] = _mm256_and_si256(_mm256_srli_epi32(d1, 4), lo);
    v[6] = _mm256_and_si256(_mm256_srli_epi32(d2, 4), lo);
    v[7] = _mm256_and_si256(_mm256_srli_epi32(d3, 4), lo);
}

/* The f16 at offset o of eight rows p[0..7] as floats (the halves meet in two general
   registers: one move to the vector unit instead of seven inserts) */
Q4_INLINE __m256 Q4_NAME(half8)(const uint8_t *const *p, int64_t o) {
    const uint64_t a = rd16(p[0] + o) | (uint64_t)rd16(p[1] + o) << 16 |
                       (uint64_t)rd16(p[2] + o) << 32 | (uint64_t)rd16(p[3] + o) << 48;
    const uint64_t b = rd16(p[4] + o) | (uint64_t)rd16(p[5] + o) << 16 |
                       (uint64_t)rd16(p[6] + o) << 32 | (uint64_t)rd16(p[7] + o) << 48;
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)b, (long long)a));
}

/* Integer dots of one x sub-block xb (its -8 sum in o, sym) with eight rows' codes v:
   lane q = row q. Two chains (even / odd dwords) halve the vpdpbusd latency chain;
   AVX2 sums the eight maddubs in int16 (each |pair| <= 2 * 15 * 127, eight <= 30480)
   and widens once. Exact either way. */
Q4_INLINE __m256i Q4_NAME(dot8)(const __m256i *v, const int8_t *xb, __m256i o) {
#if Q4_LEVEL == 0
    __m256i h = _mm256_maddubs_epi16(v[0], _mm256_set1_epi32(ld32(xb)));
#pragma GCC unroll 7
    for (int i = 1; i < 8; i++)
        h = _mm256_add_epi16(h, _mm256_maddubs_epi16(v[i], _mm256_set1_epi32(ld32(xb + 4 * i))));
    return _mm256_add_epi32(o, _mm256_madd_epi16(h, _mm256_set1_epi16(1)));
#else
    __m256i a = o, b = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2) {
#if Q4_LEVEL == 2
        a = _mm256_dpbusd_epi32(a, v[i], _mm256_set1_epi32(ld32(xb + 4 * i)));
        b = _mm256_dpbusd_epi32(b, v[i + 1], _mm256_set1_epi32(ld32(xb + 4 * i + 4)));
#else
        a = _mm256_dpbusd_avx_epi32(a, v[i], _mm256_set1_epi32(ld32(xb + 4 * i)));
        b = _mm256_dpbusd_avx_epi32(b, v[i + 1], _mm256_set1_epi32(ld32(xb + 4 * i + 4)));
#endif
    }
    return _mm256_add_epi32(a, b);
#endif
}

/* ---- few rows: eight weight rows, each block unpacked once for MR x rows ---------- */

/* y[m0 + i, r .. r + 7] for i < MR (MR a compile-time constant after inlining). Per
   block the eight rows' codes are transposed into lanes (tr8, as the prefill tile), so
   each x row costs eight dot instructions and one conversion, scale and FMA for eight
   rows, in the order of the chain in the header comment. Rows past n1 repeat the last
   row (read, not stored). */
Q4_INLINE void Q4_NAME(few8)(const q4_mm *c, int64_t r, int64_t n1, int64_t m0, const int MR) {
    const int64_t ldw = c->ldw, nv = n1 - r < 8 ? n1 - r : 8;
    const uint8_t *p[8];
    for (int q = 0; q < 8; q++) p[q] = c->w + (r + (q < nv ? q : nv - 1)) * ldw;
    const int64_t pf = prefetch_bytes < 0 ? -1 : prefetch_bytes == 0 ? 8 * ldw : prefetch_bytes;
    const int64_t K = c->K, nb = c->nb, ng = c->ng, subs = c->subs, bpb = c->bpb, hdr = c->hdr;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[FEW_MR];
    for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const int64_t off = g * bpb;
        if (pf >= 0)
            for (int q = 0; q < 8; q++) _mm_prefetch((const char *)p[q] + off + pf, _MM_HINT_T0);
        const __m256 d8 = Q4_NAME(half8)(p, off);
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            __m256i v[8];
            Q4_NAME(tr8)(p, off + hdr + 16 * j, v);
            for (int i = 0; i < MR; i++) {
                const int64_t m = m0 + i;
                const __m256i o = c->asym ? zero : _mm256_set1_epi32(c->xo[m * nb + b]);
                const __m256i a = Q4_NAME(dot8)(v, c->xq + m * K + b * QK, o);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a),
                                         _mm256_mul_ps(d8, _mm256_set1_ps(c->dx[m * nb + b])), acc[i]);
            }
        }
        if (c->asym) {
            const __m256 m8 = Q4_NAME(half8)(p, off + 2);
            for (int i = 0; i < MR; i++)
                acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(c->sg[(m0 + i) * ng + g]), acc[i]);
        }
    }
    for (int i = 0; i < MR; i++) {
        float *yr = c->y + (m0 + i) * c->N + r;
        if (nv == 8) {
            _mm256_storeu_ps(yr, acc[i]);
        } else {
            float o[8];
            _mm256_storeu_ps(o, acc[i]);
            for (int64_t v = 0; v < nv; v++) yr[v] = o[v];
        }
    }
}

#if Q4_LEVEL == 2
/* tr8 for sixteen rows: 128-bit lane k of the loads holds row q + 4k */
Q4_INLINE void Q4_NAME(tr16)(const uint8_t *const *p, int64_t o, __m512i *v) {
#define Q4_LD4(q) _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(             \
        _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p[q] + o))),          \
        _mm_loadu_si128((const __m128i *)(p[q + 4] + o)), 1),                          \
        _mm_loadu_si128((const __m128i *)(p[q + 8] + o)), 2),                          \
        _mm_loadu_si128((const __m128i *)(p[q + 12] + o)), 3)
    const __m512i a0 = Q4_LD4(0), a1 = Q4_LD4(1), a2 = Q4_LD4(2), a3 = Q4_LD4(3);
#undef Q4_LD4
    const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpacklo_epi32(a2, a3);
    const __m512i t2 = _mm512_unpackhi_epi32(a0, a1), t3 = _mm512_unpackhi_epi32(a2, a3);
    const __m512i d0 = _mm512_unpacklo_epi64(t0, t1), d1 = _mm512_unpackhi_epi64(t0, t1);
    const __m512i d2 = _mm512_unpacklo_epi64(t2, t3), d3 = _mm512_unpackhi_epi64(t2, t3);
    const __m512i lo = _mm512_set1_epi8(0x0F);
    v[0] = _mm512_and_si512(d0, lo);
    v[1] = _mm512_and_si512(d1, lo);
    v[2] = _mm512_and_si512(d2, lo);
    v[3] = _mm512_and_si512(d3, lo);
    v[4] = _mm512_and_si512(_mm512_srli_epi32(d0, 4), lo);
    v[5] = _mm512_and_si512(_mm512_srli_epi32(d1, 4), lo);
    v[6] = _mm512_and_si512(_mm512_srli_epi32(d2, 4), lo);
    v[7] = _mm512_and_si512(_mm512_srli_epi32(d3, 4), lo);
}

Q4_INLINE __m512 Q4_NAME(half16)(const uint8_t *const *p, int64_t o) {
    uint64_t h[4];
    for (int k = 0; k < 4; k++)
        h[k] = rd16(p[4 * k] + o) | (uint64_t)rd16(p[4 * k + 1] + o) << 16 |
               (uint64_t)rd16(p[4 * k + 2] + o) << 32 | (uint64_t)rd16(p[4 * k + 3] + o) << 48;
    return _mm512_cvtph_ps(_mm256_set_epi64x((long long)h[3], (long long)h[2], (long long)h[1],
                                             (long long)h[0]));
}

/* few8 with sixteen weight rows in the lanes of 512-bit vectors */
Q4_INLINE void Q4_NAME(few16)(const q4_mm *c, int64_t r, int64_t n1, int64_t m0, const int MR) {
    const int64_t ldw = c->ldw, nv = n1 - r < 16 ? n1 - r : 16;
    const uint8_t *p[16];
    for (int q = 0; q < 16; q++) p[q] = c->w + (r + (q < nv ? q : nv - 1)) * ldw;
    const int64_t pf = prefetch_bytes < 0 ? -1 : prefetch_bytes == 0 ? 16 * ldw : prefetch_bytes;
    const int64_t K = c->K, nb = c->nb, ng = c->ng, subs = c->subs, bpb = c->bpb, hdr = c->hdr;
    __m512 acc[FEW_MR];
    for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const int64_t off = g * bpb;
        if (pf >= 0)
            for (int q = 0; q < 16; q++) _mm_prefetch((const char *)p[q] + off + pf, _MM_HINT_T0);
        const __m512 d16 = Q4_NAME(half16)(p, off);
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            __m512i v[8];
            Q4_NAME(tr16)(p, off + hdr + 16 * j, v);
            for (int i = 0; i < MR; i++) {
                const int64_t m = m0 + i;
                const int8_t *xb = c->xq + m * K + b * QK;
                __m512i a = c->asym ? _mm512_setzero_si512() : _mm512_set1_epi32(c->xo[m * nb + b]);
                __m512i a2 = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int k = 0; k < 8; k += 2) {
                    a = _mm512_dpbusd_epi32(a, v[k], _mm512_set1_epi32(ld32(xb + 4 * k)));
                    a2 = _mm512_dpbusd_epi32(a2, v[k + 1], _mm512_set1_epi32(ld32(xb + 4 * k + 4)));
                }
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, a2)),
                                         _mm512_mul_ps(d16, _mm512_set1_ps(c->dx[m * nb + b])), acc[i]);
            }
        }
        if (c->asym) {
            const __m512 m16 = Q4_NAME(half16)(p, off + 2);
            for (int i = 0; i < MR; i++)
                acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(c->sg[(m0 + i) * ng + g]), acc[i]);
        }
    }
    for (int i = 0; i < MR; i++) {
        float *yr = c->y + (m0 + i) * c->N + r;
        if (nv == 16) _mm512_storeu_ps(yr, acc[i]);
        else _mm512_mask_storeu_ps(yr, (__mmask16)((1u << nv) - 1), acc[i]);
    }
}
#define Q4_FEW_W 16
#define Q4_FEW Q4_NAME(few16)
#else
#define Q4_FEW_W 8
#define Q4_FEW Q4_NAME(few8)
#endif

/* one instantiation per MR, so the x-row loop unrolls and acc stays in registers */
#define Q4_FEW_MR(MR)                                                                   \
    Q4_TARGET __attribute__((noinline)) static void Q4_NAME(few_##MR)(                  \
        const q4_mm *c, int64_t r, int64_t n1, int64_t m0) {                            \
        Q4_FEW(c, r, n1, m0, MR);                                                       \
    }
Q4_FEW_MR(1)
Q4_FEW_MR(2)
Q4_FEW_MR(3)
Q4_FEW_MR(4)
Q4_FEW_MR(5)
Q4_FEW_MR(6)
Q4_FEW_MR(7)
Q4_FEW_MR(8)
#undef Q4_FEW_MR

static void Q4_NAME(rows_few)(const q4_mm *c, int64_t n0, int64_t n1) {
    static void (*const by_mr[FEW_MR + 1])(const q4_mm *, int64_t, int64_t, int64_t) = {
        NULL, Q4_NAME(few_1), Q4_NAME(few_2), Q4_NAME(few_3), Q4_NAME(few_4),
        Q4_NAME(few_5), Q4_NAME(few_6), Q4_NAME(few_7), Q4_NAME(few_8)};
    for (int64_t r = n0; r < n1; r += Q4_FEW_W)
        for (int64_t m = 0; m < c->M; m += FEW_MR) {
            const int64_t mr = c->M - m < FEW_MR ? c->M - m : FEW_MR;
            by_mr[mr](c, r, n1, m);
        }
}
#undef Q4_FEW_W
#undef Q4_FEW

/* ---- few rows over the _r16 layout ------------------------------------------------- */

/* The nibbles of one 16-row record's sub-block (at q) as the codes tr8 / tr16 build:
   raw dword i of the rows (already in lanes) -> v[i] its low nibbles, v[4 + i] its high
   nibbles. 256-bit: the 8 rows of half h (rows 8h .. 8h + 7). */
Q4_INLINE void Q4_NAME(split8)(const uint8_t *q, int h, __m256i *v) {
    const __m256i lo = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 64 * i + 32 * h));
        v[i] = _mm256_and_si256(raw, lo);
        v[4 + i] = _mm256_and_si256(_mm256_srli_epi32(raw, 4), lo);
    }
}

/* Prefetch distance of the _r16 few-rows kernels: the records stream in order, so a
   fixed distance ahead (Q4_PF > 0 overrides it, < 0 = off) */
#define Q4_R16_PF 1024

#if Q4_LEVEL == 2
/* few16 over the _r16 layout: rows [r, r + 16) (all present), the record of each weight
   group read with plain loads, no transposes; the same chain as few16, to the bit. */
Q4_INLINE void Q4_NAME(fewr16)(const q4_mm *c, int64_t r, int64_t m0, const int MR) {
    const int64_t K = c->K, nb = c->nb, ng = c->ng, subs = c->subs, bpb = c->bpb;
    const int64_t hdr16 = 16 * c->hdr;
    const uint8_t *w = c->w + r * c->ldw;
    const int64_t pf = prefetch_bytes < 0 ? -1 : prefetch_bytes == 0 ? Q4_R16_PF : prefetch_bytes;
    const __m512i lo = _mm512_set1_epi8(0x0F);
    __m512 acc[FEW_MR];
    for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *rec = w + g * 16 * bpb;
        if (pf >= 0)
            for (int64_t o = 0; o < 16 * bpb; o += 64)
                _mm_prefetch((const char *)rec + pf + o, _MM_HINT_T0);
        const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)rec));
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            const uint8_t *q = rec + hdr16 + 256 * j;
            __m512i v[8];
            for (int i = 0; i < 4; i++) {
                const __m512i raw = _mm512_loadu_si512((const void *)(q + 64 * i));
                v[i] = _mm512_and_si512(raw, lo);
                v[4 + i] = _mm512_and_si512(_mm512_srli_epi32(raw, 4), lo);
            }
            for (int i = 0; i < MR; i++) {
                const int64_t m = m0 + i;
                const int8_t *xb = c->xq + m * K + b * QK;
                __m512i a = c->asym ? _mm512_setzero_si512() : _mm512_set1_epi32(c->xo[m * nb + b]);
                __m512i a2 = _mm512_setzero_si512();
#pragma GCC unroll 4
                for (int k = 0; k < 8; k += 2) {
                    a = _mm512_dpbusd_epi32(a, v[k], _mm512_set1_epi32(ld32(xb + 4 * k)));
                    a2 = _mm512_dpbusd_epi32(a2, v[k + 1], _mm512_set1_epi32(ld32(xb + 4 * k + 4)));
                }
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, a2)),
                                         _mm512_mul_ps(d16, _mm512_set1_ps(c->dx[m * nb + b])), acc[i]);
            }
        }
        if (c->asym) {
            const __m512 m16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + 32)));
            for (int i = 0; i < MR; i++)
                acc[i] = _mm512_fmadd_ps(m16, _mm512_set1_ps(c->sg[(m0 + i) * ng + g]), acc[i]);
        }
    }
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(c->y + (m0 + i) * c->N + r, acc[i]);
}
#else
/* 256-bit registers hold 8 rows: both halves of each record in one pass (the record's
   cache lines are read once), so two accumulators per x row and at most 4 x rows. */
Q4_INLINE void Q4_NAME(fewr16)(const q4_mm *c, int64_t r, int64_t m0, const int MR) {
    const int64_t K = c->K, nb = c->nb, ng = c->ng, subs = c->subs, bpb = c->bpb;
    const int64_t hdr16 = 16 * c->hdr;
    const uint8_t *w = c->w + r * c->ldw;
    const int64_t pf = prefetch_bytes < 0 ? -1 : prefetch_bytes == 0 ? Q4_R16_PF : prefetch_bytes;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[4][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *rec = w + g * 16 * bpb;
        if (pf >= 0)
            for (int64_t o = 0; o < 16 * bpb; o += 64)
                _mm_prefetch((const char *)rec + pf + o, _MM_HINT_T0);
        const __m256 dh[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)rec)),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 16)))};
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            for (int h = 0; h < 2; h++) {
                __m256i v[8];
                Q4_NAME(split8)(rec + hdr16 + 256 * j, h, v);
                for (int i = 0; i < MR; i++) {
                    const int64_t m = m0 + i;
                    const __m256i o = c->asym ? zero : _mm256_set1_epi32(c->xo[m * nb + b]);
                    const __m256i a = Q4_NAME(dot8)(v, c->xq + m * K + b * QK, o);
                    acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a),
                                                _mm256_mul_ps(dh[h], _mm256_set1_ps(c->dx[m * nb + b])),
                                                acc[i][h]);
                }
            }
        }
        if (c->asym) {
            const __m256 mh[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 32))),
                                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 48)))};
            for (int i = 0; i < MR; i++) {
                const __m256 e = _mm256_set1_ps(c->sg[(m0 + i) * ng + g]);
                acc[i][0] = _mm256_fmadd_ps(mh[0], e, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(mh[1], e, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(c->y + (m0 + i) * c->N + r, acc[i][0]);
        _mm256_storeu_ps(c->y + (m0 + i) * c->N + r + 8, acc[i][1]);
    }
}

/* More than 4 x rows: one half of the 16 rows (8 rows, h) per pass with up to FEW_MR x
   rows, few8 reading the _r16 records (the other half's pass finds the 16 rows' record
   bytes in L2). The same chain per row. */
Q4_INLINE void Q4_NAME(fewr16h)(const q4_mm *c, int64_t r, int h, int64_t m0, const int MR) {
    const int64_t K = c->K, nb = c->nb, ng = c->ng, subs = c->subs, bpb = c->bpb;
    const int64_t hdr16 = 16 * c->hdr;
    const uint8_t *w = c->w + r * c->ldw;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[FEW_MR];
    for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *rec = w + g * 16 * bpb;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 16 * h)));
        for (int64_t j = 0; j < subs; j++) {
            const int64_t b = g * subs + j;
            __m256i v[8];
            Q4_NAME(split8)(rec + hdr16 + 256 * j, h, v);
            for (int i = 0; i < MR; i++) {
                const int64_t m = m0 + i;
                const __m256i o = c->asym ? zero : _mm256_set1_epi32(c->xo[m * nb + b]);
                const __m256i a = Q4_NAME(dot8)(v, c->xq + m * K + b * QK, o);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a),
                                         _mm256_mul_ps(d8, _mm256_set1_ps(c->dx[m * nb + b])), acc[i]);
            }
        }
        if (c->asym) {
            const __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 32 + 16 * h)));
            for (int i = 0; i < MR; i++)
                acc[i] = _mm256_fmadd_ps(m8, _mm256_set1_ps(c->sg[(m0 + i) * ng + g]), acc[i]);
        }
    }
    for (int i = 0; i < MR; i++) _mm256_storeu_ps(c->y + (m0 + i) * c->N + r + 8 * h, acc[i]);
}
#endif

#define Q4_FEWR16_MR(MR)                                                                \
    Q4_TARGET __attribute__((noinline)) static void Q4_NAME(fewr16_##MR)(               \
        const q4_mm *c, int64_t r, int64_t m0) {                                        \
        Q4_NAME(fewr16)(c, r, m0, MR);                                                  \
    }
Q4_FEWR16_MR(1)
Q4_FEWR16_MR(2)
Q4_FEWR16_MR(3)
Q4_FEWR16_MR(4)
#if Q4_LEVEL == 2
Q4_FEWR16_MR(5)
Q4_FEWR16_MR(6)
Q4_FEWR16_MR(7)
Q4_FEWR16_MR(8)
#else
#define Q4_FEWR16H_MR(MR)                                                               \
    Q4_TARGET __attribute__((noinline)) static void Q4_NAME(fewr16h_##MR)(              \
        const q4_mm *c, int64_t r, int h, int64_t m0) {                                 \
        Q4_NAME(fewr16h)(c, r, h, m0, MR);                                              \
    }
Q4_FEWR16H_MR(1)
Q4_FEWR16H_MR(2)
Q4_FEWR16H_MR(3)
Q4_FEWR16H_MR(4)
Q4_FEWR16H_MR(5)
Q4_FEWR16H_MR(6)
Q4_FEWR16H_MR(7)
Q4_FEWR16H_MR(8)
#undef Q4_FEWR16H_MR
#endif
#undef Q4_FEWR16_MR

/* rows [n0, n1) (multiples of 16) of the _r16 layout, every x row */
static void Q4_NAME(rows_few_r16)(const q4_mm *c, int64_t n0, int64_t n1) {
#if Q4_LEVEL == 2
    static void (*const by_mr[FEW_MR + 1])(const q4_mm *, int64_t, int64_t) = {
        NULL, Q4_NAME(fewr16_1), Q4_NAME(fewr16_2), Q4_NAME(fewr16_3), Q4_NAME(fewr16_4),
        Q4_NAME(fewr16_5), Q4_NAME(fewr16_6), Q4_NAME(fewr16_7), Q4_NAME(fewr16_8)};
    for (int64_t r = n0; r < n1; r += 16)
        for (int64_t m = 0; m < c->M; m += FEW_MR) {
            const int64_t mr = c->M - m < FEW_MR ? c->M - m : FEW_MR;
            by_mr[mr](c, r, m);
        }
#else
    static void (*const by_mr[5])(const q4_mm *, int64_t, int64_t) = {
        NULL, Q4_NAME(fewr16_1), Q4_NAME(fewr16_2), Q4_NAME(fewr16_3), Q4_NAME(fewr16_4)};
    static void (*const by_mr_h[FEW_MR + 1])(const q4_mm *, int64_t, int, int64_t) = {
        NULL, Q4_NAME(fewr16h_1), Q4_NAME(fewr16h_2), Q4_NAME(fewr16h_3), Q4_NAME(fewr16h_4),
        Q4_NAME(fewr16h_5), Q4_NAME(fewr16h_6), Q4_NAME(fewr16h_7), Q4_NAME(fewr16h_8)};
    for (int64_t r = n0; r < n1; r += 16) {
        if (c->M <= 4) {
            by_mr[c->M](c, r, 0);
            continue;
        }
        for (int h = 0; h < 2; h++)
            for (int64_t m = 0; m < c->M; m += FEW_MR) {
                const int64_t mr = c->M - m < FEW_MR ? c->M - m : FEW_MR;
                by_mr_h[mr](c, r, h, m);
            }
    }
#endif
}

/* ---- prefill: tiles unpacked once, many x rows ------------------------------------- */

/* The tile of rows [r0, r0 + nr) over sub-blocks [s0, s0 + sn) of K, for every x row to
   reuse: groups of NV rows; per group and sub-block 8 vectors of NV uint32 lanes, lane jj
   of vector i holding the codes of values 4i .. 4i + 3 of row jj (raw dword i & 15 for
   i < 4, its high nibbles for i >= 4), so one broadcast x dword times one vector gives NV
   rows' partial dots with no horizontal sums. Per group and sub-block NV scales, per
   group and weight group NV offsets (asym). Rows past nr repeat the last row. */
Q4_TARGET static void Q4_NAME(pack)(const q4_mm *c, int64_t r0, int64_t nr, int64_t s0,
                                    int64_t sn, int nv, int64_t ngv, uint32_t *tile,
                                    float *sc, float *mn) {
    const int64_t subs = c->subs, ngs = sn / subs, g0 = s0 / subs;
    for (int64_t gv = 0; gv < ngv; gv++)
        for (int half = 0; half < nv; half += 8) {
            const uint8_t *p[8];
            for (int q = 0; q < 8; q++) {
                int64_t row = gv * nv + half + q;
                p[q] = c->w + (r0 + (row < nr ? row : nr - 1)) * c->ldw;
            }
            for (int64_t gs = 0; gs < ngs; gs++) {
                const int64_t off = (g0 + gs) * c->bpb;
                const __m256 d8 = Q4_NAME(half8)(p, off);
                for (int64_t j = 0; j < subs; j++)
                    _mm256_storeu_ps(sc + (gv * sn + gs * subs + j) * nv + half, d8);
                if (c->asym)
                    _mm256_storeu_ps(mn + (gv * ngs + gs) * nv + half, Q4_NAME(half8)(p, off + 2));
                for (int64_t j = 0; j < subs; j++) {
                    __m256i v[8];
                    Q4_NAME(tr8)(p, off + c->hdr + 16 * j, v);
                    uint32_t *dst = tile + (gv * sn + gs * subs + j) * 8 * nv + half;
                    for (int i = 0; i < 8; i++) _mm256_store_si256((__m256i *)(dst + i * nv), v[i]);
                }
            }
        }
}

/* pack over the _r16 layout (r0 and nr multiples of 16): the tile is a copy of the
   records with the nibbles split, the same bytes pack builds from plain rows. Groups of
   NV rows past nr read the last 16 rows (their outputs are never stored). */
Q4_TARGET static void Q4_NAME(pack_r16)(const q4_mm *c, int64_t r0, int64_t nr, int64_t s0,
                                        int64_t sn, int nv, int64_t ngv, uint32_t *tile,
                                        float *sc, float *mn) {
    const int64_t subs = c->subs, ngs = sn / subs, g0 = s0 / subs, bpb = c->bpb;
    const int64_t hdr16 = 16 * c->hdr;
    for (int64_t gv = 0; gv < ngv; gv++)
        for (int half = 0; half < nv; half += 8) {
            int64_t row = gv * nv + half;
            if (row >= nr) row = nr - 16 + (row % 16);
            const int h = (int)(row % 16) / 8;
            const uint8_t *w = c->w + (r0 + row - row % 16) * c->ldw;
            for (int64_t gs = 0; gs < ngs; gs++) {
                const uint8_t *rec = w + (g0 + gs) * 16 * bpb;
                const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 16 * h)));
                for (int64_t j = 0; j < subs; j++)
                    _mm256_storeu_ps(sc + (gv * sn + gs * subs + j) * nv + half, d8);
                if (c->asym)
                    _mm256_storeu_ps(mn + (gv * ngs + gs) * nv + half,
                                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 32 + 16 * h))));
                for (int64_t j = 0; j < subs; j++) {
                    __m256i v[8];
                    Q4_NAME(split8)(rec + hdr16 + 256 * j, h, v);
                    uint32_t *dst = tile + (gv * sn + gs * subs + j) * 8 * nv + half;
                    for (int i = 0; i < 8; i++) _mm256_store_si256((__m256i *)(dst + i * nv), v[i]);
                }
            }
        }
}

#if Q4_LEVEL == 2
/* Prefill micro-kernel, 512-bit: MR x rows (xr at the slice start, their scales xd,
   offsets xo and group sums xg) against NRV packed rows (two groups of 16) over sn
   sub-blocks; io [MR][NRV] holds the chains' values before and after. */
#define Q4_MR 4
#define Q4_NV 16
#define Q4_NRV 32
Q4_INLINE void Q4_NAME(mk)(const q4_mm *c, const int8_t *const *xr, const float *const *xd,
                           const int32_t *const *xo, const float *const *xg,
                           const uint32_t *t, const float *sc, const float *mn, int64_t sn,
                           float *io) {
    const int64_t subs = c->subs;
    const uint32_t *t1 = t + sn * 8 * 16;
    const float *sc1 = sc + sn * 16, *mn1 = mn + sn / subs * 16;
    __m512 f[Q4_MR][2];
#pragma GCC unroll 4
    for (int m = 0; m < Q4_MR; m++) {
        f[m][0] = _mm512_load_ps(io + m * Q4_NRV);
        f[m][1] = _mm512_load_ps(io + m * Q4_NRV + 16);
    }
    for (int64_t b = 0, j = 0, g = 0; b < sn; b++) {
        const __m512i *wa = (const __m512i *)(t + b * 128), *wb = (const __m512i *)(t1 + b * 128);
        __m512i a[Q4_MR][2];
#pragma GCC unroll 4
        for (int m = 0; m < Q4_MR; m++)
            a[m][0] = a[m][1] = c->asym ? _mm512_setzero_si512() : _mm512_set1_epi32(xo[m][b]);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m512i v0 = _mm512_load_si512(wa + i), v1 = _mm512_load_si512(wb + i);
#pragma GCC unroll 4
            for (int m = 0; m < Q4_MR; m++) {
                const __m512i xv = _mm512_set1_epi32(ld32(xr[m] + 32 * b + 4 * i));
                a[m][0] = _mm512_dpbusd_epi32(a[m][0], v0, xv);
                a[m][1] = _mm512_dpbusd_epi32(a[m][1], v1, xv);
            }
        }
        const __m512 s0 = _mm512_load_ps(sc + 16 * b), s1 = _mm512_load_ps(sc1 + 16 * b);
#pragma GCC unroll 4
        for (int m = 0; m < Q4_MR; m++) {
            const __m512 e = _mm512_set1_ps(xd[m][b]);
            f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(s0, e), f[m][0]);
            f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(s1, e), f[m][1]);
        }
        if (++j == subs) { /* end of a weight group: its offset term (asym) */
            if (c->asym) {
                const __m512 o0 = _mm512_load_ps(mn + 16 * g), o1 = _mm512_load_ps(mn1 + 16 * g);
#pragma GCC unroll 4
                for (int m = 0; m < Q4_MR; m++) {
                    const __m512 e = _mm512_set1_ps(xg[m][g]);
                    f[m][0] = _mm512_fmadd_ps(o0, e, f[m][0]);
                    f[m][1] = _mm512_fmadd_ps(o1, e, f[m][1]);
                }
            }
            j = 0;
            g++;
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < Q4_MR; m++) {
        _mm512_store_ps(io + m * Q4_NRV, f[m][0]);
        _mm512_store_ps(io + m * Q4_NRV + 16, f[m][1]);
    }
}
#else
/* Prefill micro-kernel, 256-bit: two x rows against 16 packed rows (two groups of 8).
   AVX2 sums the eight maddubs of a sub-block in int16 (each <= 2 * 15 * 127, eight <=
   30480: no saturation) and widens once; AVX-VNNI keeps two accumulator sets (even /
   odd dwords) to hide the vpdpbusd latency. */
#define Q4_MR 2
#define Q4_NV 8
#define Q4_NRV 16
Q4_INLINE void Q4_NAME(mk)(const q4_mm *c, const int8_t *const *xr, const float *const *xd,
                           const int32_t *const *xo, const float *const *xg,
                           const uint32_t *t, const float *sc, const float *mn, int64_t sn,
                           float *io) {
    const int64_t subs = c->subs;
    const uint32_t *t1 = t + sn * 8 * 8;
    const float *sc1 = sc + sn * 8, *mn1 = mn + sn / subs * 8;
    const int8_t *pa = xr[0], *pb = xr[1];
    __m256 f00 = _mm256_load_ps(io), f01 = _mm256_load_ps(io + 8);
    __m256 f10 = _mm256_load_ps(io + 16), f11 = _mm256_load_ps(io + 24);
    for (int64_t b = 0, j = 0, g = 0; b < sn; b++) {
        const __m256i *wa = (const __m256i *)(t + b * 64), *wb = (const __m256i *)(t1 + b * 64);
        const int8_t *ya = pa + 32 * b, *yb = pb + 32 * b;
#if Q4_LEVEL == 0
        __m256i h00 = _mm256_setzero_si256(), h01 = h00, h10 = h00, h11 = h00;
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m256i v0 = _mm256_load_si256(wa + i), v1 = _mm256_load_si256(wb + i);
            const __m256i xa = _mm256_set1_epi32(ld32(ya + 4 * i)), xb = _mm256_set1_epi32(ld32(yb + 4 * i));
            h00 = _mm256_add_epi16(h00, _mm256_maddubs_epi16(v0, xa));
            h01 = _mm256_add_epi16(h01, _mm256_maddubs_epi16(v1, xa));
            h10 = _mm256_add_epi16(h10, _mm256_maddubs_epi16(v0, xb));
            h11 = _mm256_add_epi16(h11, _mm256_maddubs_epi16(v1, xb));
        }
        const __m256i one = _mm256_set1_epi16(1);
        __m256i a00 = _mm256_madd_epi16(h00, one), a01 = _mm256_madd_epi16(h01, one);
        __m256i a10 = _mm256_madd_epi16(h10, one), a11 = _mm256_madd_epi16(h11, one);
#else
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
        __m256i c00 = a00, c01 = a00, c10 = a00, c11 = a00;
#pragma GCC unroll 4
        for (int i = 0; i < 8; i += 2) {
            __m256i v0 = _mm256_load_si256(wa + i), v1 = _mm256_load_si256(wb + i);
            __m256i xa = _mm256_set1_epi32(ld32(ya + 4 * i)), xb = _mm256_set1_epi32(ld32(yb + 4 * i));
            a00 = _mm256_dpbusd_avx_epi32(a00, v0, xa);
            a01 = _mm256_dpbusd_avx_epi32(a01, v1, xa);
            a10 = _mm256_dpbusd_avx_epi32(a10, v0, xb);
            a11 = _mm256_dpbusd_avx_epi32(a11, v1, xb);
            v0 = _mm256_load_si256(wa + i + 1);
            v1 = _mm256_load_si256(wb + i + 1);
            xa = _mm256_set1_epi32(ld32(ya + 4 * i + 4));
            xb = _mm256_set1_epi32(ld32(yb + 4 * i + 4));
            c00 = _mm256_dpbusd_avx_epi32(c00, v0, xa);
            c01 = _mm256_dpbusd_avx_epi32(c01, v1, xa);
            c10 = _mm256_dpbusd_avx_epi32(c10, v0, xb);
            c11 = _mm256_dpbusd_avx_epi32(c11, v1, xb);
        }
        a00 = _mm256_add_epi32(a00, c00);
        a01 = _mm256_add_epi32(a01, c01);
        a10 = _mm256_add_epi32(a10, c10);
        a11 = _mm256_add_epi32(a11, c11);
#endif
        if (!c->asym) {
            const __m256i oa = _mm256_set1_epi32(xo[0][b]), ob = _mm256_set1_epi32(xo[1][b]);
            a00 = _mm256_add_epi32(a00, oa);
            a01 = _mm256_add_epi32(a01, oa);
            a10 = _mm256_add_epi32(a10, ob);
            a11 = _mm256_add_epi32(a11, ob);
        }
        const __m256 s0 = _mm256_load_ps(sc + 8 * b), s1 = _mm256_load_ps(sc1 + 8 * b);
        const __m256 ea = _mm256_set1_ps(xd[0][b]), eb = _mm256_set1_ps(xd[1][b]);
        f00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a00), _mm256_mul_ps(s0, ea), f00);
        f01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a01), _mm256_mul_ps(s1, ea), f01);
        f10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a10), _mm256_mul_ps(s0, eb), f10);
        f11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a11), _mm256_mul_ps(s1, eb), f11);
        if (++j == subs) { /* end of a weight group: its offset term (asym) */
            if (c->asym) {
                const __m256 o0 = _mm256_load_ps(mn + 8 * g), o1 = _mm256_load_ps(mn1 + 8 * g);
                const __m256 ga = _mm256_set1_ps(xg[0][g]), gb = _mm256_set1_ps(xg[1][g]);
                f00 = _mm256_fmadd_ps(o0, ga, f00);
                f01 = _mm256_fmadd_ps(o1, ga, f01);
                f10 = _mm256_fmadd_ps(o0, gb, f10);
                f11 = _mm256_fmadd_ps(o1, gb, f11);
            }
            j = 0;
            g++;
        }
    }
    _mm256_store_ps(io, f00);
    _mm256_store_ps(io + 8, f01);
    _mm256_store_ps(io + 16, f10);
    _mm256_store_ps(io + 24, f11);
}
#endif

/* Prefill: rows [r0, r1) (at most PF_ROWS) of W against all M rows of x, one K slice at
   a time; the slice of the rows is unpacked to bytes once (pack) and stays in L1 while
   every x row passes over it. Each (x row, weight row) chain carries on from one slice
   to the next through y, so the result is the decode kernel's to the bit. */
Q4_TARGET static void Q4_NAME(prefill)(const q4_mm *c, int64_t r0, int64_t r1, void *scratch) {
    const int64_t M = c->M, K = c->K, N = c->N, nb = c->nb, ng = c->ng, nr = r1 - r0;
    const int64_t ngv = (nr + Q4_NRV - 1) / Q4_NRV * (Q4_NRV / Q4_NV);
    /* a slice is whole weight groups: slice_subs is a multiple of 4 */
    uint32_t *tile = (uint32_t *)scratch;
    float *sc = (float *)(tile + (size_t)(PF_ROWS * slice_subs * 8));
    float *mn = sc + PF_ROWS * slice_subs;
    float io[Q4_MR * Q4_NRV] __attribute__((aligned(64)));
    for (int64_t s0 = 0; s0 < nb; s0 += slice_subs) {
        const int64_t sn = nb - s0 < slice_subs ? nb - s0 : slice_subs;
        const int first = s0 == 0;
        (c->r16 ? Q4_NAME(pack_r16) : Q4_NAME(pack))(c, r0, nr, s0, sn, Q4_NV, ngv, tile, sc, mn);
        for (int64_t m = 0; m < M; m += Q4_MR) {
            const int8_t *xr[Q4_MR];
            const float *xd[Q4_MR], *xg[Q4_MR];
            const int32_t *xo[Q4_MR];
            for (int i = 0; i < Q4_MR; i++) {
                const int64_t mi = m + i < M ? m + i : M - 1;
                xr[i] = c->xq + mi * K + s0 * QK;
                xd[i] = c->dx + mi * nb + s0;
                xo[i] = c->xo + mi * nb + s0;
                xg[i] = c->sg + mi * ng + s0 / c->subs;
            }
            for (int64_t gv = 0; gv < ngv; gv += Q4_NRV / Q4_NV) {
                const int64_t c0 = gv * Q4_NV, nc = nr - c0 < Q4_NRV ? nr - c0 : Q4_NRV;
                for (int i = 0; i < Q4_MR; i++) {
                    const float *y = c->y + (m + i < M ? m + i : M - 1) * N + r0 + c0;
                    for (int64_t v = 0; v < Q4_NRV; v++)
                        io[i * Q4_NRV + v] = first || v >= nc ? 0.0f : y[v];
                }
                Q4_NAME(mk)(c, xr, xd, xo, xg, tile + gv * sn * 8 * Q4_NV, sc + gv * sn * Q4_NV,
                            mn + gv * (sn / c->subs) * Q4_NV, sn, io);
                for (int i = 0; i < Q4_MR && m + i < M; i++) {
                    float *y = c->y + (m + i) * N + r0 + c0;
                    memcpy(y, io + i * Q4_NRV, (size_t)nc * sizeof(float));
                }
            }
        }
    }
}

#undef Q4_INLINE
#undef Q4_MR
#undef Q4_NV
#undef Q4_NRV
#endif /* Q4_TEMPLATE */
