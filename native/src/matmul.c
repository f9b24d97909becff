/* matmul y[M, N] = x[M, K] @ W[N, K]^T for f32, f16 and q8_0 weights.
 *
 * Decode (M = 1, and up to FEW_ROWS rows) is bound by how fast the weights stream from
 * memory: each thread takes contiguous chunks of output rows from a shared counter and
 * walks four weight rows at a time, so one load of x feeds four rows, while it prefetches
 * the next four (which took 4864 x 896 q8_0 from 12 to 21 GB/s on 2 cores). Prefill
 * (more rows) is tiled: a chunk of weight rows and a slice of K stay in L1 (converted to
 * f32 once, for f16) while every row of x passes over them.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LK_X86 1
#else
#define LK_X86 0
#endif

enum { FMT_F32, FMT_F16, FMT_Q8_0 };

/* Prefill tiling: weight rows per chunk, and the K slice (values) kept in L1. */
#define PF_ROWS 16
#define PF_KSLICE 256
#define PF_Q8_BLOCKS 32

typedef struct matmul_job {
    const float *x;
    int64_t M, K;
    const uint8_t *w;
    int64_t ldw, N;
    float *y;
    const lk_block_q8_act *xq; /* q8_0: x quantized, M rows of K/32 blocks */
    int64_t chunk, nchunks;
    void (*rows)(const struct matmul_job *j, int64_t r0, int64_t r1, int ith);
} matmul_job;

static inline uint16_t rd16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ---- generic (scalar) ------------------------------------------------------------ */

static float dot_f32_generic(const float *x, const float *w, int64_t K) {
    float acc[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int i = 0; i < 8; i++) acc[i] += x[k + i] * w[k + i];
    float s = 0;
    for (int i = 0; i < 8; i++) s += acc[i];
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}

static void rows_f32_generic(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    for (int64_t r = r0; r < r1; r++) {
        const float *w = (const float *)(j->w + r * j->ldw);
        for (int64_t m = 0; m < j->M; m++)
            j->y[m * j->N + r] = dot_f32_generic(j->x + m * j->K, w, j->K);
    }
}

static void rows_f16_generic(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    float *wf = (float *)lk_scratch(ith, (size_t)j->K * sizeof(float));
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *w = j->w + r * j->ldw;
        for (int64_t k = 0; k < j->K; k++) wf[k] = lk_f16_to_f32(rd16(w + 2 * k));
        for (int64_t m = 0; m < j->M; m++)
            j->y[m * j->N + r] = dot_f32_generic(j->x + m * j->K, wf, j->K);
    }
}

static void rows_q8_0_generic(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const int64_t nb = j->K / LK_QK8_0;
    for (int64_t r = r0; r < r1; r++) {
        const lk_block_q8_0 *w = (const lk_block_q8_0 *)(j->w + r * j->ldw);
        for (int64_t m = 0; m < j->M; m++) {
            const lk_block_q8_act *xq = j->xq + m * nb;
            float acc = 0;
            for (int64_t b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int i = 0; i < LK_QK8_0; i++) s += (int32_t)w[b].qs[i] * xq[b].qs[i];
                acc += (float)s * (lk_f16_to_f32(rd16(&w[b].d)) * xq[b].d);
            }
            j->y[m * j->N + r] = acc;
        }
    }
}

static void quantize_act_generic(const float *x, int64_t K, lk_block_q8_act *out) {
    for (int64_t b = 0; b < K / LK_QK8_0; b++) {
        const float *v = x + b * LK_QK8_0;
        float amax = 0;
        for (int i = 0; i < LK_QK8_0; i++) amax = fmaxf(amax, fabsf(v[i]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = d;
        for (int i = 0; i < LK_QK8_0; i++) {
            float q = nearbyintf(v[i] * id);
            out[b].qs[i] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
        }
    }
}

/* ---- AVX2 / FMA / F16C ------------------------------------------------------------ */
#if LK_X86

#define AVX2_INLINE LK_AVX2_TARGET __attribute__((always_inline)) static inline

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [sum a0, sum a1, sum a2, sum a3] */
AVX2_INLINE __m128 hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Eight weights from row p at column k as f32 (fmt is a compile-time constant). */
AVX2_INLINE __m256 load_w8(const uint8_t *p, int64_t k, int fmt) {
    if (fmt == FMT_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * k)));
    return _mm256_loadu_ps((const float *)p + k);
}

AVX2_INLINE float load_w1(const uint8_t *p, int64_t k, int fmt) {
    if (fmt == FMT_F16) return _cvtsh_ss(rd16(p + 2 * k));
    return ((const float *)p)[k];
}

/* Software prefetch distance for the matvec weight streams: 0 = the next group of four
   rows (best measured), 1..64 = that many rows ahead, > 64 = bytes ahead, < 0 = off.
   LATTICE_PF overrides it (tuning only). */
int lk_pf_dist = 0;
/* into L1: T1/T2 measured the same, NTA far worse */
AVX2_INLINE void pf_(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
/* Up to this many x rows use the streaming (matvec-like) kernels: the weights are read
   once either way, and the streaming order keeps the prefetchers fed. */
#define FEW_ROWS 8

/* y[0..3] = dot(x, rows w, w + ldw, w + 2 ldw, w + 3 ldw) */
AVX2_INLINE void mv4_float(const float *x, int64_t K, const uint8_t *w, int64_t ldw,
                           float *y, int fmt) {
    const uint8_t *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    const int es = fmt == FMT_F16 ? 2 : 4;
    const int64_t pf = lk_pf_dist < 0 ? -1 : lk_pf_dist == 0 ? 4 * ldw : lk_pf_dist <= 64 ? lk_pf_dist * ldw : lk_pf_dist;
    for (; k + 16 <= K; k += 16) {
        if (pf >= 0) {
            pf_((const char *)w0 + pf + k * es);
            pf_((const char *)w1 + pf + k * es);
            pf_((const char *)w2 + pf + k * es);
            pf_((const char *)w3 + pf + k * es);
        }
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(load_w8(w0, k, fmt), x0, a0);
        b0 = _mm256_fmadd_ps(load_w8(w0, k + 8, fmt), x1, b0);
        a1 = _mm256_fmadd_ps(load_w8(w1, k, fmt), x0, a1);
        b1 = _mm256_fmadd_ps(load_w8(w1, k + 8, fmt), x1, b1);
        a2 = _mm256_fmadd_ps(load_w8(w2, k, fmt), x0, a2);
        b2 = _mm256_fmadd_ps(load_w8(w2, k + 8, fmt), x1, b2);
        a3 = _mm256_fmadd_ps(load_w8(w3, k, fmt), x0, a3);
        b3 = _mm256_fmadd_ps(load_w8(w3, k + 8, fmt), x1, b3);
    }
    if (k + 8 <= K) {
        __m256 x0 = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(load_w8(w0, k, fmt), x0, a0);
        a1 = _mm256_fmadd_ps(load_w8(w1, k, fmt), x0, a1);
        a2 = _mm256_fmadd_ps(load_w8(w2, k, fmt), x0, a2);
        a3 = _mm256_fmadd_ps(load_w8(w3, k, fmt), x0, a3);
        k += 8;
    }
    __m128 s = hsum8x4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1),
                       _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));
    float out[4];
    _mm_storeu_ps(out, s);
    for (; k < K; k++) {
        out[0] += load_w1(w0, k, fmt) * x[k];
        out[1] += load_w1(w1, k, fmt) * x[k];
        out[2] += load_w1(w2, k, fmt) * x[k];
        out[3] += load_w1(w3, k, fmt) * x[k];
    }
    memcpy(y, out, sizeof out);
}

AVX2_INLINE float mv1_float(const float *x, int64_t K, const uint8_t *w, int fmt) {
    __m256 a = _mm256_setzero_ps(), b = a;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a = _mm256_fmadd_ps(load_w8(w, k, fmt), _mm256_loadu_ps(x + k), a);
        b = _mm256_fmadd_ps(load_w8(w, k + 8, fmt), _mm256_loadu_ps(x + k + 8), b);
    }
    if (k + 8 <= K) {
        a = _mm256_fmadd_ps(load_w8(w, k, fmt), _mm256_loadu_ps(x + k), a);
        k += 8;
    }
    float s = hsum8(_mm256_add_ps(a, b));
    for (; k < K; k++) s += load_w1(w, k, fmt) * x[k];
    return s;
}

/* The software prefetch inside the row loops covers the next group of rows; the first
   group of a chunk has nobody ahead of it, so warm it up front. */
AVX2_INLINE void prefetch_rows(const uint8_t *w, int64_t bytes) {
    if (bytes > 16384) bytes = 16384;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)w + o, _MM_HINT_T0);
}

AVX2_INLINE void matvec_float(const matmul_job *j, int64_t r0, int64_t r1, int fmt) {
    int64_t r = r0;
    prefetch_rows(j->w + r0 * j->ldw, (r1 - r0 < 4 ? r1 - r0 : 4) * j->ldw);
    for (; r + 4 <= r1; r += 4) mv4_float(j->x, j->K, j->w + r * j->ldw, j->ldw, j->y + r, fmt);
    for (; r < r1; r++) j->y[r] = mv1_float(j->x, j->K, j->w + r * j->ldw, fmt);
}

/* Prefill micro-kernel: two x rows (x0, x1, may be equal) against four f32 weight rows
   (row stride ldwf floats) over n values; out{0,1}[0..3] += or = the dots. */
AVX2_INLINE void mm2x4_f32(const float *x0, const float *x1, const float *w, int64_t ldwf,
                           int64_t n, float *y0, float *y1, int accumulate) {
    const float *w0 = w, *w1 = w + ldwf, *w2 = w + 2 * ldwf, *w3 = w + 3 * ldwf;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
    __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 a = _mm256_loadu_ps(x0 + k), b = _mm256_loadu_ps(x1 + k);
        __m256 v = _mm256_loadu_ps(w0 + k);
        c00 = _mm256_fmadd_ps(a, v, c00);
        c10 = _mm256_fmadd_ps(b, v, c10);
        v = _mm256_loadu_ps(w1 + k);
        c01 = _mm256_fmadd_ps(a, v, c01);
        c11 = _mm256_fmadd_ps(b, v, c11);
        v = _mm256_loadu_ps(w2 + k);
        c02 = _mm256_fmadd_ps(a, v, c02);
        c12 = _mm256_fmadd_ps(b, v, c12);
        v = _mm256_loadu_ps(w3 + k);
        c03 = _mm256_fmadd_ps(a, v, c03);
        c13 = _mm256_fmadd_ps(b, v, c13);
    }
    float s0[4], s1[4];
    _mm_storeu_ps(s0, hsum8x4(c00, c01, c02, c03));
    _mm_storeu_ps(s1, hsum8x4(c10, c11, c12, c13));
    for (; k < n; k++) {
        for (int i = 0; i < 4; i++) {
            s0[i] += x0[k] * w[i * ldwf + k];
            s1[i] += x1[k] * w[i * ldwf + k];
        }
    }
    for (int i = 0; i < 4; i++) {
        y0[i] = accumulate ? y0[i] + s0[i] : s0[i];
        if (y1 != y0) y1[i] = accumulate ? y1[i] + s1[i] : s1[i];
    }
}

AVX2_INLINE float dot_f32(const float *x, const float *w, int64_t n) {
    __m256 a = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a);
    float s = hsum8(a);
    for (; k < n; k++) s += x[k] * w[k];
    return s;
}

/* Prefill for float formats: rows [r0, r1) of W against all M rows of x. */
AVX2_INLINE void matmul_float_tiled(const matmul_job *j, int64_t r0, int64_t r1, int ith,
                                    int fmt) {
    const int64_t M = j->M, K = j->K, N = j->N;
    const int64_t nr = r1 - r0;
    float *tile = NULL;
    if (fmt == FMT_F16) tile = (float *)lk_scratch(ith, (size_t)nr * PF_KSLICE * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
        const float *wt;
        int64_t ldwf;
        if (fmt == FMT_F16) {
            /* convert this slice of the chunk's rows once; every x row reuses it */
            for (int64_t r = 0; r < nr; r++) {
                const uint8_t *src = j->w + (r0 + r) * j->ldw;
                float *dst = tile + r * PF_KSLICE;
                int64_t k = 0;
                for (; k + 8 <= kn; k += 8) _mm256_storeu_ps(dst + k, load_w8(src, k0 + k, FMT_F16));
                for (; k < kn; k++) dst[k] = load_w1(src, k0 + k, FMT_F16);
            }
            wt = tile;
            ldwf = PF_KSLICE;
        } else {
            wt = (const float *)(j->w + r0 * j->ldw) + k0;
            ldwf = j->ldw / (int64_t)sizeof(float);
        }
        const int acc = k0 > 0;
        for (int64_t m = 0; m < M; m += 2) {
            const float *x0 = j->x + m * K + k0;
            const float *x1 = m + 1 < M ? x0 + K : x0;
            float *y0 = j->y + m * N + r0;
            float *y1 = m + 1 < M ? y0 + N : y0;
            int64_t r = 0;
            for (; r + 4 <= nr; r += 4)
                mm2x4_f32(x0, x1, wt + r * ldwf, ldwf, kn, y0 + r, y1 + r, acc);
            for (; r < nr; r++) {
                float d0 = dot_f32(x0, wt + r * ldwf, kn);
                y0[r] = acc ? y0[r] + d0 : d0;
                if (y1 != y0) {
                    float d1 = dot_f32(x1, wt + r * ldwf, kn);
                    y1[r] = acc ? y1[r] + d1 : d1;
                }
            }
        }
    }
}

/* A few x rows (batched decode, speculative verification): still bound by streaming
   the weights, so walk them like the matvec, four rows at a time with the next four
   prefetched, load each group once into an f32 tile, and run every x row over it. */
AVX2_INLINE void matmul_float_few(const matmul_job *j, int64_t r0, int64_t r1, int ith, int fmt) {
    const int64_t M = j->M, K = j->K, N = j->N, ldw = j->ldw;
    float *tile = (float *)lk_scratch(ith, (size_t)4 * K * sizeof(float));
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t nr = r1 - r < 4 ? r1 - r : 4;
        for (int64_t i = 0; i < nr; i++) {
            const uint8_t *src = j->w + (r + i) * ldw;
            float *dst = tile + i * K;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                pf_(src + 4 * ldw + k * (fmt == FMT_F16 ? 2 : 4));
                _mm256_storeu_ps(dst + k, load_w8(src, k, fmt));
                _mm256_storeu_ps(dst + k + 8, load_w8(src, k + 8, fmt));
            }
            for (; k < K; k++) dst[k] = load_w1(src, k, fmt);
        }
        for (int64_t m = 0; m < M; m += 2) {
            const float *x0 = j->x + m * K;
            const float *x1 = m + 1 < M ? x0 + K : x0;
            float *y0 = j->y + m * N + r;
            float *y1 = m + 1 < M ? y0 + N : y0;
            if (nr == 4) {
                mm2x4_f32(x0, x1, tile, K, K, y0, y1, 0);
            } else {
                for (int64_t i = 0; i < nr; i++) {
                    y0[i] = dot_f32(x0, tile + i * K, K);
                    if (y1 != y0) y1[i] = dot_f32(x1, tile + i * K, K);
                }
            }
        }
    }
}

LK_AVX2_TARGET static void rows_f32_avx2(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    if (j->M == 1) matvec_float(j, r0, r1, FMT_F32);
    else if (j->M <= FEW_ROWS) matmul_float_few(j, r0, r1, ith, FMT_F32);
    else matmul_float_tiled(j, r0, r1, ith, FMT_F32);
}

LK_AVX2_TARGET static void rows_f16_avx2(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    if (j->M == 1) matvec_float(j, r0, r1, FMT_F16);
    else if (j->M <= FEW_ROWS) matmul_float_few(j, r0, r1, ith, FMT_F16);
    else matmul_float_tiled(j, r0, r1, ith, FMT_F16);
}

/* ---- q8_0 ---- */

/* 8 int32 partial sums of the 32 products x.qs * w.qs; ax = |x.qs| */
AVX2_INLINE __m256i dot_q8_32(__m256i ax, __m256i xs, const int8_t *wq) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)wq);
    __m256i p16 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xs));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

AVX2_INLINE float f16s(const lk_block_q8_0 *b) { return _cvtsh_ss(rd16(&b->d)); }

/* y[0..3] for four q8_0 rows. The rows' int32 partial sums are folded into one vector
   per block by horizontal adds, so the int->float conversion, the scale multiply and
   the FMA run once per block for all four rows: fewer uops on the FMA ports, which bound
   this loop when the weights come from cache (18% faster there than one FMA chain per
   row). The weights of the next four rows are prefetched as these stream. */
AVX2_INLINE void mv4_q8_0(const lk_block_q8_act *xq, int64_t nb, const uint8_t *w,
                                 int64_t ldw, float *y) {
    const lk_block_q8_0 *w0 = (const lk_block_q8_0 *)w;
    const lk_block_q8_0 *w1 = (const lk_block_q8_0 *)(w + ldw);
    const lk_block_q8_0 *w2 = (const lk_block_q8_0 *)(w + 2 * ldw);
    const lk_block_q8_0 *w3 = (const lk_block_q8_0 *)(w + 3 * ldw);
    __m256 acc = _mm256_setzero_ps();
    const int64_t pf = lk_pf_dist < 0 ? -1 : lk_pf_dist == 0 ? 4 * ldw : lk_pf_dist <= 64 ? lk_pf_dist * ldw : lk_pf_dist;
    for (int64_t b = 0; b < nb; b++) {
        if (pf >= 0) {
            pf_((const char *)&w0[b] + pf);
            pf_((const char *)&w1[b] + pf);
            pf_((const char *)&w2[b] + pf);
            pf_((const char *)&w3[b] + pf);
        }
        __m256i xs = _mm256_loadu_si256((const __m256i *)xq[b].qs);
        __m256i ax = _mm256_abs_epi8(xs);
        __m256i p0 = dot_q8_32(ax, xs, w0[b].qs);
        __m256i p1 = dot_q8_32(ax, xs, w1[b].qs);
        __m256i p2 = dot_q8_32(ax, xs, w2[b].qs);
        __m256i p3 = dot_q8_32(ax, xs, w3[b].qs);
        /* lanes: [r0 r1 r2 r3 | r0 r1 r2 r3], each a partial sum of that row's block */
        __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        __m128i dh = _mm_cvtsi32_si128(rd16(&w0[b].d));
        dh = _mm_insert_epi16(dh, rd16(&w1[b].d), 1);
        dh = _mm_insert_epi16(dh, rd16(&w2[b].d), 2);
        dh = _mm_insert_epi16(dh, rd16(&w3[b].d), 3);
        __m128 d4 = _mm_mul_ps(_mm_cvtph_ps(dh), _mm_set1_ps(xq[b].d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set_m128(d4, d4), acc);
    }
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)));
}

AVX2_INLINE float mv1_q8_0(const lk_block_q8_act *xq, int64_t nb, const uint8_t *w) {
    const lk_block_q8_0 *w0 = (const lk_block_q8_0 *)w;
    __m256 a = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xs = _mm256_loadu_si256((const __m256i *)xq[b].qs);
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_q8_32(_mm256_abs_epi8(xs), xs, w0[b].qs)),
                            _mm256_set1_ps(f16s(&w0[b]) * xq[b].d), a);
    }
    return hsum8(a);
}

/* Prefill: one x row against four weight rows over blocks [0, nb) of a slice;
   dw4 holds per block [d0 d1 d2 d3 d0 d1 d2 d3] of the four rows. */
AVX2_INLINE __m128 mm1x4_q8_0(const lk_block_q8_act *xq, const lk_block_q8_0 *w0,
                              const lk_block_q8_0 *w1, const lk_block_q8_0 *w2,
                              const lk_block_q8_0 *w3, const float *dw4, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xs = _mm256_loadu_si256((const __m256i *)xq[b].qs);
        __m256i ax = _mm256_abs_epi8(xs);
        __m256i p0 = dot_q8_32(ax, xs, w0[b].qs);
        __m256i p1 = dot_q8_32(ax, xs, w1[b].qs);
        __m256i p2 = dot_q8_32(ax, xs, w2[b].qs);
        __m256i p3 = dot_q8_32(ax, xs, w3[b].qs);
        __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dw4 + 8 * b), _mm256_set1_ps(xq[b].d));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc);
    }
    return _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
}

AVX2_INLINE float dot1_q8_0(const lk_block_q8_act *xq, const lk_block_q8_0 *w, int64_t nb) {
    return mv1_q8_0(xq, nb, (const uint8_t *)w);
}

LK_AVX2_TARGET static void rows_q8_0_avx2(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    const int64_t nb = j->K / LK_QK8_0;
    if (j->M <= FEW_ROWS) {
        /* decode, or a few x rows: stream the weights four rows at a time (the first x
           row's pass prefetches the next four), the other x rows reuse them from L1 */
        int64_t r = r0;
        prefetch_rows(j->w + r0 * j->ldw, (r1 - r0 < 4 ? r1 - r0 : 4) * j->ldw);
        for (; r + 4 <= r1; r += 4)
            for (int64_t m = 0; m < j->M; m++)
                mv4_q8_0(j->xq + m * nb, nb, j->w + r * j->ldw, j->ldw, j->y + m * j->N + r);
        for (; r < r1; r++)
            for (int64_t m = 0; m < j->M; m++)
                j->y[m * j->N + r] = mv1_q8_0(j->xq + m * nb, nb, j->w + r * j->ldw);
        return;
    }
    const int64_t M = j->M, N = j->N, nr = r1 - r0;
    float *dw4 = (float *)lk_scratch(ith, (size_t)((nr + 3) / 4) * PF_Q8_BLOCKS * 8 * sizeof(float));
    for (int64_t b0 = 0; b0 < nb; b0 += PF_Q8_BLOCKS) {
        const int64_t bn = nb - b0 < PF_Q8_BLOCKS ? nb - b0 : PF_Q8_BLOCKS;
        const int acc = b0 > 0;
        const int64_t ntiles = nr / 4;
        for (int64_t t = 0; t < ntiles; t++) {
            float *d = dw4 + t * PF_Q8_BLOCKS * 8;
            for (int i = 0; i < 4; i++) {
                const lk_block_q8_0 *w = (const lk_block_q8_0 *)(j->w + (r0 + 4 * t + i) * j->ldw) + b0;
                for (int64_t b = 0; b < bn; b++) d[8 * b + i] = d[8 * b + 4 + i] = f16s(&w[b]);
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const lk_block_q8_act *xq = j->xq + m * nb + b0;
            float *y = j->y + m * N + r0;
            for (int64_t t = 0; t < ntiles; t++) {
                const uint8_t *wr = j->w + (r0 + 4 * t) * j->ldw;
                __m128 s = mm1x4_q8_0(xq, (const lk_block_q8_0 *)wr + b0,
                                      (const lk_block_q8_0 *)(wr + j->ldw) + b0,
                                      (const lk_block_q8_0 *)(wr + 2 * j->ldw) + b0,
                                      (const lk_block_q8_0 *)(wr + 3 * j->ldw) + b0,
                                      dw4 + t * PF_Q8_BLOCKS * 8, bn);
                if (acc) s = _mm_add_ps(s, _mm_loadu_ps(y + 4 * t));
                _mm_storeu_ps(y + 4 * t, s);
            }
            for (int64_t r = 4 * ntiles; r < nr; r++) {
                float v = dot1_q8_0(xq, (const lk_block_q8_0 *)(j->w + (r0 + r) * j->ldw) + b0, bn);
                y[r] = acc ? y[r] + v : v;
            }
        }
    }
}

LK_AVX2_TARGET static void quantize_act_avx2(const float *x, int64_t K, lk_block_q8_act *out) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / LK_QK8_0; b++) {
        const float *v = x + b * LK_QK8_0;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = d;
        const __m256 s = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, s));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, s));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, s));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, s));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, perm);
        /* keep -128 out: the maddubs trick needs |x| <= 127 */
        p = _mm256_max_epi8(p, _mm256_set1_epi8(-127));
        _mm256_storeu_si256((__m256i *)out[b].qs, p);
    }
}

#endif /* LK_X86 */

/* ---- dispatch ---------------------------------------------------------------------- */

static void quantize_act(const float *x, int64_t K, lk_block_q8_act *out) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        quantize_act_avx2(x, K, out);
        return;
    }
#endif
    quantize_act_generic(x, K, out);
}

void lk_quantize_row_q8_act(const float *x, int64_t K, void *dst) {
    lk_init();
    quantize_act(x, K, (lk_block_q8_act *)dst);
}

static void matmul_task(void *vctx, int64_t c, int ith) {
    matmul_job *j = (matmul_job *)vctx;
    int64_t r0 = c * j->chunk;
    int64_t r1 = r0 + j->chunk < j->N ? r0 + j->chunk : j->N;
    j->rows(j, r0, r1, ith);
}

typedef struct {
    const float *x;
    int64_t M, K;
    lk_block_q8_act *xq;
} quant_job;

static void quant_task(void *vctx, int64_t m, int ith) {
    (void)ith;
    quant_job *q = (quant_job *)vctx;
    const int64_t nb = q->K / LK_QK8_0;
    quantize_act(q->x + m * q->K, q->K, q->xq + m * nb);
}

static void run_matmul(int fmt, const float *x, int64_t M, int64_t K, const void *w,
                       int64_t ldw, int64_t N, float *y) {
    if (M <= 0 || N <= 0) return;
    lk_lock();
    matmul_job j;
    j.x = x;
    j.M = M;
    j.K = K;
    j.w = (const uint8_t *)w;
    j.ldw = ldw;
    j.N = N;
    j.y = y;
    j.xq = NULL;
    const int avx2 = LK_X86 && lk_active_isa == LK_ISA_AVX2;
    if (fmt == FMT_Q8_0) {
        const int64_t nb = K / LK_QK8_0;
        lk_block_q8_act *xq = (lk_block_q8_act *)lk_shared_scratch((size_t)(M * nb) * sizeof(lk_block_q8_act));
        quant_job q = {x, M, K, xq};
        if (M == 1) quant_task(&q, 0, 0);
        else lk_parallel(quant_task, &q, M);
        j.xq = xq;
    }
#if LK_X86
    if (avx2) j.rows = fmt == FMT_F32 ? rows_f32_avx2 : fmt == FMT_F16 ? rows_f16_avx2 : rows_q8_0_avx2;
    else
#endif
        j.rows = fmt == FMT_F32 ? rows_f32_generic : fmt == FMT_F16 ? rows_f16_generic : rows_q8_0_generic;
    (void)avx2;
    const int nth = lk_threads_locked();
    int64_t chunk;
    if (M <= FEW_ROWS) {
        /* a few chunks per thread for balance, but at least ~64 KiB of weights each; more,
           smaller chunks measured slower (each restarts the prefetch streams) */
        int64_t target = (int64_t)nth * 4;
        int64_t by_bytes = (N * ldw) / (64 * 1024);
        if (by_bytes < target) target = by_bytes > nth ? by_bytes : nth;
        chunk = (N + target - 1) / target;
        chunk = (chunk + 3) & ~(int64_t)3;
    } else {
        chunk = PF_ROWS;
    }
    if (chunk < 4) chunk = 4;
    j.chunk = chunk;
    j.nchunks = (N + chunk - 1) / chunk;
    lk_parallel(matmul_task, &j, j.nchunks);
    lk_unlock();
}

void lk_matmul_f32(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                   float *y) {
    run_matmul(FMT_F32, x, M, K, w, ldw, N, y);
}

void lk_matmul_f16(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                   float *y) {
    run_matmul(FMT_F16, x, M, K, w, ldw, N, y);
}

void lk_matmul_q8_0(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                    float *y) {
    run_matmul(FMT_Q8_0, x, M, K, w, ldw, N, y);
}

/* ---- embed ------------------------------------------------------------------------- */

static int check_ids(const int64_t *ids, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    return 0;
}

int lk_embed_f32(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                 int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    for (int64_t i = 0; i < n; i++)
        memcpy(out + i * K, (const uint8_t *)w + ids[i] * ldw, (size_t)K * sizeof(float));
    return 0;
}

#if LK_X86
LK_AVX2_TARGET static void f16_row_avx2(const uint8_t *src, int64_t K, float *dst) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load_w8(src, k, FMT_F16));
    for (; k < K; k++) dst[k] = _cvtsh_ss(rd16(src + 2 * k));
}
#endif

int lk_embed_f16(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                 int64_t n, float *out) {
    lk_init();
    if (check_ids(ids, n, rows)) return -1;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *src = (const uint8_t *)w + ids[i] * ldw;
#if LK_X86
        if (lk_active_isa == LK_ISA_AVX2) {
            f16_row_avx2(src, K, out + i * K);
            continue;
        }
#endif
        for (int64_t k = 0; k < K; k++) out[i * K + k] = lk_f16_to_f32(rd16(src + 2 * k));
    }
    return 0;
}

int lk_embed_q8_0(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                  int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    const int64_t nb = K / LK_QK8_0;
    for (int64_t i = 0; i < n; i++) {
        const lk_block_q8_0 *src = (const lk_block_q8_0 *)((const uint8_t *)w + ids[i] * ldw);
        float *dst = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const float d = lk_f16_to_f32(rd16(&src[b].d));
            for (int k = 0; k < LK_QK8_0; k++) dst[b * LK_QK8_0 + k] = d * (float)src[b].qs[k];
        }
    }
    return 0;
}

/* ---- weight quantization (matches the numpy reference bit for bit) --------------------- */

void lk_quantize_q8_0(const float *x, int64_t rows, int64_t K, void *dst) {
    const int64_t nb = K / LK_QK8_0;
    lk_block_q8_0 *out = (lk_block_q8_0 *)dst;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *v = x + r * K + b * LK_QK8_0;
            lk_block_q8_0 *o = out + r * nb + b;
            float amax = 0;
            for (int i = 0; i < LK_QK8_0; i++) amax = fmaxf(amax, fabsf(v[i]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            const uint16_t dh = lk_f32_to_f16(d);
            memcpy(&o->d, &dh, 2);
            for (int i = 0; i < LK_QK8_0; i++) {
                const float s = v[i] * id;
                float q = floorf(fabsf(s) + 0.5f);
                q = q > 127.0f ? 127.0f : q;
                o->qs[i] = (int8_t)(s < 0 ? -q : q);
            }
        }
    }
}
