/* matmul_generic.c: the scalar C matmul kernels of every format (f32, f16, q8_0,
 * q8_0_r16) and the scalar activation quantizer for q8_0: what runs without AVX2 or under
 * LATTICE_ISA=generic, and the reference the SIMD kernels match (q8_0: bit for bit). */
#include "matmul_internal.h"

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

const lk_mm_kernels lk_mm_generic = {rows_f32_generic, rows_f16_generic, rows_q8_0_generic,
                                     rows_q8r_generic, quantize_act_generic};
