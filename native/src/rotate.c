/* Block rotation x @ (mix kron H_block / sqrt(block)): the online Hadamard rotation that
 * QuaRot puts before a down projection, for any width m * block (block a power of two,
 * mix a small orthogonal matrix across the m groups).
 *
 * Work units are (row, output group): group j of a row is the mix of the row's groups
 * (sum_i mix[i, j] x_i), then a fast Walsh-Hadamard transform of those `block` values,
 * so units are independent and spread over the pool when there are enough of them.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <string.h>

typedef struct {
    const float *x, *mix;
    int64_t m, block;
    float scale;
    float *out;
} rot_job;

static void fwht_generic(float *v, int64_t n, float scale) {
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    for (int64_t i = 0; i < n; i++) v[i] *= scale;
}

#if LK_X86
LK_AVX2_TARGET static void fwht_avx2(float *v, int64_t n, float scale) {
    int64_t h = 1;
    /* the first three levels stay inside 8 lanes: do them in scalar per 8-block */
    for (; h < n && h < 8; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    for (; h < n; h *= 2)
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
                _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
            }
    const __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), s));
    for (; i < n; i++) v[i] *= scale;
}
#endif

static void rot_units(void *ctx, int64_t u0, int64_t u1, int ith) {
    (void)ith;
    const rot_job *j = (const rot_job *)ctx;
    const int64_t m = j->m, p = j->block;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t r = u / m, g = u % m;
        const float *x = j->x + r * m * p;
        float *o = j->out + r * m * p + g * p;
        if (m == 1) {
            if (o != x) memcpy(o, x, (size_t)p * sizeof(float));
        } else {
            memset(o, 0, (size_t)p * sizeof(float));
            for (int64_t i = 0; i < m; i++) {
                const float c = j->mix[i * m + g];
                const float *xi = x + i * p;
                for (int64_t k = 0; k < p; k++) o[k] += c * xi[k];
            }
        }
#if LK_X86
        if (lk_active_isa == LK_ISA_AVX2 && p >= 8) {
            fwht_avx2(o, p, j->scale);
            continue;
        }
#endif
        fwht_generic(o, p, j->scale);
    }
}

int lk_block_rotate(const float *x, int64_t rows, int64_t m, int64_t block, const float *mix,
                    float *out) {
    lk_init();
    if (rows < 0 || m < 1 || block < 1 || (block & (block - 1))) return -1;
    if (m > 1 && (out == x || !mix)) return -1;
    rot_job j = {x, mix, m, block, 1.0f / sqrtf((float)block), out};
    int64_t grain = 16384 / block; /* units of `block` floats below ~32K floats run inline */
    if (grain < 1) grain = 1;
    lk_parallel_for(rot_units, &j, rows * m, grain);
    return 0;
}
