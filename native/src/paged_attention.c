/* Causal grouped-query attention over a paged KV cache (continuous batching).
 *
 * One call covers a flat batch of sequences: sequence i owns query rows
 * q_start[i] .. q_start[i+1]-1 at absolute positions pos_start[i] + t, and reads its keys
 * and values through block_tables[i]: position s lives in block tables[i][s / bs] at
 * offset s % bs of pools shaped [num_blocks, bs, Hkv, D]. Decode rows (one per sequence)
 * and prefill chunks (many rows) mix freely in one call.
 *
 * Work units are (sequence, kv head, block of QROWS query rows); each row is computed in
 * two passes over its keys (scores into per-thread scratch, softmax, weighted sum of
 * values), so the result of a row depends only on its own sequence: the same request gives
 * the same attention output whatever else is in the batch.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>

#define QROWS 8

typedef struct {
    const float *q;
    int64_t Hq, D, Hkv, bs;
    const float *kp, *vp;
    const int64_t *q_start, *pos_start;
    const int32_t *tables;
    int64_t max_blocks, nseq;
    float scale;
    float *out;
    const int64_t *unit_seq;  /* first unit index of each sequence, [nseq + 1] */
} paged_job;

static inline const float *kv_row(const float *pool, const int32_t *table, int64_t s,
                                  int64_t bs, int64_t Hkv, int64_t kvh, int64_t D) {
    return pool + (((int64_t)table[s / bs] * bs + s % bs) * Hkv + kvh) * D;
}

/* The rows of positions 0 .. n-1 of kv head kvh, in order, without a division per
   position (it cost more than the dot itself): FOR_KV_ROWS(pool, table, n, ptr, s) { ... }
   runs the body with ptr at position s's row. */
#define FOR_KV_ROWS(pool, j, table, n, kvh, ptr, s)                                          \
    for (int64_t blk_ = 0, s = 0; s < (n); blk_++)                                           \
        for (const float *ptr = (pool) + ((int64_t)(table)[blk_] * (j)->bs * (j)->Hkv + (kvh)) * (j)->D, \
                         *end_ = ptr + ((n) - s < (j)->bs ? (n) - s : (j)->bs) * (j)->Hkv * (j)->D; \
             ptr < end_; ptr += (j)->Hkv * (j)->D, s++)

static void row_generic(const paged_job *j, const float *q, const int32_t *table, int64_t n,
                        int64_t kvh, float *sc, float *o) {
    const int64_t D = j->D;
    float m = -INFINITY;
    FOR_KV_ROWS(j->kp, j, table, n, kvh, kr, s) {
        float acc = 0;
        for (int64_t d = 0; d < D; d++) acc += q[d] * kr[d];
        sc[s] = acc * j->scale;
        m = sc[s] > m ? sc[s] : m;
    }
    float sum = 0;
    for (int64_t s = 0; s < n; s++) {
        sc[s] = expf(sc[s] - m);
        sum += sc[s];
    }
    for (int64_t d = 0; d < D; d++) o[d] = 0;
    FOR_KV_ROWS(j->vp, j, table, n, kvh, vr, s) {
        for (int64_t d = 0; d < D; d++) o[d] += sc[s] * vr[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

#if LK_X86
LK_AVX2_TARGET static void row_avx2(const paged_job *j, const float *q, const int32_t *table,
                                    int64_t n, int64_t kvh, float *sc, float *o) {
    const int64_t D = j->D, D8 = D & ~(int64_t)7;
    float m = -INFINITY;
    FOR_KV_ROWS(j->kp, j, table, n, kvh, kr, s) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D8; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kr + d), acc);
        float t = lk_hsum8_avx2(acc);
        for (int64_t d = D8; d < D; d++) t += q[d] * kr[d];
        sc[s] = t * j->scale;
        m = sc[s] > m ? sc[s] : m;
    }
    const float inv = 1.0f / lk_exp_sum_avx2(sc, n, m, sc);
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        FOR_KV_ROWS(j->vp, j, table, n, kvh, vrow, s) {
            const float *vr = vrow + d0;
            const __m256 p = _mm256_broadcast_ss(sc + s);
            c0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr), c0);
            c1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8), c1);
            c2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 16), c2);
            c3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 24), c3);
        }
        const __m256 vi = _mm256_set1_ps(inv);
        _mm256_storeu_ps(o + d0, _mm256_mul_ps(c0, vi));
        _mm256_storeu_ps(o + d0 + 8, _mm256_mul_ps(c1, vi));
        _mm256_storeu_ps(o + d0 + 16, _mm256_mul_ps(c2, vi));
        _mm256_storeu_ps(o + d0 + 24, _mm256_mul_ps(c3, vi));
    }
    for (; d0 + 8 <= D; d0 += 8) {
        __m256 c0 = _mm256_setzero_ps();
        FOR_KV_ROWS(j->vp, j, table, n, kvh, vr, s)
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + s), _mm256_loadu_ps(vr + d0), c0);
        _mm256_storeu_ps(o + d0, _mm256_mul_ps(c0, _mm256_set1_ps(inv)));
    }
    for (; d0 < D; d0++) {
        float a = 0;
        for (int64_t s = 0; s < n; s++) a += sc[s] * kv_row(j->vp, table, s, j->bs, j->Hkv, kvh, D)[d0];
        o[d0] = a * inv;
    }
}
#endif

static void paged_task(void *vctx, int64_t u, int ith) {
    const paged_job *j = (const paged_job *)vctx;
    /* find the sequence of unit u (few sequences: a linear scan is cheapest) */
    int64_t i = 0;
    while (j->unit_seq[i + 1] <= u) i++;
    const int64_t r0 = j->q_start[i], rows = j->q_start[i + 1] - r0;
    const int64_t tblocks = (rows + QROWS - 1) / QROWS;
    const int64_t local = u - j->unit_seq[i];
    const int64_t kvh = local / tblocks, tb = local % tblocks;
    const int64_t t0 = tb * QROWS, t1 = t0 + QROWS < rows ? t0 + QROWS : rows;
    const int64_t group = j->Hq / j->Hkv, D = j->D;
    const int32_t *table = j->tables + i * j->max_blocks;
    const int64_t longest = j->pos_start[i] + t1;
    float *sc = (float *)lk_scratch(ith, (size_t)(longest > 0 ? longest : 1) * sizeof(float));
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n = j->pos_start[i] + t + 1;
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = kvh * group + g;
            const float *q = j->q + ((r0 + t) * j->Hq + h) * D;
            float *o = j->out + ((r0 + t) * j->Hq + h) * D;
#if LK_X86
            if (lk_active_isa == LK_ISA_AVX2) {
                row_avx2(j, q, table, n, kvh, sc, o);
                continue;
            }
#endif
            row_generic(j, q, table, n, kvh, sc, o);
        }
    }
}

int lk_paged_attention(const float *q, int64_t Hq, int64_t D, const float *k_pool,
                       const float *v_pool, int64_t block_size, int64_t Hkv, int64_t nseq,
                       const int64_t *q_start, const int64_t *pos_start,
                       const int32_t *block_tables, int64_t max_blocks, float scale,
                       float *out) {
    if (Hq <= 0 || Hkv <= 0 || D <= 0 || block_size <= 0 || nseq < 0 || Hq % Hkv)
        return -1;
    for (int64_t i = 0; i < nseq; i++) {
        const int64_t rows = q_start[i + 1] - q_start[i];
        if (rows < 0 || pos_start[i] < 0) return -1;
        if (rows && (pos_start[i] + rows + block_size - 1) / block_size > max_blocks) return -1;
    }
    if (nseq == 0 || q_start[nseq] == q_start[0]) return 0;
    int64_t stack_units[65];
    int64_t *unit_seq = nseq < 65 ? stack_units : NULL;
    lk_lock();
    if (!unit_seq) {
        unit_seq = (int64_t *)lk_shared_scratch((size_t)(nseq + 1) * sizeof(int64_t));
        if (!unit_seq) {
            lk_unlock();
            return -2;
        }
    }
    unit_seq[0] = 0;
    for (int64_t i = 0; i < nseq; i++) {
        const int64_t rows = q_start[i + 1] - q_start[i];
        unit_seq[i + 1] = unit_seq[i] + Hkv * ((rows + QROWS - 1) / QROWS);
    }
    paged_job j = {q, Hq, D, Hkv, block_size, k_pool, v_pool, q_start, pos_start,
                   block_tables, max_blocks, nseq, scale, out, unit_seq};
    lk_parallel(paged_task, &j, unit_seq[nseq]);
    lk_unlock();
    return 0;
}
