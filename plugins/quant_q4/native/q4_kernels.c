/*
 * q4_kernels.c: matmul and embedding lookup for the 4-bit block formats of
 * lattice-quant-q4. Self-contained (no core header), so the plugin builds from its own
 * directory.
 *
 * Block layout, group size G in {32, 64, 128}:
 *   q4_sym : [d: f16][G/2 bytes of nibbles]            x = d * (q - 8)
 *   q4_asym: [d: f16][m: f16][G/2 bytes of nibbles]    x = d * q + m
 * The nibbles come in sub-blocks of 32 values, 16 bytes each: byte i of sub-block j holds
 * value 32j + i in its low nibble and value 32j + 16 + i in its high nibble. At G = 32 the
 * blocks are byte for byte GGUF's Q4_0 (sym) and Q4_1 (asym).
 *
 * matmul y[M, N] = x[M, K] @ W[N, K]^T quantizes each row of x per 32 values to int8 with
 * a float scale dx = amax / 127 (like ggml's Q8_0/Q8_1 activations) and its block sum
 * s = dx * sum(q). Per 32 values the integer dot sum(w_q * x_q) is exact in int32 (the
 * nibbles are the unsigned operand of maddubs / dpbusd); then
 *   sym : d * dx * dot - 8 * d * s
 *   asym: d * dx * dot + m * s.
 *
 * Threads: the core's pool. q4_set_parallel_for() receives the address of the core's
 * lk_parallel_for (see lattice_quant_q4/kernels.py); without it every call runs on the
 * calling thread. Two pools on a 2-core machine would spin against each other between
 * the core's kernels and ours, so we do not start our own.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define Q4_X86 1
#else
#define Q4_X86 0
#endif

#define QK 32

typedef void (*q4_range_fn)(void *ctx, int64_t i0, int64_t i1, int ith);
typedef void (*q4_parallel_for_fn)(q4_range_fn fn, void *ctx, int64_t n, int64_t grain);

static q4_parallel_for_fn parallel_for = NULL;

/* Decode streams the weights once per token: prefetch this many bytes ahead of the block
   being read (Q4_PF overrides; rows are contiguous, so this runs on into the next rows). */
static int64_t prefetch_bytes = 2048;

void q4_set_parallel_for(void *fn) { parallel_for = (q4_parallel_for_fn)fn; }

static void run_range(q4_range_fn fn, void *ctx, int64_t n, int64_t grain) {
    if (n <= 0) return;
    if (parallel_for) parallel_for(fn, ctx, n, grain);
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

/* ---- ISA selection --------------------------------------------------------------- */

enum { Q4_GENERIC = 0, Q4_AVX2 = 1, Q4_AVXVNNI = 2 };
static int best_isa = -1, active_isa = -1;

static void detect(void) {
    if (best_isa >= 0) return;
    best_isa = Q4_GENERIC;
#if Q4_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
        best_isa = Q4_AVX2;
        if (__builtin_cpu_supports("avxvnni")) best_isa = Q4_AVXVNNI;
    }
#endif
    const char *pf = getenv("Q4_PF");
    if (pf && *pf) prefetch_bytes = atol(pf);
    const char *env = getenv("LATTICE_ISA");
    active_isa = (env && strcmp(env, "generic") == 0) ? Q4_GENERIC : best_isa;
}

int q4_isa(void) { detect(); return active_isa; }
const char *q4_isa_name(void) {
    static const char *names[] = {"generic", "avx2", "avxvnni"};
    return names[q4_isa()];
}
/* Force a variant (tests compare them); one the CPU lacks is refused. */
int q4_set_isa(int isa) {
    detect();
    if (isa >= Q4_GENERIC && isa <= best_isa) active_isa = isa;
    return active_isa;
}

/* ---- activation quantization ----------------------------------------------------- */

/* One row x[K] -> q int8 [K], dx float [K/32], s float [K/32] (s = dx * sum(q)). */
static void quantize_act_generic(const float *x, int64_t K, int8_t *q, float *dx, float *s,
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
        s[b] = d * (float)sum;
        isum[b] = sum;
    }
}

#if Q4_X86
__attribute__((target("avx2,fma,f16c")))
static void quantize_act_avx2(const float *x, int64_t K, int8_t *q, float *dx, float *s,
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
        s[b] = d * (float)isum[b];
    }
}
#endif

static void quantize_act(const float *x, int64_t K, int8_t *q, float *dx, float *s,
                         int32_t *isum) {
#if Q4_X86
    if (q4_isa() >= Q4_AVX2) { quantize_act_avx2(x, K, q, dx, s, isum); return; }
#endif
    quantize_act_generic(x, K, q, dx, s, isum);
}

/* ---- one row dot: weight row (packed) . activation row (quantized) ----------------- */

typedef struct {
    int asym;       /* 0: q4_sym, 1: q4_asym */
    int64_t group;  /* values per block */
    int64_t hdr;    /* header bytes per block (2 or 4) */
    int64_t bpb;    /* bytes per block */
} q4_layout;

static float dot_row_generic(const q4_layout *L, const uint8_t *w, int64_t K,
                             const int8_t *xq, const float *dx, const float *xs) {
    float acc = 0.0f;
    int64_t sub = L->group / QK;
    for (int64_t b = 0; b < K / L->group; b++, w += L->bpb) {
        float d = f16_to_f32(rd16(w));
        float m = L->asym ? f16_to_f32(rd16(w + 2)) : -8.0f * d;
        const uint8_t *qs = w + L->hdr;
        for (int64_t j = 0; j < sub; j++) {
            int64_t blk = b * sub + j;
            const int8_t *y = xq + blk * QK;
            int dot = 0;
            for (int i = 0; i < 16; i++) {
                dot += (qs[16 * j + i] & 0x0F) * y[i];
                dot += (qs[16 * j + i] >> 4) * y[16 + i];
            }
            acc += d * dx[blk] * (float)dot + m * xs[blk];
        }
    }
    return acc;
}

#if Q4_X86
/* One packed row against one quantized activation row, specialised per family (ASYM),
   group size (G) and integer dot (DOT32) so the block loop has constant strides and
   unrolls; two accumulators per part keep the FMA chains short. */
#define Q4_DEF_DOT(NAME, TARGET, DOT32, ASYM, G)                                       \
    TARGET static float NAME(const uint8_t *w, int64_t K, const int8_t *xq,            \
                             const float *dx, const float *xs, const int32_t *isum) {   \
        enum { HDR = (ASYM) ? 4 : 2, BPB = HDR + (G) / 2, SUBS = (G) / QK };            \
        const __m256i lowmask = _mm256_set1_epi8(0x0F);                                 \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                  \
        const int64_t nblk = K / (G);                                                   \
        float mrow[(ASYM) ? K / QK + 8 : 1]; /* offsets per 32 values (asym) */         \
        (void)isum; (void)mrow;                                                         \
        for (int64_t b = 0; b < nblk; b++) {                                            \
            const uint8_t *wb = w + b * BPB;                                            \
            _mm_prefetch((const char *)(wb + prefetch_bytes), _MM_HINT_T0);             \
            float d = _cvtsh_ss(rd16(wb));                                              \
            if (ASYM) {                                                                 \
                float m = _cvtsh_ss(rd16(wb + 2));                                      \
                for (int j = 0; j < SUBS; j++) mrow[b * SUBS + j] = m;                  \
            }                                                                           \
            for (int j = 0; j < SUBS; j++) {                                            \
                int64_t blk = b * SUBS + j;                                             \
                __m128i raw = _mm_loadu_si128((const __m128i *)(wb + HDR + 16 * j));     \
                __m256i wq = _mm256_and_si256(                                          \
                    _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), lowmask);            \
                __m256i p = DOT32(wq, _mm256_loadu_si256((const __m256i *)(xq + blk * QK))); \
                /* sym: q - 8 folded in exactly, as -8 * sum(x_q) in lane 0 */           \
                if (!(ASYM)) p = _mm256_sub_epi32(p, _mm256_castsi128_si256(             \
                                     _mm_cvtsi32_si128(8 * isum[blk])));                \
                __m256 f = _mm256_cvtepi32_ps(p);                                       \
                if (blk & 1) acc1 = _mm256_fmadd_ps(f, _mm256_set1_ps(d * dx[blk]), acc1); \
                else acc0 = _mm256_fmadd_ps(f, _mm256_set1_ps(d * dx[blk]), acc0);       \
            }                                                                           \
        }                                                                               \
        __m256 acc = _mm256_add_ps(acc0, acc1);                                         \
        float tail = 0.0f;                                                              \
        if (ASYM) { /* + sum over blocks of m * s */                                    \
            const int64_t nb = K / QK;                                                  \
            int64_t i = 0;                                                              \
            for (; i + 8 <= nb; i += 8)                                                 \
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(mrow + i), _mm256_loadu_ps(xs + i), acc); \
            for (; i < nb; i++) tail += mrow[i] * xs[i];                                \
        }                                                                               \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)); \
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                         \
        h = _mm_add_ss(h, _mm_movehdup_ps(h));                                          \
        return _mm_cvtss_f32(h) + tail;                                                 \
    }

#define Q4_AVX2_T __attribute__((target("avx2,fma,f16c")))
#define Q4_VNNI_T __attribute__((target("avx2,fma,f16c,avxvnni")))

Q4_AVX2_T static inline __m256i dot32_avx2(__m256i wq, __m256i y) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wq, y), _mm256_set1_epi16(1));
}
Q4_VNNI_T static inline __m256i dot32_vnni(__m256i wq, __m256i y) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wq, y);
}

#define Q4_DEF_ALL(ISA, T, DOT32)                                                      \
    Q4_DEF_DOT(dot_sym32_##ISA, T, DOT32, 0, 32)                                        \
    Q4_DEF_DOT(dot_sym64_##ISA, T, DOT32, 0, 64)                                        \
    Q4_DEF_DOT(dot_sym128_##ISA, T, DOT32, 0, 128)                                      \
    Q4_DEF_DOT(dot_asym32_##ISA, T, DOT32, 1, 32)                                       \
    Q4_DEF_DOT(dot_asym64_##ISA, T, DOT32, 1, 64)                                       \
    Q4_DEF_DOT(dot_asym128_##ISA, T, DOT32, 1, 128)

Q4_DEF_ALL(avx2, Q4_AVX2_T, dot32_avx2)
Q4_DEF_ALL(vnni, Q4_VNNI_T, dot32_vnni)

typedef float (*dot_spec_fn)(const uint8_t *, int64_t, const int8_t *, const float *,
                             const float *, const int32_t *);
/* [isa - 1][asym][log2(group / 32)] */
static const dot_spec_fn dot_spec[2][2][3] = {
    {{dot_sym32_avx2, dot_sym64_avx2, dot_sym128_avx2},
     {dot_asym32_avx2, dot_asym64_avx2, dot_asym128_avx2}},
    {{dot_sym32_vnni, dot_sym64_vnni, dot_sym128_vnni},
     {dot_asym32_vnni, dot_asym64_vnni, dot_asym128_vnni}},
};
#endif

typedef float (*dot_row_fn)(const q4_layout *, const uint8_t *, int64_t, const int8_t *,
                            const float *, const float *);
/* ---- prefill: one weight row, unpacked once, against 4 activation rows -------------- */

/* w row -> nibble codes wu [K] (0..15), and per 32 values the scale dw and the offset mw
   (sym: -8 d, so that x = d * q + m for both families) */
static void unpack_row(const q4_layout *L, const uint8_t *w, int64_t K, uint8_t *wu,
                       float *dw, float *mw) {
    int64_t sub = L->group / QK;
    for (int64_t b = 0; b < K / L->group; b++, w += L->bpb) {
        float d = f16_to_f32(rd16(w));
        float m = L->asym ? f16_to_f32(rd16(w + 2)) : -8.0f * d;
        const uint8_t *qs = w + L->hdr;
        for (int64_t j = 0; j < sub; j++) {
            int64_t blk = b * sub + j;
            dw[blk] = d;
            mw[blk] = m;
            for (int i = 0; i < 16; i++) {
                wu[blk * QK + i] = qs[16 * j + i] & 0x0F;
                wu[blk * QK + 16 + i] = qs[16 * j + i] >> 4;
            }
        }
    }
}

/* y[r] = sum over blocks of dw * dx_r * (wu . xq_r) + mw * xs_r, for r < nr (<= 4);
   activation row r is at xq + r * K, dx / xs + r * nb */
static void dot4_generic(const uint8_t *wu, const float *dw, const float *mw, int64_t K,
                         const int8_t *xq, const float *dx, const float *xs, int nr,
                         float *y, int64_t ldy) {
    int64_t nb = K / QK;
    for (int r = 0; r < nr; r++) {
        float acc = 0.0f;
        for (int64_t blk = 0; blk < nb; blk++) {
            const int8_t *a = xq + r * K + blk * QK;
            int dot = 0;
            for (int i = 0; i < QK; i++) dot += wu[blk * QK + i] * a[i];
            acc += dw[blk] * dx[r * nb + blk] * (float)dot + mw[blk] * xs[r * nb + blk];
        }
        y[r * ldy] = acc;
    }
}

#if Q4_X86
/* Two unpacked weight rows (wu, wu + K) against four activation rows: eight dot products
   share each load. nr < 4 or a single weight row fall back to the generic loop. */
#define Q4_DOT24_BODY(DOT32)                                                            \
    int64_t nb = K / QK;                                                                \
    if (nr < 4) {                                                                       \
        for (int i = 0; i < nw; i++)                                                    \
            dot4_generic(wu + i * K, dw + i * nb, mw + i * nb, K, xq, dx, xs, nr, y + i, ldy); \
        return;                                                                         \
    }                                                                                   \
    /* a lone row runs as a pair with itself, so results do not depend on how the rows \
       were split between threads */                                                    \
    const int64_t second = nw < 2 ? 0 : 1;                                              \
    __m256 acc[2][4];                                                                   \
    for (int i = 0; i < 2; i++)                                                         \
        for (int r = 0; r < 4; r++) acc[i][r] = _mm256_setzero_ps();                    \
    for (int64_t blk = 0; blk < nb; blk++) {                                            \
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(wu + blk * QK));              \
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(wu + second * K + blk * QK)); \
        float e0 = dw[blk], e1 = dw[second * nb + blk];                                 \
        for (int r = 0; r < 4; r++) {                                                   \
            __m256i a = _mm256_loadu_si256((const __m256i *)(xq + r * K + blk * QK));    \
            float sx = dx[r * nb + blk];                                                \
            acc[0][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT32(w0, a)),               \
                                        _mm256_set1_ps(e0 * sx), acc[0][r]);            \
            acc[1][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT32(w1, a)),               \
                                        _mm256_set1_ps(e1 * sx), acc[1][r]);            \
        }                                                                               \
    }                                                                                   \
    for (int i = 0; i < nw; i++) {                                                      \
        const float *mi = mw + i * nb;                                                  \
        for (int r = 0; r < 4; r++) {                                                   \
            const float *sr = xs + r * nb;                                              \
            __m256 v = acc[i][r];                                                       \
            int64_t blk = 0;                                                            \
            for (; blk + 8 <= nb; blk += 8)                                             \
                v = _mm256_fmadd_ps(_mm256_loadu_ps(mi + blk), _mm256_loadu_ps(sr + blk), v); \
            float tail = 0.0f;                                                          \
            for (; blk < nb; blk++) tail += mi[blk] * sr[blk];                          \
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); \
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                     \
            h = _mm_add_ss(h, _mm_movehdup_ps(h));                                      \
            y[r * ldy + i] = _mm_cvtss_f32(h) + tail;                                   \
        }                                                                               \
    }

Q4_AVX2_T static void dot24_avx2(const uint8_t *wu, const float *dw, const float *mw,
                                 int64_t K, const int8_t *xq, const float *dx,
                                 const float *xs, int nw, int nr, float *y, int64_t ldy) {
    Q4_DOT24_BODY(dot32_avx2)
}

Q4_VNNI_T static void dot24_vnni(const uint8_t *wu, const float *dw, const float *mw,
                                 int64_t K, const int8_t *xq, const float *dx,
                                 const float *xs, int nw, int nr, float *y, int64_t ldy) {
    Q4_DOT24_BODY(dot32_vnni)
}
#endif

static void dot24_generic(const uint8_t *wu, const float *dw, const float *mw, int64_t K,
                          const int8_t *xq, const float *dx, const float *xs, int nw, int nr,
                          float *y, int64_t ldy) {
    int64_t nb = K / QK;
    for (int i = 0; i < nw; i++)
        dot4_generic(wu + i * K, dw + i * nb, mw + i * nb, K, xq, dx, xs, nr, y + i, ldy);
}

typedef void (*dot24_fn)(const uint8_t *, const float *, const float *, int64_t,
                         const int8_t *, const float *, const float *, int, int, float *,
                         int64_t);

static dot24_fn pick_dot24(void) {
#if Q4_X86
    switch (q4_isa()) {
    case Q4_AVXVNNI: return dot24_vnni;
    case Q4_AVX2: return dot24_avx2;
    }
#endif
    return dot24_generic;
}

/* ---- matmul ---------------------------------------------------------------------- */

typedef struct {
    const q4_layout *L;
    dot_row_fn dot;     /* generic decode dot */
    void *spec;         /* specialised decode dot (dot_spec_fn), or NULL */
    dot24_fn dot24;
    const uint8_t *w;
    int64_t ldw, N, K, M;
    const int8_t *xq;
    const float *dx, *xs;
    const int32_t *isum;
    float *y;
} mm_ctx;

#define M_TILE 16 /* activation rows per pass over a slice of weight rows (prefill) */
#define N_TILE 16 /* weight rows unpacked together (prefill) */

static void mm_range(void *vctx, int64_t n0, int64_t n1, int ith) {
    (void)ith;
    const mm_ctx *c = (const mm_ctx *)vctx;
    int64_t K = c->K, nb = K / QK;
    if (c->M < 4) { /* decode: stream the packed rows once */
#if Q4_X86
        if (c->spec) {
            dot_spec_fn f = (dot_spec_fn)c->spec;
            for (int64_t n = n0; n < n1; n++)
                for (int64_t m = 0; m < c->M; m++)
                    c->y[m * c->N + n] = f(c->w + n * c->ldw, K, c->xq + m * K,
                                           c->dx + m * nb, c->xs + m * nb, c->isum + m * nb);
            return;
        }
#endif
        for (int64_t n = n0; n < n1; n++)
            for (int64_t m = 0; m < c->M; m++)
                c->y[m * c->N + n] = c->dot(c->L, c->w + n * c->ldw, K, c->xq + m * K,
                                            c->dx + m * nb, c->xs + m * nb);
        return;
    }
    /* prefill: unpack N_TILE rows once, then run them against M_TILE activation rows at a
       time, four activation rows per pass over a weight row */
    uint8_t *wu = (uint8_t *)malloc((size_t)(N_TILE * K) + (size_t)(2 * N_TILE * nb) * sizeof(float));
    if (!wu) return; /* cannot happen for sane K; the output is left as it was */
    float *dw = (float *)(wu + N_TILE * K), *mw = dw + N_TILE * nb;
    for (int64_t t0 = n0; t0 < n1; t0 += N_TILE) {
        int64_t t1 = t0 + N_TILE < n1 ? t0 + N_TILE : n1;
        for (int64_t n = t0; n < t1; n++)
            unpack_row(c->L, c->w + n * c->ldw, K, wu + (n - t0) * K, dw + (n - t0) * nb,
                       mw + (n - t0) * nb);
        for (int64_t m0 = 0; m0 < c->M; m0 += M_TILE) {
            int64_t m1 = m0 + M_TILE < c->M ? m0 + M_TILE : c->M;
            for (int64_t n = t0; n < t1; n += 2) {
                int nw = t1 - n < 2 ? 1 : 2;
                for (int64_t m = m0; m < m1; m += 4) {
                    int nr = m1 - m < 4 ? (int)(m1 - m) : 4;
                    c->dot24(wu + (n - t0) * K, dw + (n - t0) * nb, mw + (n - t0) * nb, K,
                             c->xq + m * K, c->dx + m * nb, c->xs + m * nb, nw, nr,
                             c->y + m * c->N + n, c->N);
                }
            }
        }
    }
    free(wu);
}

/* Returns 0, or -1 on a bad layout / out of memory (nothing written). */
int q4_matmul(int asym, int64_t group, const float *x, int64_t M, int64_t K,
              const void *w, int64_t ldw, int64_t N, float *y) {
    if ((group != 32 && group != 64 && group != 128) || K % group) return -1;
    q4_layout L = {asym, group, asym ? 4 : 2, (asym ? 4 : 2) + group / 2};
    if (M <= 0 || N <= 0) return 0;
    int64_t nb = K / QK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + (size_t)(3 * M * nb) * sizeof(float) + 64);
    if (!xq) return -1;
    float *dx = (float *)(((uintptr_t)(xq + M * K) + 63) & ~(uintptr_t)63);
    float *xs = dx + M * nb;
    int32_t *isum = (int32_t *)(xs + M * nb);
    for (int64_t m = 0; m < M; m++)
        quantize_act(x + m * K, K, xq + m * K, dx + m * nb, xs + m * nb, isum + m * nb);
    void *spec = NULL;
#if Q4_X86
    if (q4_isa() >= Q4_AVX2)
        spec = (void *)dot_spec[q4_isa() - 1][asym ? 1 : 0][group == 32 ? 0 : group == 64 ? 1 : 2];
#endif
    mm_ctx c = {&L, dot_row_generic, spec, pick_dot24(), (const uint8_t *)w, ldw, N, K, M, xq, dx, xs, isum, y};
    /* grain: enough row-dots per task that the pool's hand-off is amortised */
    int64_t work = (K / 256 + 1) * M;
    int64_t grain = work >= 64 ? 1 : 64 / work;
    run_range(mm_range, &c, N, grain);
    free(xq);
    return 0;
}

/* ---- embed ----------------------------------------------------------------------- */

/* out[i, :] = float(W[ids[i], :]). Returns 0, or -1 (writing nothing) for an id outside
   [0, rows) or a bad layout. */
int q4_embed(int asym, int64_t group, const void *w, int64_t ldw, int64_t rows, int64_t K,
             const int64_t *ids, int64_t n, float *out) {
    if ((group != 32 && group != 64 && group != 128) || K % group) return -1;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    int64_t hdr = asym ? 4 : 2, bpb = hdr + group / 2;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *wr = (const uint8_t *)w + ids[i] * ldw;
        float *o = out + i * K;
        for (int64_t b = 0; b < K / group; b++, wr += bpb) {
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
