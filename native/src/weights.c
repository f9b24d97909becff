/* weights.c: per-format weight-row utilities that are not matmuls: the embedding lookup
 * (lk_embed_*), the q8_0 <-> q8_0_r16 layout conversion and q8_0 weight quantization. */
#include "matmul_internal.h"

/* ---- embed ------------------------------------------------------------------------- */

static int check_ids(const int64_t *ids, int64_t n, int64_t rows) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -1;
    return 0;
}

int lk_embed_f32(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                 int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    for (int64_t i = 0; i < n; i++)
        memcpy(out + i * K, (const uint8_t *)w + ids[i] * ldw, (size_t)K * sizeof(float));
    return 0;
}

#if LK_X86
LK_AVX2_TARGET static void f16_row_avx2(const uint8_t *src, int64_t K, float *dst) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load_w8(src, k, FMT_F16));
    for (; k < K; k++) dst[k] = _cvtsh_ss(rd16(src + 2 * k));
}
#endif

int lk_embed_f16(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                 int64_t n, float *out) {
    lk_init();
    if (check_ids(ids, n, rows)) return -1;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *src = (const uint8_t *)w + ids[i] * ldw;
#if LK_X86
        if (lk_active_isa == LK_ISA_AVX2) {
            f16_row_avx2(src, K, out + i * K);
            continue;
        }
#endif
        for (int64_t k = 0; k < K; k++) out[i * K + k] = lk_f16_to_f32(rd16(src + 2 * k));
    }
    return 0;
}

int lk_embed_q8_0(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                  int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    const int64_t nb = K / LK_QK8_0;
    for (int64_t i = 0; i < n; i++) {
        const lk_block_q8_0 *src = (const lk_block_q8_0 *)((const uint8_t *)w + ids[i] * ldw);
        float *dst = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const float d = lk_f16_to_f32(rd16(&src[b].d));
            for (int k = 0; k < LK_QK8_0; k++) dst[b * LK_QK8_0 + k] = d * (float)src[b].qs[k];
        }
    }
    return 0;
}

int lk_embed_q8_0_r16(const void *w, int64_t ldw, int64_t rows, int64_t K, const int64_t *ids,
                      int64_t n, float *out) {
    if (check_ids(ids, n, rows)) return -1;
    const int64_t nb = K / LK_QK8_0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *g = (const uint8_t *)w + ids[i] / LK_R16_ROWS * LK_R16_ROWS * ldw;
        const int l = (int)(ids[i] % LK_R16_ROWS);
        float *dst = out + i * K;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *rec = g + b * LK_R16_RECORD;
            const float d = lk_f16_to_f32(rd16(rec + 512 + 2 * l));
            for (int p = 0; p < 16; p++)
                for (int e = 0; e < 2; e++)
                    dst[b * LK_QK8_0 + lk_r16_value(p, e)] = d * (float)(int8_t)rec[32 * p + 2 * l + e];
        }
    }
    return 0;
}

/* ---- layout conversion q8_0 <-> q8_0_r16 --------------------------------------------- */

typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    int64_t nb, ldw;
    int to_r16, failed;
} r16_job;

/* Groups [g0, g1) one at a time through a copy of each, so src may be dst (in place: a
   group holds the same bytes in either layout). */
static void r16_groups(void *ctx, int64_t g0, int64_t g1, int ith) {
    (void)ith;
    r16_job *j = (r16_job *)ctx;
    const int64_t nb = j->nb, ldw = j->ldw, gbytes = LK_R16_ROWS * ldw;
    const int to_r16 = j->to_r16;
    uint8_t *tmp = (uint8_t *)malloc(gbytes > 0 ? (size_t)gbytes : 1);
    if (!tmp) {
        j->failed = 1;
        return;
    }
    for (int64_t g = g0; g < g1; g++) {
        memcpy(tmp, j->src + g * gbytes, (size_t)gbytes);
        uint8_t *out = j->dst + g * gbytes;
        for (int l = 0; l < LK_R16_ROWS; l++)
            for (int64_t b = 0; b < nb; b++) {
                const int64_t rec = b * LK_R16_RECORD, blk = l * ldw + b * (int64_t)sizeof(lk_block_q8_0);
                for (int p = 0; p < 16; p++)
                    for (int e = 0; e < 2; e++) {
                        const int64_t a = rec + 32 * p + 2 * l + e, q = blk + 2 + lk_r16_value(p, e);
                        out[to_r16 ? a : q] = tmp[to_r16 ? q : a];
                    }
                const int64_t da = rec + 512 + 2 * l;
                memcpy(out + (to_r16 ? da : blk), tmp + (to_r16 ? blk : da), 2);
            }
    }
    free(tmp);
}

/* Every group is its own piece of work: the kernel threads convert a loaded model's
   matrices two (or more) groups at a time. */
static int r16_convert(const uint8_t *src, int64_t rows, int64_t K, uint8_t *dst, int to_r16) {
    if (rows < 0 || rows % LK_R16_ROWS || K < 0 || K % LK_QK8_0) return -1;
    lk_init();
    const int64_t nb = K / LK_QK8_0;
    r16_job j = {src, dst, nb, nb * (int64_t)sizeof(lk_block_q8_0), to_r16, 0};
    const int64_t per = LK_R16_ROWS * (K > 0 ? K : 1); /* values per group */
    lk_parallel_for(r16_groups, &j, rows / LK_R16_ROWS, per >= 65536 ? 1 : 65536 / per);
    return j.failed ? -1 : 0;
}

int lk_q8_0_to_r16(const void *src, int64_t rows, int64_t K, void *dst) {
    return r16_convert((const uint8_t *)src, rows, K, (uint8_t *)dst, 1);
}

int lk_r16_to_q8_0(const void *src, int64_t rows, int64_t K, void *dst) {
    return r16_convert((const uint8_t *)src, rows, K, (uint8_t *)dst, 0);
}

/* ---- weight quantization (matches the numpy reference bit for bit) --------------------- */

/* One block, the reference arithmetic: d = amax / 127 (NaN ignored by fmaxf), stored as
   f16; q = sign(s) * min(floor(|s| + 0.5), 127) with s = v / d taken as v * (1 / d). */
/* Stores the block's scale d = amax / 127 (as f16) and returns 1 / d (0 for d = 0): one
   function for both paths, so their scales cannot drift apart. */
static float put_scale_q8_0(float amax, lk_block_q8_0 *o) {
    const float d = amax / 127.0f;
    const uint16_t dh = lk_f32_to_f16(d);
    memcpy(&o->d, &dh, 2);
    return d != 0.0f ? 1.0f / d : 0.0f;
}

static void quantize_block_q8_0(const float *v, lk_block_q8_0 *o) {
    float amax = 0;
    for (int i = 0; i < LK_QK8_0; i++) amax = fmaxf(amax, fabsf(v[i]));
    const float id = put_scale_q8_0(amax, o);
    for (int i = 0; i < LK_QK8_0; i++) {
        const float s = v[i] * id;
        float q = floorf(fabsf(s) + 0.5f);
        q = q > 127.0f ? 127.0f : q;
        o->qs[i] = (int8_t)(s < 0 ? -q : q);
    }
}

#if LK_X86
/* The same IEEE operations eight lanes at a time (max, multiply, add, floor and min are
   exact or correctly rounded alike), so the same bytes; a block holding a NaN or an
   infinity takes the scalar path, whose conversions of them the vector one does not
   share. Loading a 0.8B model to q8_0 spent 9.6 of its 17 s in the scalar loop. */
LK_AVX2_TARGET static void quantize_block_q8_0_avx2(const float *v, lk_block_q8_0 *o) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 x[4], m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_loadu_ps(v + 8 * i);
        const __m256 a = _mm256_and_ps(x[i], absmask);
        /* not below +inf: an infinity or a NaN */
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_NLT_UQ));
        m = _mm256_max_ps(a, m);
    }
    if (_mm256_movemask_ps(bad)) {
        quantize_block_q8_0(v, o);
        return;
    }
    const __m256 vid = _mm256_set1_ps(put_scale_q8_0(lk_hmax8_avx2(m), o)), half = _mm256_set1_ps(0.5f);
    const __m256 top = _mm256_set1_ps(127.0f);
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    __m256i q[4];
    for (int i = 0; i < 4; i++) {
        const __m256 sc = _mm256_mul_ps(x[i], vid);
        __m256 r = _mm256_min_ps(_mm256_floor_ps(_mm256_add_ps(_mm256_and_ps(sc, absmask), half)), top);
        r = _mm256_or_ps(r, _mm256_and_ps(sc, sign)); /* -0.0 converts to 0 */
        q[i] = _mm256_cvttps_epi32(r);
    }
    /* int32 -> int8 (|q| <= 127: no saturation); packs works per 128-bit lane */
    const __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                  _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)o->qs, b);
}
#endif

typedef struct {
    const float *x;
    int64_t K;
    lk_block_q8_0 *out;
} quantize_job;

static void quantize_rows(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const quantize_job *j = (const quantize_job *)ctx;
    const int64_t nb = j->K / LK_QK8_0;
#if LK_X86
    const int avx2 = lk_active_isa == LK_ISA_AVX2;
#endif
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < nb; b++) {
            const float *v = j->x + r * j->K + b * LK_QK8_0;
            lk_block_q8_0 *o = j->out + r * nb + b;
#if LK_X86
            if (avx2) {
                quantize_block_q8_0_avx2(v, o);
                continue;
            }
#endif
            quantize_block_q8_0(v, o);
        }
}

/* ---- stored blocks or floats straight to q8_0 ----------------------------------------- */

enum { SRC_F32 = 0, SRC_F16 = 1, SRC_BF16 = 30 }; /* ggml type ids of the float sources */

typedef struct {
    lk_ggml_rows in;
    lk_block_q8_0 *out;
} to_q8_job;

/* 32 values of a float source -> y (exact: f16 and bf16 widen without rounding) */
static void float_piece(int type, const uint8_t *p, float *y) {
    if (type == SRC_F32) {
        memcpy(y, p, 32 * sizeof(float));
    } else if (type == SRC_F16) {
        for (int i = 0; i < 32; i++) y[i] = lk_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
    } else {
        for (int i = 0; i < 32; i++) {
            const uint32_t bits = (uint32_t)(p[2 * i] | p[2 * i + 1] << 8) << 16;
            memcpy(y + i, &bits, 4);
        }
    }
}

/* Each stored block (or 32 floats) is decoded onto the stack and its 32-value pieces
   quantized from there: the same functions as lk_dequantize_ggml (or the float widening)
   then lk_quantize_q8_0, so the same bytes, without a float32 copy of the matrix passing
   through memory. */
static void to_q8_rows(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const to_q8_job *j = (const to_q8_job *)ctx;
    const lk_ggml_rows *in = &j->in;
    const int64_t nb = in->K / in->block_values, per = in->block_values / LK_QK8_0;
    const int floats = in->type == SRC_F32 || in->type == SRC_F16 || in->type == SRC_BF16;
#if LK_X86
    const int avx2 = lk_active_isa == LK_ISA_AVX2;
#endif
    float y[LK_GGML_MAX_BLOCK];
    for (int64_t r = r0; r < r1; r++) {
        lk_block_q8_0 *o = j->out + r * (in->K / LK_QK8_0);
        for (int64_t b = 0; b < nb; b++, o += per) {
            const uint8_t *blk = in->src + r * in->row_bytes + b * in->block_bytes;
            if (floats) float_piece(in->type, blk, y);
            else lk_ggml_block_to_f32(in->type, blk, y);
            for (int64_t s = 0; s < per; s++) {
#if LK_X86
                if (avx2) {
                    quantize_block_q8_0_avx2(y + s * LK_QK8_0, o + s);
                    continue;
                }
#endif
                quantize_block_q8_0(y + s * LK_QK8_0, o + s);
            }
        }
    }
}

int lk_to_q8_0(int type, const void *src, int64_t rows, int64_t K, void *dst) {
    int64_t values = LK_QK8_0, bytes;
    if (type == SRC_F32) bytes = 32 * 4;
    else if (type == SRC_F16 || type == SRC_BF16) bytes = 32 * 2;
    else if (lk_ggml_block_shape(type, &values, &bytes)) return -1;
    if (rows < 0 || K <= 0 || K % values || values % LK_QK8_0 || values > LK_GGML_MAX_BLOCK)
        return -1;
    lk_init();
    to_q8_job j = {{type, (const uint8_t *)src, K, K / values * bytes, values, bytes},
                   (lk_block_q8_0 *)dst};
    const int64_t grain = K >= 65536 ? 1 : 65536 / K;
    lk_parallel_for(to_q8_rows, &j, rows, grain);
    return 0;
}

void lk_quantize_q8_0(const float *x, int64_t rows, int64_t K, void *dst) {
    lk_init();
    quantize_job j = {x, K, (lk_block_q8_0 *)dst};
    /* rows in chunks of ~64k values: small matrices stay on the calling thread */
    const int64_t grain = K >= 65536 ? 1 : 65536 / (K > 0 ? K : 1);
    lk_parallel_for(quantize_rows, &j, rows, grain);
}
