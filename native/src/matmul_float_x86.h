/* matmul_float_x86.h: the AVX2 f32 tile kernels shared by matmul_f_avx2.c and
 * matmul_f_avx512.c (which runs them for a chunk's last rows, so both give a row the same
 * bits): two x rows against four weight rows over one K slice, one row's slice dot, a
 * slice of rows against all x rows, and f16 rows converted to an f32 slice. static inline
 * (always_inline): each file compiles its own copy into its kernels. */
#ifndef LK_MATMUL_FLOAT_X86_H
#define LK_MATMUL_FLOAT_X86_H

#include "matmul_internal.h"

#if LK_X86
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

/* f_slice: f16_slice for either float format (f32 rows copied) */
AVX2_INLINE void f_slice(const matmul_job *j, int64_t r0, int64_t nr, int64_t k0, int64_t kn,
                         float *dst, int fmt) {
    if (fmt == FMT_F16) {
        f16_slice(j, r0, nr, k0, kn, dst, -1);
        return;
    }
    for (int64_t r = 0; r < nr; r++)
        memcpy(dst + r * PF_KSLICE, (const float *)(j->w + (r0 + r) * j->ldw) + k0,
               (size_t)kn * sizeof(float));
}

#endif /* LK_X86 */

#endif /* LK_MATMUL_FLOAT_X86_H */
