/* attention_tile.h: the tiled AVX2 attention core shared by the dense (attention.c) and
 * paged (paged_attention.c) kernels, so both give a query vector the same bits.
 *
 * A unit's query vectors (rows x heads of one kv head) pass over the keys a tile of
 * ATT_KT keys at a time, with an online softmax (running max and sum per vector). Each
 * tile's keys are transposed once into kt[d][ATT_KT], so the scores of 4 vectors x 16 keys
 * are 8 accumulators fed by broadcasts of q (no horizontal sums), and the tile's values
 * are read from L1 by every vector.
 *
 * Batch invariance: tiles start at key 0 in steps of ATT_KT whatever the chunk, a vector's
 * score of a key is one FMA chain over d, its softmax and value sums run over its own valid
 * keys only, so a row's bits do not depend on the rows, heads or sequences it shares a call
 * with, nor on how its prompt was chunked (decode rows included: they run the same code).
 * Included by x86 translation units only, after lattice_kernels.h with LK_INTERNAL.
 */
#ifndef LK_ATTENTION_TILE_H
#define LK_ATTENTION_TILE_H

#define ATT_KT 64

/* Prefetch one stored key or value row (bytes) into L1. The tile loops call it for the
   row one tile ahead as they load each row: rows of one kv head are strided (the other
   heads in between) and the arrays sit on 4 KiB pages, where the hardware prefetcher
   restarts every 16-32 keys; without it a 16,384-token f16 decode spent 35% of its time
   waiting in the widening loads (Qwen2.5-Coder-0.5B q8_0). */
static inline void att_prefetch_row(const void *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)row + o, _MM_HINT_T0);
}

/* kt[(d + e) * ATT_KT + c + i] = r[i][d + e] for the 8 key rows r[i] (NULL: a zero row) */
LK_AVX2_TARGET static inline void att_pack8_avx2(const float *const r[8], int64_t D, float *kt,
                                                 int64_t c) {
    for (int64_t d = 0; d < D; d += 8) {
        __m256i x[8];
        for (int i = 0; i < 8; i++)
            x[i] = r[i] ? _mm256_loadu_si256((const __m256i *)(r[i] + d)) : _mm256_setzero_si256();
        lk_transpose8x8_avx2(x); /* x[e] now holds dim d + e of the 8 keys */
        for (int e = 0; e < 8; e++) _mm256_storeu_si256((__m256i *)(kt + (d + e) * ATT_KT + c), x[e]);
    }
}

/* sc[i * ATT_KT + c] = scale * q_i . k_c for nq (1..4, a constant once inlined) vectors
   and c < kp16 (a multiple of 16): 2 x nq accumulators fed by broadcasts of q. A vector's
   scores are the same bits whatever nq it is computed with. */
LK_AVX2_TARGET __attribute__((always_inline)) static inline void
att_scores_avx2(const float *const q[4], const int nq, const float *kt, int64_t D,
                int64_t kp16, float scale, float *sc) {
    const __m256 vs = _mm256_set1_ps(scale);
    for (int64_t c = 0; c < kp16; c += 16) {
        __m256 a[4][2];
        for (int i = 0; i < nq; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
        const float *k = kt + c;
        for (int64_t d = 0; d < D; d++, k += ATT_KT) {
            const __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
            for (int i = 0; i < nq; i++) {
                const __m256 b = _mm256_broadcast_ss(q[i] + d);
                a[i][0] = _mm256_fmadd_ps(b, k0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(b, k1, a[i][1]);
            }
        }
        for (int i = 0; i < nq; i++) {
            _mm256_storeu_ps(sc + i * ATT_KT + c, _mm256_mul_ps(a[i][0], vs));
            _mm256_storeu_ps(sc + i * ATT_KT + c + 8, _mm256_mul_ps(a[i][1], vs));
        }
    }
}

/* the scores of vectors r0 .. r0 + nq - 1 (nq <= 4) into sc + r0 * ATT_KT */
LK_AVX2_TARGET static inline void att_scores_n_avx2(const float *const q[4], int nq,
                                                    const float *kt, int64_t D, int64_t kp16,
                                                    float scale, float *sc) {
    if (nq >= 4) att_scores_avx2(q, 4, kt, D, kp16, scale, sc);
    else if (nq == 3) att_scores_avx2(q, 3, kt, D, kp16, scale, sc);
    else if (nq == 2) att_scores_avx2(q, 2, kt, D, kp16, scale, sc);
    else att_scores_avx2(q, 1, kt, D, kp16, scale, sc);
}

/* One vector's online-softmax step over the nv valid scores p of a tile: the running max
   *mx and sum *sum, and acc[0..D) = acc * correction + sum_c p_c v_c (p becomes the
   weights). */
LK_AVX2_TARGET static inline void att_tile_row_avx2(float *p, int64_t nv, float *mx, float *sum,
                                                    float *acc, const float *const *vrows,
                                                    int64_t D) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t c = 0;
    for (; c + 8 <= nv; c += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(p + c));
    float m = lk_hmax8_avx2(vm);
    for (; c < nv; c++) m = p[c] > m ? p[c] : m;
    if (*mx > m) m = *mx;
    const float corr = *mx == -INFINITY ? 0.0f : expf(*mx - m);
    *sum = *sum * corr + lk_exp_sum_avx2(p, nv, m, p);
    *mx = m;
    lk_pv_rows_avx2(acc, corr, p, vrows, nv, D);
}

/* scratch floats of a unit of R vectors: kt [D][KT], scores [R][KT], acc [R][D], max and
   sum [R] */
static inline size_t att_tile_floats(int64_t R, int64_t D) {
    return (size_t)D * ATT_KT + (size_t)R * ATT_KT + (size_t)R * (D + 2);
}

#endif /* LK_ATTENTION_TILE_H */
