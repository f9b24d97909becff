/* matmul y[M, N] = x[M, K] @ W[N, K]^T for f32, f16 and q8_0 weights.
 *
 * Decode (M = 1, and up to FEW_ROWS rows) is bound by how fast the weights stream from
 * memory: each thread takes contiguous chunks of output rows from a shared counter and
 * walks four weight rows at a time, so one load of x feeds four rows, while it prefetches
 * the next four (which took 4864 x 896 q8_0 from 12 to 21 GB/s on 2 cores). For f32 / f16
 * the four rows are a quarter of the chunk apart, so the four streams are long and
 * sequential (f16 K = 1024: 23 -> 27-28 GB/s, 90-95% of a plain read); q8_0_r16 reads its
 * two 16-row groups from the chunk's two halves likewise. Prefill
 * (more rows) is tiled: a chunk of weight rows and a slice of K stay in L1 (converted to
 * f32 once, for f16; packed to int16 once, for q8_0) while every row of x passes over them.
 *
 * f32 / f16 prefill with AVX-512 runs the few-rows 512-bit micro-kernel over L1 tiles
 * (prefill512): 100 -> 155-195 GFLOP/s on 2 cores at M = 64 and 512 (bench/kernels.py).
 *
 * q8_0 quantizes x per block of 32 to int16 with a float32 scale (int8 activations cost
 * 0.1 perplexity on SmolLM2-135M; int16 is within 0.001 of float x), so each block's dot
 * is exact in int32 (vpmaddwd, or vpdpwssd with AVX-VNNI / AVX512-VNNI) and one FMA per
 * block applies d_w * d_x. Prefill with int16 tiles measured at least as fast as
 * dequantizing the tiles to f32 for FMA on plain AVX2, and 1.5-3x faster with VNNI.
 *
 * A few x rows (batched decode, M = 2 .. FEW_ROWS; q8_0 up to lk_q8_few_rows = 64, which
 * also covers a decode batch plus a prefill slice) still stream the weights like the
 * matvec, but each weight block is widened / converted once for all x rows (q8_0: packed
 * to int16 with rows in lanes, as for prefill; f16: to an f32 tile) instead of once per
 * x row. q8_0_r16 (q8_0's blocks stored with 16 rows interleaved, what models loaded for
 * the native backend hold) skips that packing: a weight vector is one sign-extending load
 * shared by every x row (Qwen2.5-0.5B, 2 threads, hot cache, M = 8 against M = 1: q8_0
 * 2.6-2.7x, q8_0_r16 2.0x; M = 4: 2.0x and 1.2x).
 *
 * Batch invariance: every path computes an output row in one order, whatever M is, so
 * a request gets the same bits batched as alone (tests/test_kernels.py checks M = 1..9,
 * 16 for every format and variant). q8_0: each block's int32 dot is exact in any order,
 * and every kernel then does acc = fma(dot, d_w * d_x, acc) block by block. f32 / f16:
 * see the comment above mv4_float.
 */
#ifndef LK_Q8_TEMPLATE
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


enum { FMT_F32 = LK_FMT_F32, FMT_F16 = LK_FMT_F16, FMT_Q8_0 = LK_FMT_Q8_0,
       FMT_Q8_0_R16 = LK_FMT_Q8_0_R16 };

/* Prefill tiling: weight rows per chunk, and the K slice (values) kept in L1. */
#define PF_ROWS 16
#define PF_KSLICE 256
/* q8_0: weight rows per chunk, and the K slice (blocks) packed to int16 and kept in L1
   (32 x 16 blocks = 32 KiB; 8 blocks measured ~15% slower) */
#define PF_Q8_ROWS 32
#define PF_Q16_BLOCKS 16
/* few rows: K slice (blocks) packed at a time; short, so the loads of the next slice
   overlap the micro-kernel's arithmetic on this one (LATTICE_FEW_BLOCKS: tuning only) */
int lk_few_blocks = 4;

typedef struct matmul_job {
    const float *x;
    int64_t M, K;
    const uint8_t *w;
    int64_t ldw, N;
    float *y;
    const int16_t *xq; /* q8_0: x quantized to int16, [M, K] */
    const float *xd;   /* q8_0: its scales, [M, K/32] */
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

/* q8_0: activations are quantized per block of 32 to int16 with a float32 scale
   (amax / 32767), so the integer dot keeps ~15 bits of x (int8 activations cost 0.1
   perplexity on SmolLM2-135M). |sum of 32 products| <= 32 * 32767 * 128 fits int32.
   Within a block the int16 values are stored even-indexed first, then odd-indexed
   (q16_pos), so the SIMD kernels sign-extend a weight block's even and odd bytes
   with shifts (no cross-lane widening on the shuffle port). */
static inline int q16_pos(int i) { return (i & 1) ? 16 + (i >> 1) : i >> 1; }

static void rows_q8_0_generic(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const int64_t K = j->K, nb = K / LK_QK8_0;
    for (int64_t r = r0; r < r1; r++) {
        const lk_block_q8_0 *w = (const lk_block_q8_0 *)(j->w + r * j->ldw);
        for (int64_t m = 0; m < j->M; m++) {
            const int16_t *xq = j->xq + m * K;
            const float *xd = j->xd + m * nb;
            float acc = 0;
            for (int64_t b = 0; b < nb; b++) {
                int32_t s = 0;
                for (int i = 0; i < LK_QK8_0; i++) s += (int32_t)w[b].qs[i] * xq[b * LK_QK8_0 + q16_pos(i)];
                acc += (float)s * (lk_f16_to_f32(rd16(&w[b].d)) * xd[b]);
            }
            j->y[m * j->N + r] = acc;
        }
    }
}

/* q8_0_r16: row r is lane r % 16 of its group's records; the same integer dots and the
   same float sequence as rows_q8_0_generic, so the same bits. */
static void rows_q8r_generic(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const int64_t K = j->K, nb = K / LK_QK8_0;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *g = j->w + (r / LK_R16_ROWS) * LK_R16_ROWS * j->ldw;
        const int l = (int)(r % LK_R16_ROWS);
        for (int64_t m = 0; m < j->M; m++) {
            const int16_t *xq = j->xq + m * K;
            const float *xd = j->xd + m * nb;
            float acc = 0;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *rec = g + b * LK_R16_RECORD;
                int32_t s = 0;
                for (int i = 0; i < 16; i++)
                    for (int e = 0; e < 2; e++)
                        s += (int32_t)(int8_t)rec[32 * i + 2 * l + e] * xq[b * LK_QK8_0 + 2 * i + e];
                acc += (float)s * (lk_f16_to_f32(rd16(rec + 512 + 2 * l)) * xd[b]);
            }
            j->y[m * j->N + r] = acc;
        }
    }
}

/* The int16 scale of one block of activations; 0 for an (almost) all-zero block, so
   1 / d never overflows. */
static inline float q16_scale(float amax) { return amax < 1e-30f ? 0.0f : amax / 32767.0f; }

static void quantize_act_generic(const float *x, int64_t K, int16_t *q, float *d) {
    for (int64_t b = 0; b < K / LK_QK8_0; b++) {
        const float *v = x + b * LK_QK8_0;
        float amax = 0;
        for (int i = 0; i < LK_QK8_0; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float s = q16_scale(amax);
        const float id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int i = 0; i < LK_QK8_0; i++) {
            float t = nearbyintf(v[i] * id);
            q[b * LK_QK8_0 + q16_pos(i)] = (int16_t)(t > 32767.0f ? 32767.0f : (t < -32767.0f ? -32767.0f : t));
        }
    }
}

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
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
/* q8_0 from this many x rows packs each weight block once for all of them (few); below,
   each x row runs mv4 (packing cost more than it saved at M = 2) */
#define Q8_FEW_MIN 3
/* q8_0 keeps streaming up to this many rows. All linears of Qwen2.5-0.5B, 2 threads, ms
   (prefill tiles -> few rows): M = 9 71 -> 54, 16 84 -> 66, 32 129 -> 105, 64 198 -> 184,
   96 283 -> 276, 128 360 -> 363. A decode batch plus a prefill slice lives in this range
   (LATTICE_Q8_FEW_ROWS: tuning only) */
#ifndef Q8_FEW_ROWS_MAX
#define Q8_FEW_ROWS_MAX 128
#endif
int lk_q8_few_rows = 64;
int lk_f_pf512 = 1; /* LATTICE_PF512=0: the AVX2 prefill for f32 / f16 with AVX-512 (A/B) */
static inline int64_t q8_few_rows(void) {
    return lk_q8_few_rows >= FEW_ROWS && lk_q8_few_rows <= Q8_FEW_ROWS_MAX ? lk_q8_few_rows : 64;
}

/* f32 / f16: every path (matvec, few rows, prefill tiles) computes a dot in the same
   order, so an output row has the same bits whatever M is (batched decode gives a request
   what it gets alone): per K slice of PF_KSLICE values, one 8-lane FMA accumulator over
   the slice's whole groups of 8, summed by the hsum8x4 tree, then the slice's last values
   (only the last slice has any) by scalar FMAs; slice sums are added to y in order. */

AVX2_INLINE float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

/* hsum8x4's sum of one vector (the same tree) */
AVX2_INLINE float hsum8t(__m256 v) { return _mm_cvtss_f32(hsum8x4(v, v, v, v)); }

/* y{0..3} = dot(x, row w + i * stride) for i = 0..3, prefetching pf bytes ahead in each */
AVX2_INLINE void mv4_float(const float *x, int64_t K, const uint8_t *w, int64_t stride,
                           int64_t pf, float *y0, float *y1, float *y2, float *y3, int fmt) {
    const uint8_t *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
    const int es = fmt == FMT_F16 ? 2 : 4;
    float out[4] = {0, 0, 0, 0};
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t k1 = K - k0 < PF_KSLICE ? K : k0 + PF_KSLICE;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) {
            if (pf >= 0 && ((k * es) & 63) == 0) {
                pf_((const char *)w0 + pf + k * es);
                pf_((const char *)w1 + pf + k * es);
                pf_((const char *)w2 + pf + k * es);
                pf_((const char *)w3 + pf + k * es);
            }
            const __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(load_w8(w0, k, fmt), xv, a0);
            a1 = _mm256_fmadd_ps(load_w8(w1, k, fmt), xv, a1);
            a2 = _mm256_fmadd_ps(load_w8(w2, k, fmt), xv, a2);
            a3 = _mm256_fmadd_ps(load_w8(w3, k, fmt), xv, a3);
        }
        float sl[4];
        _mm_storeu_ps(sl, hsum8x4(a0, a1, a2, a3));
        for (; k < k1; k++) {
            sl[0] = fma1(x[k], load_w1(w0, k, fmt), sl[0]);
            sl[1] = fma1(x[k], load_w1(w1, k, fmt), sl[1]);
            sl[2] = fma1(x[k], load_w1(w2, k, fmt), sl[2]);
            sl[3] = fma1(x[k], load_w1(w3, k, fmt), sl[3]);
        }
        for (int i = 0; i < 4; i++) out[i] = k0 ? out[i] + sl[i] : sl[i];
    }
    *y0 = out[0];
    *y1 = out[1];
    *y2 = out[2];
    *y3 = out[3];
}

AVX2_INLINE float mv1_float(const float *x, int64_t K, const uint8_t *w, int fmt) {
    float out = 0;
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t k1 = K - k0 < PF_KSLICE ? K : k0 + PF_KSLICE;
        __m256 a = _mm256_setzero_ps();
        int64_t k = k0;
        for (; k + 8 <= k1; k += 8) a = _mm256_fmadd_ps(load_w8(w, k, fmt), _mm256_loadu_ps(x + k), a);
        float sl = hsum8t(a);
        for (; k < k1; k++) sl = fma1(x[k], load_w1(w, k, fmt), sl);
        out = k0 ? out + sl : sl;
    }
    return out;
}

/* The software prefetch inside the row loops covers the next group of rows; the first
   group of a chunk has nobody ahead of it, so warm it up front. */
AVX2_INLINE void prefetch_rows(const uint8_t *w, int64_t bytes) {
    if (bytes > 16384) bytes = 16384;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)w + o, _MM_HINT_T0);
}

/* LATTICE_MV_QUARTERS=0: the four rows of mv4 adjacent (A/B; tuning only) */
int lk_mv_quarters = 1;

/* A chunk's rows as four long sequential streams: mv4 takes rows r, r + q, r + 2q, r + 3q
   (q = a quarter of the chunk), so each stream walks its quarter row after row and the
   hardware prefetcher keeps running, where four adjacent rows are four 2-4 KB streams that
   restart every group. A row's dot is the same either way (mv4 computes each row alone),
   only the grouping changes. */
AVX2_INLINE void matvec_float(const matmul_job *j, int64_t r0, int64_t r1, int fmt) {
    const int64_t ldw = j->ldw, n = r1 - r0;
    if (lk_mv_quarters) {
        const int64_t q = n / 4;
        const int64_t pf = lk_pf_dist < 0 ? -1 : lk_pf_dist == 0 ? 2 * ldw
                         : lk_pf_dist <= 64 ? lk_pf_dist * ldw : lk_pf_dist;
        for (int64_t i = 0; i < 4; i++) prefetch_rows(j->w + (r0 + i * q) * ldw, q ? ldw : 0);
        for (int64_t i = 0; i < q; i++) {
            const int64_t r = r0 + i;
            mv4_float(j->x, j->K, j->w + r * ldw, q * ldw, i + 2 < q ? pf : -1, j->y + r,
                      j->y + r + q, j->y + r + 2 * q, j->y + r + 3 * q, fmt);
        }
        for (int64_t r = r0 + 4 * q; r < r1; r++) j->y[r] = mv1_float(j->x, j->K, j->w + r * ldw, fmt);
        return;
    }
    int64_t r = r0;
    const int64_t pf = lk_pf_dist < 0 ? -1 : lk_pf_dist == 0 ? 4 * ldw : lk_pf_dist <= 64 ? lk_pf_dist * ldw : lk_pf_dist;
    prefetch_rows(j->w + r0 * ldw, (n < 4 ? n : 4) * ldw);
    for (; r + 4 <= r1; r += 4)
        mv4_float(j->x, j->K, j->w + r * ldw, ldw, pf, j->y + r, j->y + r + 1, j->y + r + 2,
                  j->y + r + 3, fmt);
    for (; r < r1; r++) j->y[r] = mv1_float(j->x, j->K, j->w + r * ldw, fmt);
}

/* Two x rows (x0, x1, may be equal) against four f32 weight rows (row stride ldwf floats)
   over one K slice of n values; y{0,1}[0..3] = (accumulate ? y + : ) the slice's dots. */
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
            s0[i] = fma1(x0[k], w[i * ldwf + k], s0[i]);
            s1[i] = fma1(x1[k], w[i * ldwf + k], s1[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        y0[i] = accumulate ? y0[i] + s0[i] : s0[i];
        if (y1 != y0) y1[i] = accumulate ? y1[i] + s1[i] : s1[i];
    }
}

/* one slice's dot, in the order above */
AVX2_INLINE float dot_f32(const float *x, const float *w, int64_t n) {
    __m256 a = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a);
    float s = hsum8t(a);
    for (; k < n; k++) s = fma1(x[k], w[k], s);
    return s;
}

/* Rows [r0, r0 + nr) of W against x rows [m0, m1), one K slice of kn values at k0 (wt:
   the slice's weights as f32, row stride ldwf); y += or = the slice's dots. */
AVX2_INLINE void slice_rows(const matmul_job *j, int64_t m0, int64_t m1, int64_t r0, int64_t nr,
                            int64_t k0, int64_t kn, const float *wt, int64_t ldwf) {
    const int64_t K = j->K, N = j->N;
    const int acc = k0 > 0;
    for (int64_t m = m0; m < m1; m += 2) {
        const float *x0 = j->x + m * K + k0;
        const float *x1 = m + 1 < m1 ? x0 + K : x0;
        float *y0 = j->y + m * N + r0;
        float *y1 = m + 1 < m1 ? y0 + N : y0;
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

/* f16 rows [r0, r0 + nr) of W, values [k0, k0 + kn), to f32 at dst (row stride PF_KSLICE),
   prefetching `pf` bytes ahead (< 0: off) */
AVX2_INLINE void f16_slice(const matmul_job *j, int64_t r0, int64_t nr, int64_t k0, int64_t kn,
                           float *dst, int64_t pf) {
    for (int64_t r = 0; r < nr; r++) {
        const uint8_t *src = j->w + (r0 + r) * j->ldw;
        float *d = dst + r * PF_KSLICE;
        int64_t k = 0;
        for (; k + 8 <= kn; k += 8) {
            if (pf >= 0 && (k & 31) == 0) pf_(src + pf + 2 * (k0 + k));
            _mm256_storeu_ps(d + k, load_w8(src, k0 + k, FMT_F16));
        }
        for (; k < kn; k++) d[k] = load_w1(src, k0 + k, FMT_F16);
    }
}

/* Prefill for float formats: rows [r0, r1) of W against all M rows of x. */
AVX2_INLINE void matmul_float_tiled(const matmul_job *j, int64_t r0, int64_t r1, int ith,
                                    int fmt) {
    const int64_t K = j->K, nr = r1 - r0;
    float *tile = NULL;
    if (fmt == FMT_F16) tile = (float *)lk_scratch(ith, (size_t)nr * PF_KSLICE * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
        if (fmt == FMT_F16) {
            /* convert this slice of the chunk's rows once; every x row reuses it */
            f16_slice(j, r0, nr, k0, kn, tile, -1);
            slice_rows(j, 0, j->M, r0, nr, k0, kn, tile, PF_KSLICE);
        } else {
            slice_rows(j, 0, j->M, r0, nr, k0, kn, (const float *)(j->w + r0 * j->ldw) + k0,
                       j->ldw / (int64_t)sizeof(float));
        }
    }
}

/* A few x rows (batched decode, speculative verification): still bound by streaming the
   weights, so walk them like the matvec, four rows at a time with the next four
   prefetched, converted to an f32 tile once (all of K when four rows of it fit ~32 KiB,
   else one K slice at a time: measured faster both ways), and run every x row over it. */
#define FEW_SPAN(K) ((K) <= 2048 ? (K) : PF_KSLICE)
AVX2_INLINE void matmul_float_few(const matmul_job *j, int64_t r0, int64_t r1, int ith, int fmt) {
    const int64_t K = j->K, ldw = j->ldw, span = FEW_SPAN(K);
    float *tile = (float *)lk_scratch(ith, (size_t)4 * span * sizeof(float));
    const int es = fmt == FMT_F16 ? 2 : 4;
    prefetch_rows(j->w + r0 * ldw, (r1 - r0 < 4 ? r1 - r0 : 4) * ldw);
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t nr = r1 - r < 4 ? r1 - r : 4;
        for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
            const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
            if (k0 % span == 0) {
                /* the group's next span of values as f32 (f16 converted once; f32
                   copied), prefetching the next group as it streams; row stride span */
                const int64_t sn = K - k0 < span ? K - k0 : span;
                for (int64_t i = 0; i < nr; i++) {
                    const uint8_t *src = j->w + (r + i) * ldw;
                    float *dst = tile + i * span;
                    int64_t k = 0;
                    for (; k + 8 <= sn; k += 8) {
                        if (((k0 + k) * es & 63) == 0) pf_(src + 4 * ldw + (k0 + k) * es);
                        _mm256_storeu_ps(dst + k, load_w8(src, k0 + k, fmt));
                    }
                    for (; k < sn; k++) dst[k] = load_w1(src, k0 + k, fmt);
                }
            }
            slice_rows(j, 0, j->M, r, nr, k0, kn, tile + k0 % span, span);
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

/* f32 / f16, a few x rows, with 512-bit FMAs (run when the AVX-512 variant is active):
   the same dot order as above, each zmm accumulator holding two weight rows' 8-lane
   accumulators side by side (x broadcast to both halves), so a row gets the bits the
   AVX2 kernels give it while one FMA does the work of two. Four weight rows at a time,
   converted (as in matmul_float_few) into an f32 tile interleaved by 8 ([k / 8][row][8]: rows
   0-1 and 2-3 are one zmm load each), against all MR (= M) x rows held in registers. */
#define AVX512F_TARGET __attribute__((target("avx2,fma,f16c,avx512f")))
#define AVX512F_INLINE AVX512F_TARGET __attribute__((always_inline)) static inline

AVX512F_INLINE __m256 hi256(__m512 v) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

/* rows r, r + rs, r + 2 rs, r + 3 rs, slice [k0, k0 + kn): y += or = the slice's dots for x
   rows 0 .. MR-1 */
AVX512F_INLINE void few512_slice(const matmul_job *j, int64_t m0, int64_t r, int64_t rs,
                                 int64_t k0, int64_t kn, const float *tile, int fmt,
                                 const int MR) {
    const int64_t K = j->K, N = j->N, kn8 = kn & ~(int64_t)7;
    const float *const xm = j->x + m0 * K;
    float *const ym = j->y + m0 * N;
    __m512 acc[FEW_ROWS][2];
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kn8; k += 8) {
        const __m512 w01 = _mm512_load_ps(tile + 4 * k), w23 = _mm512_load_ps(tile + 4 * k + 16);
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            const __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(
                _mm256_castps_pd(_mm256_loadu_ps(xm + m * K + k0 + k))));
            acc[m][0] = _mm512_fmadd_ps(xv, w01, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xv, w23, acc[m][1]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
        float sl[4];
        _mm_storeu_ps(sl, hsum8x4(_mm512_castps512_ps256(acc[m][0]), hi256(acc[m][0]),
                                  _mm512_castps512_ps256(acc[m][1]), hi256(acc[m][1])));
        const float *x = xm + m * K + k0;
        for (int64_t k = kn8; k < kn; k++)
            for (int i = 0; i < 4; i++)
                sl[i] = fma1(x[k], load_w1(j->w + (r + i * rs) * j->ldw, k0 + k, fmt), sl[i]);
        float *y = ym + m * N + r;
        for (int i = 0; i < 4; i++) y[i * rs] = k0 ? y[i * rs] + sl[i] : sl[i];
    }
}

/* Values [k0, k0 + s8) (s8 a multiple of 8) of the four rows src[0..3] as f32 into the tile
   few512_slice reads ([k / 8][row][8]): 16 values of each row at a time, converted with
   one 512-bit instruction and paired by 128-bit lane shuffles (half the conversions and
   stores of a row-by-row 8-value loop, which was a third of the M = 8 f16 time).
   Prefetches pfd bytes ahead in every row when pfd >= 0. */
AVX512F_INLINE void few512_tile(const uint8_t *const *src, int64_t k0, int64_t s8, float *tile,
                                int fmt, int64_t pfd) {
    const int es = fmt == FMT_F16 ? 2 : 4;
    int64_t k = 0;
    for (; k + 16 <= s8; k += 16) {
        __m512 v[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const uint8_t *p = src[i] + (k0 + k) * es;
            if (pfd >= 0 && ((k0 + k) * es & 63) == 0) pf_(p + pfd);
            v[i] = fmt == FMT_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))
                                  : _mm512_loadu_ps((const float *)p);
        }
        _mm512_store_ps(tile + 4 * k, _mm512_shuffle_f32x4(v[0], v[1], 0x44));
        _mm512_store_ps(tile + 4 * k + 16, _mm512_shuffle_f32x4(v[2], v[3], 0x44));
        _mm512_store_ps(tile + 4 * k + 32, _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
        _mm512_store_ps(tile + 4 * k + 48, _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
    }
    for (; k < s8; k += 8)
        for (int i = 0; i < 4; i++) {
            if (pfd >= 0 && ((k0 + k) * es & 63) == 0) pf_(src[i] + pfd + (k0 + k) * es);
            _mm256_store_ps(tile + 4 * k + 8 * i, load_w8(src[i], k0 + k, fmt));
        }
}

/* The tile holds one K slice of the four rows (4 KiB), converted slice by slice: a tile of
   all of K (16 KiB at K = 1024) next to eight x rows (32 KiB) overflowed L1, and x came
   back from L2 for every group of rows (f16 [248320 x 1024], M = 2 / 4 / 8: 21.8 / 25.2 /
   39 ms -> 17.4 / 18.8 / 29-32). */
AVX512F_INLINE void few512(const matmul_job *j, int64_t r0, int64_t r1, int ith, int fmt) {
    const int64_t K = j->K, ldw = j->ldw;
    float *tile = (float *)lk_scratch(ith, (size_t)4 * PF_KSLICE * sizeof(float));
    /* the four rows a quarter of the chunk apart, as matvec_float: four long streams */
    const int64_t q = (r1 - r0) / 4, rs = lk_mv_quarters ? q : 1;
    for (int64_t i = 0; i < 4; i++) prefetch_rows(j->w + (r0 + i * rs) * ldw, q ? ldw : 0);
    for (int64_t gi = 0; gi < q; gi++) {
        const int64_t r = lk_mv_quarters ? r0 + gi : r0 + 4 * gi;
        for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
            const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
            const int64_t pfd = gi + 2 >= q ? -1 /* the stream's next rows */
                              : lk_mv_quarters ? 2 * ldw : 4 * ldw;
            const uint8_t *src[4] = {j->w + r * ldw, j->w + (r + rs) * ldw,
                                     j->w + (r + 2 * rs) * ldw, j->w + (r + 3 * rs) * ldw};
            few512_tile(src, k0, kn & ~(int64_t)7, tile, fmt, pfd);
            switch (j->M) {
            case 2: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 2); break;
            case 3: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 3); break;
            case 4: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 4); break;
            case 5: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 5); break;
            case 6: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 6); break;
            case 7: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 7); break;
            default: few512_slice(j, 0, r, rs, k0, kn, tile, fmt, 8); break;
            }
        }
    }
    const int64_t r = r0 + 4 * q;
    if (r < r1) { /* the chunk's last 1-3 rows: the AVX2 path (same bits) */
        float *rt = tile;
        for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
            const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
            if (fmt == FMT_F16) {
                f16_slice(j, r, r1 - r, k0, kn, rt, -1);
                slice_rows(j, 0, j->M, r, r1 - r, k0, kn, rt, PF_KSLICE);
            } else {
                slice_rows(j, 0, j->M, r, r1 - r, k0, kn, (const float *)(j->w + r * ldw) + k0,
                           ldw / (int64_t)sizeof(float));
            }
        }
    }
}

/* Prefill (M > FEW_ROWS) with 512-bit FMAs: per K slice, the chunk's weight rows (up to
   PF_ROWS) are converted once into f32 tiles interleaved by 8 as few512 lays them out, four
   rows per tile, and every group of eight x rows passes over all of them (x stays in L1
   across the chunk's rows). The micro-kernel is few512_slice, so a row gets the bits of
   the AVX2 kernels; the chunk's last 1-3 rows (N not a multiple of 4) take slice_rows. */
AVX512F_INLINE void prefill512(const matmul_job *j, int64_t r0, int64_t r1, int ith, int fmt) {
    const int64_t K = j->K, M = j->M, ldw = j->ldw, nr4 = (r1 - r0) & ~(int64_t)3;
    float *tile = (float *)lk_scratch(ith, (size_t)(r1 - r0 + 3) * PF_KSLICE * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE, kn8 = kn & ~(int64_t)7;
        for (int64_t g = 0; g < nr4; g += 4)
            for (int i = 0; i < 4; i++) {
                const uint8_t *src = j->w + (r0 + g + i) * ldw;
                float *dst = tile + g * PF_KSLICE + 8 * i;
                for (int64_t k = 0; k < kn8; k += 8)
                    _mm256_store_ps(dst + 4 * k, load_w8(src, k0 + k, fmt));
            }
        for (int64_t m0 = 0; m0 < M; m0 += FEW_ROWS) {
            const int64_t mr = M - m0 < FEW_ROWS ? M - m0 : FEW_ROWS;
            for (int64_t g = 0; g < nr4; g += 4) {
                const float *t = tile + g * PF_KSLICE;
                if (mr == FEW_ROWS) few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, FEW_ROWS);
                else switch (mr) {
                case 1: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 1); break;
                case 2: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 2); break;
                case 3: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 3); break;
                case 4: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 4); break;
                case 5: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 5); break;
                case 6: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 6); break;
                default: few512_slice(j, m0, r0 + g, 1, k0, kn, t, fmt, 7); break;
                }
            }
        }
        if (nr4 < r1 - r0) { /* the chunk's last rows: the AVX2 micro-kernels, same bits */
            const int64_t rt = r0 + nr4, nt = r1 - rt;
            if (fmt == FMT_F16) {
                float *ft = tile + nr4 * PF_KSLICE;
                f16_slice(j, rt, nt, k0, kn, ft, -1);
                slice_rows(j, 0, M, rt, nt, k0, kn, ft, PF_KSLICE);
            } else {
                slice_rows(j, 0, M, rt, nt, k0, kn, (const float *)(j->w + rt * ldw) + k0,
                           ldw / (int64_t)sizeof(float));
            }
        }
    }
}

AVX512F_TARGET static void rows_f32_pf512(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    prefill512(j, r0, r1, ith, FMT_F32);
}

AVX512F_TARGET static void rows_f16_pf512(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    prefill512(j, r0, r1, ith, FMT_F16);
}

AVX512F_TARGET static void rows_f32_few512(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    few512(j, r0, r1, ith, FMT_F32);
}

AVX512F_TARGET static void rows_f16_few512(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    few512(j, r0, r1, ith, FMT_F16);
}

/* ---- q8_0 ---- */

AVX2_INLINE float f16s(const lk_block_q8_0 *b) { return _cvtsh_ss(rd16(&b->d)); }

/* Same arithmetic as quantize_act_generic (bit for bit: cvtps rounds half to even). */
LK_AVX2_TARGET static void quantize_act_avx2(const float *x, int64_t K, int16_t *q, float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < K / LK_QK8_0; b++) {
        const float *v = x + b * LK_QK8_0;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        const float s = q16_scale(lk_hmax8_avx2(m));
        const float id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        const __m256 vs = _mm256_set1_ps(id);
        const __m256i lo = _mm256_set1_epi16(-32767);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vs));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vs));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vs));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vs));
        /* packs works per 128-bit lane: put the 64-bit quarters back in order */
        __m256i p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8); /* 0..15 */
        __m256i p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8); /* 16..31 */
        p0 = _mm256_max_epi16(p0, lo);
        p1 = _mm256_max_epi16(p1, lo);
        /* even values, then odd ones (q16_pos) */
        __m256i e = _mm256_packs_epi32(_mm256_srai_epi32(_mm256_slli_epi32(p0, 16), 16),
                                       _mm256_srai_epi32(_mm256_slli_epi32(p1, 16), 16));
        __m256i o = _mm256_packs_epi32(_mm256_srai_epi32(p0, 16), _mm256_srai_epi32(p1, 16));
        _mm256_storeu_si256((__m256i *)(q + b * LK_QK8_0), _mm256_permute4x64_epi64(e, 0xD8));
        _mm256_storeu_si256((__m256i *)(q + b * LK_QK8_0 + 16), _mm256_permute4x64_epi64(o, 0xD8));
    }
}

/* The q8_0 kernels proper are written once, below the main part of this file, and
   compiled once per variant: AVX2 (madd + add), AVX-VNNI (vpdpwssd, 256-bit) and
   AVX512-VNNI (256-bit vpdpwssd for decode, 512-bit prefill). */
#define LK_Q8_TEMPLATE 1
#define Q8_TARGET LK_AVX2_TARGET
#define Q8_VNNI 0
#define Q8_NAME(n) n##_avx2
#include "matmul.c"
#undef Q8_TARGET
#undef Q8_VNNI
#undef Q8_NAME
#define Q8_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define Q8_VNNI 1
#define Q8_NAME(n) n##_avxvnni
#include "matmul.c"
#undef Q8_TARGET
#undef Q8_VNNI
#undef Q8_NAME
#define Q8_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define Q8_VNNI 2
#define Q8_NAME(n) n##_avx512vnni
#include "matmul.c"
#undef Q8_TARGET
#undef Q8_VNNI
#undef Q8_NAME
#undef LK_Q8_TEMPLATE

#endif /* LK_X86 */

/* ---- dispatch ---------------------------------------------------------------------- */

/* q8_0 kernel variants beyond the ISA level of runtime.c; picked once (the best the
   CPU has, or LATTICE_Q8=avx2|avxvnni|avx512vnni), used while the active ISA is AVX2. */
enum { Q8_V_AVX2, Q8_V_AVXVNNI, Q8_V_AVX512VNNI, Q8_V_COUNT };
static const char *const q8_names[Q8_V_COUNT] = {"avx2", "avxvnni", "avx512vnni"};
static int q8_mask = -1; /* bit v: the CPU runs variant v */
static int q8_active = Q8_V_AVX2;

static void q8_detect(void) {
    if (q8_mask >= 0) return;
    int mask = 0;
    const uint32_t f = lk_cpu_features();
    const uint32_t avx2 = LK_CPU_AVX2 | LK_CPU_FMA | LK_CPU_F16C;
    const uint32_t avx512vnni = LK_CPU_AVX512F | LK_CPU_AVX512BW | LK_CPU_AVX512VL |
                                LK_CPU_AVX512VNNI;
    if ((f & avx2) == avx2) {
        mask |= 1 << Q8_V_AVX2;
        if (f & LK_CPU_AVXVNNI) mask |= 1 << Q8_V_AVXVNNI;
        if ((f & avx512vnni) == avx512vnni) mask |= 1 << Q8_V_AVX512VNNI;
    }
    int best = Q8_V_AVX2;
    for (int v = Q8_V_AVX2; v < Q8_V_COUNT; v++)
        if (mask & (1 << v)) best = v;
    const char *force = getenv("LATTICE_Q8");
    for (int v = 0; force && v < Q8_V_COUNT; v++)
        if (strcmp(force, q8_names[v]) == 0 && (mask & (1 << v))) best = v;
    q8_active = best;
    q8_mask = mask;
}

int lk_q8_variant(int v) {
    lk_init();
    lk_lock();
    q8_detect();
    if (v >= 0 && v < Q8_V_COUNT && (q8_mask & (1 << v))) q8_active = v;
    v = q8_active;
    lk_unlock();
    return v;
}

const char *lk_q8_variant_name(int v) { return v >= 0 && v < Q8_V_COUNT ? q8_names[v] : NULL; }

static void quantize_act(const float *x, int64_t K, int16_t *q, float *d) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        quantize_act_avx2(x, K, q, d);
        return;
    }
#endif
    quantize_act_generic(x, K, q, d);
}

void lk_quantize_row_q16_act(const float *x, int64_t K, int16_t *q, float *d) {
    lk_init();
    quantize_act(x, K, q, d);
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
    int16_t *xq;
    float *xd;
} quant_job;

static void quant_task(void *vctx, int64_t m, int ith) {
    (void)ith;
    quant_job *q = (quant_job *)vctx;
    const int64_t nb = q->K / LK_QK8_0;
    quantize_act(q->x + m * q->K, q->K, q->xq + m * q->K, q->xd + m * nb);
}

/* Decode chunks per thread and matrix (LATTICE_CHUNKS overrides it; tuning only). */
int lk_chunks_per_thread = 4;

/* Output rows per task for a matrix of N rows of ldw bytes. */
static int64_t chunk_rows(int fmt, int64_t M, int64_t N, int64_t ldw, int nth) {
    int64_t chunk;
    const int q8 = fmt == FMT_Q8_0 || fmt == FMT_Q8_0_R16;
    if (M <= (q8 ? q8_few_rows() : FEW_ROWS)) {
        /* a few chunks per thread for balance, but at least ~64 KiB of weights each; more,
           smaller chunks measured slower (each restarts the prefetch streams) */
        int64_t target = (int64_t)nth * lk_chunks_per_thread;
        int64_t by_bytes = (N * ldw) / (64 * 1024);
        if (by_bytes < target) target = by_bytes > nth ? by_bytes : nth;
        chunk = (N + target - 1) / target;
        chunk = (chunk + 3) & ~(int64_t)3;
    } else {
        chunk = q8 ? PF_Q8_ROWS : PF_ROWS;
    }
    if (fmt == FMT_Q8_0_R16) /* whole pairs of 16-row groups (the 512-bit kernel's unit) */
        return (chunk + 2 * LK_R16_ROWS - 1) / (2 * LK_R16_ROWS) * (2 * LK_R16_ROWS);
    return chunk < 4 ? 4 : chunk;
}

typedef struct {
    matmul_job *jobs;
    int n;
    int64_t first[LK_MATMUL_MULTI_MAX + 1]; /* first task of each job; first[n] = total */
} multi_job;

static void multi_task(void *vctx, int64_t c, int ith) {
    multi_job *mj = (multi_job *)vctx;
    int i = 0;
    while (c >= mj->first[i + 1]) i++;
    matmul_task(&mj->jobs[i], c - mj->first[i], ith);
}

/* y_i = x @ W_i^T for n matrices of one format and one K, as one parallel job: x is
   quantized once and the threads take row chunks of all n in turn, so decode pays one
   wake-up and one activation quantization for q/k/v (or gate/up) instead of three. */
static void run_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                             const void *const *w, const int64_t *ldw, const int64_t *N,
                             float *const *y) {
    if (M <= 0 || n <= 0) return;
    lk_lock();
    const int avx2 = LK_X86 && lk_active_isa == LK_ISA_AVX2;
    const int16_t *xq = NULL;
    const float *xd = NULL;
    q8_detect();
    if (fmt == FMT_Q8_0 || fmt == FMT_Q8_0_R16) {
        /* x as int16 [M, K] (64 bytes per block, so the scales after it stay aligned)
           and its scales float [M, K/32] */
        const int64_t nb = K / LK_QK8_0;
        uint8_t *buf = (uint8_t *)lk_shared_scratch((size_t)(M * K) * 2 + (size_t)(M * nb) * 4);
        quant_job q = {x, M, K, (int16_t *)buf, (float *)(buf + (size_t)(M * K) * 2)};
        if (M == 1) quant_task(&q, 0, 0);
        else lk_parallel(quant_task, &q, M);
        xq = q.xq;
        xd = q.xd;
    }
    void (*rows)(const matmul_job *, int64_t, int64_t, int);
#if LK_X86
    if (avx2) {
        const int few512 = M >= 2 && M <= FEW_ROWS && q8_active == Q8_V_AVX512VNNI;
        const int pf512 = M > FEW_ROWS && q8_active == Q8_V_AVX512VNNI && lk_f_pf512;
        if (fmt == FMT_F32) rows = few512 ? rows_f32_few512 : pf512 ? rows_f32_pf512 : rows_f32_avx2;
        else if (fmt == FMT_F16) rows = few512 ? rows_f16_few512 : pf512 ? rows_f16_pf512 : rows_f16_avx2;
        else if (fmt == FMT_Q8_0_R16)
            rows = q8_active == Q8_V_AVX512VNNI ? rows_q8r_avx512vnni
                 : q8_active == Q8_V_AVXVNNI ? rows_q8r_avxvnni : rows_q8r_avx2;
        else if (q8_active == Q8_V_AVX512VNNI) rows = rows_q8_0_avx512vnni;
        else if (q8_active == Q8_V_AVXVNNI) rows = rows_q8_0_avxvnni;
        else rows = rows_q8_0_avx2;
    } else
#endif
        rows = fmt == FMT_F32 ? rows_f32_generic : fmt == FMT_F16 ? rows_f16_generic
             : fmt == FMT_Q8_0_R16 ? rows_q8r_generic : rows_q8_0_generic;
    (void)avx2;
    const int nth = lk_threads_locked();
    matmul_job jobs[LK_MATMUL_MULTI_MAX];
    multi_job mj = {jobs, 0, {0}};
    for (int i = 0; i < n; i++) {
        if (N[i] <= 0) continue;
        matmul_job *j = &jobs[mj.n];
        j->x = x;
        j->M = M;
        j->K = K;
        j->w = (const uint8_t *)w[i];
        j->ldw = ldw[i];
        j->N = N[i];
        j->y = y[i];
        j->xq = xq;
        j->xd = xd;
        j->rows = rows;
        j->chunk = chunk_rows(fmt, M, N[i], ldw[i], nth);
        j->nchunks = (N[i] + j->chunk - 1) / j->chunk;
        mj.first[mj.n + 1] = mj.first[mj.n] + j->nchunks;
        mj.n++;
    }
    if (mj.n == 1) lk_parallel(matmul_task, &jobs[0], jobs[0].nchunks);
    else if (mj.n > 1) lk_parallel(multi_task, &mj, mj.first[mj.n]);
    lk_unlock();
}

static void run_matmul(int fmt, const float *x, int64_t M, int64_t K, const void *w,
                       int64_t ldw, int64_t N, float *y) {
    run_matmul_multi(fmt, x, M, K, 1, &w, &ldw, &N, &y);
}

int lk_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                    const void *const *w, const int64_t *ldw, const int64_t *N,
                    float *const *y) {
    if (fmt < LK_FMT_F32 || fmt > LK_FMT_Q8_0_R16 || n < 0 || n > LK_MATMUL_MULTI_MAX) return -1;
    if ((fmt == LK_FMT_Q8_0 || fmt == LK_FMT_Q8_0_R16) && K % LK_QK8_0) return -1;
    if (fmt == LK_FMT_Q8_0_R16)
        for (int i = 0; i < n; i++)
            if (N[i] % LK_R16_ROWS || ldw[i] != K / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0)) return -1;
    run_matmul_multi(fmt, x, M, K, n, w, ldw, N, y);
    return 0;
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

void lk_matmul_q8_0_r16(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw,
                        int64_t N, float *y) {
    run_matmul(FMT_Q8_0_R16, x, M, K, w, ldw, N, y);
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

int lk_embed_q8_0_r16(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                      int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    const int64_t nb = K / LK_QK8_0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *g = (const uint8_t *)w + ids[i] / LK_R16_ROWS * LK_R16_ROWS * ldw;
        const int l = (int)(ids[i] % LK_R16_ROWS);
        float *dst = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *rec = g + b * LK_R16_RECORD;
            const float d = lk_f16_to_f32(rd16(rec + 512 + 2 * l));
            for (int p = 0; p < 16; p++)
                for (int e = 0; e < 2; e++)
                    dst[b * LK_QK8_0 + lk_r16_value(p, e)] = d * (float)(int8_t)rec[32 * p + 2 * l + e];
        }
    }
    return 0;
}

/* ---- layout conversion q8_0 <-> q8_0_r16 --------------------------------------------- */

/* One group at a time through a copy of it, so src may be dst (in place: a group holds
   the same bytes in either layout). */
static int r16_convert(const uint8_t *src, int64_t rows, int64_t K, uint8_t *dst, int to_r16) {
    if (rows < 0 || rows % LK_R16_ROWS || K < 0 || K % LK_QK8_0) return -1;
    const int64_t nb = K / LK_QK8_0, ldw = nb * (int64_t)sizeof(lk_block_q8_0);
    const int64_t gbytes = LK_R16_ROWS * ldw;
    uint8_t *tmp = (uint8_t *)malloc(gbytes > 0 ? (size_t)gbytes : 1);
    if (!tmp) return -1;
    for (int64_t g0 = 0; g0 < rows; g0 += LK_R16_ROWS) {
        memcpy(tmp, src + g0 * ldw, (size_t)gbytes);
        uint8_t *out = dst + g0 * ldw;
        for (int l = 0; l < LK_R16_ROWS; l++)
            for (int64_t b = 0; b < nb; b++) {
                const int64_t rec = b * LK_R16_RECORD, blk = l * ldw + b * (int64_t)sizeof(lk_block_q8_0);
                for (int p = 0; p < 16; p++)
                    for (int e = 0; e < 2; e++) {
                        const int64_t a = rec + 32 * p + 2 * l + e, q = blk + 2 + lk_r16_value(p, e);
                        out[to_r16 ? a : q] = tmp[to_r16 ? q : a];
                    }
                const int64_t da = rec + 512 + 2 * l;
                memcpy(out + (to_r16 ? da : blk), tmp + (to_r16 ? blk : da), 2);
            }
    }
    free(tmp);
    return 0;
}

int lk_q8_0_to_r16(const void *src, int64_t rows, int64_t K, void *dst) {
    return r16_convert((const uint8_t *)src, rows, K, (uint8_t *)dst, 1);
}

int lk_r16_to_q8_0(const void *src, int64_t rows, int64_t K, void *dst) {
    return r16_convert((const uint8_t *)src, rows, K, (uint8_t *)dst, 0);
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

#else /* LK_Q8_TEMPLATE */
/* ---- q8_0 kernels for one x86 variant ----------------------------------------------
 * Included by the main part above once per variant, with Q8_NAME (a suffix), Q8_TARGET
 * (its target attribute) and Q8_VNNI (0: AVX2 madd + add, 1: AVX-VNNI, 2: AVX512-VNNI).
 * x arrives as int16 [M, K] with float scales [M, K/32]; each block's integer dot is
 * exact in int32, then one FMA per block applies d_w * d_x.
 */
#define Q8_INLINE Q8_TARGET __attribute__((always_inline)) static inline

/* acc + pairwise sums of the int16 products a * b, 8 int32 lanes */
Q8_INLINE __m256i Q8_NAME(dot16)(__m256i acc, __m256i a, __m256i b) {
#if Q8_VNNI == 1
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#elif Q8_VNNI == 2
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* 8 int32 partial sums of one block: int8 weights wq times x0 (the block's even values)
   and x1 (odd ones). An arithmetic shift of each 16-bit lane sign-extends its odd byte;
   the same load one byte earlier puts the even bytes there (wq - 1 is the high byte of
   the block's scale, inside the block), so two loads and two shifts widen the block. */
Q8_INLINE __m256i Q8_NAME(blk)(const int8_t *wq, __m256i x0, __m256i x1) {
    __m256i wa = _mm256_loadu_si256((const __m256i *)(wq - 1));
    __m256i wb = _mm256_loadu_si256((const __m256i *)wq);
    /* keep the loads in registers: with AVX-512 enabled gcc folds them into the shifts */
    __asm__("" : "+x"(wa), "+x"(wb));
    const __m256i we = _mm256_srai_epi16(wa, 8);
    const __m256i wo = _mm256_srai_epi16(wb, 8);
    return Q8_NAME(dot16)(_mm256_madd_epi16(we, x0), wo, x1);
}

/* y[0..3] for four q8_0 rows. The rows' int32 partial sums are folded into one vector
   per block by horizontal adds, so the int->float conversion, the scale multiply and
   the FMA run once per block for all four rows. The weights of the next four rows are
   prefetched as these stream. */
Q8_INLINE void Q8_NAME(mv4)(const int16_t *xq, const float *xd, int64_t nb, const uint8_t *w,
                            int64_t ldw, float *y) {
    const lk_block_q8_0 *w0 = (const lk_block_q8_0 *)w;
    const lk_block_q8_0 *w1 = (const lk_block_q8_0 *)(w + ldw);
    const lk_block_q8_0 *w2 = (const lk_block_q8_0 *)(w + 2 * ldw);
    const lk_block_q8_0 *w3 = (const lk_block_q8_0 *)(w + 3 * ldw);
    __m128 acc = _mm_setzero_ps();
    const int64_t pf = lk_pf_dist < 0 ? -1 : lk_pf_dist == 0 ? 4 * ldw : lk_pf_dist <= 64 ? lk_pf_dist * ldw : lk_pf_dist;
    for (int64_t b = 0; b < nb; b++) {
        if (pf >= 0) {
            pf_((const char *)&w0[b] + pf);
            pf_((const char *)&w1[b] + pf);
            pf_((const char *)&w2[b] + pf);
            pf_((const char *)&w3[b] + pf);
        }
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b + 16));
        __m256i p0 = Q8_NAME(blk)(w0[b].qs, x0, x1);
        __m256i p1 = Q8_NAME(blk)(w1[b].qs, x0, x1);
        __m256i p2 = Q8_NAME(blk)(w2[b].qs, x0, x1);
        __m256i p3 = Q8_NAME(blk)(w3[b].qs, x0, x1);
        /* lanes: [r0 r1 r2 r3 | r0 r1 r2 r3], each a partial sum of that row's block */
        __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        /* the four half scales meet in a general register: one move to the vector unit
           instead of three inserts on the shuffle port */
        const uint64_t dd = rd16(&w0[b].d) | (uint64_t)rd16(&w1[b].d) << 16 |
                            (uint64_t)rd16(&w2[b].d) << 32 | (uint64_t)rd16(&w3[b].d) << 48;
        __m128 d4 = _mm_mul_ps(_mm_cvtph_ps(_mm_set_epi64x(0, (long long)dd)), _mm_set1_ps(xd[b]));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), d4, acc);
    }
    _mm_storeu_ps(y, acc);
}


/* One row, for a chunk's last rows: the same arithmetic as mv4 (each block's exact int32
   dot, then acc = fma(dot, d_w * d_x, acc)), so a row gets the same bits whichever kernel
   computes it. */
Q8_INLINE float Q8_NAME(mv1)(const int16_t *xq, const float *xd, int64_t nb, const uint8_t *w) {
    const lk_block_q8_0 *w0 = (const lk_block_q8_0 *)w;
    __m128 acc = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32 * b + 16));
        const __m256i p = Q8_NAME(blk)(w0[b].qs, x0, x1);
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        const __m128 d = _mm_mul_ss(_mm_set_ss(f16s(&w0[b])), _mm_set_ss(xd[b]));
        acc = _mm_fmadd_ss(_mm_cvtepi32_ps(s), d, acc);
    }
    return _mm_cvtss_f32(acc);
}

/* Packs 8 q8_0 rows (row jj's block b0 at rows[jj]; rows past the matrix point at zero
   blocks) for blocks [b0, b0 + bn) into the layout the micro-kernels mk read, at lanes
   lane0 .. lane0 + 7 of groups of nv lanes (t, sc point at lane0). Per group and block:
   16 vectors of nv int32 lanes, lane jj of vector i holding the int16 pair of row jj that
   meets x's int16 dword i (q16_pos order: values 4i, 4i + 2 for i < 8, else
   4(i - 8) + 1, + 3), so one broadcast x pair times one vector gives nv rows' partial
   dots with no horizontal sums; then nv float scales. per block, the even and odd values of each row are
   sign-extended to int16 as in blk (their dwords are exactly the pairs x's dwords meet),
   then an 8 x 8 dword transpose puts the rows in lanes. pf: bytes ahead to prefetch
   (the next group of rows), or < 0. */
Q8_INLINE void Q8_NAME(pack8)(const uint8_t *const *rows, int64_t bn, int nv,
                              int32_t *t, float *sc, int64_t pf) {
    for (int64_t b = 0; b < bn; b++) {
        __m256i e[8], o[8];
        uint64_t dlo = 0, dhi = 0; /* the half scales meet in general registers (no
                                      store-forwarding stall of 2-byte stores into a load) */
#pragma GCC unroll 8
        for (int jj = 0; jj < 8; jj++) {
            const lk_block_q8_0 *blk = (const lk_block_q8_0 *)rows[jj] + b;
            if (pf >= 0 && (b & 1) == 0) pf_((const char *)blk + pf);
            __m256i wa = _mm256_loadu_si256((const __m256i *)(blk->qs - 1));
            __m256i wb = _mm256_loadu_si256((const __m256i *)blk->qs);
            __asm__("" : "+x"(wa), "+x"(wb));
            e[jj] = _mm256_srai_epi16(wa, 8);
            o[jj] = _mm256_srai_epi16(wb, 8);
            if (jj < 4) dlo |= (uint64_t)rd16(&blk->d) << (16 * jj);
            else dhi |= (uint64_t)rd16(&blk->d) << (16 * (jj - 4));
        }
        int32_t *tb = t + b * 16 * nv;
        for (int h = 0; h < 2; h++) {
            __m256i *r = h ? o : e;
            lk_transpose8x8_avx2(r);
            __m256i *v = (__m256i *)(tb + 8 * h * nv);
            const int s = nv / 8; /* vectors per packed dword position */
            for (int i = 0; i < 8; i++) _mm256_store_si256(v + i * s, r[i]);
        }
        _mm256_store_ps(sc + b * nv, _mm256_cvtph_ps(_mm_set_epi64x((long long)dhi, (long long)dlo)));
    }
}

#if Q8_VNNI == 2
/* Prefill micro-kernel, 512-bit: Q8_MR x rows (xr, scales xs, at the slice start)
   against Q8_NRV packed rows (two groups of 16) over bn blocks -> out[Q8_MR][Q8_NRV]. */
#define Q8_MR 4
#define Q8_NV 16
#define Q8_NRV 32
Q8_INLINE void Q8_NAME(mk)(const int16_t *const *xr, const float *const *xs, const int32_t *t,
                           const float *sc, int64_t bn, float *out, int acc) {
    const int32_t *t1 = t + bn * 16 * 16;
    const float *sc1 = sc + bn * 16;
    __m512 f[Q8_MR][2];
#pragma GCC unroll 4
    for (int m = 0; m < Q8_MR; m++) {
        f[m][0] = acc ? _mm512_load_ps(out + m * Q8_NRV) : _mm512_setzero_ps();
        f[m][1] = acc ? _mm512_load_ps(out + m * Q8_NRV + 16) : _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < bn; b++) {
        const __m512i *wa = (const __m512i *)(t + b * 256), *wb = (const __m512i *)(t1 + b * 256);
        __m512i a[Q8_MR][2];
#pragma GCC unroll 4
        for (int m = 0; m < Q8_MR; m++) a[m][0] = a[m][1] = _mm512_setzero_si512();
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            const __m512i v0 = _mm512_load_si512(wa + i), v1 = _mm512_load_si512(wb + i);
#pragma GCC unroll 4
            for (int m = 0; m < Q8_MR; m++) {
                const __m512i xv = _mm512_set1_epi32(ld32(xr[m] + 32 * b + 2 * i));
                a[m][0] = _mm512_dpwssd_epi32(a[m][0], v0, xv);
                a[m][1] = _mm512_dpwssd_epi32(a[m][1], v1, xv);
            }
        }
        const __m512 s0 = _mm512_load_ps(sc + 16 * b), s1 = _mm512_load_ps(sc1 + 16 * b);
#pragma GCC unroll 4
        for (int m = 0; m < Q8_MR; m++) {
            const __m512 e = _mm512_set1_ps(xs[m][b]);
            f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(s0, e), f[m][0]);
            f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(s1, e), f[m][1]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < Q8_MR; m++) {
        _mm512_store_ps(out + m * Q8_NRV, f[m][0]);
        _mm512_store_ps(out + m * Q8_NRV + 16, f[m][1]);
    }
}
#else
/* Prefill micro-kernel, 256-bit: two x rows against 16 packed rows (two groups of 8);
   two accumulator sets (even / odd pairs) hide the vpdpwssd latency. */
#define Q8_MR 2
#define Q8_NV 8
#define Q8_NRV 16
Q8_INLINE void Q8_NAME(mk)(const int16_t *const *xr, const float *const *xs, const int32_t *t,
                           const float *sc, int64_t bn, float *out, int acc) {
    const int32_t *t1 = t + bn * 16 * 8;
    const float *sc1 = sc + bn * 8;
    const float *da = xs[0], *db = xs[1];
    __m256 f00 = _mm256_setzero_ps(), f01 = f00, f10 = f00, f11 = f00;
    if (acc) {
        f00 = _mm256_load_ps(out);
        f01 = _mm256_load_ps(out + 8);
        f10 = _mm256_load_ps(out + 16);
        f11 = _mm256_load_ps(out + 24);
    }
    for (int64_t b = 0; b < bn; b++) {
        const __m256i *wa = (const __m256i *)(t + b * 128), *wb = (const __m256i *)(t1 + b * 128);
        const int16_t *pa = xr[0] + 32 * b, *pb = xr[1] + 32 * b;
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
        __m256i c00 = a00, c01 = a00, c10 = a00, c11 = a00;
#pragma GCC unroll 8
        for (int i = 0; i < 16; i += 2) {
            __m256i v0 = _mm256_load_si256(wa + i), v1 = _mm256_load_si256(wb + i);
            __m256i ya = _mm256_set1_epi32(ld32(pa + 2 * i)), yb = _mm256_set1_epi32(ld32(pb + 2 * i));
            a00 = Q8_NAME(dot16)(a00, v0, ya);
            a01 = Q8_NAME(dot16)(a01, v1, ya);
            a10 = Q8_NAME(dot16)(a10, v0, yb);
            a11 = Q8_NAME(dot16)(a11, v1, yb);
            v0 = _mm256_load_si256(wa + i + 1);
            v1 = _mm256_load_si256(wb + i + 1);
            ya = _mm256_set1_epi32(ld32(pa + 2 * i + 2));
            yb = _mm256_set1_epi32(ld32(pb + 2 * i + 2));
#if Q8_VNNI
            c00 = Q8_NAME(dot16)(c00, v0, ya);
            c01 = Q8_NAME(dot16)(c01, v1, ya);
            c10 = Q8_NAME(dot16)(c10, v0, yb);
            c11 = Q8_NAME(dot16)(c11, v1, yb);
#else /* madd + add: no latency chain to hide, and AVX2 has only 16 registers */
            a00 = Q8_NAME(dot16)(a00, v0, ya);
            a01 = Q8_NAME(dot16)(a01, v1, ya);
            a10 = Q8_NAME(dot16)(a10, v0, yb);
            a11 = Q8_NAME(dot16)(a11, v1, yb);
#endif
        }
        const __m256 s0 = _mm256_load_ps(sc + 8 * b), s1 = _mm256_load_ps(sc1 + 8 * b);
        const __m256 ea = _mm256_set1_ps(da[b]), eb = _mm256_set1_ps(db[b]);
        f00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a00, c00)), _mm256_mul_ps(s0, ea), f00);
        f01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a01, c01)), _mm256_mul_ps(s1, ea), f01);
        f10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a10, c10)), _mm256_mul_ps(s0, eb), f10);
        f11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a11, c11)), _mm256_mul_ps(s1, eb), f11);
    }
    _mm256_store_ps(out, f00);
    _mm256_store_ps(out + 8, f01);
    _mm256_store_ps(out + 16, f10);
    _mm256_store_ps(out + 24, f11);
}
#endif

/* Packs the rows [r, r + nr) of W (nr <= Q8_NRV) for blocks [b0, b0 + bn) as the
   micro-kernel mk reads them: Q8_NRV / Q8_NV groups of Q8_NV lanes; missing rows are
   zero. */
Q8_INLINE void Q8_NAME(pack)(const uint8_t *w, int64_t ldw, int64_t nr, int64_t b0, int64_t bn,
                             int32_t *t, float *sc, int64_t pf) {
    static const lk_block_q8_0 zero[PF_Q16_BLOCKS];
#pragma GCC unroll 4
    for (int p = 0; p < Q8_NRV / 8; p++) {
        const uint8_t *rows[8];
        for (int jj = 0; jj < 8; jj++) {
            const int64_t r = 8 * p + jj;
            rows[jj] = r < nr ? w + r * ldw + b0 * (int64_t)sizeof(lk_block_q8_0)
                              : (const uint8_t *)zero;
        }
        const int g = 8 * p / Q8_NV, lane0 = 8 * p % Q8_NV;
        Q8_NAME(pack8)(rows, bn, Q8_NV, t + g * bn * 16 * Q8_NV + lane0, sc + g * bn * Q8_NV + lane0,
                       8 * p < nr ? pf : -1);
    }
}

/* Prefill: rows [r0, r1) of W against all M rows of x, one K slice at a time; the slice
   of the chunk's rows is packed to int16 once (pack) and stays in L1 while every x row
   passes over it. Each output continues its float accumulator across the slices (from y),
   so every row gets the bits mv4 gives it: the same fma per block, in block order. */
/* q8_0_r16 rows [r, r + nr) (nr <= Q8_NRV, whole groups of 16) for blocks [b0, b0 + bn)
   widened into the layout pack writes: a record already has its rows in lanes, so this is
   one sign extension per 8 rows' dword, no transpose. Lanes past nr are zero. */
Q8_INLINE void Q8_NAME(widen_r16)(const uint8_t *w, int64_t ldw, int64_t nr, int64_t b0,
                                  int64_t bn, int32_t *t, float *sc) {
    for (int64_t h = 0; h < Q8_NRV / 8; h++) { /* 8-row halves of the groups */
        int32_t *tg = t + (8 * h / Q8_NV) * bn * 16 * Q8_NV + 8 * h % Q8_NV;
        float *sg = sc + (8 * h / Q8_NV) * bn * Q8_NV + 8 * h % Q8_NV;
        if (8 * h >= nr) {
            for (int64_t b = 0; b < bn; b++) {
                for (int i = 0; i < 16; i++)
                    _mm256_storeu_si256((__m256i *)(tg + b * 16 * Q8_NV + i * Q8_NV), _mm256_setzero_si256());
                _mm256_storeu_ps(sg + b * Q8_NV, _mm256_setzero_ps());
            }
            continue;
        }
        const uint8_t *g = w + (8 * h / LK_R16_ROWS) * LK_R16_ROWS * ldw + (h & 1) * 16;
        for (int64_t b = 0; b < bn; b++) {
            const uint8_t *rec = g + (b0 + b) * LK_R16_RECORD;
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++)
                _mm256_storeu_si256((__m256i *)(tg + b * 16 * Q8_NV + i * Q8_NV),
                                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rec + 32 * i))));
            _mm256_storeu_ps(sg + b * Q8_NV, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rec + 512))));
        }
    }
}

Q8_INLINE void Q8_NAME(prefill_impl)(const matmul_job *j, int64_t r0, int64_t r1, int ith,
                                     const int r16) {
    const int64_t M = j->M, K = j->K, N = j->N, nb = K / LK_QK8_0, nr = r1 - r0;
    const int64_t ng = (nr + Q8_NRV - 1) / Q8_NRV * (Q8_NRV / Q8_NV);
    const int64_t sb = nb < PF_Q16_BLOCKS ? nb : PF_Q16_BLOCKS;
    const size_t tbytes = (size_t)(ng * sb * 16 * Q8_NV) * sizeof(int32_t);
    uint8_t *scr = (uint8_t *)lk_scratch(ith, tbytes + (size_t)(ng * sb * Q8_NV) * sizeof(float));
    int32_t *tile = (int32_t *)scr;
    float *sc = (float *)(scr + tbytes);
    float out[Q8_MR * Q8_NRV] __attribute__((aligned(64)));
    for (int64_t b0 = 0; b0 < nb; b0 += PF_Q16_BLOCKS) {
        const int64_t bn = nb - b0 < PF_Q16_BLOCKS ? nb - b0 : PF_Q16_BLOCKS;
        const int first = b0 == 0;
        for (int64_t g = 0; g < ng; g += Q8_NRV / Q8_NV) {
            if (r16)
                Q8_NAME(widen_r16)(j->w + (r0 + g * Q8_NV) * j->ldw, j->ldw, nr - g * Q8_NV, b0, bn,
                                   tile + g * bn * 16 * Q8_NV, sc + g * bn * Q8_NV);
            else
                Q8_NAME(pack)(j->w + (r0 + g * Q8_NV) * j->ldw, j->ldw, nr - g * Q8_NV, b0, bn,
                              tile + g * bn * 16 * Q8_NV, sc + g * bn * Q8_NV, -1);
        }
        for (int64_t m = 0; m < M; m += Q8_MR) {
            const int16_t *xr[Q8_MR];
            const float *xs[Q8_MR];
            for (int i = 0; i < Q8_MR; i++) {
                const int64_t mi = m + i < M ? m + i : M - 1;
                xr[i] = j->xq + mi * K + b0 * LK_QK8_0;
                xs[i] = j->xd + mi * nb + b0;
            }
            for (int64_t g = 0; g < ng; g += Q8_NRV / Q8_NV) {
                const int64_t c0 = g * Q8_NV, nc = nr - c0 < Q8_NRV ? nr - c0 : Q8_NRV;
                if (!first) {
                    for (int i = 0; i < Q8_MR; i++) {
                        const float *y = j->y + (m + i) * N + r0 + c0;
                        for (int64_t c = 0; c < Q8_NRV; c++)
                            out[i * Q8_NRV + c] = m + i < M && c < nc ? y[c] : 0.0f;
                    }
                }
                Q8_NAME(mk)(xr, xs, tile + g * bn * 16 * Q8_NV, sc + g * bn * Q8_NV, bn, out, !first);
                for (int i = 0; i < Q8_MR && m + i < M; i++)
                    memcpy(j->y + (m + i) * N + r0 + c0, out + i * Q8_NRV, (size_t)nc * sizeof(float));
            }
        }
    }
}

Q8_TARGET static void Q8_NAME(prefill)(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    Q8_NAME(prefill_impl)(j, r0, r1, ith, 0);
}

/* A few x rows (2 .. FEW_ROWS: batched decode): still bound by streaming the weights, so
   walk them in groups of Q8_NRV rows, prefetching the next group as this one is packed
   (pack, as in prefill: each weight block is widened once, not once per x row), and run
   every x row over the packed slice with the prefill micro-kernel; the accumulators stay
   in `acc` across the K slices, so each output gets the bits mv4 gives it. */
Q8_TARGET static void Q8_NAME(few)(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    const int64_t M = j->M, K = j->K, N = j->N, nb = K / LK_QK8_0, ldw = j->ldw;
    const int64_t fb = lk_few_blocks >= 1 && lk_few_blocks <= PF_Q16_BLOCKS ? lk_few_blocks : 4;
    const int64_t sb = nb < fb ? nb : fb;
    const size_t tbytes = (size_t)(Q8_NRV * sb * 16) * sizeof(int32_t);
    uint8_t *scr = (uint8_t *)lk_scratch(ith, tbytes + (size_t)(Q8_NRV * sb) * sizeof(float));
    int32_t *tile = (int32_t *)scr;
    float *sc = (float *)(scr + tbytes);
    float acc[(Q8_FEW_ROWS_MAX + Q8_MR) * Q8_NRV] __attribute__((aligned(64)));
    const int64_t pf = lk_pf_dist < 0 ? -1 : Q8_NRV * ldw;
    prefetch_rows(j->w + r0 * ldw, (r1 - r0 < Q8_NRV ? r1 - r0 : Q8_NRV) * ldw);
    for (int64_t r = r0; r < r1; r += Q8_NRV) {
        const int64_t nr = r1 - r < Q8_NRV ? r1 - r : Q8_NRV;
        for (int64_t b0 = 0; b0 < nb; b0 += fb) {
            const int64_t bn = nb - b0 < fb ? nb - b0 : fb;
            Q8_NAME(pack)(j->w + r * ldw, ldw, nr, b0, bn, tile, sc, r + Q8_NRV < r1 ? pf : -1);
            for (int64_t m = 0; m < M; m += Q8_MR) {
                const int16_t *xr[Q8_MR];
                const float *xs[Q8_MR];
                for (int i = 0; i < Q8_MR; i++) {
                    const int64_t mi = m + i < M ? m + i : M - 1;
                    xr[i] = j->xq + mi * K + b0 * LK_QK8_0;
                    xs[i] = j->xd + mi * nb + b0;
                }
                Q8_NAME(mk)(xr, xs, tile, sc, bn, acc + m * Q8_NRV, b0 > 0);
            }
        }
        for (int64_t m = 0; m < M; m++)
            memcpy(j->y + m * N + r, acc + m * Q8_NRV, (size_t)nr * sizeof(float));
    }
}

Q8_TARGET static void Q8_NAME(rows_q8_0)(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    if (j->M > q8_few_rows()) {
        Q8_NAME(prefill)(j, r0, r1, ith);
        return;
    }
    if (j->M >= Q8_FEW_MIN) {
        Q8_NAME(few)(j, r0, r1, ith);
        return;
    }
    /* decode (and M = 2): stream the weights four rows at a time, prefetching the next
       four; a second x row reuses them from L1 */
    const int64_t K = j->K, N = j->N, nb = K / LK_QK8_0, ldw = j->ldw;
    int64_t r = r0;
    prefetch_rows(j->w + r0 * ldw, (r1 - r0 < 4 ? r1 - r0 : 4) * ldw);
    for (; r + 4 <= r1; r += 4)
        for (int64_t m = 0; m < j->M; m++)
            Q8_NAME(mv4)(j->xq + m * K, j->xd + m * nb, nb, j->w + r * ldw, ldw, j->y + m * N + r);
    for (; r < r1; r++)
        for (int64_t m = 0; m < j->M; m++)
            j->y[m * N + r] = Q8_NAME(mv1)(j->xq + m * K, j->xd + m * nb, nb, j->w + r * ldw);
}

/* ---- q8_0_r16: the batched kernels multiply straight from the weights ----------------
 * The records already hold each block with its 16 rows in lanes (lattice_kernels.h), so a
 * weight vector is one sign-extending load, shared by every x row: no per-call packing
 * (which cost q8_0 as much as the dots themselves at M = 8). Per output: the same exact
 * int32 dot per block and the same acc = fma(dot, d_w * d_x, acc) in block order as the
 * q8_0 kernels, so the same bits for every M. */
#if Q8_VNNI == 2
#define Q8R_NR 32 /* rows per micro-kernel call: two groups of 16 */
#define Q8R_MR 4  /* x rows per micro-kernel call */
/* mr x rows (xr, scales xs, at the slice start) against the groups at g0 and g1 over bn
   blocks -> out[m][32]; acc: continue from out. */
Q8_INLINE void Q8_NAME(mkr)(const int16_t *const *xr, const float *const *xs, const uint8_t *g0,
                            const uint8_t *g1, int64_t bn, float *out, int acc, const int mr,
                            int64_t pf) {
    __m512 f[Q8R_MR][2];
#pragma GCC unroll 4
    for (int m = 0; m < mr; m++) {
        f[m][0] = acc ? _mm512_load_ps(out + m * Q8R_NR) : _mm512_setzero_ps();
        f[m][1] = acc ? _mm512_load_ps(out + m * Q8R_NR + 16) : _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < bn; b++) {
        const uint8_t *ra = g0 + b * LK_R16_RECORD, *rb = g1 + b * LK_R16_RECORD;
        if (pf >= 0) {
            pf_(ra + pf);
            pf_(ra + pf + 64 * 4);
            pf_(rb + pf);
            pf_(rb + pf + 64 * 4);
        }
        __m512i a[Q8R_MR][2];
#pragma GCC unroll 4
        for (int m = 0; m < mr; m++) a[m][0] = a[m][1] = _mm512_setzero_si512();
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            const __m512i v0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(ra + 32 * i)));
            const __m512i v1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rb + 32 * i)));
#pragma GCC unroll 4
            for (int m = 0; m < mr; m++) {
                const __m512i xv = _mm512_set1_epi32(ld32(xr[m] + 32 * b + 2 * i));
                a[m][0] = _mm512_dpwssd_epi32(a[m][0], v0, xv);
                a[m][1] = _mm512_dpwssd_epi32(a[m][1], v1, xv);
            }
        }
        const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ra + 512)));
        const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rb + 512)));
#pragma GCC unroll 4
        for (int m = 0; m < mr; m++) {
            const __m512 e = _mm512_set1_ps(xs[m][b]);
            f[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][0]), _mm512_mul_ps(s0, e), f[m][0]);
            f[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[m][1]), _mm512_mul_ps(s1, e), f[m][1]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < mr; m++) {
        _mm512_store_ps(out + m * Q8R_NR, f[m][0]);
        _mm512_store_ps(out + m * Q8R_NR + 16, f[m][1]);
    }
}
#else
#define Q8R_NR 16 /* one group: rows 0-7 and 8-15 of each dword are two 256-bit vectors */
#define Q8R_MR 2
Q8_INLINE void Q8_NAME(mkr)(const int16_t *const *xr, const float *const *xs, const uint8_t *g0,
                            const uint8_t *g1, int64_t bn, float *out, int acc, const int mr,
                            int64_t pf) {
    (void)g1;
    __m256 f[Q8R_MR][2];
#pragma GCC unroll 2
    for (int m = 0; m < mr; m++) {
        f[m][0] = acc ? _mm256_load_ps(out + m * Q8R_NR) : _mm256_setzero_ps();
        f[m][1] = acc ? _mm256_load_ps(out + m * Q8R_NR + 8) : _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < bn; b++) {
        const uint8_t *ra = g0 + b * LK_R16_RECORD;
        if (pf >= 0) {
            pf_(ra + pf);
            pf_(ra + pf + 64 * 4);
        }
        __m256i a[Q8R_MR][2], c[Q8R_MR][2];
#pragma GCC unroll 2
        for (int m = 0; m < mr; m++) a[m][0] = a[m][1] = c[m][0] = c[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 0; i < 16; i += 2) {
            __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i)));
            __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i + 16)));
#pragma GCC unroll 2
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_set1_epi32(ld32(xr[m] + 32 * b + 2 * i));
                a[m][0] = Q8_NAME(dot16)(a[m][0], v0, xv);
                a[m][1] = Q8_NAME(dot16)(a[m][1], v1, xv);
            }
            v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i + 32)));
            v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i + 48)));
#pragma GCC unroll 2
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_set1_epi32(ld32(xr[m] + 32 * b + 2 * i + 2));
                c[m][0] = Q8_NAME(dot16)(c[m][0], v0, xv);
                c[m][1] = Q8_NAME(dot16)(c[m][1], v1, xv);
            }
        }
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ra + 512)));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ra + 528)));
#pragma GCC unroll 2
        for (int m = 0; m < mr; m++) {
            const __m256 e = _mm256_set1_ps(xs[m][b]);
            f[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a[m][0], c[m][0])),
                                      _mm256_mul_ps(s0, e), f[m][0]);
            f[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a[m][1], c[m][1])),
                                      _mm256_mul_ps(s1, e), f[m][1]);
        }
    }
#pragma GCC unroll 2
    for (int m = 0; m < mr; m++) {
        _mm256_store_ps(out + m * Q8R_NR, f[m][0]);
        _mm256_store_ps(out + m * Q8R_NR + 8, f[m][1]);
    }
}
#endif

/* Rows [r0, r1) (whole groups) of a q8_0_r16 matrix against M x rows. Up to
   q8_few_rows() rows (decode, batched decode, a batch plus a prefill slice): per Q8R_NR
   weight rows, the K axis in slices of a few blocks, so a slice is still in L1 as every x
   row passes over it; each output's float accumulator stays in acc across the slices.
   More rows (prefill): each slice is widened once into an L1 tile (widen_r16) and the
   q8_0 prefill loop runs over it. */
Q8_TARGET static void Q8_NAME(rows_q8r)(const matmul_job *j, int64_t r0, int64_t r1, int ith) {
    if (j->M > q8_few_rows()) { /* prefill: widen each slice once into L1 for all x rows */
        Q8_NAME(prefill_impl)(j, r0, r1, ith, 1);
        return;
    }
    const int64_t M = j->M, K = j->K, N = j->N, nb = K / LK_QK8_0, ldw = j->ldw;
    const int64_t gs = LK_R16_ROWS * ldw; /* bytes per group */
    const int64_t fb = lk_few_blocks >= 1 && lk_few_blocks <= PF_Q16_BLOCKS ? lk_few_blocks : 4;
    const int64_t mpad = (M + Q8R_MR - 1) / Q8R_MR * Q8R_MR;
    float *acc = (float *)lk_scratch(ith, (size_t)(mpad * Q8R_NR) * sizeof(float));
    /* no software prefetch by default: on two long sequential streams the hardware
       prefetcher alone measured faster (q8_0_r16 [248320 x 1024], M = 1: 26.5 -> 29.4
       GB/s); LATTICE_PF > 64 prefetches that many bytes ahead (tuning only) */
    const int64_t pf = lk_pf_dist > 64 ? lk_pf_dist : -1;
#if Q8R_NR == 32
    /* the micro-kernel's two groups come from the two halves of the chunk, so each half is
       one long sequential stream (as matvec_float's quarters) */
    const int64_t ng = (r1 - r0) / LK_R16_ROWS, half = (ng + 1) / 2;
    (void)gs;
    for (int64_t gi = 0; gi < half; gi++) {
        const int64_t r = r0 + gi * LK_R16_ROWS, rb = r0 + (gi + half) * LK_R16_ROWS;
        const int two = gi + half < ng;
        const uint8_t *g0 = j->w + r * ldw;
        const uint8_t *g1 = two ? j->w + rb * ldw : g0; /* a lone last group: twice */
#else
    for (int64_t r = r0; r < r1; r += Q8R_NR) {
        const int64_t nr = r1 - r < Q8R_NR ? r1 - r : Q8R_NR;
        const uint8_t *g0 = j->w + r * ldw;
        const uint8_t *g1 = nr > LK_R16_ROWS ? g0 + gs : g0; /* a last lone group: twice */
#endif
        for (int64_t b0 = 0; b0 < nb; b0 += fb) {
            const int64_t bn = nb - b0 < fb ? nb - b0 : fb;
            const uint8_t *s0 = g0 + b0 * LK_R16_RECORD, *s1 = g1 + b0 * LK_R16_RECORD;
            for (int64_t m = 0; m < M; m += Q8R_MR) {
                const int64_t mr = M - m < Q8R_MR ? M - m : Q8R_MR;
                const int16_t *xr[Q8R_MR];
                const float *xs[Q8R_MR];
                for (int i = 0; i < Q8R_MR; i++) {
                    const int64_t mi = m + i < M ? m + i : M - 1;
                    xr[i] = j->xq + mi * K + b0 * LK_QK8_0;
                    xs[i] = j->xd + mi * nb + b0;
                }
                const int64_t p = m == 0 ? pf : -1; /* the first pass pulls the slice in */
                float *o = acc + m * Q8R_NR;
#if Q8R_MR == 4
                if (mr == 4) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 4, p);
                else if (mr == 3) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 3, p);
                else if (mr == 2) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 2, p);
                else Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 1, p);
#else
                if (mr == 2) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 2, p);
                else Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 1, p);
#endif
            }
        }
#if Q8R_NR == 32
        for (int64_t m = 0; m < M; m++) {
            memcpy(j->y + m * N + r, acc + m * Q8R_NR, LK_R16_ROWS * sizeof(float));
            if (two)
                memcpy(j->y + m * N + rb, acc + m * Q8R_NR + LK_R16_ROWS, LK_R16_ROWS * sizeof(float));
        }
#else
        for (int64_t m = 0; m < M; m++)
            memcpy(j->y + m * N + r, acc + m * Q8R_NR, (size_t)nr * sizeof(float));
#endif
    }
}
#undef Q8R_NR
#undef Q8R_MR

#undef Q8_INLINE
#undef Q8_MR
#undef Q8_NV
#undef Q8_NRV
#endif /* LK_Q8_TEMPLATE */
