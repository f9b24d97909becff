/* Vector distances (dot, cosine, squared L2) on float32 and int8 vectors, and a batched
 * exact top-k search of queries against a matrix of stored vectors.
 *
 * Kernels: generic C, AVX2 (+FMA) and AVX-512 (F + BW), picked at run time: generic when
 * the active ISA is generic (LATTICE_ISA=generic), else the best the CPU runs, or the one
 * lk_distance_variant() forces (tests compare them). int8 products are exact in int32
 * (vpmaddwd on sign-extended int16), so every variant gives the same int8 scores and
 * rankings bit for bit; float32 sums differ between variants only in summation order.
 *
 * Top-k: the stored matrix is split into row ranges over the thread pool; a range is
 * walked in blocks of rows small enough to stay in L1/L2 while every query passes over
 * them (so the matrix streams from memory once for all queries), and each thread keeps
 * one bounded heap per query. The heaps are merged at the end. Ranking: a higher score is
 * better (dot, cosine; squared L2 is ranked by its negation), and equal scores rank the
 * lower id first, so results are deterministic and equal to a stable exact sort.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdlib.h>
#include <string.h>

enum { DV_GENERIC, DV_AVX2, DV_AVX512, DV_COUNT };
static const char *const dv_names[DV_COUNT] = {"generic", "avx2", "avx512"};
static int dv_mask = -1;
static int dv_forced = -1;

static void dv_detect(void) {
    if (dv_mask >= 0) return;
    const uint32_t f = lk_cpu_features();
    int mask = 1 << DV_GENERIC;
    if ((f & (LK_CPU_AVX2 | LK_CPU_FMA)) == (LK_CPU_AVX2 | LK_CPU_FMA)) {
        mask |= 1 << DV_AVX2;
        if ((f & (LK_CPU_AVX512F | LK_CPU_AVX512BW)) == (LK_CPU_AVX512F | LK_CPU_AVX512BW))
            mask |= 1 << DV_AVX512;
    }
    dv_mask = mask;
}

static int dv_active(void) {
    dv_detect();
    if (!LK_X86 || lk_active_isa == LK_ISA_GENERIC) return DV_GENERIC;
    if (dv_forced >= 0 && (dv_mask & (1 << dv_forced))) return dv_forced;
    return (dv_mask & (1 << DV_AVX512)) ? DV_AVX512 : DV_AVX2;
}

int lk_distance_variant(int v) {
    lk_init();
    dv_detect();
    if (v >= 0 && v < DV_COUNT && (dv_mask & (1 << v))) dv_forced = v;
    if (v == -2) dv_forced = -1; /* back to the best */
    return dv_active();
}

const char *lk_distance_variant_name(int v) {
    return v >= 0 && v < DV_COUNT ? dv_names[v] : NULL;
}

int lk_distance_variants(void) {
    lk_init();
    dv_detect();
    return dv_mask;
}

/* ---- dot and squared L2 of one pair, per variant ------------------------------------- */

static float dot_f32_generic(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float l2sq_f32_generic(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            const float t = a[i + l] - b[i + l];
            acc[l] += t * t;
        }
    float s = 0;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; i < n; i++) s += (a[i] - b[i]) * (a[i] - b[i]);
    return s;
}

static int64_t dot_i8_generic(const int8_t *a, const int8_t *b, int64_t n) {
    int64_t s = 0;
    for (int64_t i = 0; i < n; i++) s += (int32_t)a[i] * (int32_t)b[i];
    return s;
}

static int64_t l2sq_i8_generic(const int8_t *a, const int8_t *b, int64_t n) {
    int64_t s = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t t = (int32_t)a[i] - (int32_t)b[i];
        s += t * t;
    }
    return s;
}

#if LK_X86
LK_AVX2_TARGET static float dot_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = lk_hsum8_avx2(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

LK_AVX2_TARGET static float l2sq_f32_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
        s0 = _mm256_fmadd_ps(t0, t0, s0);
        s1 = _mm256_fmadd_ps(t1, t1, s1);
    }
    for (; i + 8 <= n; i += 8) {
        const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        s0 = _mm256_fmadd_ps(t0, t0, s0);
    }
    float s = lk_hsum8_avx2(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += (a[i] - b[i]) * (a[i] - b[i]);
    return s;
}

LK_AVX2_TARGET static int64_t hsum_i32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return (int64_t)_mm_cvtsi128_si32(s);
}

/* 16 int8 -> int16, then vpmaddwd: pairs of exact int16 products summed into int32 lanes.
   Each lane adds at most n / 8 products of |x| <= 255^2: exact for n < 2^18 / 2. */
LK_AVX2_TARGET static int64_t dot_i8_avx2(const int8_t *a, const int8_t *b, int64_t n) {
    __m256i s = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + i)));
        const __m256i y = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + i)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(x, y));
    }
    int64_t r = hsum_i32_avx2(s);
    for (; i < n; i++) r += (int32_t)a[i] * (int32_t)b[i];
    return r;
}

LK_AVX2_TARGET static int64_t l2sq_i8_avx2(const int8_t *a, const int8_t *b, int64_t n) {
    __m256i s = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + i)));
        const __m256i y = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + i)));
        const __m256i t = _mm256_sub_epi16(x, y);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(t, t));
    }
    int64_t r = hsum_i32_avx2(s);
    for (; i < n; i++) r += ((int32_t)a[i] - b[i]) * ((int32_t)a[i] - b[i]);
    return r;
}

#define DV512_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw")))

DV512_TARGET static float dot_f32_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) { /* the tail under a mask: no scalar loop */
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

DV512_TARGET static float l2sq_f32_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        const __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16));
        s0 = _mm512_fmadd_ps(t0, t0, s0);
        s1 = _mm512_fmadd_ps(t1, t1, s1);
    }
    for (; i + 16 <= n; i += 16) {
        const __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        s0 = _mm512_fmadd_ps(t0, t0, s0);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i),
                                       _mm512_maskz_loadu_ps(m, b + i));
        s1 = _mm512_fmadd_ps(t, t, s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

DV512_TARGET static int64_t dot_i8_avx512(const int8_t *a, const int8_t *b, int64_t n) {
    __m512i s = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(a + i)));
        const __m512i y = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(b + i)));
        s = _mm512_add_epi32(s, _mm512_madd_epi16(x, y));
    }
    int64_t r = _mm512_reduce_add_epi32(s);
    for (; i < n; i++) r += (int32_t)a[i] * (int32_t)b[i];
    return r;
}

DV512_TARGET static int64_t l2sq_i8_avx512(const int8_t *a, const int8_t *b, int64_t n) {
    __m512i s = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(a + i)));
        const __m512i y = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(b + i)));
        const __m512i t = _mm512_sub_epi16(x, y);
        s = _mm512_add_epi32(s, _mm512_madd_epi16(t, t));
    }
    int64_t r = _mm512_reduce_add_epi32(s);
    for (; i < n; i++) r += ((int32_t)a[i] - b[i]) * ((int32_t)a[i] - b[i]);
    return r;
}
#endif

typedef float (*f32_fn)(const float *, const float *, int64_t);
typedef int64_t (*i8_fn)(const int8_t *, const int8_t *, int64_t);

static f32_fn f32_kernel(int v, int l2) {
#if LK_X86
    if (v == DV_AVX512) return l2 ? l2sq_f32_avx512 : dot_f32_avx512;
    if (v == DV_AVX2) return l2 ? l2sq_f32_avx2 : dot_f32_avx2;
#endif
    (void)v;
    return l2 ? l2sq_f32_generic : dot_f32_generic;
}

static i8_fn i8_kernel(int v, int l2) {
#if LK_X86
    if (v == DV_AVX512) return l2 ? l2sq_i8_avx512 : dot_i8_avx512;
    if (v == DV_AVX2) return l2 ? l2sq_i8_avx2 : dot_i8_avx2;
#endif
    (void)v;
    return l2 ? l2sq_i8_generic : dot_i8_generic;
}

/* ---- one pair --------------------------------------------------------------------- */

static double cosine_of(double dot, double aa, double bb) {
    const double den = sqrt(aa) * sqrt(bb);
    return den > 0 ? dot / den : 0.0;
}

float lk_distance_f32(const float *a, const float *b, int64_t n, int metric) {
    lk_init();
    const int v = dv_active();
    if (metric == LK_METRIC_L2) return f32_kernel(v, 1)(a, b, n);
    const float d = f32_kernel(v, 0)(a, b, n);
    if (metric == LK_METRIC_DOT) return d;
    return (float)cosine_of(d, f32_kernel(v, 0)(a, a, n), f32_kernel(v, 0)(b, b, n));
}

double lk_distance_i8(const int8_t *a, const int8_t *b, int64_t n, int metric) {
    lk_init();
    const int v = dv_active();
    if (metric == LK_METRIC_L2) return (double)i8_kernel(v, 1)(a, b, n);
    const int64_t d = i8_kernel(v, 0)(a, b, n);
    if (metric == LK_METRIC_DOT) return (double)d;
    return cosine_of((double)d, (double)i8_kernel(v, 0)(a, a, n),
                     (double)i8_kernel(v, 0)(b, b, n));
}

/* ---- top-k ------------------------------------------------------------------------ */

/* A bounded min-heap of (score, id): the root is the worst kept entry. "Better" = higher
   score, or the same score and a lower id. */
typedef struct {
    double score;
    int64_t id;
} hit;

static inline int better(hit x, hit y) {
    return x.score > y.score || (x.score == y.score && x.id < y.id);
}

static int cmp_hit(const void *x, const void *y) {
    const hit a = *(const hit *)x, b = *(const hit *)y;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

static void heap_push(hit *h, int64_t *size, int64_t k, hit x) {
    if (*size < k) { /* sift up */
        int64_t i = (*size)++;
        while (i > 0) {
            const int64_t p = (i - 1) / 2;
            if (!better(h[p], x)) break;
            h[i] = h[p];
            i = p;
        }
        h[i] = x;
        return;
    }
    if (!better(x, h[0])) return;
    int64_t i = 0; /* replace the root, sift down */
    for (;;) {
        const int64_t l = 2 * i + 1, r = l + 1;
        int64_t w = i;
        hit wv = x;
        if (l < k && better(wv, h[l])) { w = l; wv = h[l]; }
        if (r < k && better(wv, h[r])) { w = r; wv = h[r]; }
        if (w == i) break;
        h[i] = h[w];
        i = w;
    }
    h[i] = x;
}

typedef struct {
    const void *q, *db;
    int64_t nq, n, d, k;
    int metric, i8, variant;
    const float *db_norms; /* cosine: |row| per stored row (NULL: computed here) */
    double *q_norms;       /* cosine: |query| per query */
    hit *heaps;            /* [threads][nq][k] */
    int64_t *sizes;        /* [threads][nq] */
} topk_job;

#define TOPK_BLOCK 64 /* stored rows per block: 64 x 384 f32 = 96 KiB, in L2 for all queries */

static void topk_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    topk_job *j = (topk_job *)ctx;
    hit *heaps = j->heaps + (int64_t)ith * j->nq * j->k;
    int64_t *sizes = j->sizes + (int64_t)ith * j->nq;
    const int l2 = j->metric == LK_METRIC_L2;
    const f32_fn ff = j->i8 ? NULL : f32_kernel(j->variant, l2);
    const f32_fn fdot = j->i8 ? NULL : f32_kernel(j->variant, 0);
    const i8_fn fi = j->i8 ? i8_kernel(j->variant, l2) : NULL;
    const i8_fn idot = j->i8 ? i8_kernel(j->variant, 0) : NULL;
    for (int64_t b0 = r0; b0 < r1; b0 += TOPK_BLOCK) {
        const int64_t b1 = b0 + TOPK_BLOCK < r1 ? b0 + TOPK_BLOCK : r1;
        double rn[TOPK_BLOCK];
        if (j->metric == LK_METRIC_COSINE)
            for (int64_t r = b0; r < b1; r++) {
                double nn;
                if (j->db_norms) nn = j->db_norms[r];
                else if (j->i8) {
                    const int8_t *row = (const int8_t *)j->db + r * j->d;
                    nn = sqrt((double)idot(row, row, j->d));
                } else {
                    const float *row = (const float *)j->db + r * j->d;
                    nn = sqrt((double)fdot(row, row, j->d));
                }
                rn[r - b0] = nn;
            }
        for (int64_t qi = 0; qi < j->nq; qi++) {
            hit *h = heaps + qi * j->k;
            for (int64_t r = b0; r < b1; r++) {
                double s;
                if (j->i8)
                    s = (double)fi((const int8_t *)j->q + qi * j->d,
                                   (const int8_t *)j->db + r * j->d, j->d);
                else
                    s = (double)ff((const float *)j->q + qi * j->d,
                                   (const float *)j->db + r * j->d, j->d);
                if (l2) s = -s;
                else if (j->metric == LK_METRIC_COSINE) {
                    const double den = j->q_norms[qi] * rn[r - b0];
                    s = den > 0 ? s / den : 0.0;
                }
                heap_push(h, &sizes[qi], j->k, (hit){s, r});
            }
        }
    }
}

static int topk(const void *q, int64_t nq, const void *db, int64_t n, int64_t d, int metric,
                int64_t k, const float *db_norms, int i8, int64_t *ids, float *scores) {
    lk_init();
    if (nq < 0 || n < 0 || d < 1 || k < 1 || k > n || metric < 0 || metric > 2) return -1;
    if (nq == 0) return 0;
    const int threads = lk_get_threads();
    const int variant = dv_active();
    hit *heaps = malloc(sizeof(hit) * (size_t)threads * (size_t)nq * (size_t)k);
    int64_t *sizes = calloc((size_t)threads * (size_t)nq, sizeof(int64_t));
    double *qn = malloc(sizeof(double) * (size_t)nq);
    if (!heaps || !sizes || !qn) {
        free(heaps);
        free(sizes);
        free(qn);
        return -5;
    }
    for (int64_t qi = 0; qi < nq; qi++) {
        if (metric != LK_METRIC_COSINE) { qn[qi] = 1.0; continue; }
        qn[qi] = i8 ? sqrt((double)i8_kernel(variant, 0)((const int8_t *)q + qi * d,
                                                         (const int8_t *)q + qi * d, d))
                    : sqrt((double)f32_kernel(variant, 0)((const float *)q + qi * d,
                                                          (const float *)q + qi * d, d));
    }
    topk_job j = {q, db, nq, n, d, k, metric, i8, variant, db_norms, qn, heaps, sizes};
    /* grain: enough rows per range that a thread's blocks amortise the heap merge */
    lk_parallel_for(topk_range, &j, n, 4 * TOPK_BLOCK);
    /* merge every thread's heap of a query, then sort best first */
    hit *all = malloc(sizeof(hit) * (size_t)threads * (size_t)k);
    if (!all) {
        free(heaps);
        free(sizes);
        free(qn);
        return -5;
    }
    for (int64_t qi = 0; qi < nq; qi++) {
        hit *h = all;
        int64_t size = 0;
        for (int t = 0; t < threads; t++) {
            const hit *src = heaps + ((int64_t)t * nq + qi) * k;
            for (int64_t e = 0; e < sizes[(int64_t)t * nq + qi]; e++) heap_push(h, &size, k, src[e]);
        }
        qsort(h, (size_t)size, sizeof(hit), cmp_hit); /* best first */
        for (int64_t e = 0; e < size; e++) {
            ids[qi * k + e] = h[e].id;
            scores[qi * k + e] = (float)(metric == LK_METRIC_L2 ? -h[e].score : h[e].score);
        }
    }
    free(all);
    free(heaps);
    free(sizes);
    free(qn);
    return 0;
}

int lk_topk_f32(const float *q, int64_t nq, const float *db, int64_t n, int64_t d, int metric,
                int64_t k, const float *db_norms, int64_t *ids, float *scores) {
    return topk(q, nq, db, n, d, metric, k, db_norms, 0, ids, scores);
}

int lk_topk_i8(const int8_t *q, int64_t nq, const int8_t *db, int64_t n, int64_t d, int metric,
               int64_t k, const float *db_norms, int64_t *ids, float *scores) {
    return topk(q, nq, db, n, d, metric, k, db_norms, 1, ids, scores);
}

/* ---- all scores ---------------------------------------------------------------------- */

typedef struct {
    const void *q, *db;
    int64_t nq, n, d;
    int metric, i8, variant;
    float *out; /* [nq, n] */
} scores_job;

static void scores_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    scores_job *j = (scores_job *)ctx;
    for (int64_t b0 = r0; b0 < r1; b0 += TOPK_BLOCK) {
        const int64_t b1 = b0 + TOPK_BLOCK < r1 ? b0 + TOPK_BLOCK : r1;
        for (int64_t qi = 0; qi < j->nq; qi++)
            for (int64_t r = b0; r < b1; r++) {
                if (j->i8) {
                    const int8_t *a = (const int8_t *)j->q + qi * j->d;
                    const int8_t *b = (const int8_t *)j->db + r * j->d;
                    j->out[qi * j->n + r] = (float)lk_distance_i8(a, b, j->d, j->metric);
                } else {
                    const float *a = (const float *)j->q + qi * j->d;
                    const float *b = (const float *)j->db + r * j->d;
                    j->out[qi * j->n + r] = lk_distance_f32(a, b, j->d, j->metric);
                }
            }
    }
}

int lk_scores_f32(const float *q, int64_t nq, const float *db, int64_t n, int64_t d, int metric,
                  float *out) {
    lk_init();
    if (nq < 0 || n < 0 || d < 1 || metric < 0 || metric > 2) return -1;
    scores_job j = {q, db, nq, n, d, metric, 0, dv_active(), out};
    lk_parallel_for(scores_range, &j, n, 4 * TOPK_BLOCK);
    return 0;
}

int lk_scores_i8(const int8_t *q, int64_t nq, const int8_t *db, int64_t n, int64_t d, int metric,
                 float *out) {
    lk_init();
    if (nq < 0 || n < 0 || d < 1 || metric < 0 || metric > 2) return -1;
    scores_job j = {q, db, nq, n, d, metric, 1, dv_active(), out};
    lk_parallel_for(scores_range, &j, n, 4 * TOPK_BLOCK);
    return 0;
}

/* ---- candidates of an approximate pass ------------------------------------------------ */

/* For query qi and stored row i the approximate score is s = A[qi, i] m_i p_qi + o_i and
   the true score lies within b = (alpha_qi r_i + beta_qi xn_i) |m_i p_qi| + e_i of it (the
   caller's error bound). Pass 1 finds L, the k-th largest lower bound s - b: at least k
   rows score L or more, so every row of the true top k has s + b >= L; pass 2 lists those
   rows (in id order, at most cap of them; counts[qi] is the full count, so a caller can
   retry with a larger cap). One query per task. */
typedef struct {
    const float *A, *m, *o, *r, *xn, *e, *p, *alpha, *beta;
    int64_t n, k, cap;
    int64_t *cand, *counts;
} cand_job;

static void cand_range(void *ctx, int64_t q0, int64_t q1, int ith) {
    (void)ith;
    const cand_job *j = (const cand_job *)ctx;
    float *low = malloc(sizeof(float) * (size_t)j->k); /* min-heap of the k largest */
    if (!low) {
        for (int64_t qi = q0; qi < q1; qi++) j->counts[qi] = -1;
        return;
    }
    for (int64_t qi = q0; qi < q1; qi++) {
        const float *a = j->A + qi * j->n;
        const float p = j->p[qi], al = j->alpha[qi], be = j->beta[qi];
        int64_t size = 0;
        for (int64_t i = 0; i < j->n; i++) {
            const float mp = j->m[i] * p;
            const float lo = a[i] * mp + j->o[i] - (al * j->r[i] + be * j->xn[i]) * fabsf(mp) - j->e[i];
            if (size < j->k) { /* sift up */
                int64_t c = size++;
                while (c > 0 && low[(c - 1) / 2] > lo) {
                    low[c] = low[(c - 1) / 2];
                    c = (c - 1) / 2;
                }
                low[c] = lo;
            } else if (lo > low[0]) { /* replace the smallest, sift down */
                int64_t c = 0;
                for (;;) {
                    int64_t w = 2 * c + 1;
                    if (w >= size) break;
                    if (w + 1 < size && low[w + 1] < low[w]) w++;
                    if (low[w] >= lo) break;
                    low[c] = low[w];
                    c = w;
                }
                low[c] = lo;
            }
        }
        const float L = low[0];
        int64_t cnt = 0;
        int64_t *out = j->cand + qi * j->cap;
        for (int64_t i = 0; i < j->n; i++) {
            const float mp = j->m[i] * p;
            const float hi = a[i] * mp + j->o[i] + (al * j->r[i] + be * j->xn[i]) * fabsf(mp) + j->e[i];
            if (hi >= L) {
                if (cnt < j->cap) out[cnt] = i;
                cnt++;
            }
        }
        j->counts[qi] = cnt;
    }
    free(low);
}

int lk_topk_candidates(const float *A, int64_t nq, int64_t n, int64_t k, const float *m,
                       const float *o, const float *r, const float *xn, const float *e,
                       const float *p, const float *alpha, const float *beta, int64_t cap,
                       int64_t *cand, int64_t *counts) {
    lk_init();
    if (nq < 0 || n < 1 || k < 1 || k > n || cap < k) return -1;
    cand_job j = {A, m, o, r, xn, e, p, alpha, beta, n, k, cap, cand, counts};
    lk_parallel_for(cand_range, &j, nq, 1);
    for (int64_t qi = 0; qi < nq; qi++)
        if (counts[qi] < 0) return -5;
    return 0;
}
