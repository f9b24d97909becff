/* matmul_q8_0_x86.h: the q8_0 and q8_0_r16 kernels for one x86 variant, written once
 * (~600 lines because it is every q8_0 kernel: matvec, few rows, prefill tiles, r16).
 * A template, deliberately without an include guard: each of matmul_q8_0_avx2.c,
 * matmul_q8_0_avxvnni.c and matmul_q8_0_avx512vnni.c defines Q8_NAME (a name suffix),
 * Q8_TARGET (its target attribute) and Q8_VNNI (0: AVX2 madd + add, 1: AVX-VNNI,
 * 2: AVX512-VNNI), then includes it once; the variant's entry points are
 * rows_q8_0_<suffix> and rows_q8r_<suffix> (declared in matmul_internal.h),
 * everything else is static to that file.
 * x arrives as int16 [M, K] with float scales [M, K/32]; each block's integer dot is
 * exact in int32, then one FMA per block applies d_w * d_x.
 */
#if !defined(Q8_NAME) || !defined(Q8_TARGET) || !defined(Q8_VNNI)
#error "define Q8_NAME, Q8_TARGET and Q8_VNNI before including matmul_q8_0_x86.h"
#endif
#define Q8_INLINE Q8_TARGET __attribute__((always_inline)) static inline

/* acc + pairwise sums of the int16 products a * b, 8 int32 lanes */
Q8_INLINE __m256i Q8_NAME(dot16)(__m256i acc, __m256i a, __m256i b) {
#if Q8_VNNI == 1
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#elif Q8_VNNI == 2
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    /* the asm keeps the sum in a register as written: without it gcc 12 reassociates a
       kernel's chain of integer adds into trees and spills every product to the stack
       (the AVX2 r16 micro-kernel ran at 35 instead of 64 GMAC/s per core on Zen 3).
       Integer adds are exact, so the bits are the same either way. */
    __m256i r = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
    __asm__("" : "+x"(r));
    return r;
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
#define Q8R_MR 4
/* Four x rows share each widened weight vector: per x row and record, 16 broadcasts and 32
   dots, and a quarter of the record's 32 widenings. One int32 accumulator pair per row (8
   in all; with the two weight vectors and the broadcast, 11 of AVX2's 16 registers: no
   spills). With three or four rows the float accumulators live in out (one load / fma /
   store per block); with one or two they stay in registers (in out, the matvec ran 8%
   more instructions: the perf gate). Two x rows per call (each widened vector used twice)
   ran M = 4 and 8 about 10% slower on Zen 3 (one thread, hot cache, 8 alternated runs);
   three and five rows were slower than four in an L1-resident loop (five run out of
   registers). A block's integer sum is exact, so the bits are those of any other split. */
Q8_INLINE void Q8_NAME(mkr)(const int16_t *const *xr, const float *const *xs, const uint8_t *g0,
                            const uint8_t *g1, int64_t bn, float *out, int acc, const int mr,
                            int64_t pf) {
    (void)g1;
    const int in_regs = mr <= 2; /* a constant where mkr is inlined */
    __m256 f[2][2];
#pragma GCC unroll 4
    for (int m = 0; m < mr; m++) {
        if (in_regs) {
            f[m & 1][0] = acc ? _mm256_load_ps(out + m * Q8R_NR) : _mm256_setzero_ps();
            f[m & 1][1] = acc ? _mm256_load_ps(out + m * Q8R_NR + 8) : _mm256_setzero_ps();
        } else if (!acc) {
            _mm256_store_ps(out + m * Q8R_NR, _mm256_setzero_ps());
            _mm256_store_ps(out + m * Q8R_NR + 8, _mm256_setzero_ps());
        }
    }
    for (int64_t b = 0; b < bn; b++) {
        const uint8_t *ra = g0 + b * LK_R16_RECORD;
        if (pf >= 0) {
            pf_(ra + pf);
            pf_(ra + pf + 64 * 4);
        }
        __m256i a[Q8R_MR][2];
#pragma GCC unroll 4
        for (int m = 0; m < mr; m++) a[m][0] = a[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i)));
            const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(ra + 32 * i + 16)));
#pragma GCC unroll 4
            for (int m = 0; m < mr; m++) {
                const __m256i xv = _mm256_set1_epi32(ld32(xr[m] + 32 * b + 2 * i));
                a[m][0] = Q8_NAME(dot16)(a[m][0], v0, xv);
                a[m][1] = Q8_NAME(dot16)(a[m][1], v1, xv);
            }
        }
        const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ra + 512)));
        const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ra + 528)));
#pragma GCC unroll 4
        for (int m = 0; m < mr; m++) {
            const __m256 e = _mm256_set1_ps(xs[m][b]);
            const __m256 d0 = _mm256_mul_ps(s0, e), d1 = _mm256_mul_ps(s1, e);
            float *o = out + m * Q8R_NR;
            if (in_regs) {
                f[m & 1][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][0]), d0, f[m & 1][0]);
                f[m & 1][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][1]), d1, f[m & 1][1]);
            } else {
                _mm256_store_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][0]), d0,
                                                   _mm256_load_ps(o)));
                _mm256_store_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][1]), d1,
                                                       _mm256_load_ps(o + 8)));
            }
        }
    }
    if (in_regs)
#pragma GCC unroll 2
        for (int m = 0; m < mr; m++) {
            _mm256_store_ps(out + m * Q8R_NR, f[m & 1][0]);
            _mm256_store_ps(out + m * Q8R_NR + 8, f[m & 1][1]);
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
                for (int i = 0; i < mr; i++) { /* mkr reads the first mr */
                    xr[i] = j->xq + (m + i) * K + b0 * LK_QK8_0;
                    xs[i] = j->xd + (m + i) * nb + b0;
                }
                const int64_t p = m == 0 ? pf : -1; /* the first pass pulls the slice in */
                float *o = acc + m * Q8R_NR;
#if Q8R_MR == 4
                if (mr == 1) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 1, p); /* decode */
                else if (mr == 4) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 4, p);
                else if (mr == 3) Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 3, p);
                else Q8_NAME(mkr)(xr, xs, s0, s1, bn, o, b0 > 0, 2, p);
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
