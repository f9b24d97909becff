/* matmul y[M, N] = x[M, K] @ W[N, K]^T for f32, f16 and q8_0 weights: the dispatch (job
 * setup, row chunks, one parallel job for several matrices, the q8_0 variant choice,
 * activation quantization, the lk_matmul_* entry points). The kernels live in one file
 * per format and instruction set (the map heads matmul_internal.h); the design notes
 * below cover them all.
 *
 *
 * Decode (M = 1, and up to FEW_ROWS rows) is bound by how fast the weights stream from
 * memory: each thread takes contiguous chunks of output rows from a shared counter and
 * walks four weight rows at a time, so one load of x feeds four rows, while it prefetches
 * the next four (which took 4864 x 896 q8_0 from 12 to 21 GB/s on 2 cores). For f32 / f16
 * the four rows are a quarter of the chunk apart, so the four streams are long and
 * sequential (f16 K = 1024: 23 -> 27-28 GB/s, 90-95% of a plain read); q8_0_r16 reads its
 * two 16-row groups from the chunk's two halves likewise. Prefill
 * (more rows) is tiled: a chunk of weight rows and a slice of K stay in L1 (converted to
 * f32 once, for f16; packed to int16 once, for q8_0) while every row of x passes over them.
 *
 * f32 / f16 prefill with AVX-512 runs the few-rows 512-bit micro-kernel over L1 tiles
 * (prefill512): 100 -> 155-195 GFLOP/s on 2 cores at M = 64 and 512 (bench/kernel_speed.py).
 *
 * q8_0 quantizes x per block of 32 to int16 with a float32 scale (int8 activations cost
 * 0.1 perplexity on SmolLM2-135M; int16 is within 0.001 of float x), so each block's dot
 * is exact in int32 (vpmaddwd, or vpdpwssd with AVX-VNNI / AVX512-VNNI) and one FMA per
 * block applies d_w * d_x. Prefill with int16 tiles measured at least as fast as
 * dequantizing the tiles to f32 for FMA on plain AVX2, and 1.5-3x faster with VNNI.
 *
 * A few x rows (batched decode, M = 2 .. FEW_ROWS; q8_0 up to lk_q8_few_rows = 64, which
 * also covers a decode batch plus a prefill slice) still stream the weights like the
 * matvec, but each weight block is widened / converted once for all x rows (q8_0: packed
 * to int16 with rows in lanes, as for prefill; f16: to an f32 tile) instead of once per
 * x row. q8_0_r16 (q8_0's blocks stored with 16 rows interleaved, what models loaded for
 * the native backend hold) skips that packing: a weight vector is one sign-extending load
 * shared by every x row (Qwen2.5-0.5B, 2 threads, hot cache, M = 8 against M = 1: q8_0
 * 2.6-2.7x, q8_0_r16 2.0x; M = 4: 2.0x and 1.2x).
 *
 * Batch invariance: every path computes an output row in one order, whatever M is, so
 * a request gets the same bits batched as alone (tests/test_kernels.py checks M = 1..9,
 * 16 for every format and variant). q8_0: each block's int32 dot is exact in any order,
 * and every kernel then does acc = fma(dot, d_w * d_x, acc) block by block. f32 / f16:
 * see the comment above mv4_float.
 */
#include "matmul_internal.h"

/* Tuning knobs (matmul_internal.h; runtime.c reads them from the environment once) */
int lk_few_blocks = 4;
int lk_pf_dist = 0;
int lk_q8_few_rows = 64;
int lk_f_pf512 = 1;
int lk_mv_quarters = 1;

/* ---- dispatch ---------------------------------------------------------------------- */

/* q8_0 kernel variants beyond the ISA level of runtime.c; picked once (the best the
   CPU has, or LATTICE_Q8=avx2|avxvnni|avx512vnni), used while the active ISA is AVX2. */
enum { Q8_V_AVX2, Q8_V_AVXVNNI, Q8_V_AVX512VNNI, Q8_V_COUNT };
static const char *const q8_names[Q8_V_COUNT] = {"avx2", "avxvnni", "avx512vnni"};
static int q8_mask = -1; /* bit v: the CPU runs variant v */
static int q8_active = Q8_V_AVX2;

static void q8_detect(void) {
    if (q8_mask >= 0) return;
    int mask = 0;
    const uint32_t f = lk_cpu_features();
    const uint32_t avx2 = LK_CPU_AVX2 | LK_CPU_FMA | LK_CPU_F16C;
    const uint32_t avx512vnni = LK_CPU_AVX512F | LK_CPU_AVX512BW | LK_CPU_AVX512VL |
                                LK_CPU_AVX512VNNI;
    if ((f & avx2) == avx2) {
        mask |= 1 << Q8_V_AVX2;
        if (f & LK_CPU_AVXVNNI) mask |= 1 << Q8_V_AVXVNNI;
        if ((f & avx512vnni) == avx512vnni) mask |= 1 << Q8_V_AVX512VNNI;
    }
    int best = Q8_V_AVX2;
    for (int v = Q8_V_AVX2; v < Q8_V_COUNT; v++)
        if (mask & (1 << v)) best = v;
    const char *force = getenv("LATTICE_Q8");
    for (int v = 0; force && v < Q8_V_COUNT; v++)
        if (strcmp(force, q8_names[v]) == 0 && (mask & (1 << v))) best = v;
    q8_active = best;
    q8_mask = mask;
}

int lk_q8_variant(int v) {
    lk_init();
    lk_lock();
    q8_detect();
    if (v >= 0 && v < Q8_V_COUNT && (q8_mask & (1 << v))) q8_active = v;
    v = q8_active;
    lk_unlock();
    return v;
}

const char *lk_q8_variant_name(int v) { return v >= 0 && v < Q8_V_COUNT ? q8_names[v] : NULL; }

static void quantize_act(const float *x, int64_t K, int16_t *q, float *d) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        lk_mm_q8_avx2.quantize_act(x, K, q, d);
        return;
    }
#endif
    lk_mm_generic.quantize_act(x, K, q, d);
}

void lk_quantize_row_q16_act(const float *x, int64_t K, int16_t *q, float *d) {
    lk_init();
    quantize_act(x, K, q, d);
}

static void matmul_task(void *vctx, int64_t c, int ith) {
    matmul_job *j = (matmul_job *)vctx;
    int64_t r0 = c * j->chunk;
    int64_t r1 = r0 + j->chunk < j->N ? r0 + j->chunk : j->N;
    j->rows(j, r0, r1, ith);
    if (j->hooks && j->hooks->post) j->hooks->post(j->hooks->ctx, j->hook_i, r0, r1, ith);
}

typedef struct {
    const float *x;
    int64_t M, K;
    int16_t *xq;
    float *xd;
} quant_job;

static void quant_task(void *vctx, int64_t m, int ith) {
    (void)ith;
    quant_job *q = (quant_job *)vctx;
    const int64_t nb = q->K / LK_QK8_0;
    quantize_act(q->x + m * q->K, q->K, q->xq + m * q->K, q->xd + m * nb);
}

/* Decode chunks per thread and matrix (LATTICE_CHUNKS overrides it; tuning only). */
int lk_chunks_per_thread = 4;
/* Float prefill: weight rows per chunk (LATTICE_PF_ROWS overrides it; tuning only). 64: the
   chunk's converted K slice (64 KiB) stays in L2 while every x row passes over it, and x is
   read once per 64 weight rows (at 16 it came from L3 four times as often: -25% GFLOP/s) */
int lk_pf_rows = PF_ROWS;

/* Output rows per task for a matrix of N rows of ldw bytes. */
static int64_t chunk_rows(int fmt, int64_t M, int64_t N, int64_t ldw, int nth) {
    int64_t chunk;
    const int q8 = fmt == FMT_Q8_0 || fmt == FMT_Q8_0_R16;
    if (M <= (q8 ? q8_few_rows() : FEW_ROWS)) {
        /* a few chunks per thread for balance, but at least ~64 KiB of weights each; more,
           smaller chunks measured slower (each restarts the prefetch streams) */
        int64_t target = (int64_t)nth * lk_chunks_per_thread;
        int64_t by_bytes = (N * ldw) / (64 * 1024);
        if (by_bytes < target) target = by_bytes > nth ? by_bytes : nth;
        chunk = (N + target - 1) / target;
        chunk = (chunk + 3) & ~(int64_t)3;
    } else {
        if (q8) chunk = PF_Q8_ROWS;
        else { /* lk_pf_rows, but at least one chunk per thread */
            const int64_t per = ((N + nth - 1) / nth + 7) & ~(int64_t)7;
            chunk = per < lk_pf_rows ? per : lk_pf_rows;
        }
    }
    if (fmt == FMT_Q8_0_R16) /* whole pairs of 16-row groups (the 512-bit kernel's unit) */
        return (chunk + 2 * LK_R16_ROWS - 1) / (2 * LK_R16_ROWS) * (2 * LK_R16_ROWS);
    return chunk < 4 ? 4 : chunk;
}

typedef struct {
    matmul_job *jobs;
    int n;
    int64_t first[LK_MATMUL_MULTI_MAX + 1]; /* first task of each job; first[n] = total */
    const lk_mm_hooks *hooks;                /* its n_pre tasks come before the chunks */
    int64_t n_pre;
} multi_job;

static void multi_task(void *vctx, int64_t c, int ith) {
    multi_job *mj = (multi_job *)vctx;
    if (mj->hooks) {
        if (c < mj->n_pre) {
            mj->hooks->pre(mj->hooks->ctx, c, ith);
            return;
        }
        c -= mj->n_pre;
    }
    int i = 0;
    while (c >= mj->first[i + 1]) i++;
    matmul_task(&mj->jobs[i], c - mj->first[i], ith);
}

/* The row kernel for format fmt at M rows of x (call with lk_lock held, q8_detect done). */
static lk_mm_rows_fn pick_rows(int fmt, int64_t M, int avx2) {
    lk_mm_rows_fn rows;
#if LK_X86
    if (avx2) {
        const int few512 = M >= 2 && M <= FEW_ROWS && q8_active == Q8_V_AVX512VNNI;
        const int pf512 = M > FEW_ROWS && q8_active == Q8_V_AVX512VNNI && lk_f_pf512;
        if (fmt == FMT_F32) rows = few512 ? lk_mm_f_few512.f32 : pf512 ? lk_mm_f_pf512.f32 : lk_mm_f_avx2.f32;
        else if (fmt == FMT_F16) rows = few512 ? lk_mm_f_few512.f16 : pf512 ? lk_mm_f_pf512.f16 : lk_mm_f_avx2.f16;
        else if (fmt == FMT_Q8_0_R16)
            rows = q8_active == Q8_V_AVX512VNNI ? lk_mm_q8_avx512vnni.q8_0_r16
                 : q8_active == Q8_V_AVXVNNI ? lk_mm_q8_avxvnni.q8_0_r16 : lk_mm_q8_avx2.q8_0_r16;
        else if (q8_active == Q8_V_AVX512VNNI) rows = lk_mm_q8_avx512vnni.q8_0;
        else if (q8_active == Q8_V_AVXVNNI) rows = lk_mm_q8_avxvnni.q8_0;
        else rows = lk_mm_q8_avx2.q8_0;
    } else
#endif
        rows = fmt == FMT_F32 ? lk_mm_generic.f32 : fmt == FMT_F16 ? lk_mm_generic.f16
             : fmt == FMT_Q8_0_R16 ? lk_mm_generic.q8_0_r16 : lk_mm_generic.q8_0;
    (void)avx2;
    (void)M;
    return rows;
}

/* y_i = x @ W_i^T for n matrices of one format and one K, as one parallel job: x is
   quantized once and the threads take row chunks of all n in turn, so decode pays one
   wake-up and one activation quantization for q/k/v (or gate/up) instead of three. */
static void run_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                             const void *const *w, const int64_t *ldw, const int64_t *N,
                             float *const *y, const lk_mm_hooks *hooks) {
    if (M <= 0 || n <= 0) return;
    if (hooks && !hooks->post && (!hooks->pre || hooks->n_pre <= 0)) hooks = NULL;
    lk_lock();
    const int avx2 = LK_X86 && lk_active_isa == LK_ISA_AVX2;
    const int16_t *xq = NULL;
    const float *xd = NULL;
    q8_detect();
    if (fmt == FMT_Q8_0 || fmt == FMT_Q8_0_R16) {
        /* x as int16 [M, K] (64 bytes per block, so the scales after it stay aligned)
           and its scales float [M, K/32] */
        const int64_t nb = K / LK_QK8_0;
        uint8_t *buf = (uint8_t *)lk_shared_scratch((size_t)(M * K) * 2 + (size_t)(M * nb) * 4);
        quant_job q = {x, M, K, (int16_t *)buf, (float *)(buf + (size_t)(M * K) * 2)};
        if (M == 1) quant_task(&q, 0, 0);
        else lk_parallel(quant_task, &q, M);
        xq = q.xq;
        xd = q.xd;
    }
    lk_mm_rows_fn rows = pick_rows(fmt, M, avx2);
    const int nth = lk_threads_locked();
    matmul_job jobs[LK_MATMUL_MULTI_MAX];
    multi_job mj = {jobs, 0, {0}, NULL, 0};
    for (int i = 0; i < n; i++) {
        if (N[i] <= 0) continue;
        matmul_job *j = &jobs[mj.n];
        j->x = x;
        j->M = M;
        j->K = K;
        j->w = (const uint8_t *)w[i];
        j->ldw = ldw[i];
        j->N = N[i];
        j->y = y[i];
        j->xq = xq;
        j->xd = xd;
        j->rows = rows;
        j->chunk = chunk_rows(fmt, M, N[i], ldw[i], nth);
        j->nchunks = (N[i] + j->chunk - 1) / j->chunk;
        j->hooks = hooks;
        j->hook_i = i;
        mj.first[mj.n + 1] = mj.first[mj.n] + j->nchunks;
        mj.n++;
    }
    const int64_t n_pre = hooks && hooks->pre && hooks->n_pre > 0 ? hooks->n_pre : 0;
    if (n_pre > 0) {
        mj.hooks = hooks;
        mj.n_pre = n_pre;
        lk_parallel(multi_task, &mj, n_pre + mj.first[mj.n]);
    } else if (mj.n == 1) lk_parallel(matmul_task, &jobs[0], jobs[0].nchunks);
    else if (mj.n > 1) lk_parallel(multi_task, &mj, mj.first[mj.n]);
    lk_unlock();
}

static void run_matmul(int fmt, const float *x, int64_t M, int64_t K, const void *w,
                       int64_t ldw, int64_t N, float *y) {
    run_matmul_multi(fmt, x, M, K, 1, &w, &ldw, &N, &y, NULL);
}

int lk_matmul_multi_hooked(int fmt, const float *x, int64_t M, int64_t K, int n,
                           const void *const *w, const int64_t *ldw, const int64_t *N,
                           float *const *y, const lk_mm_hooks *hooks) {
    if (fmt < LK_FMT_F32 || fmt > LK_FMT_Q8_0_R16 || n < 0 || n > LK_MATMUL_MULTI_MAX) return -1;
    if ((fmt == LK_FMT_Q8_0 || fmt == LK_FMT_Q8_0_R16) && K % LK_QK8_0) return -1;
    if (fmt == LK_FMT_Q8_0_R16)
        for (int i = 0; i < n; i++)
            if (N[i] % LK_R16_ROWS || ldw[i] != K / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0)) return -1;
    run_matmul_multi(fmt, x, M, K, n, w, ldw, N, y, hooks);
    return 0;
}

int lk_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                    const void *const *w, const int64_t *ldw, const int64_t *N,
                    float *const *y) {
    return lk_matmul_multi_hooked(fmt, x, M, K, n, w, ldw, N, y, NULL);
}

void lk_matmul_f32(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                   float *y) {
    run_matmul(FMT_F32, x, M, K, w, ldw, N, y);
}

void lk_matmul_f16(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                   float *y) {
    run_matmul(FMT_F16, x, M, K, w, ldw, N, y);
}

void lk_matmul_q8_0(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw, int64_t N,
                    float *y) {
    run_matmul(FMT_Q8_0, x, M, K, w, ldw, N, y);
}

void lk_matmul_q8_0_r16(const float *x, int64_t M, int64_t K, const void *w, int64_t ldw,
                        int64_t N, float *y) {
    run_matmul(FMT_Q8_0_R16, x, M, K, w, ldw, N, y);
}

/* ---- grouped: each matrix its own rows of x (mixture-of-experts dispatch) ------------- */

typedef struct {
    matmul_job *jobs;
    int64_t n;
    int64_t *first; /* [n + 1]: first task of each job */
} grouped_job;

static void grouped_task(void *vctx, int64_t c, int ith) {
    grouped_job *g = (grouped_job *)vctx;
    int64_t lo = 0, hi = g->n - 1; /* the job whose tasks hold c */
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (g->first[mid] <= c) lo = mid;
        else hi = mid - 1;
    }
    matmul_task(&g->jobs[lo], c - g->first[lo], ith);
}

static matmul_job *g_jobs;
static int64_t *g_first;
static int64_t g_cap;

int lk_matmul_grouped(int fmt, const float *x, int64_t K, int64_t n, const int64_t *row0,
                      const int64_t *M, const void *const *w, const int64_t *ldw,
                      const int64_t *N, float *const *y) {
    if (fmt < LK_FMT_F32 || fmt > LK_FMT_Q8_0_R16 || n < 0 || K <= 0) return -1;
    const int q8 = fmt == LK_FMT_Q8_0 || fmt == LK_FMT_Q8_0_R16;
    if (q8 && K % LK_QK8_0) return -1;
    int64_t rows_x = 0; /* x rows read: quantized once for every matrix */
    for (int64_t i = 0; i < n; i++) {
        if (row0[i] < 0 || M[i] < 0) return -1;
        if (fmt == LK_FMT_Q8_0_R16 &&
            (N[i] % LK_R16_ROWS || ldw[i] != K / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0)))
            return -1;
        if (M[i] > 0 && row0[i] + M[i] > rows_x) rows_x = row0[i] + M[i];
    }
    if (n == 0 || rows_x == 0) return 0;
    lk_init();
    lk_lock();
    if (n > g_cap) {
        matmul_job *j = (matmul_job *)realloc(g_jobs, (size_t)n * sizeof *j);
        if (j) g_jobs = j;
        int64_t *f = (int64_t *)realloc(g_first, (size_t)(n + 1) * sizeof *f);
        if (f) g_first = f;
        if (!j || !f) {
            lk_unlock();
            return -2;
        }
        g_cap = n;
    }
    const int avx2 = LK_X86 && lk_active_isa == LK_ISA_AVX2;
    const int16_t *xq = NULL;
    const float *xd = NULL;
    q8_detect();
    const int64_t nb = K / LK_QK8_0;
    if (q8) {
        uint8_t *buf = (uint8_t *)lk_shared_scratch((size_t)(rows_x * K) * 2 +
                                                   (size_t)(rows_x * nb) * 4);
        if (!buf) {
            lk_unlock();
            return -2;
        }
        quant_job q = {x, rows_x, K, (int16_t *)buf, (float *)(buf + (size_t)(rows_x * K) * 2)};
        if (rows_x == 1) quant_task(&q, 0, 0);
        else lk_parallel(quant_task, &q, rows_x);
        xq = q.xq;
        xd = q.xd;
    }
    const int nth = lk_threads_locked();
    grouped_job g = {g_jobs, 0, g_first};
    g.first[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        if (N[i] <= 0 || M[i] <= 0) continue;
        matmul_job *j = &g.jobs[g.n];
        j->x = x + row0[i] * K;
        j->M = M[i];
        j->K = K;
        j->w = (const uint8_t *)w[i];
        j->ldw = ldw[i];
        j->N = N[i];
        j->y = y[i];
        j->xq = q8 ? xq + row0[i] * K : NULL;
        j->xd = q8 ? xd + row0[i] * nb : NULL;
        j->rows = pick_rows(fmt, M[i], avx2);
        j->chunk = chunk_rows(fmt, M[i], N[i], ldw[i], nth);
        j->nchunks = (N[i] + j->chunk - 1) / j->chunk;
        j->hooks = NULL;
        g.first[g.n + 1] = g.first[g.n] + j->nchunks;
        g.n++;
    }
    if (g.n) lk_parallel(grouped_task, &g, g.first[g.n]);
    lk_unlock();
    return 0;
}
