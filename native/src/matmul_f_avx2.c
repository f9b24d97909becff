/* matmul_f_avx2.c: f32 and f16 weights with AVX2 / FMA / F16C: the matvec (M = 1,
 * four long weight streams per chunk), the few-rows kernel (M <= FEW_ROWS, weights
 * streamed and converted once per group of rows) and the prefill tiles. Every path
 * computes a row's dot in one order (see the comment above fma1 in matmul_internal.h). */
#include "matmul_float_x86.h"

#if LK_X86
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

/* Three x rows against four weight rows over one K slice (w: the rows' slice as f32, row
   stride ldwf): 12 accumulators, and per step of 8 values 3 + 4 loads for 12 FMAs (mm2x4's
   2 x 4 needs 6 for 8). Each accumulator sums one (k mod 8) class of the slice, reduced by
   hsum8x4, so a row gets the bits of mm2x4 and the matvec. */
AVX2_INLINE void mm3x4_f32(const float *x, int64_t ldx, const float *w, int64_t ldwf, int64_t n,
                           float *y, int64_t ldy, int accumulate) {
    __m256 c[3][4];
    for (int m = 0; m < 3; m++) c[m][0] = c[m][1] = c[m][2] = c[m][3] = _mm256_setzero_ps();
    int64_t k = 0;
    const int64_t n8 = n & ~(int64_t)7;
    for (; k < n8; k += 8) {
        /* 12 accumulators + 3 x + 1 weight register: all 16 ymm, no spill */
        const __m256 a0 = _mm256_loadu_ps(x + k), a1 = _mm256_loadu_ps(x + ldx + k);
        const __m256 a2 = _mm256_loadu_ps(x + 2 * ldx + k);
        for (int i = 0; i < 4; i++) {
            const __m256 wv = _mm256_loadu_ps(w + i * ldwf + k);
            c[0][i] = _mm256_fmadd_ps(a0, wv, c[0][i]);
            c[1][i] = _mm256_fmadd_ps(a1, wv, c[1][i]);
            c[2][i] = _mm256_fmadd_ps(a2, wv, c[2][i]);
        }
    }
    for (int m = 0; m < 3; m++) {
        float sl[4];
        _mm_storeu_ps(sl, hsum8x4(c[m][0], c[m][1], c[m][2], c[m][3]));
        for (int64_t t = k; t < n; t++)
            for (int i = 0; i < 4; i++) sl[i] = fma1(x[m * ldx + t], w[i * ldwf + t], sl[i]);
        float *yr = y + m * ldy;
        if (accumulate)
            _mm_storeu_ps(yr, _mm_add_ps(_mm_loadu_ps(yr), _mm_loadu_ps(sl)));
        else
            _mm_storeu_ps(yr, _mm_loadu_ps(sl));
    }
}

/* Prefill for float formats: rows [r0, r1) of W against all M rows of x. Per K slice (f16
   converted once into an f32 tile), x is taken PF_MB rows at a time (12 KiB of the slice,
   in L1 beside a 4 KiB group of weight rows) and every group of four weight rows passes
   over them three x rows at a time (mm3x4_f32); the last 1-2 x rows and 1-3 weight rows
   take slice_rows (same bits). */
#define PF_MB 12
AVX2_INLINE void matmul_float_tiled(const matmul_job *j, int64_t r0, int64_t r1, int ith,
                                    int fmt) {
    const int64_t K = j->K, N = j->N, M = j->M, nr = r1 - r0, nr4 = nr & ~(int64_t)3;
    const int64_t m3 = M - M % 3;
    float *tile = (float *)lk_scratch(ith, (size_t)nr * PF_KSLICE * sizeof(float));
    for (int64_t k0 = 0; k0 < K; k0 += PF_KSLICE) {
        const int64_t kn = K - k0 < PF_KSLICE ? K - k0 : PF_KSLICE;
        /* this slice of the chunk's rows, once, into a tile of row stride PF_KSLICE that
           every x row reuses: f16 converted, f32 copied (rows of 4 KiB or a multiple of
           it would otherwise share L1 sets: K = 1024 ran at 46 instead of 63 GFLOP/s) */
        f_slice(j, r0, nr, k0, kn, tile, fmt);
        const float *wt = tile;
        const int64_t ldwf = PF_KSLICE;
        for (int64_t mb = 0; mb < m3; mb += PF_MB) {
            const int64_t me = mb + PF_MB < m3 ? mb + PF_MB : m3;
            for (int64_t g = 0; g < nr4; g += 4)
                for (int64_t m = mb; m < me; m += 3)
                    mm3x4_f32(j->x + m * K + k0, K, wt + g * ldwf, ldwf, kn,
                              j->y + m * N + r0 + g, N, k0 > 0);
        }
        if (nr4 < nr) slice_rows(j, 0, m3, r0 + nr4, nr - nr4, k0, kn, wt + nr4 * ldwf, ldwf);
        if (m3 < M) slice_rows(j, m3, M, r0, nr, k0, kn, wt, ldwf);
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

const lk_mm_kernels lk_mm_f_avx2 = {rows_f32_avx2, rows_f16_avx2, NULL, NULL, NULL};

#endif /* LK_X86 */
