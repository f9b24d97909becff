/* Kernels of vision encoders (ViT blocks): LayerNorm with bias and GELU (tanh or erf).
 *
 * Rows are independent, so both run in parallel over rows on the core's thread pool. The
 * numpy references are `ops.layer_norm` and `ops.gelu`; the sums run in float32 in the
 * same two passes (mean, then the centered variance), so results agree to a few ulp.
 */

#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>

#define GRAIN_ELEMS 32768

static int64_t grain_rows(int64_t row_len) {
    int64_t g = GRAIN_ELEMS / (row_len > 0 ? row_len : 1);
    return g < 1 ? 1 : g;
}

/* ---- layer norm ----------------------------------------------------------------------- */

typedef struct {
    const float *x, *w, *b;
    int64_t D;
    float eps;
    float *out;
} layer_norm_job;

static void layer_norm_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const layer_norm_job *j = (const layer_norm_job *)ctx;
    const int64_t D = j->D;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D;
        float *o = j->out + r * D;
        float sum = 0.0f;
        for (int64_t i = 0; i < D; i++) sum += x[i];
        const float mean = sum / (float)D;
        float var = 0.0f;
        for (int64_t i = 0; i < D; i++) {
            const float c = x[i] - mean;
            var += c * c;
        }
        const float inv = 1.0f / sqrtf(var / (float)D + j->eps);
        for (int64_t i = 0; i < D; i++) {
            const float y = (x[i] - mean) * inv * j->w[i];
            o[i] = j->b ? y + j->b[i] : y;
        }
    }
}

void lk_layer_norm(const float *x, int64_t rows, int64_t D, const float *w, const float *b,
                   float eps, float *out) {
    lk_init();
    layer_norm_job j = {x, w, b, D, eps, out};
    lk_parallel_for(layer_norm_range, &j, rows, grain_rows(D));
}

/* ---- gelu ----------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    int64_t n;
    int tanh_approx;
    float *out;
} gelu_job;

static void gelu_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const gelu_job *j = (const gelu_job *)ctx;
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->n;
        float *o = j->out + r * j->n;
        if (j->tanh_approx) {
            for (int64_t i = 0; i < j->n; i++) {
                const float v = x[i];
                o[i] = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
            }
        } else {
            for (int64_t i = 0; i < j->n; i++) {
                const float v = x[i];
                o[i] = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
            }
        }
    }
}

#if LK_X86
/* 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)): one vector exp per 8 values instead of a
   scalar tanhf each (the tower's MLP runs this on intermediate_size * patches values). */
LK_AVX2_TARGET static void gelu_tanh_range_avx2(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const gelu_job *j = (const gelu_job *)ctx;
    const __m256 m2c = _mm256_set1_ps(-2.0f * 0.7978845608028654f);
    const __m256 k = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.0f);
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * j->n;
        float *o = j->out + r * j->n;
        int64_t i = 0;
        for (; i + 8 <= j->n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            const __m256 u = _mm256_fmadd_ps(_mm256_mul_ps(k, v), _mm256_mul_ps(v, v), v);
            const __m256 e = lk_exp8_avx2(_mm256_mul_ps(m2c, u));
            _mm256_storeu_ps(o + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
        }
        for (; i < j->n; i++) {
            const float v = x[i];
            o[i] = v / (1.0f + expf(-2.0f * 0.7978845608028654f * (v + 0.044715f * v * v * v)));
        }
    }
}
#endif

void lk_gelu(const float *x, int64_t n, int tanh_approx, float *out) {
    lk_init();
    lk_range_fn fn = gelu_range;
#if LK_X86
    if (tanh_approx && lk_active_isa == LK_ISA_AVX2) fn = gelu_tanh_range_avx2;
#endif
    const int64_t W = 4096; /* one logical row split into rows of W to parallelize */
    if (n > W) {
        gelu_job j = {x, W, tanh_approx, out};
        lk_parallel_for(fn, &j, n / W, grain_rows(W));
        x += n / W * W;
        out += n / W * W;
        n -= n / W * W;
        if (n == 0) return;
    }
    gelu_job j = {x, n, tanh_approx, out};
    fn(&j, 0, 1, 0);
}
