/* Causal grouped-query attention over a paged KV cache (continuous batching).
 *
 * One call covers a flat batch of sequences: sequence i owns query rows
 * q_start[i] .. q_start[i+1]-1 at absolute positions pos_start[i] + t, and reads its keys
 * and values through block_tables[i]: position s lives in block tables[i][s / bs] at
 * offset s % bs of pools shaped [num_blocks, bs, Hkv, D]. Decode rows (one per sequence)
 * and prefill chunks (many rows) mix freely in one call.
 *
 * Work units are (sequence, kv head, block of QROWS query rows). The generic code computes
 * each row in two passes over its keys (scores into per-thread scratch, softmax, weighted
 * sum of values); the AVX2 code runs the unit's rows and heads over tiles of keys together
 * (see unit_avx2). Either way the result of a row depends only on its own sequence: the
 * same request gives the same attention output whatever else is in the batch.
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
    /* pools stored as dtype (LK_KV_*), rowb bytes per head vector; direct: f32 without
       k_scale, read in place; otherwise rows are widened to floats as they are used */
    int32_t dtype, direct;
    int64_t rowb;
    const float *k_scale; /* [Hkv, D] or NULL */
} paged_job;

/* the stored row of position s, kv head kvh (any dtype) */
static inline const char *kv_row_bytes(const void *pool, const int32_t *table, int64_t s,
                                       const paged_job *j, int64_t kvh) {
    return (const char *)pool + (((int64_t)table[s / j->bs] * j->bs + s % j->bs) * j->Hkv + kvh) * j->rowb;
}

/* one row of contiguous widened keys / values [n, D]: scores, softmax, weighted sum */
static void row_contig(const float *q, const float *k, const float *v, int64_t n, int64_t D,
                       float scale, float *sc, float *o) {
    float m = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        float acc = 0;
        for (int64_t d = 0; d < D; d++) acc += q[d] * k[s * D + d];
        sc[s] = acc * scale;
        m = sc[s] > m ? sc[s] : m;
    }
    float sum = 0;
    for (int64_t s = 0; s < n; s++) {
        sc[s] = expf(sc[s] - m);
        sum += sc[s];
    }
    for (int64_t d = 0; d < D; d++) o[d] = 0;
    for (int64_t s = 0; s < n; s++)
        for (int64_t d = 0; d < D; d++) o[d] += sc[s] * v[s * D + d];
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

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
/* AVX2: the unit's R = rows x group query vectors run the tiled core of attention_tile.h
   (the dense kernel runs the same, so a row gets the same bits paged or dense). Before
   it the kernel walked all keys once per query head and row: at a 2,000-token prefix a
   prefill token cost ~6 ms of attention on Qwen2.5-0.5B, three times its matmuls. */
#include "attention_tile.h"
#define KT ATT_KT

/* kt[d * KT + c] = K[s0 + c][d] for c < kn, zero for kn <= c < round_up(kn, 16); keys
   below `ahead` of the next tile are prefetched */
LK_AVX2_TARGET static void pack_keys_avx2(const paged_job *j, const int32_t *table, int64_t kvh,
                                          int64_t s0, int64_t kn, int64_t ahead, float *kt,
                                          const float **vrows, float *wide) {
    const int64_t D = j->D, kp16 = (kn + 15) & ~(int64_t)15;
    /* not direct: wide holds 8 widened keys [8, D], then the tile's values [KT, D] */
    float *vt = wide + 8 * D;
    const float *ks = j->k_scale ? j->k_scale + kvh * D : NULL;
    for (int64_t c = 0; c < kp16; c += 8) {
        const float *r[8];
        for (int i = 0; i < 8; i++) {
            const int64_t s = s0 + c + i;
            if (c + i < kn && s + KT < ahead) { /* the same key of the next tile */
                att_prefetch_row(kv_row_bytes(j->kp, table, s + KT, j, kvh), j->rowb);
                att_prefetch_row(kv_row_bytes(j->vp, table, s + KT, j, kvh), j->rowb);
            }
            if (c + i >= kn) {
                r[i] = NULL;
            } else if (j->direct) {
                r[i] = kv_row(j->kp, table, s, j->bs, j->Hkv, kvh, D);
                vrows[c + i] = kv_row(j->vp, table, s, j->bs, j->Hkv, kvh, D);
            } else {
                lk_kv_load(j->dtype, kv_row_bytes(j->kp, table, s, j, kvh), 1, D, ks, wide + i * D);
                lk_kv_load(j->dtype, kv_row_bytes(j->vp, table, s, j, kvh), 1, D, NULL,
                           vt + (c + i) * D);
                r[i] = wide + i * D;
                vrows[c + i] = vt + (c + i) * D;
            }
        }
        att_pack8_avx2(r, D, kt, c);
    }
}

static size_t unit_scratch_avx2(int64_t rows, int64_t group, int64_t D) {
    const int64_t R = rows * group;
    return att_tile_floats(R, D) * sizeof(float) + (size_t)KT * sizeof(float *) +
           (size_t)(8 + KT) * D * sizeof(float);
}

/* query rows t0 .. t1-1 of sequence i, the heads of kv head kvh */
LK_AVX2_TARGET static void unit_avx2(const paged_job *j, int64_t i, int64_t kvh, int64_t t0,
                                     int64_t t1, void *scratch) {
    const int64_t D = j->D, group = j->Hq / j->Hkv, R = (t1 - t0) * group;
    const int64_t r0 = j->q_start[i], pos = j->pos_start[i];
    const int32_t *table = j->tables + i * j->max_blocks;
    float *kt = (float *)scratch;
    float *sc = kt + D * KT;                 /* [R][KT] */
    float *acc = sc + R * KT;                /* [R][D] */
    float *mx = acc + R * D, *sum = mx + R;  /* [R] each */
    const float **vrows = (const float **)(sum + R);
    float *wide = (float *)(vrows + KT); /* widened rows when the pool is not direct f32 */
    const float *qv[4];
    for (int64_t r = 0; r < R; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0;
    }
    memset(acc, 0, (size_t)(R * D) * sizeof(float));
    const int64_t longest = pos + t1; /* keys of the unit's last row */
    for (int64_t s0 = 0; s0 < longest; s0 += KT) {
        const int64_t kn = longest - s0 < KT ? longest - s0 : KT;
        const int64_t kp16 = (kn + 15) & ~(int64_t)15;
        pack_keys_avx2(j, table, kvh, s0, kn, longest, kt, vrows, wide);
        /* only rows that see keys of this tile: row t sees pos + t + 1 keys */
        const int64_t tfirst = s0 - pos > t0 ? s0 - pos : t0;
        const int64_t rfirst = (tfirst - t0) * group;
        for (int64_t r = rfirst; r < R; r += 4) {
            const int nq = R - r < 4 ? (int)(R - r) : 4;
            for (int e = 0; e < nq; e++) {
                const int64_t t = t0 + (r + e) / group, h = kvh * group + (r + e) % group;
                qv[e] = j->q + ((r0 + t) * j->Hq + h) * D;
            }
            att_scores_n_avx2(qv, nq, kt, D, kp16, j->scale, sc + r * KT);
        }
        for (int64_t r = rfirst; r < R; r++) {
            const int64_t t = t0 + r / group;
            const int64_t nv = pos + t + 1 - s0 < kn ? pos + t + 1 - s0 : kn;
            att_tile_row_avx2(sc + r * KT, nv, mx + r, sum + r, acc + r * D, vrows, D);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t t = t0 + r / group, h = kvh * group + r % group;
        float *o = j->out + ((r0 + t) * j->Hq + h) * D;
        const __m256 inv = _mm256_set1_ps(1.0f / sum[r]);
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d), inv));
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
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2 && D % 8 == 0) {
        void *scratch = lk_scratch(ith, unit_scratch_avx2(t1 - t0, group, D));
        if (scratch) {
            unit_avx2(j, i, kvh, t0, t1, scratch);
            return;
        }
    }
#endif
    const int64_t longest = j->pos_start[i] + t1;
    const size_t widened = j->direct ? 0 : 2 * (size_t)longest * D;
    float *sc = (float *)lk_scratch(ith, ((size_t)(longest > 0 ? longest : 1) + widened) * sizeof(float));
    if (!sc) return;
    if (!j->direct) { /* widen the unit's keys and values once, then rows over them */
        float *kw = sc + longest, *vw = kw + longest * D;
        const float *ks = j->k_scale ? j->k_scale + kvh * D : NULL;
        for (int64_t s = 0; s < longest; s++) {
            lk_kv_load(j->dtype, kv_row_bytes(j->kp, table, s, j, kvh), 1, D, ks, kw + s * D);
            lk_kv_load(j->dtype, kv_row_bytes(j->vp, table, s, j, kvh), 1, D, NULL, vw + s * D);
        }
        for (int64_t t = t0; t < t1; t++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = kvh * group + g;
                row_contig(j->q + ((r0 + t) * j->Hq + h) * D, kw, vw, j->pos_start[i] + t + 1,
                           D, j->scale, sc, j->out + ((r0 + t) * j->Hq + h) * D);
            }
        return;
    }
    for (int64_t t = t0; t < t1; t++) {
        const int64_t n = j->pos_start[i] + t + 1;
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = kvh * group + g;
            const float *q = j->q + ((r0 + t) * j->Hq + h) * D;
            float *o = j->out + ((r0 + t) * j->Hq + h) * D;
            row_generic(j, q, table, n, kvh, sc, o);
        }
    }
}

int lk_paged_attention(const float *q, int64_t Hq, int64_t D, const float *k_pool,
                       const float *v_pool, int64_t block_size, int64_t Hkv, int64_t nseq,
                       const int64_t *q_start, const int64_t *pos_start,
                       const int32_t *block_tables, int64_t max_blocks, float scale,
                       float *out) {
    return lk_paged_attention_kv(q, Hq, D, LK_KV_F32, k_pool, v_pool, NULL, block_size, Hkv,
                                 nseq, q_start, pos_start, block_tables, max_blocks, scale, out);
}

int lk_paged_attention_kv(const float *q, int64_t Hq, int64_t D, int32_t dtype,
                          const void *k_pool, const void *v_pool, const float *k_scale,
                          int64_t block_size, int64_t Hkv, int64_t nseq,
                          const int64_t *q_start, const int64_t *pos_start,
                          const int32_t *block_tables, int64_t max_blocks, float scale,
                          float *out) {
    if (Hq <= 0 || Hkv <= 0 || D <= 0 || block_size <= 0 || nseq < 0 || Hq % Hkv ||
        lk_kv_row_bytes(dtype, D) < 0)
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
    paged_job j = {q, Hq, D, Hkv, block_size, (const float *)k_pool, (const float *)v_pool,
                   q_start, pos_start, block_tables, max_blocks, nseq, scale, out, unit_seq,
                   dtype, dtype == LK_KV_F32 && !k_scale, lk_kv_row_bytes(dtype, D), k_scale};
    lk_parallel(paged_task, &j, unit_seq[nseq]);
    lk_unlock();
    return 0;
}
