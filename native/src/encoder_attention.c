/* Bidirectional multi-head attention of a right-padded batch (BERT-family encoders).
 *
 * q, k, v, out: [B, T, H, D] contiguous; lengths[b]: keys s < lengths[b] are real, the
 * rest padding that no query attends to (rows t >= lengths[b] are computed over the real
 * keys too; they are padding and mean nothing). One task is one (b, t, h) query row:
 * scores over the real keys, a stable softmax, the weighted sum of values. The row body
 * is compiled twice, plain and with AVX2 + FMA enabled, and the active ISA picks one.
 *
 * Why not numpy: its batched matmul hands each of the B x H small products to a threaded
 * BLAS, which on a busy 2-core machine spent 14 s where one thread needs 0.3 s (and it
 * competes with this library's own pool); here the rows are spread over that one pool.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    const float *q, *k, *v;
    int64_t B, T, H, D;
    const int64_t *lengths;
    float scale;
    float *out;
} enc_job;

static inline __attribute__((always_inline)) void enc_rows(const enc_job *j, int64_t r0,
                                                            int64_t r1, float *p) {
    const int64_t T = j->T, H = j->H, D = j->D, HD = H * D;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t h = r % H, t = (r / H) % T, b = r / (H * T);
        int64_t n = j->lengths[b];
        if (n > T) n = T;
        const float *qr = j->q + ((b * T + t) * H + h) * D;
        const float *kb = j->k + (b * T * H + h) * D;
        const float *vb = j->v + (b * T * H + h) * D;
        float *o = j->out + ((b * T + t) * H + h) * D;
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
LK_AVX2_TARGET static void enc_avx2(const enc_job *j, int64_t r0, int64_t r1, float *p) {
    enc_rows(j, r0, r1, p);
}
#endif

static void enc_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const enc_job *j = (const enc_job *)ctx;
    float *p = malloc(sizeof(float) * (size_t)(j->T > 0 ? j->T : 1));
    if (!p) return; /* checked up front by the caller's allocation test */
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        enc_avx2(j, r0, r1, p);
        free(p);
        return;
    }
#endif
    enc_generic(j, r0, r1, p);
    free(p);
}

int lk_encoder_attention(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                         int64_t H, int64_t D, const int64_t *lengths, float scale,
                         float *out) {
    lk_init();
    if (B < 0 || T < 0 || H < 1 || D < 1) return -1;
    for (int64_t b = 0; b < B; b++)
        if (lengths[b] < 1 || lengths[b] > T) return -1;
    void *probe = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1));
    if (!probe) return -5;
    free(probe);
    enc_job j = {q, k, v, B, T, H, D, lengths, scale, out};
    /* a row costs about 2 T D flops: aim for ~64k flops per range */
    int64_t grain = 32768 / (T * D > 0 ? T * D : 1);
    lk_parallel_for(enc_range, &j, B * T * H, grain < 1 ? 1 : grain);
    return 0;
}
