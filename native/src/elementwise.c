/* Elementwise and row-wise kernels: rms_norm, rope, silu, silu_mul, softmax, add.
 *
 * Decode calls these on one row of a few thousand floats, where a thread hand-off would
 * cost more than the work, so they run inline below a size threshold and split rows
 * across the pool above it (prefill).
 *
 * Why ~400 lines: six small kernels, each a generic and an AVX2 version side by side (the
 * pair is what a reader compares).
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>


#define GRAIN_ELEMS 32768 /* below ~2x this many floats a kernel runs on the caller alone */

static inline int use_avx2(void) { return LK_X86 && lk_active_isa == LK_ISA_AVX2; }

static int64_t grain_rows(int64_t row_len) {
    int64_t g = GRAIN_ELEMS / (row_len > 0 ? row_len : 1);
    return g < 1 ? 1 : g;
}

/* ---- rms_norm ----------------------------------------------------------------------- */

typedef struct {
    const float *x, *w;
    int64_t D;
    float eps, offset;
    float *out;
} rms_job;

static void rms_rows_generic(const rms_job *j, int64_t r0, int64_t r1) {
    const int64_t D = j->D;
    const float offset = j->offset, eps = j->eps, *w = j->w;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D;
        float *o = j->out + r * D;
        float acc[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += x[i + l] * x[i + l];
        float ss = 0;
        for (int l = 0; l < 8; l++) ss += acc[l];
        for (; i < D; i++) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (i = 0; i < D; i++) o[i] = (x[i] * inv) * (offset + w[i]);
    }
}

#if LK_X86
LK_AVX2_TARGET static void rms_rows_avx2(const rms_job *j, int64_t r0, int64_t r1) {
    const int64_t D = j->D;
    const __m256 off = _mm256_set1_ps(j->offset);
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D;
        float *o = j->out + r * D;
        __m256 a = _mm256_setzero_ps(), b = a;
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) {
            __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
            a = _mm256_fmadd_ps(u, u, a);
            b = _mm256_fmadd_ps(v, v, b);
        }
        for (; i + 8 <= D; i += 8) {
            __m256 u = _mm256_loadu_ps(x + i);
            a = _mm256_fmadd_ps(u, u, a);
        }
        float ss = lk_hsum8_avx2(_mm256_add_ps(a, b));
        for (; i < D; i++) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + j->eps);
        const __m256 vi = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= D; i += 8) {
            __m256 g = _mm256_add_ps(off, _mm256_loadu_ps(j->w + i));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi), g));
        }
        for (; i < D; i++) o[i] = (x[i] * inv) * (j->offset + j->w[i]);
    }
}
#endif

static void rms_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
#if LK_X86
    if (use_avx2()) {
        rms_rows_avx2((const rms_job *)ctx, r0, r1);
        return;
    }
#endif
    rms_rows_generic((const rms_job *)ctx, r0, r1);
}

void lk_rms_norm(const float *x, int64_t rows, int64_t D, const float *w, float eps, float offset,
                 float *out) {
    lk_init();
    rms_job j = {x, w, D, eps, offset, out};
    lk_parallel_for(rms_range, &j, rows, grain_rows(D));
}

/* ---- layer_norm (BERT) and gelu ------------------------------------------------------
 * The encoders' row kernels. layer_norm: two passes over a row in float (mean, then the
 * biased variance of the centred values, as torch), which the compiler vectorises; gelu:
 * x * Phi(x) with libm's erff (exact) or the tanh form (scalar; the AVX2 version is below).
 * Both split rows over the pool. */

typedef struct {
    const float *x, *w, *b;
    int64_t D;
    float eps;
    float *out;
} ln_job;

static void ln_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const ln_job *j = (const ln_job *)ctx;
    const int64_t D = j->D;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D;
        float *o = j->out + r * D;
        float acc[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += x[i + l];
        float sum = 0;
        for (int l = 0; l < 8; l++) sum += acc[l];
        for (; i < D; i++) sum += x[i];
        const float mean = sum / (float)D;
        float vacc[8] = {0};
        for (i = 0; i + 8 <= D; i += 8)
            for (int l = 0; l < 8; l++) {
                const float c = x[i + l] - mean;
                vacc[l] += c * c;
            }
        float ss = 0;
        for (int l = 0; l < 8; l++) ss += vacc[l];
        for (; i < D; i++) ss += (x[i] - mean) * (x[i] - mean);
        const float inv = 1.0f / sqrtf(ss / (float)D + j->eps);
        for (i = 0; i < D; i++) o[i] = ((x[i] - mean) * inv) * j->w[i] + j->b[i];
    }
}

void lk_layer_norm(const float *x, int64_t rows, int64_t D, const float *w, const float *b,
                   float eps, float *out) {
    lk_init();
    ln_job j = {x, w, b, D, eps, out};
    lk_parallel_for(ln_range, &j, rows, grain_rows(D));
}

typedef struct {
    const float *x;
    int tanh_form;
    float *out;
} gelu_job;

static void gelu_range(void *ctx, int64_t i0, int64_t i1, int ith) {
    (void)ith;
    const gelu_job *j = (const gelu_job *)ctx;
    if (j->tanh_form) {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
        for (int64_t i = i0; i < i1; i++) {
            const float v = j->x[i];
            j->out[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
        }
    } else {
        for (int64_t i = i0; i < i1; i++) {
            const float v = j->x[i];
            j->out[i] = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
        }
    }
}

#if LK_X86
/* gelu with AVX2: 8 values at a time, where libm's scalar erff was 13% of an encoder's time.
 * Exact form: Phi(x) = erfc(-x / sqrt 2) / 2 with erfc(z) = poly(t) e^(-z^2), t = 1 / (1 + p z)
 * for z >= 0 (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 on erf), and 2 - erfc(|z|) for the
 * other sign: the small side is computed directly, not as 1 - something (no cancellation
 * for negative x, whose outputs are tiny). The error stays below 1.5e-7 * |x| / 2 absolute,
 * within a few float32 ulps of the output for |x| <= 4.
 * Tanh form: tanh(y) = 1 - 2 / (e^(2y) + 1), with 1 + tanh(y) = 2 e^(2y) / (e^(2y) + 1)
 * written that way for the same reason. */
LK_AVX2_TARGET static void gelu_range_avx2(void *ctx, int64_t i0, int64_t i1, int ith) {
    (void)ith;
    const gelu_job *j = (const gelu_job *)ctx;
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f),
                 two = _mm256_set1_ps(2.0f), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t i = i0;
    if (j->tanh_form) {
        const __m256 k = _mm256_set1_ps(0.7978845608028654f), c = _mm256_set1_ps(0.044715f);
        for (; i + 8 <= i1; i += 8) {
            const __m256 v = _mm256_loadu_ps(j->x + i);
            const __m256 y = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v));
            /* e^(2y) saturates to inf above y ~ 44 (then 2e/(e+1) -> nan): clamp y */
            const __m256 e = lk_exp8_avx2(_mm256_mul_ps(two, _mm256_min_ps(y, _mm256_set1_ps(20.0f))));
            const __m256 onep = _mm256_div_ps(_mm256_mul_ps(two, e), _mm256_add_ps(e, one));
            _mm256_storeu_ps(j->out + i, _mm256_mul_ps(_mm256_mul_ps(half, v), onep));
        }
    } else {
        const __m256 rs2 = _mm256_set1_ps(0.7071067811865476f), p = _mm256_set1_ps(0.3275911f);
        const __m256 a1 = _mm256_set1_ps(0.254829592f), a2 = _mm256_set1_ps(-0.284496736f),
                     a3 = _mm256_set1_ps(1.421413741f), a4 = _mm256_set1_ps(-1.453152027f),
                     a5 = _mm256_set1_ps(1.061405429f), zero = _mm256_setzero_ps();
        for (; i + 8 <= i1; i += 8) {
            const __m256 v = _mm256_loadu_ps(j->x + i);
            const __m256 z = _mm256_and_ps(_mm256_mul_ps(v, rs2), absmask);
            const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(p, z, one));
            __m256 poly = _mm256_fmadd_ps(a5, t, a4);
            poly = _mm256_fmadd_ps(poly, t, a3);
            poly = _mm256_fmadd_ps(poly, t, a2);
            poly = _mm256_fmadd_ps(poly, t, a1);
            poly = _mm256_mul_ps(poly, t);
            const __m256 erfc = _mm256_mul_ps(poly, lk_exp8_avx2(_mm256_sub_ps(zero, _mm256_mul_ps(z, z))));
            /* 1 + erf(x / sqrt 2): erfc(|z|) for x < 0, 2 - erfc(|z|) for x >= 0 */
            const __m256 onep = _mm256_blendv_ps(_mm256_sub_ps(two, erfc), erfc,
                                                 _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
            _mm256_storeu_ps(j->out + i, _mm256_mul_ps(_mm256_mul_ps(half, v), onep));
        }
    }
    if (i < i1) gelu_range(ctx, i, i1, ith);
}
#endif

void lk_gelu(const float *x, int64_t n, int tanh_form, float *out) {
    lk_init();
    gelu_job j = {x, tanh_form, out};
    lk_range_fn fn = gelu_range;
#if LK_X86
    if (use_avx2()) fn = gelu_range_avx2;
#endif
    lk_parallel_for(fn, &j, n, GRAIN_ELEMS / 4);
}

/* ---- rope ---------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    int64_t T, H, Dh, sb, st, sh;
    const float *cos_t, *sin_t;
    int64_t half;
    int interleaved;
    float *out;
} rope_job;

static void rope_row_generic(const float *x, float *o, const float *c, const float *s,
                             int64_t half, int interleaved) {
    if (interleaved) {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[2 * i], b = x[2 * i + 1];
            o[2 * i] = a * c[i] - b * s[i];
            o[2 * i + 1] = b * c[i] + a * s[i];
        }
    } else {
        for (int64_t i = 0; i < half; i++) {
            const float a = x[i], b = x[half + i];
            o[i] = a * c[i] - b * s[i];
            o[half + i] = b * c[i] + a * s[i];
        }
    }
}

#if LK_X86
LK_AVX2_TARGET static void rope_row_avx2(const float *x, float *o, const float *c, const float *s,
                                         int64_t half, int interleaved) {
    int64_t i = 0;
    if (interleaved) {
        const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (; i + 4 <= half; i += 4) {
            __m256 v = _mm256_loadu_ps(x + 2 * i);
            __m256 cc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
            __m256 ss = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup);
            __m256 sw = _mm256_permute_ps(v, 0xB1); /* (b, a) in each pair */
            /* even lanes a*c - b*s, odd lanes b*c + a*s */
            _mm256_storeu_ps(o + 2 * i, _mm256_fmaddsub_ps(v, cc, _mm256_mul_ps(sw, ss)));
        }
        for (; i < half; i++) {
            const float a = x[2 * i], b = x[2 * i + 1];
            o[2 * i] = a * c[i] - b * s[i];
            o[2 * i + 1] = b * c[i] + a * s[i];
        }
    } else {
        for (; i + 8 <= half; i += 8) {
            __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
            __m256 cc = _mm256_loadu_ps(c + i), ss = _mm256_loadu_ps(s + i);
            __m256 na = _mm256_fmsub_ps(a, cc, _mm256_mul_ps(b, ss));
            __m256 nb = _mm256_fmadd_ps(b, cc, _mm256_mul_ps(a, ss));
            _mm256_storeu_ps(o + i, na);
            _mm256_storeu_ps(o + half + i, nb);
        }
        for (; i < half; i++) {
            const float a = x[i], b = x[half + i];
            o[i] = a * c[i] - b * s[i];
            o[half + i] = b * c[i] + a * s[i];
        }
    }
}
#endif

static void rope_range(void *ctx, int64_t i0, int64_t i1, int ith) {
    (void)ith;
    const rope_job jv = *(const rope_job *)ctx;
    const rope_job *j = &jv;
    const int avx2 = use_avx2();
    (void)avx2;
    for (int64_t i = i0; i < i1; i++) { /* i enumerates (b, t, h) */
        const int64_t h = i % j->H, t = (i / j->H) % j->T, b = i / (j->H * j->T);
        const float *x = j->x + b * j->sb + t * j->st + h * j->sh;
        float *o = j->out + i * j->Dh;
        const float *c = j->cos_t + t * j->half, *s = j->sin_t + t * j->half;
#if LK_X86
        if (avx2) rope_row_avx2(x, o, c, s, j->half, j->interleaved);
        else
#endif
            rope_row_generic(x, o, c, s, j->half, j->interleaved);
        if (o != x && 2 * j->half < j->Dh)
            memcpy(o + 2 * j->half, x + 2 * j->half, (size_t)(j->Dh - 2 * j->half) * sizeof(float));
    }
}

void lk_rope(const float *x, int64_t B, int64_t T, int64_t H, int64_t Dh, int64_t sb, int64_t st,
             int64_t sh, const float *cos_t, const float *sin_t, int64_t half, int interleaved,
             float *out) {
    lk_init();
    rope_job j = {x, T, H, Dh, sb, st, sh, cos_t, sin_t, half, interleaved, out};
    lk_parallel_for(rope_range, &j, B * T * H, grain_rows(Dh));
}

/* ---- silu, silu_mul ------------------------------------------------------------------- */

typedef struct {
    const float *gate, *up;
    int64_t ldg, ldu, n;
    float *out;
} silu_job;

static void silu_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const silu_job *j = (const silu_job *)ctx;
    const int64_t n = j->n;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->gate + r * j->ldg;
        const float *u = j->up ? j->up + r * j->ldu : NULL;
        float *o = j->out + r * n;
        for (int64_t i = 0; i < n; i++) {
            const float s = g[i] / (1.0f + expf(-g[i]));
            o[i] = u ? s * u[i] : s;
        }
    }
}

#if LK_X86
LK_AVX2_TARGET static void silu_range_avx2(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const silu_job *j = (const silu_job *)ctx;
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t n = j->n;
    for (int64_t r = r0; r < r1; r++) {
        const float *g = j->gate + r * j->ldg;
        const float *u = j->up ? j->up + r * j->ldu : NULL;
        float *o = j->out + r * n;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(g + i);
            __m256 e = lk_exp8_avx2(_mm256_xor_ps(v, sign));
            __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, e));
            if (u) s = _mm256_mul_ps(s, _mm256_loadu_ps(u + i));
            _mm256_storeu_ps(o + i, s);
        }
        for (; i < n; i++) {
            const float s = g[i] / (1.0f + expf(-g[i]));
            o[i] = u ? s * u[i] : s;
        }
    }
}
#endif

static void run_silu(const silu_job *j, int64_t rows) {
    lk_init();
    lk_range_fn fn = silu_range;
#if LK_X86
    if (use_avx2()) fn = silu_range_avx2;
#endif
    lk_parallel_for(fn, (void *)j, rows, grain_rows(j->n));
}

void lk_silu(const float *x, int64_t n, float *out) {
    /* one logical row split into rows of 4096 so large inputs still parallelize */
    const int64_t W = 4096;
    if (n > W) {
        silu_job j = {x, NULL, W, 0, W, out};
        run_silu(&j, n / W);
        x += n / W * W;
        out += n / W * W;
        n -= n / W * W;
        if (n == 0) return;
    }
    silu_job j = {x, NULL, n, 0, n, out};
    run_silu(&j, 1);
}

void lk_silu_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu, int64_t rows,
                 int64_t n, float *out) {
    silu_job j = {gate, up, ldg, ldu, n, out};
    run_silu(&j, rows);
}

/* ---- softmax --------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    int64_t n;
    float *out;
} softmax_job;

static void softmax_row_generic(const float *x, int64_t n, float *o) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float sum = 0;
    for (int64_t i = 0; i < n; i++) {
        o[i] = expf(x[i] - m);
        sum += o[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) o[i] *= inv;
}

#if LK_X86
LK_AVX2_TARGET static void softmax_row_avx2(const float *x, int64_t n, float *o) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float m = lk_hmax8_avx2(vm);
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    const float inv = 1.0f / lk_exp_sum_avx2(x, n, m, o);
    const __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(o + i), vi));
    for (; i < n; i++) o[i] *= inv;
}
#endif

static void softmax_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const softmax_job *j = (const softmax_job *)ctx;
    for (int64_t r = r0; r < r1; r++) {
#if LK_X86
        if (use_avx2()) {
            softmax_row_avx2(j->x + r * j->n, j->n, j->out + r * j->n);
            continue;
        }
#endif
        softmax_row_generic(j->x + r * j->n, j->n, j->out + r * j->n);
    }
}

void lk_softmax(const float *x, int64_t rows, int64_t n, float *out) {
    lk_init();
    softmax_job j = {x, n, out};
    lk_parallel_for(softmax_range, &j, rows, grain_rows(n));
}

/* ---- log-sum-exp ------------------------------------------------------------------------ */

/* out[r] = log(sum_i exp(x[r, i])): the normaliser of a log softmax, so a sampled token's
   logprob is x[token] - out[r] without writing the distribution out. Over a 150k-token
   vocabulary numpy takes ~1 ms per row, a sizable slice of a batched decode step. A row
   whose max is not finite gives that max (+inf, NaN) or NaN (all -inf), like numpy. */
typedef struct {
    const float *x;
    int64_t n;
    float *out;
} lse_job;

static float lse_finish(float m, double sum) {
    if (!isfinite(m)) return m == -INFINITY ? NAN : m;
    return m + (float)log(sum);
}

static float lse_row_generic(const float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    if (!isfinite(m)) return lse_finish(m, 0);
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += expf(x[i] - m);
    return lse_finish(m, sum);
}

#if LK_X86
LK_AVX2_TARGET static float lse_row_avx2(const float *x, int64_t n) {
    __m256 vm = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float m = lk_hmax8_avx2(vm);
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    if (!isfinite(m)) return lse_finish(m, 0);
    vm = _mm256_set1_ps(m);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {  /* two chains: the exp's latency overlaps */
        s0 = _mm256_add_ps(s0, lk_exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm)));
        s1 = _mm256_add_ps(s1, lk_exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm)));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
    double sum = 0;
    for (int k = 0; k < 8; k++) sum += lanes[k];
    for (; i < n; i++) sum += expf(x[i] - m);
    return lse_finish(m, sum);
}
#endif

static void lse_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const lse_job *j = (const lse_job *)ctx;
    for (int64_t r = r0; r < r1; r++) {
#if LK_X86
        if (use_avx2()) {
            j->out[r] = lse_row_avx2(j->x + r * j->n, j->n);
            continue;
        }
#endif
        j->out[r] = lse_row_generic(j->x + r * j->n, j->n);
    }
}

void lk_log_sum_exp(const float *x, int64_t rows, int64_t n, float *out) {
    lk_init();
    lse_job j = {x, n, out};
    lk_parallel_for(lse_range, &j, rows, grain_rows(n));
}

/* ---- add --------------------------------------------------------------------------------- */

typedef struct {
    const float *a, *b;
    float *out;
} add_job;

static void add_range(void *ctx, int64_t i0, int64_t i1, int ith) {
    (void)ith;
    const add_job *j = (const add_job *)ctx;
    const float *a = j->a, *b = j->b;
    float *out = j->out; /* may equal a or b: element i is read before it is written */
    for (int64_t i = i0; i < i1; i++) out[i] = a[i] + b[i];
}

void lk_add(const float *a, const float *b, int64_t n, float *out) {
    add_job j = {a, b, out};
    lk_parallel_for(add_range, &j, n, 4 * GRAIN_ELEMS);
}
