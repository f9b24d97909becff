/* matmul_f_avx512.c: f32 and f16 weights with 512-bit FMAs (AVX-512F), for a few x rows
 * (few512) and for prefill (prefill512); run while the AVX512-VNNI q8_0 variant is active
 * (matmul.c). The same dot order as the AVX2 kernels, so the same bits. */
#include "matmul_float_x86.h"

#if LK_X86
/* f32 / f16, a few x rows, with 512-bit FMAs (run when the AVX-512 variant is active):
   the same dot order as above, each zmm accumulator holding two weight rows' 8-lane
   accumulators side by side (x broadcast to both halves), so a row gets the bits the
   AVX2 kernels give it while one FMA does the work of two. Four weight rows at a time,
   converted (as in matmul_float_few) into an f32 tile interleaved by 8 ([k / 8][row][8]: rows
   0-1 and 2-3 are one zmm load each), against all MR (= M) x rows held in registers. */
#define AVX512F_TARGET __attribute__((target("avx2,fma,f16c,avx512f")))
#define AVX512F_INLINE AVX512F_TARGET __attribute__((always_inline)) static inline
#ifndef PF_MBLOCK
#define PF_MBLOCK 24
#endif

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

/* The sums of eight weight rows' 8-lane accumulators, two rows per register (rows 0-1 in
   a01, ..., 6-7 in a67), in row order, by hsum8x4's tree ((l0 + l1) + (l2 + l3)) + ((l4 + l5)
   + (l6 + l7)), so the same bits: adjacent lanes paired by even / odd permutes three times.
   A quarter of the shuffles of four hsum8x4 calls, which were a quarter of the prefill's
   time at a 256-value K slice. ev / od: the even and odd lane indices 0 .. 30 / 1 .. 31. */
AVX512F_INLINE __m256 hsum8rows(__m512 a01, __m512 a23, __m512 a45, __m512 a67, __m512i ev,
                                __m512i od) {
    const __m512 p03 = _mm512_add_ps(_mm512_permutex2var_ps(a01, ev, a23),
                                     _mm512_permutex2var_ps(a01, od, a23));
    const __m512 p47 = _mm512_add_ps(_mm512_permutex2var_ps(a45, ev, a67),
                                     _mm512_permutex2var_ps(a45, od, a67));
    const __m512 q = _mm512_add_ps(_mm512_permutex2var_ps(p03, ev, p47),
                                   _mm512_permutex2var_ps(p03, od, p47));
    return _mm512_castps512_ps256(_mm512_add_ps(_mm512_permutex2var_ps(q, ev, q),
                                                _mm512_permutex2var_ps(q, od, q)));
}

/* Six x rows against eight weight rows (two tiles of four, laid out as few512_tile lays
   them: rows g .. g+3 at t0, g+4 .. g+7 at t1) over one K slice: 24 accumulators, and per
   step of 8 values 4 tile loads and 6 broadcasts for 24 FMAs (few512_slice's 8 x 4 needs
   10 loads for 16), so the prefill runs near the FMA ports' rate instead of the load
   ports'. Each accumulator lane still sums one (k mod 8) class of the slice and the lanes
   go through the hsum8x4 tree, so a row gets exactly the bits few512_slice and the AVX2
   kernels give it. */
AVX512F_INLINE void pf512_6x8(const matmul_job *j, int64_t m0, int64_t r, int64_t k0, int64_t kn,
                              const float *t0, const float *t1, int fmt) {
    const int64_t K = j->K, N = j->N, kn8 = kn & ~(int64_t)7;
    const float *const xm = j->x + m0 * K + k0;
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int m = 0; m < 6; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kn8; k += 8) {
        const __m512 w0 = _mm512_load_ps(t0 + 4 * k), w1 = _mm512_load_ps(t0 + 4 * k + 16);
        const __m512 w2 = _mm512_load_ps(t1 + 4 * k), w3 = _mm512_load_ps(t1 + 4 * k + 16);
#pragma GCC unroll 6
        for (int m = 0; m < 6; m++) {
            const __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(
                _mm256_castps_pd(_mm256_loadu_ps(xm + m * K + k))));
            acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(xv, w2, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(xv, w3, acc[m][3]);
        }
    }
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int m = 0; m < 6; m++) {
        __m256 sum = hsum8rows(acc[m][0], acc[m][1], acc[m][2], acc[m][3], ev, od);
        float *y = j->y + (m0 + m) * N + r;
        if (kn8 < kn) {
            float sl[8];
            _mm256_storeu_ps(sl, sum);
            const float *x = xm + m * K;
            for (int64_t k = kn8; k < kn; k++)
                for (int i = 0; i < 8; i++)
                    sl[i] = fma1(x[k], load_w1(j->w + (r + i) * j->ldw, k0 + k, fmt), sl[i]);
            sum = _mm256_loadu_ps(sl);
        }
        _mm256_storeu_ps(y, k0 ? _mm256_add_ps(_mm256_loadu_ps(y), sum) : sum);
    }
}

/* few512_slice for mr (1 .. 8) x rows: the dispatch to its unrolled copies */
AVX512F_INLINE void few512_any(const matmul_job *j, int64_t m0, int64_t r, int64_t k0,
                               int64_t kn, const float *t, int fmt, int64_t mr) {
    switch (mr) {
    case 1: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 1); break;
    case 2: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 2); break;
    case 3: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 3); break;
    case 4: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 4); break;
    case 5: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 5); break;
    case 6: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 6); break;
    case 7: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 7); break;
    default: few512_slice(j, m0, r, 1, k0, kn, t, fmt, 8); break;
    }
}

/* Prefill (M > FEW_ROWS) with 512-bit FMAs: per K slice, the chunk's weight rows (lk_pf_rows,
   64: a chunk's slice is 64 KiB of f32 tiles, in L2, and every x row is read once per 64
   weight rows instead of once per 16, which left the kernel waiting on x from L3) are
   converted once into f32 tiles interleaved by 8 as few512 lays them out, four rows per
   tile; then every group of six x rows (in L1) passes over them eight rows at a time with
   pf512_6x8, a last group of four rows and the last 1-5 x rows with few512_slice (same
   bits), and the chunk's last 1-3 rows (N not a multiple of 4) take slice_rows. */
AVX512F_INLINE void prefill512(const matmul_job *j, int64_t r0, int64_t r1, int ith, int fmt) {
    const int64_t K = j->K, M = j->M, ldw = j->ldw, nr4 = (r1 - r0) & ~(int64_t)3;
    const int64_t nr8 = nr4 & ~(int64_t)7, m6 = M - M % 6;
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
        for (int64_t mb = 0; mb < m6; mb += PF_MBLOCK) {
            const int64_t me = mb + PF_MBLOCK < m6 ? mb + PF_MBLOCK : m6;
            for (int64_t g = 0; g < nr8; g += 8)
                for (int64_t m0 = mb; m0 < me; m0 += 6)
                    pf512_6x8(j, m0, r0 + g, k0, kn, tile + g * PF_KSLICE,
                              tile + (g + 4) * PF_KSLICE, fmt);
            if (nr8 < nr4)
                for (int64_t m0 = mb; m0 < me; m0 += 6)
                    few512_slice(j, m0, r0 + nr8, 1, k0, kn, tile + nr8 * PF_KSLICE, fmt, 6);
        }
        if (m6 < M)
            for (int64_t g = 0; g < nr4; g += 4)
                few512_any(j, m6, r0 + g, k0, kn, tile + g * PF_KSLICE, fmt, M - m6);
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

const lk_mm_kernels lk_mm_f_few512 = {rows_f32_few512, rows_f16_few512, NULL, NULL, NULL};
const lk_mm_kernels lk_mm_f_pf512 = {rows_f32_pf512, rows_f16_pf512, NULL, NULL, NULL};

#endif /* LK_X86 */
