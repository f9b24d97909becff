/* Causal grouped-query attention over strided q / k / v (prefill, and decode over a
 * KV cache).
 *
 * A work unit is (batch, kv head, block of query rows) and covers the query heads of
 * that kv head's group (all of them, or a part when there would be too few units for the
 * threads), so each key and value row is fetched from memory once per unit rather than
 * once per query head (a 7:1 group reads up to 7x less at long contexts). Keys are
 * walked in blocks that stay in L2 while each head of the group passes over them, with
 * an online softmax (running max and sum) across blocks. Units are claimed from the pool
 * longest-first, since causal rows further down attend more keys.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>


#define QROWS 8    /* query rows per work unit */
#define KBLOCK 256 /* keys per block: 64 KiB of K and of V at D = 64 */

typedef struct {
    const float *q;
    int64_t B, T, Hq, D, qsb, qst, qsh;
    const float *k;
    int64_t ksb, kst, ksh;
    const float *v;
    int64_t vsb, vst, vsh;
    int64_t S, Hkv, start_pos;
    float scale;
    float *out;
    int64_t tblocks, gsplit, units;
    /* keys / values stored as dtype (LK_KV_*): k, v then point at bytes and the strides
       count bytes; rows are widened to floats a block at a time (kv_block) */
    int32_t dtype, direct; /* direct: f32 without k_scale, read in place */
    /* the tiled core (attention_tile.h) for every row, decode included: D % 8 == 0 and
       query groups of 2 or more heads. Plain multi-head attention keeps one dot per key:
       a decode row there is a single query vector per key tile, which would pay the tile's
       transposition alone (0.56 -> 0.79 ms at 8 heads x 64, 2,048 keys). The choice
       depends on the shapes only, so decode and prefill rows run the same code. */
    int32_t tiled;
    const float *k_scale;  /* [Hkv, D] or NULL */
} attn_job;

/* Rows s0 .. s0+n-1 of kv head kvh of sequence b, widened to floats: keys into kt, values
   into vt ([n, D] each). */
static void kv_block(const attn_job *j, int64_t b, int64_t kvh, int64_t s0, int64_t n,
                     float *kt, float *vt) {
    const char *kb = (const char *)j->k + b * j->ksb + kvh * j->ksh;
    const char *vb = (const char *)j->v + b * j->vsb + kvh * j->vsh;
    const float *ks = j->k_scale ? j->k_scale + kvh * j->D : NULL;
    for (int64_t s = 0; s < n; s++) {
        lk_kv_load(j->dtype, kb + (s0 + s) * j->kst, 1, j->D, ks, kt + s * j->D);
        lk_kv_load(j->dtype, vb + (s0 + s) * j->vst, 1, j->D, NULL, vt + s * j->D);
    }
}

/* ---- generic: one query row, two passes -------------------------------------------- */

static void attend_row_generic(const float *q, const float *k, int64_t kst, const float *v,
                               int64_t vst, int64_t n, int64_t D, float scale, float *sc,
                               float *o) {
    float m = -INFINITY;
    for (int64_t s = 0; s < n; s++) {
        const float *kr = k + s * kst;
        float acc = 0;
        for (int64_t d = 0; d < D; d++) acc += q[d] * kr[d];
        sc[s] = acc * scale;
        m = sc[s] > m ? sc[s] : m;
    }
    float sum = 0;
    for (int64_t s = 0; s < n; s++) {
        sc[s] = expf(sc[s] - m);
        sum += sc[s];
    }
    for (int64_t d = 0; d < D; d++) o[d] = 0;
    for (int64_t s = 0; s < n; s++) {
        const float *vr = v + s * vst;
        for (int64_t d = 0; d < D; d++) o[d] += sc[s] * vr[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

static void unit_generic(const attn_job *j, int64_t b, int64_t kvh, int64_t g0, int64_t g1,
                         int64_t t0, int64_t t1, float *sc) {
    const int64_t group = j->Hq / j->Hkv;
    const float *kb, *vb;
    int64_t kst = j->kst, vst = j->vst;
    if (j->direct) {
        kb = j->k + b * j->ksb + kvh * j->ksh;
        vb = j->v + b * j->vsb + kvh * j->vsh;
    } else { /* the unit's keys and values widened once, after the scores (sc[S]) */
        int64_t n = j->start_pos + t1;
        if (n > j->S) n = j->S;
        float *kt = sc + (j->S > 0 ? j->S : 1), *vt = kt + j->S * j->D;
        kv_block(j, b, kvh, 0, n, kt, vt);
        kb = kt;
        vb = vt;
        kst = vst = j->D;
    }
    for (int64_t t = t0; t < t1; t++) {
        int64_t n = j->start_pos + t + 1;
        if (n > j->S) n = j->S;
        for (int64_t g = g0; g < g1; g++) {
            const int64_t h = kvh * group + g;
            const float *q = j->q + b * j->qsb + t * j->qst + h * j->qsh;
            float *o = j->out + ((b * j->T + t) * j->Hq + h) * j->D;
            if (n <= 0) memset(o, 0, (size_t)j->D * sizeof(float));
            else attend_row_generic(q, kb, kst, vb, vst, n, j->D, j->scale, sc, o);
        }
    }
}

/* ---- AVX2: blocked keys, online softmax, the whole group per block --------------------- */
#if LK_X86

LK_AVX2_TARGET static inline __m256 dot8_acc(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d + 8 <= D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return acc;
}

LK_AVX2_TARGET static inline float dot_tail(const float *a, const float *b, int64_t D) {
    float s = 0;
    for (int64_t d = D & ~(int64_t)7; d < D; d++) s += a[d] * b[d];
    return s;
}

/* sc[s] = scale * dot(q, k_s) for s < n; returns max(sc) */
LK_AVX2_TARGET static float scores_avx2(const float *q, const float *k, int64_t kst, int64_t n,
                                        int64_t D, float scale, float *sc) {
    int64_t s = 0;
    for (; s + 4 <= n; s += 4) {
        const float *k0 = k + s * kst;
        __m256 a0 = dot8_acc(q, k0, D), a1 = dot8_acc(q, k0 + kst, D);
        __m256 a2 = dot8_acc(q, k0 + 2 * kst, D), a3 = dot8_acc(q, k0 + 3 * kst, D);
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if (D & 7)
            r = _mm_add_ps(r, _mm_setr_ps(dot_tail(q, k0, D), dot_tail(q, k0 + kst, D),
                                          dot_tail(q, k0 + 2 * kst, D), dot_tail(q, k0 + 3 * kst, D)));
        _mm_storeu_ps(sc + s, _mm_mul_ps(r, _mm_set1_ps(scale)));
    }
    for (; s < n; s++) {
        const float *kr = k + s * kst;
        sc[s] = (lk_hsum8_avx2(dot8_acc(q, kr, D)) + dot_tail(q, kr, D)) * scale;
    }
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (s = 0; s + 8 <= n; s += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sc + s));
    float m = lk_hmax8_avx2(vm);
    for (; s < n; s++) m = sc[s] > m ? sc[s] : m;
    return m;
}

/* scratch: KBLOCK scores, then per head of the group its running max, sum and output,
   then the block's KBLOCK value row pointers */
LK_AVX2_TARGET static void unit_avx2(const attn_job *j, int64_t b, int64_t kvh, int64_t g0,
                                     int64_t g1, int64_t t0, int64_t t1, float *scratch) {
    const int64_t group = j->Hq / j->Hkv, D = j->D;
    const float *kb = j->direct ? j->k + b * j->ksb + kvh * j->ksh : NULL;
    const float *vb = j->direct ? j->v + b * j->vsb + kvh * j->vsh : NULL;
    float *sc = scratch;
    float *mx = sc + KBLOCK, *sum = mx + group, *acc = sum + group;
    const float **vrows = (const float **)(scratch + ((KBLOCK + group * (2 + D) + 1) & ~(int64_t)1));
    /* non-f32 storage: the block's keys and values widened, after the row pointers */
    float *kt = (float *)(vrows + KBLOCK), *vt = kt + KBLOCK * D;
    for (int64_t t = t0; t < t1; t++) {
        int64_t n = j->start_pos + t + 1;
        if (n > j->S) n = j->S;
        const float *qt = j->q + b * j->qsb + t * j->qst + kvh * group * j->qsh;
        for (int64_t g = g0; g < g1; g++) {
            mx[g] = -INFINITY;
            sum[g] = 0;
            memset(acc + g * D, 0, (size_t)D * sizeof(float));
        }
        for (int64_t s0 = 0; s0 < n; s0 += KBLOCK) {
            const int64_t sn = n - s0 < KBLOCK ? n - s0 : KBLOCK;
            const float *kblk, *vblk;
            int64_t kst = j->kst, vst = j->vst;
            if (j->direct) {
                kblk = kb + s0 * j->kst;
                vblk = vb + s0 * j->vst;
            } else {
                kv_block(j, b, kvh, s0, sn, kt, vt);
                kblk = kt;
                vblk = vt;
                kst = vst = D;
            }
            for (int64_t s = 0; s < sn; s++) vrows[s] = vblk + s * vst;
            for (int64_t g = g0; g < g1; g++) {
                const float bm = scores_avx2(qt + g * j->qsh, kblk, kst, sn, D, j->scale, sc);
                const float m = bm > mx[g] ? bm : mx[g];
                if (m == -INFINITY) continue; /* every score so far is -inf */
                const float corr = mx[g] == -INFINITY ? 0.0f : expf(mx[g] - m);
                const float bs = lk_exp_sum_avx2(sc, sn, m, sc);
                sum[g] = sum[g] * corr + bs;
                mx[g] = m;
                lk_pv_rows_avx2(acc + g * D, corr, sc, vrows, sn, D);
            }
        }
        for (int64_t g = g0; g < g1; g++) {
            float *o = j->out + ((b * j->T + t) * j->Hq + kvh * group + g) * D;
            const float inv = sum[g] > 0 ? 1.0f / sum[g] : 0.0f;
            const float *a = acc + g * D;
            int64_t d = 0;
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), _mm256_set1_ps(inv)));
            for (; d < D; d++) o[d] = a[d] * inv;
        }
    }
}

/* The tiled core (attention_tile.h, the paged kernel's too) for D % 8 == 0: the unit's
   R = rows x heads query vectors pass over tiles of ATT_KT keys together, each tile's keys
   transposed once. Every query row runs it whatever T is (decode included), so a row's bits
   do not depend on the chunking. Before it, each row and head walked all keys with one
   dot per key: a 16,384-token prefill of Qwen2.5-0.5B took 350 s, mostly here. */
#include "attention_tile.h"

static size_t tiled_scratch(int64_t R, int64_t D) {
    return att_tile_floats(R, D) * sizeof(float) + (size_t)ATT_KT * sizeof(float *) +
           (size_t)(8 + ATT_KT) * D * sizeof(float);
}

LK_AVX2_TARGET static void unit_tiled_avx2(const attn_job *j, int64_t b, int64_t kvh, int64_t g0,
                                           int64_t g1, int64_t t0, int64_t t1, void *scratch) {
    const int64_t D = j->D, group = j->Hq / j->Hkv, gn = g1 - g0, R = (t1 - t0) * gn;
    const int64_t pos = j->start_pos, KT = ATT_KT;
    float *kt = (float *)scratch;
    float *sc = kt + D * KT;                 /* [R][KT] */
    float *acc = sc + R * KT;                /* [R][D] */
    float *mx = acc + R * D, *sum = mx + R;  /* [R] each */
    const float **vrows = (const float **)(sum + R);
    float *wide = (float *)(vrows + KT); /* widened keys [8][D], then values [KT][D] */
    float *vt = wide + 8 * D;
    const float *ks = j->k_scale ? j->k_scale + kvh * D : NULL;
    const float *qv[4];
    for (int64_t r = 0; r < R; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0;
    }
    memset(acc, 0, (size_t)(R * D) * sizeof(float));
    const int64_t longest = pos + t1 < j->S ? pos + t1 : j->S; /* keys of the last row */
    const int64_t rowb = j->direct ? D * (int64_t)sizeof(float) : lk_kv_row_bytes(j->dtype, D);
    for (int64_t s0 = 0; s0 < longest; s0 += KT) {
        const int64_t kn = longest - s0 < KT ? longest - s0 : KT;
        const int64_t kp16 = (kn + 15) & ~(int64_t)15;
        for (int64_t c = 0; c < kp16; c += 8) { /* the tile's keys, transposed */
            const float *rows[8];
            for (int i = 0; i < 8; i++) {
                const int64_t s = s0 + c + i;
                if (c + i < kn && s + KT < longest) { /* the same key of the next tile */
                    const int64_t sn = s + KT;
                    if (j->direct) {
                        att_prefetch_row(j->k + b * j->ksb + sn * j->kst + kvh * j->ksh, rowb);
                        att_prefetch_row(j->v + b * j->vsb + sn * j->vst + kvh * j->vsh, rowb);
                    } else {
                        att_prefetch_row((const char *)j->k + b * j->ksb + sn * j->kst + kvh * j->ksh, rowb);
                        att_prefetch_row((const char *)j->v + b * j->vsb + sn * j->vst + kvh * j->vsh, rowb);
                    }
                }
                if (c + i >= kn) {
                    rows[i] = NULL;
                } else if (j->direct) {
                    rows[i] = j->k + b * j->ksb + s * j->kst + kvh * j->ksh;
                    vrows[c + i] = j->v + b * j->vsb + s * j->vst + kvh * j->vsh;
                } else { /* strides count bytes */
                    lk_kv_load(j->dtype, (const char *)j->k + b * j->ksb + s * j->kst + kvh * j->ksh,
                               1, D, ks, wide + i * D);
                    lk_kv_load(j->dtype, (const char *)j->v + b * j->vsb + s * j->vst + kvh * j->vsh,
                               1, D, NULL, vt + (c + i) * D);
                    rows[i] = wide + i * D;
                    vrows[c + i] = vt + (c + i) * D;
                }
            }
            att_pack8_avx2(rows, D, kt, c);
        }
        /* only rows that see keys of this tile: row t sees pos + t + 1 keys */
        const int64_t tfirst = s0 - pos > t0 ? s0 - pos : t0;
        const int64_t rfirst = (tfirst - t0) * gn;
        for (int64_t r = rfirst; r < R; r += 4) {
            const int nq = R - r < 4 ? (int)(R - r) : 4;
            for (int e = 0; e < nq; e++) {
                const int64_t t = t0 + (r + e) / gn, h = kvh * group + g0 + (r + e) % gn;
                qv[e] = j->q + b * j->qsb + t * j->qst + h * j->qsh;
            }
            att_scores_n_avx2(qv, nq, kt, D, kp16, j->scale, sc + r * KT);
        }
        for (int64_t r = rfirst; r < R; r++) {
            const int64_t t = t0 + r / gn;
            const int64_t n = pos + t + 1 < j->S ? pos + t + 1 : j->S;
            const int64_t nv = n - s0 < kn ? n - s0 : kn;
            att_tile_row_avx2(sc + r * KT, nv, mx + r, sum + r, acc + r * D, vrows, D);
        }
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t t = t0 + r / gn, h = kvh * group + g0 + r % gn;
        float *o = j->out + ((b * j->T + t) * j->Hq + h) * D;
        const __m256 inv = _mm256_set1_ps(sum[r] > 0 ? 1.0f / sum[r] : 0.0f);
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + d), inv));
    }
}
#endif

static void attn_task(void *vctx, int64_t c, int ith) {
    const attn_job *j = (const attn_job *)vctx;
    const int64_t u = j->units - 1 - c; /* last query blocks attend most keys: start there */
    const int64_t tb = u % j->tblocks;
    const int64_t gp = (u / j->tblocks) % j->gsplit;
    const int64_t kvh = (u / (j->tblocks * j->gsplit)) % j->Hkv;
    const int64_t b = u / (j->tblocks * j->gsplit * j->Hkv);
    const int64_t group = j->Hq / j->Hkv;
    const int64_t g0 = gp * group / j->gsplit, g1 = (gp + 1) * group / j->gsplit;
    const int64_t t0 = tb * QROWS, t1 = t0 + QROWS < j->T ? t0 + QROWS : j->T;
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2 && j->tiled) {
        void *scratch = lk_scratch(ith, tiled_scratch((t1 - t0) * (g1 - g0), j->D));
        if (!scratch) return;
        unit_tiled_avx2(j, b, kvh, g0, g1, t0, t1, scratch);
        return;
    }
    if (lk_active_isa == LK_ISA_AVX2) {
        /* floats, rounded up to an even count so the pointers after them are aligned */
        const size_t floats = (size_t)(KBLOCK + group * (2 + j->D) + 1) & ~(size_t)1;
        const size_t tiles = j->direct ? 0 : 2 * (size_t)KBLOCK * j->D * sizeof(float);
        float *scratch = (float *)lk_scratch(ith, floats * sizeof(float) + KBLOCK * sizeof(float *) + tiles);
        if (!scratch) return;
        unit_avx2(j, b, kvh, g0, g1, t0, t1, scratch);
        return;
    }
#endif
    const size_t widened = j->direct ? 0 : 2 * (size_t)j->S * j->D;
    float *sc = (float *)lk_scratch(ith, ((size_t)(j->S > 0 ? j->S : 1) + widened) * sizeof(float));
    if (!sc) return;
    unit_generic(j, b, kvh, g0, g1, t0, t1, sc);
}

int lk_attention(const float *q, int64_t B, int64_t T, int64_t Hq, int64_t D, int64_t qsb,
                 int64_t qst, int64_t qsh, const float *k, int64_t ksb, int64_t kst, int64_t ksh,
                 const float *v, int64_t vsb, int64_t vst, int64_t vsh, int64_t S, int64_t Hkv,
                 int64_t start_pos, float scale, float *out) {
    return lk_attention_kv(q, B, T, Hq, D, qsb, qst, qsh, LK_KV_F32, k, ksb, kst, ksh, v, vsb,
                           vst, vsh, NULL, S, Hkv, start_pos, scale, out);
}

int lk_attention_kv(const float *q, int64_t B, int64_t T, int64_t Hq, int64_t D, int64_t qsb,
                    int64_t qst, int64_t qsh, int32_t dtype, const void *k, int64_t ksb,
                    int64_t kst, int64_t ksh, const void *v, int64_t vsb, int64_t vst,
                    int64_t vsh, const float *k_scale, int64_t S, int64_t Hkv,
                    int64_t start_pos, float scale, float *out) {
    if (B < 0 || T < 0 || Hq <= 0 || Hkv <= 0 || D <= 0 || S < 0 || start_pos < 0 || Hq % Hkv ||
        lk_kv_row_bytes(dtype, D) < 0)
        return -1;
    if (B == 0 || T == 0) return 0;
    attn_job j;
    j.dtype = dtype;
    j.k_scale = k_scale;
    j.direct = dtype == LK_KV_F32 && !k_scale;
    /* direct: strides stay in floats (pointer arithmetic on float *); otherwise bytes */
    const int64_t unit = dtype == LK_KV_F32 ? 4 : dtype == LK_KV_F16 ? 2 : 1;
    if (!j.direct) {
        ksb *= unit; kst *= unit; ksh *= unit;
        vsb *= unit; vst *= unit; vsh *= unit;
    }
    j.q = q; j.B = B; j.T = T; j.Hq = Hq; j.D = D; j.qsb = qsb; j.qst = qst; j.qsh = qsh;
    j.k = (const float *)k; j.ksb = ksb; j.kst = kst; j.ksh = ksh;
    j.v = (const float *)v; j.vsb = vsb; j.vst = vst; j.vsh = vsh;
    j.S = S; j.Hkv = Hkv; j.start_pos = start_pos; j.scale = scale; j.out = out;
    j.tblocks = (T + QROWS - 1) / QROWS;
    j.tiled = D % 8 == 0 && Hq / Hkv >= 2;
    lk_lock();
    /* split each group's heads when there are too few units to keep every thread busy
       (decode: one query row, a couple of kv heads); each part rereads the keys, and in
       the tiled core transposes them again, so there it takes one unit per thread (two
       parts of a head measured slower than one unit of all its heads) */
    const int64_t nth = lk_threads_locked();
    const int64_t group = Hq / Hkv, want = j.tiled && lk_active_isa == LK_ISA_AVX2 ? nth : 2 * nth;
    j.gsplit = 1;
    while (j.gsplit < group && B * Hkv * j.tblocks * j.gsplit < want) j.gsplit++;
    j.units = B * Hkv * j.tblocks * j.gsplit;
    lk_parallel(attn_task, &j, j.units);
    lk_unlock();
    return 0;
}
