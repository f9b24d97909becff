/* Bidirectional multi-head attention of a right-padded batch (BERT-family encoders).
 *
 * Padded: q, k, v, out [B, T, H, D] contiguous; lengths[b]: keys s < lengths[b] are real,
 * the rest padding that no query attends to (rows t >= lengths[b] are computed over the
 * real keys too; they are padding and mean nothing). Packed: [N, H, D], sequence b the rows
 * offsets[b] .. offsets[b + 1] (no padding: what an encoder's linear layers run on, and a
 * vision tower's frames).
 *
 * AVX2: one task is one (b, h) and a block of up to ENC_TBLOCK query rows. The head's real
 * keys are packed transposed (Kt [D][n], so a score vector is eight keys) and its values
 * contiguous, then six query rows at a time: scores as a 6 x 16 register tile over D, a
 * stable softmax with the vector exp, and the output as a 3 x 32 tile over the keys. Both
 * products are GEMM-shaped, where the per-row kernel below did a D-long dot per key (a
 * horizontal sum every 32 values at D = 32) and one axpy per key.
 * Generic (and D not a multiple of 8): one (b, t, h) query row at a time, scalar.
 *
 * Why not numpy: its batched matmul hands each of the B x H small products to a threaded
 * BLAS, which on a busy 2-core machine spent 14 s where one thread needs 0.3 s (and it
 * competes with this library's own pool); here the rows are spread over that one pool.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Sequence b's token rows are row0[b] .. row0[b] + nq[b] (its queries; the first n[b] of
   them are its keys), each row H * D floats of q, k, v and out. Padded: row0 = b T, nq = T. */
typedef struct {
    const float *q, *k, *v;
    int64_t B, T, H, D; /* T: the longest nq */
    const int64_t *row0, *nq, *n;
    const int64_t *task0; /* AVX2: the first task of each sequence, task0[B] = all tasks */
    float scale;
    float *out;
    int wide; /* the 512-bit tiles (enc_tile_avx512); set by run_encoder */
} enc_job;

/* rows r0 .. r1 of the flat (b, t, h) order over all sequences' query rows (r / H in
   sequence b at t: found by walking row0) */
static inline __attribute__((always_inline)) void enc_rows(const enc_job *j, int64_t r0,
                                                            int64_t r1, float *p) {
    const int64_t H = j->H, D = j->D, HD = H * D;
    int64_t b = 0, seen = 0; /* query rows of sequences before b */
    for (int64_t r = r0; r < r1; r++) {
        const int64_t h = r % H;
        int64_t t = r / H - seen;
        while (t >= j->nq[b]) {
            seen += j->nq[b];
            t -= j->nq[b];
            b++;
        }
        const int64_t n = j->n[b], base = j->row0[b];
        const float *qr = j->q + ((base + t) * H + h) * D;
        const float *kb = j->k + (base * H + h) * D;
        const float *vb = j->v + (base * H + h) * D;
        float *o = j->out + ((base + t) * H + h) * D;
        float top = -INFINITY;
        for (int64_t s = 0; s < n; s++) {
            const float *kr = kb + s * HD;
            float acc = 0;
            for (int64_t i = 0; i < D; i++) acc += qr[i] * kr[i];
            p[s] = acc * j->scale;
            if (p[s] > top) top = p[s];
        }
        float sum = 0;
        for (int64_t s = 0; s < n; s++) {
            p[s] = expf(p[s] - top);
            sum += p[s];
        }
        const float inv = n > 0 ? 1.0f / sum : 0.0f;
        for (int64_t i = 0; i < D; i++) o[i] = 0;
        for (int64_t s = 0; s < n; s++) {
            const float w = p[s] * inv;
            const float *vr = vb + s * HD;
            for (int64_t i = 0; i < D; i++) o[i] += w * vr[i];
        }
    }
}

static void enc_generic(const enc_job *j, int64_t r0, int64_t r1, float *p) {
    enc_rows(j, r0, r1, p);
}

#if LK_X86
#define ENC_TBLOCK 96 /* query rows per task */
#define ENC_QR 6      /* query rows per score tile */

/* sc[r][s0 .. s0 + 8 * NV) = scale * q_r . k_s for NV * 8 keys from s0, QR rows (QR <= 6) */
LK_AVX2_TARGET __attribute__((always_inline)) static inline void
enc_scores_tile(const float *const *qr, int QR, const float *kt, int64_t np8, int64_t D,
                int64_t s0, int NV, float scale, float *sc) {
    __m256 acc[ENC_QR][2];
    for (int r = 0; r < QR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i++) {
        const float *kr = kt + i * np8 + s0;
        const __m256 k0 = _mm256_loadu_ps(kr);
        const __m256 k1 = NV == 2 ? _mm256_loadu_ps(kr + 8) : k0;
        for (int r = 0; r < QR; r++) {
            const __m256 qv = _mm256_broadcast_ss(qr[r] + i);
            acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
            if (NV == 2) acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    const __m256 vs = _mm256_set1_ps(scale);
    for (int r = 0; r < QR; r++) {
        _mm256_storeu_ps(sc + r * np8 + s0, _mm256_mul_ps(acc[r][0], vs));
        if (NV == 2) _mm256_storeu_ps(sc + r * np8 + s0 + 8, _mm256_mul_ps(acc[r][1], vs));
    }
}

LK_AVX2_TARGET static void enc_scores(const float *const *qr, int QR, const float *kt,
                                      int64_t np8, int64_t D, float scale, float *sc) {
    int64_t s0 = 0;
#define ENC_SC(Q) \
    for (s0 = 0; s0 + 16 <= np8; s0 += 16) enc_scores_tile(qr, Q, kt, np8, D, s0, 2, scale, sc); \
    if (s0 < np8) enc_scores_tile(qr, Q, kt, np8, D, s0, 1, scale, sc);
    switch (QR) {
    case 1: ENC_SC(1) break;
    case 2: ENC_SC(2) break;
    case 3: ENC_SC(3) break;
    case 4: ENC_SC(4) break;
    case 5: ENC_SC(5) break;
    default: ENC_SC(6) break;
    }
#undef ENC_SC
}

/* o_r[d0 .. d0 + 8 * NV) = inv_r * sum_s p_r[s] v_s[d0 ..] for RR (<= 3) rows */
LK_AVX2_TARGET __attribute__((always_inline)) static inline void
enc_pv_tile(const float *p, int64_t np8, int RR, const float *vp, int64_t n, int64_t D,
            int64_t d0, int NV, const float *inv, float *const *o) {
    __m256 acc[3][4];
    for (int r = 0; r < RR; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        const float *vr = vp + s * D + d0;
        __m256 v[4];
        for (int c = 0; c < NV; c++) v[c] = _mm256_loadu_ps(vr + 8 * c);
        for (int r = 0; r < RR; r++) {
            const __m256 pv = _mm256_broadcast_ss(p + r * np8 + s);
            for (int c = 0; c < NV; c++) acc[r][c] = _mm256_fmadd_ps(pv, v[c], acc[r][c]);
        }
    }
    for (int r = 0; r < RR; r++) {
        const __m256 iv = _mm256_set1_ps(inv[r]);
        for (int c = 0; c < NV; c++) _mm256_storeu_ps(o[r] + d0 + 8 * c, _mm256_mul_ps(acc[r][c], iv));
    }
}

LK_AVX2_TARGET static void enc_pv(const float *p, int64_t np8, int RR, const float *vp, int64_t n,
                                  int64_t D, const float *inv, float *const *o) {
    for (int64_t d0 = 0; d0 < D;) {
        const int64_t left = (D - d0) / 8;
        const int NV = left >= 4 ? 4 : (int)left;
#define ENC_PV(R, V) enc_pv_tile(p, np8, R, vp, n, D, d0, V, inv, o)
        if (RR == 3) { if (NV == 4) ENC_PV(3, 4); else if (NV == 3) ENC_PV(3, 3); else if (NV == 2) ENC_PV(3, 2); else ENC_PV(3, 1); }
        else if (RR == 2) { if (NV == 4) ENC_PV(2, 4); else if (NV == 3) ENC_PV(2, 3); else if (NV == 2) ENC_PV(2, 2); else ENC_PV(2, 1); }
        else { if (NV == 4) ENC_PV(1, 4); else if (NV == 3) ENC_PV(1, 3); else if (NV == 2) ENC_PV(1, 2); else ENC_PV(1, 1); }
#undef ENC_PV
        d0 += 8 * NV;
    }
}

/* scratch floats for one task: Kt [D][np8], V [n][D], scores [ENC_QR][np8] */
static size_t enc_tile_floats(int64_t T, int64_t D) {
    const int64_t np16 = (T + 15) & ~(int64_t)15; /* (the 512-bit tiles pad keys to 16) */
    return (size_t)(D * np16 + T * D + ENC_QR * np16);
}

/* Sequence b's keys of head h transposed into kt [D][np] (keys past n zero) and its values
   into vp [n][D]: what both tile widths read (np: n padded to their key vector width). */
static void enc_pack_kv(const enc_job *j, int64_t b, int64_t h, int64_t np, float *kt,
                        float *vp) {
    const int64_t H = j->H, D = j->D, HD = H * D, n = j->n[b], base = j->row0[b];
    const float *kb = j->k + (base * H + h) * D, *vb = j->v + (base * H + h) * D;
    for (int64_t s = 0; s < n; s++) {
        const float *kr = kb + s * HD;
        for (int64_t i = 0; i < D; i++) kt[i * np + s] = kr[i];
        memcpy(vp + s * D, vb + s * HD, (size_t)D * sizeof(float));
    }
    for (int64_t i = 0; i < D; i++)
        for (int64_t s = n; s < np; s++) kt[i * np + s] = 0;
}

LK_AVX2_TARGET static void enc_tile_avx2(const enc_job *j, int64_t b, int64_t h, int64_t t0,
                                         int64_t t1, float *scratch) {
    const int64_t H = j->H, D = j->D, n = j->n[b], base = j->row0[b];
    const int64_t np8 = (n + 7) & ~(int64_t)7;
    float *kt = scratch, *vp = kt + D * np8, *sc = vp + n * D;
    enc_pack_kv(j, b, h, np8, kt, vp);
    for (int64_t t = t0; t < t1; t += ENC_QR) {
        const int QR = t1 - t < ENC_QR ? (int)(t1 - t) : ENC_QR;
        const float *qr[ENC_QR];
        float *o[ENC_QR], inv[ENC_QR];
        for (int r = 0; r < QR; r++) {
            qr[r] = j->q + ((base + t + r) * H + h) * D;
            o[r] = j->out + ((base + t + r) * H + h) * D;
        }
        enc_scores(qr, QR, kt, np8, D, j->scale, sc);
        for (int r = 0; r < QR; r++) {
            float *pr = sc + r * np8;
            __m256 vm = _mm256_set1_ps(-INFINITY);
            int64_t s = 0;
            for (; s + 8 <= n; s += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(pr + s));
            float top = -INFINITY, lanes[8];
            _mm256_storeu_ps(lanes, vm);
            for (int l = 0; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
            for (; s < n; s++) top = pr[s] > top ? pr[s] : top;
            const float sum = lk_exp_sum_avx2(pr, n, top, pr);
            inv[r] = 1.0f / sum;
        }
        for (int r = 0; r < QR; r += 3) {
            const int RR = QR - r < 3 ? QR - r : 3;
            enc_pv(sc + r * np8, np8, RR, vp, n, D, inv + r, o + r);
        }
    }
}

/* ---- the same tiles with 512-bit FMAs (D a multiple of 16; run while the AVX512-VNNI
   q8_0 variant is active, as the 512-bit float matmuls): scores as a 6 x 32 tile over
   keys padded to 16, the output as a 6 x (16 or 32) tile over D. Other sums than the AVX2
   tiles' (a key's score and an output's value are each one accumulator's chain, as
   there, but over other lanes), within the same float32 bound. */
#define AVX512_TARGET __attribute__((target("avx2,fma,f16c,avx512f")))
#define ENC5_QR 6

AVX512_TARGET __attribute__((always_inline)) static inline void
enc5_scores_tile(const float *const *qr, int QR, const float *kt, int64_t np16, int64_t D,
                 int64_t s0, int NV, float scale, float *sc) {
    __m512 acc[ENC5_QR][2];
    for (int r = 0; r < QR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i++) {
        const float *kr = kt + i * np16 + s0;
        const __m512 k0 = _mm512_loadu_ps(kr);
        const __m512 k1 = NV == 2 ? _mm512_loadu_ps(kr + 16) : k0;
        for (int r = 0; r < QR; r++) {
            const __m512 qv = _mm512_set1_ps(qr[r][i]);
            acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
            if (NV == 2) acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
        }
    }
    const __m512 vs = _mm512_set1_ps(scale);
    for (int r = 0; r < QR; r++) {
        _mm512_storeu_ps(sc + r * np16 + s0, _mm512_mul_ps(acc[r][0], vs));
        if (NV == 2) _mm512_storeu_ps(sc + r * np16 + s0 + 16, _mm512_mul_ps(acc[r][1], vs));
    }
}

AVX512_TARGET static void enc5_scores(const float *const *qr, int QR, const float *kt,
                                      int64_t np16, int64_t D, float scale, float *sc) {
    int64_t s0;
#define ENC5_SC(Q)                                                                        \
    for (s0 = 0; s0 + 32 <= np16; s0 += 32)                                             \
        enc5_scores_tile(qr, Q, kt, np16, D, s0, 2, scale, sc);                           \
    if (s0 < np16) enc5_scores_tile(qr, Q, kt, np16, D, s0, 1, scale, sc);
    switch (QR) {
    case 1: ENC5_SC(1) break;
    case 2: ENC5_SC(2) break;
    case 3: ENC5_SC(3) break;
    case 4: ENC5_SC(4) break;
    case 5: ENC5_SC(5) break;
    default: ENC5_SC(6) break;
    }
#undef ENC5_SC
}

/* o_r[d0 .. d0 + 16 NV) = inv_r * sum_s p_r[s] v_s[d0 ..] for RR (<= 6) rows */
AVX512_TARGET __attribute__((always_inline)) static inline void
enc5_pv_tile(const float *p, int64_t np16, int RR, const float *vp, int64_t n, int64_t D,
             int64_t d0, int NV, const float *inv, float *const *o) {
    __m512 acc[ENC5_QR][2];
    for (int r = 0; r < RR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s++) {
        const float *vr = vp + s * D + d0;
        const __m512 v0 = _mm512_loadu_ps(vr);
        const __m512 v1 = NV == 2 ? _mm512_loadu_ps(vr + 16) : v0;
        for (int r = 0; r < RR; r++) {
            const __m512 pv = _mm512_set1_ps(p[r * np16 + s]);
            acc[r][0] = _mm512_fmadd_ps(pv, v0, acc[r][0]);
            if (NV == 2) acc[r][1] = _mm512_fmadd_ps(pv, v1, acc[r][1]);
        }
    }
    for (int r = 0; r < RR; r++) {
        const __m512 iv = _mm512_set1_ps(inv[r]);
        _mm512_storeu_ps(o[r] + d0, _mm512_mul_ps(acc[r][0], iv));
        if (NV == 2) _mm512_storeu_ps(o[r] + d0 + 16, _mm512_mul_ps(acc[r][1], iv));
    }
}

AVX512_TARGET static void enc5_pv(const float *p, int64_t np16, int RR, const float *vp,
                                  int64_t n, int64_t D, const float *inv, float *const *o) {
    for (int64_t d0 = 0; d0 < D;) {
        const int NV = D - d0 >= 32 ? 2 : 1;
#define ENC5_PV(R) \
    (NV == 2 ? enc5_pv_tile(p, np16, R, vp, n, D, d0, 2, inv, o) \
             : enc5_pv_tile(p, np16, R, vp, n, D, d0, 1, inv, o))
        switch (RR) {
        case 1: ENC5_PV(1); break;
        case 2: ENC5_PV(2); break;
        case 3: ENC5_PV(3); break;
        case 4: ENC5_PV(4); break;
        case 5: ENC5_PV(5); break;
        default: ENC5_PV(6); break;
        }
#undef ENC5_PV
        d0 += 16 * NV;
    }
}

AVX512_TARGET static void enc_tile_avx512(const enc_job *j, int64_t b, int64_t h, int64_t t0,
                                          int64_t t1, float *scratch) {
    const int64_t H = j->H, D = j->D, n = j->n[b], base = j->row0[b];
    const int64_t np16 = (n + 15) & ~(int64_t)15;
    float *kt = scratch, *vp = kt + D * np16, *sc = vp + n * D;
    enc_pack_kv(j, b, h, np16, kt, vp);
    for (int64_t t = t0; t < t1; t += ENC5_QR) {
        const int QR = t1 - t < ENC5_QR ? (int)(t1 - t) : ENC5_QR;
        const float *qr[ENC5_QR];
        float *o[ENC5_QR], inv[ENC5_QR];
        for (int r = 0; r < QR; r++) {
            qr[r] = j->q + ((base + t + r) * H + h) * D;
            o[r] = j->out + ((base + t + r) * H + h) * D;
        }
        enc5_scores(qr, QR, kt, np16, D, j->scale, sc);
        for (int r = 0; r < QR; r++) {
            float *pr = sc + r * np16;
            __m512 vm = _mm512_set1_ps(-INFINITY);
            int64_t s = 0;
            for (; s + 16 <= n; s += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(pr + s));
            float top = _mm512_reduce_max_ps(vm);
            for (; s < n; s++) top = pr[s] > top ? pr[s] : top;
            inv[r] = 1.0f / lk_exp_sum_avx2(pr, n, top, pr);
        }
        enc5_pv(sc, np16, QR, vp, n, D, inv, o);
    }
}

/* task c: sequence b (by task0), head h, query block blk */
static void enc_task(void *ctx, int64_t c, int ith) {
    const enc_job *j = (const enc_job *)ctx;
    int64_t b = 0;
    while (c >= j->task0[b + 1]) b++;
    const int64_t tb = (j->nq[b] + ENC_TBLOCK - 1) / ENC_TBLOCK, u = c - j->task0[b];
    const int64_t blk = u % tb, h = u / tb;
    const int64_t t0 = blk * ENC_TBLOCK, t1 = t0 + ENC_TBLOCK < j->nq[b] ? t0 + ENC_TBLOCK : j->nq[b];
    float *scratch = (float *)lk_scratch(ith, enc_tile_floats(j->T, j->D) * sizeof(float));
    if (!scratch) return; /* checked up front by the caller */
    if (j->wide) enc_tile_avx512(j, b, h, t0, t1, scratch);
    else enc_tile_avx2(j, b, h, t0, t1, scratch);
}

#endif

static void enc_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const enc_job *j = (const enc_job *)ctx;
    float *p = malloc(sizeof(float) * (size_t)(j->T > 0 ? j->T : 1));
    if (!p) return; /* checked up front by the caller's allocation test */
    enc_generic(j, r0, r1, p);
    free(p);
}

/* checks done by the callers; nq[b] >= n[b] >= 1 */
static int run_encoder(enc_job *j) {
    const int64_t B = j->B, T = j->T, H = j->H, D = j->D;
    int64_t rows = 0;
    for (int64_t b = 0; b < B; b++) rows += j->nq[b];
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2 && D % 8 == 0 && rows > 0) {
        int64_t *task0 = malloc(sizeof(int64_t) * (size_t)(B + 1));
        if (!task0) return -5;
        task0[0] = 0;
        for (int64_t b = 0; b < B; b++)
            task0[b + 1] = task0[b] + H * ((j->nq[b] + ENC_TBLOCK - 1) / ENC_TBLOCK);
        j->task0 = task0;
        /* 512-bit tiles as the 512-bit float matmuls: with the AVX512-VNNI q8_0 variant */
        j->wide = D % 16 == 0 && lk_q8_variant(-1) == 2;
        /* the tiles' scratch, probed once here so a task cannot fail to get it */
        lk_lock();
        const int nth = lk_threads_locked();
        int ok = 1;
        for (int i = 0; i < nth && ok; i++)
            ok = lk_scratch(i, enc_tile_floats(T, D) * sizeof(float)) != NULL;
        if (ok) lk_parallel(enc_task, j, task0[B]);
        lk_unlock();
        free(task0);
        return ok ? 0 : -5;
    }
#endif
    void *probe = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1));
    if (!probe) return -5;
    free(probe);
    /* a row costs about 2 T D flops: aim for ~64k flops per range */
    int64_t grain = 32768 / (T * D > 0 ? T * D : 1);
    lk_parallel_for(enc_range, j, rows * H, grain < 1 ? 1 : grain);
    return 0;
}

int lk_encoder_attention(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                         int64_t H, int64_t D, const int64_t *lengths, float scale,
                         float *out) {
    lk_init();
    if (B < 0 || T < 0 || H < 1 || D < 1) return -1;
    for (int64_t b = 0; b < B; b++)
        if (lengths[b] < 1 || lengths[b] > T) return -1;
    int64_t *meta = malloc(sizeof(int64_t) * (size_t)(2 * B + 1));
    if (!meta) return -5;
    int64_t *row0 = meta, *nq = meta + B;
    for (int64_t b = 0; b < B; b++) {
        row0[b] = b * T;
        nq[b] = T;
    }
    enc_job j = {q, k, v, B, T, H, D, row0, nq, lengths, NULL, scale, out};
    const int rc = run_encoder(&j);
    free(meta);
    return rc;
}

int lk_encoder_attention_packed(const float *q, const float *k, const float *v, int64_t B,
                                const int64_t *offsets, int64_t H, int64_t D, float scale,
                                float *out) {
    lk_init();
    if (B < 0 || H < 1 || D < 1 || (B > 0 && offsets[0] != 0)) return -1;
    int64_t T = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = offsets[b + 1] - offsets[b];
        if (n < 1) return -1;
        if (n > T) T = n;
    }
    int64_t *nq = malloc(sizeof(int64_t) * (size_t)(B > 0 ? B : 1));
    if (!nq) return -5;
    for (int64_t b = 0; b < B; b++) nq[b] = offsets[b + 1] - offsets[b];
    enc_job j = {q, k, v, B, T, H, D, offsets, nq, nq, NULL, scale, out};
    const int rc = run_encoder(&j);
    free(nq);
    return rc;
}
