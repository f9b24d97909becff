/* The storage of KV-cache head vectors (`[model] kv_cache`): f32, f16 (IEEE halves) and
 * q8_0 (GGUF Q8_0 blocks of 32: an f16 scale d = amax / 127, then round(x / d) as int8,
 * the reference being cache/dense.py). lk_kv_store encodes rows as a step writes them,
 * lk_kv_load widens stored rows back to floats as attention reads them, a tile at a time.
 * The f16 conversions use F16C where the AVX2 kernels run (same bits as the scalar code:
 * both round to nearest even), the generic code the exact scalar conversions of runtime.c.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>

int64_t lk_kv_row_bytes(int32_t dtype, int64_t D) {
    if (D <= 0) return -1;
    switch (dtype) {
    case LK_KV_F32: return 4 * D;
    case LK_KV_F16: return 2 * D;
    case LK_KV_Q8_0: return D % LK_QK8_0 ? -1 : D / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0);
    default: return -1;
    }
}

static inline uint16_t rd16(const void *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

/* one q8_0 row of D values from x (already shifted / scaled) */
static void store_q8_0_row(const float *x, int64_t D, uint8_t *dst) {
    for (int64_t b = 0; b < D / LK_QK8_0; b++) {
        const float *xb = x + b * LK_QK8_0;
        float amax = 0;
        for (int i = 0; i < LK_QK8_0; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint8_t *blk = dst + b * sizeof(lk_block_q8_0);
        const uint16_t dh = lk_f32_to_f16(d);
        memcpy(blk, &dh, 2);
        for (int i = 0; i < LK_QK8_0; i++) {
            float r = roundf(xb[i] * id);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            blk[2 + i] = (uint8_t)(int8_t)r;
        }
    }
}

#if LK_X86
LK_AVX2_TARGET static void f32_to_f16_avx2(const float *x, int64_t n, uint16_t *o) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(o + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) o[i] = lk_f32_to_f16(x[i]);
}

LK_AVX2_TARGET static void f16_to_f32_avx2(const uint16_t *h, int64_t n, float *o) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) o[i] = lk_f16_to_f32(h[i]);
}

/* 32 int8 times d (times scale[0..32) when given) */
LK_AVX2_TARGET static void q8_block_avx2(const uint8_t *blk, const float *scale, float *o) {
    const __m256 d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(rd16(blk)))));
    for (int i = 0; i < 32; i += 8) {
        const __m128i b8 = _mm_loadl_epi64((const __m128i *)(blk + 2 + i));
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b8)), d);
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + i));
        _mm256_storeu_ps(o + i, v);
    }
}
#endif

void lk_kv_store(int32_t dtype, const float *x, int64_t n, int64_t D, const float *k_shift,
                 const float *k_scale, void *dst) {
    const int64_t rb = lk_kv_row_bytes(dtype, D);
    float tmp[1024];
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * D;
        uint8_t *o = (uint8_t *)dst + r * rb;
        if ((k_shift || k_scale) && D <= 1024) {
            for (int64_t d = 0; d < D; d++)
                tmp[d] = (xr[d] - (k_shift ? k_shift[d] : 0.0f)) / (k_scale ? k_scale[d] : 1.0f);
            xr = tmp;
        }
        switch (dtype) {
        case LK_KV_F32: memcpy(o, xr, (size_t)D * sizeof(float)); break;
        case LK_KV_F16:
#if LK_X86
            if (lk_active_isa == LK_ISA_AVX2) {
                f32_to_f16_avx2(xr, D, (uint16_t *)o);
                break;
            }
#endif
            for (int64_t d = 0; d < D; d++) {
                const uint16_t h = lk_f32_to_f16(xr[d]);
                memcpy(o + 2 * d, &h, 2);
            }
            break;
        default: store_q8_0_row(xr, D, o); break;
        }
    }
}

void lk_kv_load(int32_t dtype, const void *src, int64_t n, int64_t D, const float *k_scale,
                float *out) {
    const int64_t rb = lk_kv_row_bytes(dtype, D);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *s = (const uint8_t *)src + r * rb;
        float *o = out + r * D;
        if (dtype == LK_KV_F32) {
            memcpy(o, s, (size_t)D * sizeof(float));
        } else if (dtype == LK_KV_F16) {
#if LK_X86
            if (lk_active_isa == LK_ISA_AVX2) {
                f16_to_f32_avx2((const uint16_t *)s, D, o);
                continue;
            }
#endif
            for (int64_t d = 0; d < D; d++) o[d] = lk_f16_to_f32(rd16(s + 2 * d));
        } else {
            for (int64_t b = 0; b < D / LK_QK8_0; b++) {
                const uint8_t *blk = s + b * sizeof(lk_block_q8_0);
                const float *sc = k_scale ? k_scale + b * LK_QK8_0 : NULL;
#if LK_X86
                if (lk_active_isa == LK_ISA_AVX2) {
                    q8_block_avx2(blk, sc, o + b * LK_QK8_0);
                    continue;
                }
#endif
                const float d = lk_f16_to_f32(rd16(blk));
                for (int i = 0; i < LK_QK8_0; i++)
                    o[b * LK_QK8_0 + i] = (float)(int8_t)blk[2 + i] * d * (sc ? sc[i] : 1.0f);
            }
            continue;
        }
        if (k_scale)
            for (int64_t d = 0; d < D; d++) o[d] *= k_scale[d];
    }
}
