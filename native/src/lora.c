/* Low-rank adapter updates (LoRA), applied unmerged after a linear's matmul:
 *
 *     y[m] += scale_s * (x[m] . A_s^T) . B_s^T      for each row m, s = the row's slot
 *
 * with A_s [r, K] and B_s [N, r] (B packed in blocks of 16 outputs) as float32, or as
 * float16 over a base that is not float32 (see lk_lora_factor; the adapter stays float
 * whatever the base format, its arithmetic float32). Rows choose their slot through the
 * shared lk_lora_rows (one slot for all rows, or one per row; -1 or a slot without
 * factors for this module adds nothing), so one batch can mix adapters and rows without
 * any.
 *
 * A plan (lk_lora_plan) covers the linears that read one x (q/k/v, gate/up) and runs in
 * two passes over the rows grouped by slot, so each adapter's factors are read once per
 * call whatever the number of rows using it (8 streams on 4 adapters read 4 sets, not 8):
 *
 *   down  t[m] = scale * x[m] . A^T      units (linear, group, j): A's row j against every
 *                                        row of the group (M x r dots of length K)
 *   up    y[m, o] += t[m] . B[o]         per chunk of outputs: for each j in order, B's
 *                                        column j (16 outputs of a block, contiguous) times
 *                                        t[m, j] into each output's sum, the group's rows
 *                                        sharing every vector of B loaded
 *
 * In the fused steps (lk_step_linears) both run inside the base matmul's parallel job
 * (lk_matmul_multi_hooked): the down tasks come first, and each chunk of output rows gets
 * its bias and, when every down task is finished by then, its up pass from the thread
 * that just computed it (B's rows for the chunk stream while the other thread is in the
 * matmul, the rows of y are in cache; no extra job). A chunk that finds the down pass
 * still running leaves its outputs pending (in a bitmap, by GRANULE outputs) and does not
 * wait: the pending outputs get their up pass in a second job, only when there are any
 * (at one row a decode chunk can be as short as a down task). Nothing within a job waits
 * for another thread: up tasks that waited for the down tasks and the chunks under their
 * outputs had a thread spin on a preempted one's task on the busy machine (18% of the
 * samples at one stream; some runs decoded at half speed). lk_lora_apply runs the same
 * plan alone: a down job, then an up job over every output.
 *
 * Every row's arithmetic is the same whatever the batch and the grouping (each dot is
 * one row's, in one order), so a request gets the same bits batched as alone.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if LK_X86
static inline void relax(void) { __builtin_ia32_pause(); }
#else
static inline void relax(void) { __asm__ __volatile__("" ::: "memory"); }
#endif

/* UP_ROWS: rows of a group an up call takes (the kernel splits them 4 / 2 / 1); UP_CHUNK:
   outputs per up task; DOWN_COST: multiply-adds per down task (at 4096 a task was a few
   dots, and the task counter's and down_done's atomics showed as 1.5% of a step with 8
   streams; 32768 measured 3% faster there); PF_BYTES: how far ahead the factors' stream is
   prefetched (4 KiB, as lk_bench_read does: without it one thread's dependent loads over
   B ran at ~5 GB/s) */
enum { UP_ROWS = 8, UP_CHUNK = 256, DOWN_COST = 32768, PF_BYTES = 4096, GRANULE = 4 };

/* ---- dots ---------------------------------------------------------------------------- */

/* element i of a factor stored as dtype */
static inline float fget(const void *p, int64_t i, int f16) {
    if (f16) {
        uint16_t h;
        memcpy(&h, (const uint16_t *)p + i, 2);
        return lk_f16_to_f32(h);
    }
    return ((const float *)p)[i];
}

static float dot_generic(const float *a, const void *b, int64_t n, int f16) {
    float s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++) s[k] += a[i + k] * fget(b, i + k, f16);
    float acc = (s[0] + s[1]) + (s[2] + s[3]);
    for (; i < n; i++) acc += a[i] * fget(b, i, f16);
    return acc;
}

/* up pass of nr rows over outputs [o0, o1): y_m[o] += sum_j t_m[j] B[o][j], the sum taken
   in order of j from zero and then added. B is packed as lk_lora_factor.bp says: output o
   at bp[(o / 16) * r * 16 + j * 16 + o % 16]. */
static void up_generic(const float *const *t, float *const *y, int nr, const void *bp,
                       int f16, int64_t r, int64_t o0, int64_t o1) {
    for (int m = 0; m < nr; m++)
        for (int64_t o = o0; o < o1; o++) {
            const int64_t at = (o / LK_LORA_BLOCK) * r * LK_LORA_BLOCK + o % LK_LORA_BLOCK;
            float s = 0;
            for (int64_t j = 0; j < r; j++) s += t[m][j] * fget(bp, at + j * LK_LORA_BLOCK, f16);
            y[m][o] += s;
        }
}

#if LK_X86
/* 8 factor values from element i, widened (F16C) when stored as halves */
LK_AVX2_TARGET static inline __attribute__((always_inline)) __m256 fload8(const void *p,
                                                                           int64_t i, int f16) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    return _mm256_loadu_ps((const float *)p + i);
}

LK_AVX2_TARGET static inline __attribute__((always_inline)) float
dot_avx2_t(const float *a, const void *b, int64_t n, const int f16) {
    const int esz = f16 ? 2 : 4;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)b + i * esz + PF_BYTES, _MM_HINT_T0);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), fload8(b, i, f16), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), fload8(b, i + 8, f16), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), fload8(b, i, f16), s0);
    float acc = lk_hsum8_avx2(_mm256_add_ps(s0, s1));
    for (; i < n; i++) acc += a[i] * fget(b, i, f16);
    return acc;
}

LK_AVX2_TARGET static float dot_avx2(const float *a, const void *b, int64_t n, int f16) {
    return f16 ? dot_avx2_t(a, b, n, 1) : dot_avx2_t(a, b, n, 0);
}

/* NR rows x NB blocks of 16 outputs from block b0: one FMA chain per output over j in
   order (the generic sum's order, whatever NR and NB), each vector of B loaded once for
   the NR rows; NR * NB <= 4 keeps the 2 * NR * NB chains in registers and enough of them
   in flight to fill both FMA ports. The blocks are consecutive in memory: one stream. */
LK_AVX2_TARGET static inline __attribute__((always_inline)) void
up_tile_avx2(const float *const *t, float *const *y, const int NR, const int NB,
             const void *bp, const int f16, int64_t r, int64_t b0) {
    const int esz = f16 ? 2 : 4;
    __m256 acc[8];
    for (int i = 0; i < 2 * NR * NB; i++) acc[i] = _mm256_setzero_ps();
    const int64_t bs = r * LK_LORA_BLOCK; /* values per block */
    int64_t at = b0 * bs;
    for (int64_t j = 0; j < r; j++, at += LK_LORA_BLOCK) {
        __m256 bv[8];
        for (int nb = 0; nb < NB; nb++) {
            const int64_t e = at + nb * bs;
            if (!f16 || (j & 1) == 0)
                _mm_prefetch((const char *)bp + e * esz + PF_BYTES, _MM_HINT_T0);
            bv[2 * nb] = fload8(bp, e, f16);
            bv[2 * nb + 1] = fload8(bp, e + 8, f16);
        }
        for (int m = 0; m < NR; m++) {
            const __m256 tb = _mm256_broadcast_ss(t[m] + j);
            for (int w = 0; w < 2 * NB; w++)
                acc[m * 2 * NB + w] = _mm256_fmadd_ps(tb, bv[w], acc[m * 2 * NB + w]);
        }
    }
    for (int m = 0; m < NR; m++)
        for (int w = 0; w < 2 * NB; w++) {
            float *yo = y[m] + b0 * LK_LORA_BLOCK + 8 * w;
            _mm256_storeu_ps(yo, _mm256_add_ps(_mm256_loadu_ps(yo), acc[m * 2 * NB + w]));
        }
}

/* one row, outputs [o0, o1) inside block b (a chunk edge): the lanes masked */
LK_AVX2_TARGET static void up_part_avx2(const float *t, float *y, const void *bp, int f16,
                                        int64_t r, int64_t b, int64_t o0, int64_t o1) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int lo = (int)(o0 - b * LK_LORA_BLOCK), hi = (int)(o1 - b * LK_LORA_BLOCK);
    __m256i mk[2];
    for (int h = 0; h < 2; h++) {
        const __m256i lane = _mm256_add_epi32(idx, _mm256_set1_epi32(8 * h));
        mk[h] = _mm256_and_si256(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(lo - 1)),
                                 _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), lane));
    }
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t at = b * r * LK_LORA_BLOCK;
    for (int64_t j = 0; j < r; j++, at += LK_LORA_BLOCK) {
        const __m256 tb = _mm256_broadcast_ss(t + j);
        acc[0] = _mm256_fmadd_ps(tb, fload8(bp, at, f16), acc[0]);
        acc[1] = _mm256_fmadd_ps(tb, fload8(bp, at + 8, f16), acc[1]);
    }
    float *yb = y + b * LK_LORA_BLOCK;
    for (int h = 0; h < 2; h++)
        _mm256_maskstore_ps(yb + 8 * h, mk[h],
                            _mm256_add_ps(_mm256_maskload_ps(yb + 8 * h, mk[h]), acc[h]));
}

/* whole blocks NB at a time for NR rows, then one at a time */
#define UP_ROWS_AVX2(NR, F16, NAME)                                                        \
    LK_AVX2_TARGET static void NAME(const float *const *t, float *const *y, const void *bp, \
                                    int64_t r, int64_t b0, int64_t b1) {                   \
        enum { NB = 4 / NR };                                                              \
        int64_t b = b0;                                                                    \
        for (; b + NB <= b1; b += NB) up_tile_avx2(t, y, NR, NB, bp, F16, r, b);           \
        for (; b < b1; b++) up_tile_avx2(t, y, NR, 1, bp, F16, r, b);                      \
    }
UP_ROWS_AVX2(1, 0, up_rows1_f32)
UP_ROWS_AVX2(2, 0, up_rows2_f32)
UP_ROWS_AVX2(4, 0, up_rows4_f32)
UP_ROWS_AVX2(1, 1, up_rows1_f16)
UP_ROWS_AVX2(2, 1, up_rows2_f16)
UP_ROWS_AVX2(4, 1, up_rows4_f16)
#undef UP_ROWS_AVX2

typedef void (*up_rows_fn)(const float *const *, float *const *, const void *, int64_t,
                           int64_t, int64_t);

LK_AVX2_TARGET static void up_avx2(const float *const *t, float *const *y, int nr,
                                   const void *bp, int f16, int64_t r, int64_t o0, int64_t o1) {
    static const up_rows_fn rows_fn[2][3] = {{up_rows1_f32, up_rows2_f32, up_rows4_f32},
                                             {up_rows1_f16, up_rows2_f16, up_rows4_f16}};
    const int64_t B = LK_LORA_BLOCK;
    /* blocks wholly inside [o0, o1): [b0, b1); the edges' partial blocks row by row */
    const int64_t b0 = (o0 + B - 1) / B, b1 = o1 / B;
    if (b0 > b1) { /* the range inside one block */
        for (int m = 0; m < nr; m++) up_part_avx2(t[m], y[m], bp, f16, r, o0 / B, o0, o1);
        return;
    }
    for (int m = 0; m < nr; m++) {
        if (o0 < b0 * B) up_part_avx2(t[m], y[m], bp, f16, r, o0 / B, o0, b0 * B);
        if (b1 * B < o1) up_part_avx2(t[m], y[m], bp, f16, r, b1, b1 * B, o1);
    }
    while (nr > 0) {
        const int n = nr >= 4 ? 4 : nr >= 2 ? 2 : 1;
        rows_fn[f16 ? 1 : 0][n == 4 ? 2 : n == 2 ? 1 : 0](t, y, bp, r, b0, b1);
        t += n;
        y += n;
        nr -= n;
    }
}
#endif

static inline float dot(const float *a, const void *b, int64_t n, int f16) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) return dot_avx2(a, b, n, f16);
#endif
    return dot_generic(a, b, n, f16);
}

static inline void up(const float *const *t, float *const *y, int nr, const void *bp, int f16,
                      int64_t r, int64_t o0, int64_t o1) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        up_avx2(t, y, nr, bp, f16, r, o0, o1);
        return;
    }
#endif
    up_generic(t, y, nr, bp, f16, r, o0, o1);
}

/* ---- the plan ------------------------------------------------------------------------ */

/* the factors linear i uses for slot s, or NULL */
static inline const lk_lora_factor *slot_factor(const lk_lora *l, int32_t s) {
    if (!l || s < 0 || s >= l->n_slots || !l->slots[s].a || !l->slots[s].bp) return NULL;
    return &l->slots[s];
}

static void plan_free(lk_lora_plan *p) {
    if (p->heap) free(p->heap);
    p->heap = NULL;
}

int lk_lora_plan_make(lk_lora_plan *p, int n, const lk_lora *const *l,
                      const float *const *bias, float *const *y, const int64_t *N,
                      const float *x, int64_t M, int64_t K) {
    memset(p, 0, sizeof *p);
    if (n < 0 || n > LK_MATMUL_MULTI_MAX) return -2;
    p->n = n;
    p->x = x;
    p->M = M;
    p->K = K;
    const lk_lora_rows *rows = NULL;
    for (int i = 0; i < n; i++) {
        p->bias[i] = bias ? bias[i] : NULL;
        p->y[i] = y[i];
        p->N[i] = N[i];
        if (!l[i] || l[i]->n_slots <= 0) continue;
        if (!l[i]->rows) return -2;
        rows = l[i]->rows; /* one selection per model: every table shares it */
        for (int64_t s = 0; s < l[i]->n_slots; s++) {
            if (!l[i]->slots[s].a) continue;
            if (l[i]->slots[s].r <= 0 || (l[i]->slots[s].dtype != LK_LORA_F32 &&
                                          l[i]->slots[s].dtype != LK_LORA_F16))
                return -2;
            if (l[i]->slots[s].r > p->rmax[i]) p->rmax[i] = l[i]->slots[s].r;
        }
        if (p->rmax[i]) p->l[i] = l[i];
    }
    if (!rows || M <= 0) return 0;
    if (rows->slot && rows->n != M) return -2;
    if (!rows->slot && rows->uniform < 0) return 0;
    /* storage: t per linear [M, rmax], the groups and their rows, the (linear, group) units */
    int64_t tsum = 0;
    for (int i = 0; i < n; i++) tsum += M * p->rmax[i];
    if (tsum == 0) return 0;
    /* up tasks: windows of UP_CHUNK outputs of each linear with factors */
    p->upstart[0] = 0;
    for (int i = 0; i < n; i++)
        p->upstart[i + 1] = p->upstart[i] + (p->l[i] ? (N[i] + UP_CHUNK - 1) / UP_CHUNK : 0);
    p->nup = p->upstart[n];
    p->pstart[0] = 0;
    for (int i = 0; i < n; i++)
        p->pstart[i + 1] = p->pstart[i] + (p->l[i] ? ((N[i] + GRANULE - 1) / GRANULE + 63) / 64 : 0);
    const int64_t gmax = rows->slot ? M : 1;
    const size_t bytes = (size_t)p->pstart[n] * sizeof(uint64_t) + (size_t)tsum * sizeof(float) +
                         (size_t)(2 * gmax + 1 + M) * sizeof(int64_t) +
                         (size_t)(n * gmax + 1) * sizeof(int64_t);
    char *mem;
    if (bytes <= sizeof p->stack) mem = (char *)p->stack;
    else {
        mem = (char *)malloc(bytes);
        if (!mem) return -5;
        p->heap = mem;
    }
    p->pending = (_Atomic uint64_t *)mem;
    for (int64_t w = 0; w < p->pstart[n]; w++) atomic_init(&p->pending[w], 0);
    float *tp = (float *)(mem + (size_t)p->pstart[n] * sizeof(uint64_t));
    for (int i = 0; i < n; i++) {
        p->t[i] = tp;
        tp += M * p->rmax[i];
    }
    int64_t *ip = (int64_t *)tp;
    p->gslot = ip;
    p->gstart = ip + gmax;
    p->grow = ip + 2 * gmax + 1;
    p->ustart = ip + 2 * gmax + 1 + M;
    /* groups in order of first appearance; rows of a group in row order */
    int64_t ng = 0, nr = 0;
    if (!rows->slot) {
        p->gslot[0] = rows->uniform;
        p->gstart[0] = 0;
        for (int64_t m = 0; m < M; m++) p->grow[m] = m;
        ng = 1;
        nr = M;
    } else {
        for (int64_t m = 0; m < M; m++) {
            const int32_t s = rows->slot[m];
            if (s < 0) continue;
            int64_t g = 0;
            while (g < ng && p->gslot[g] != s) g++;
            if (g < ng) continue; /* its group was gathered when first seen */
            p->gslot[ng] = s;
            p->gstart[ng] = nr;
            for (int64_t m2 = m; m2 < M; m2++)
                if (rows->slot[m2] == s) p->grow[nr++] = m2;
            ng++;
        }
    }
    p->gstart[ng] = nr;
    p->ngroups = ng;
    /* down units: (linear i, group g, factor row j), numbered i-major then g */
    int64_t u = 0, cost = 0;
    for (int i = 0; i < n; i++)
        for (int64_t g = 0; g < ng; g++) {
            p->ustart[i * ng + g] = u;
            const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
            if (!f) continue;
            u += f->r;
            cost += f->r * K * (p->gstart[g + 1] - p->gstart[g]);
        }
    p->ustart[n * ng] = u;
    p->nunits = u;
    if (u == 0) {
        plan_free(p);
        p->ngroups = 0;
        return 0;
    }
    int64_t nt = (cost + DOWN_COST - 1) / DOWN_COST;
    p->ndown = nt < 1 ? 1 : nt > u ? u : nt;
    p->active = 1;
    return 0;
}

void lk_lora_plan_free(lk_lora_plan *p) { plan_free(p); }

/* down task d: units [nunits * d / ndown, nunits * (d + 1) / ndown) */
void lk_lora_plan_down(void *ctx, int64_t d, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    const int64_t u0 = p->nunits * d / p->ndown, u1 = p->nunits * (d + 1) / p->ndown;
    const int64_t ng = p->ngroups, K = p->K;
    int64_t pair = 0; /* i * ng + g, the unit range it covers holds u0 */
    while (p->ustart[pair + 1] <= u0) pair++;
    for (int64_t u = u0; u < u1; u++) {
        while (p->ustart[pair + 1] <= u) pair++;
        const int i = (int)(pair / ng);
        const int64_t g = pair % ng, j = u - p->ustart[pair];
        const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
        const int f16 = f->dtype == LK_LORA_F16;
        const void *a = (const char *)f->a + j * K * (f16 ? 2 : 4);
        for (int64_t q = p->gstart[g]; q < p->gstart[g + 1]; q++) {
            const int64_t m = p->grow[q];
            p->t[i][m * p->rmax[i] + j] = f->scale * dot(p->x + m * K, a, K, f16);
        }
    }
    atomic_fetch_add_explicit(&p->down_done, 1, memory_order_release);
}

/* every group's up pass over outputs [r0, r1) of linear i */
static void up_range(const lk_lora_plan *p, int i, int64_t r0, int64_t r1) {
    const int64_t N = p->N[i];
    float *y = p->y[i];
    for (int64_t g = 0; g < p->ngroups; g++) {
        const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
        if (!f) continue;
        /* the group's rows UP_ROWS at a time, each vector of B^T read once for them */
        for (int64_t q0 = p->gstart[g]; q0 < p->gstart[g + 1]; q0 += UP_ROWS) {
            const int64_t q1 = q0 + UP_ROWS < p->gstart[g + 1] ? q0 + UP_ROWS : p->gstart[g + 1];
            const float *tr[UP_ROWS];
            float *yr[UP_ROWS];
            for (int64_t q = q0; q < q1; q++) {
                const int64_t m = p->grow[q];
                tr[q - q0] = p->t[i] + m * p->rmax[i];
                yr[q - q0] = y + m * N;
            }
            up(tr, yr, (int)(q1 - q0), f->bp, f->dtype == LK_LORA_F16, f->r, r0, r1);
        }
    }
}

/* outputs [r0, r1) of linear i are written, every row: + bias, then the up pass right
   away when the down pass is complete, else the outputs are left pending (by granules of
   GRANULE outputs) for lk_lora_plan_run_up */
void lk_lora_plan_post(void *ctx, int i, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    const int64_t N = p->N[i];
    float *y = p->y[i];
    if (p->bias[i])
        for (int64_t m = 0; m < p->M; m++)
            lk_add(y + m * N + r0, p->bias[i] + r0, r1 - r0, y + m * N + r0);
    if (!p->active || !p->l[i]) return;
    if (atomic_load_explicit(&p->down_done, memory_order_acquire) == p->ndown ||
        r0 % GRANULE || (r1 % GRANULE && r1 != N)) {
        /* (a chunk not on granules, which the matmul never makes, waits instead) */
        while (atomic_load_explicit(&p->down_done, memory_order_acquire) < p->ndown) relax();
        up_range(p, i, r0, r1);
        return;
    }
    _Atomic uint64_t *bits = p->pending + p->pstart[i];
    for (int64_t gr = r0 / GRANULE; gr * GRANULE < r1; gr++)
        atomic_fetch_or_explicit(&bits[gr / 64], (uint64_t)1 << (gr % 64), memory_order_relaxed);
    atomic_store_explicit(&p->any_pending, 1, memory_order_relaxed);
}

/* up task c: the pending outputs (all of them: p->all) among [r0, r1) of one linear, the
   c-th window of UP_CHUNK counted over the linears with factors */
void lk_lora_plan_up(void *ctx, int64_t c, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    int i = 0;
    while (c >= p->upstart[i + 1]) i++;
    c -= p->upstart[i];
    const int64_t N = p->N[i];
    const int64_t r0 = c * UP_CHUNK, r1 = r0 + UP_CHUNK < N ? r0 + UP_CHUNK : N;
    if (p->all) {
        up_range(p, i, r0, r1);
        return;
    }
    const _Atomic uint64_t *bits = p->pending + p->pstart[i];
    int64_t run = -1; /* first output of the current run of pending granules */
    for (int64_t o = r0; o < r1; o += GRANULE) {
        const int64_t gr = o / GRANULE;
        const int set = (atomic_load_explicit(&bits[gr / 64], memory_order_relaxed) >> (gr % 64)) & 1;
        if (set && run < 0) run = o;
        if (!set && run >= 0) {
            up_range(p, i, run, o);
            run = -1;
        }
    }
    if (run >= 0) up_range(p, i, run, r1);
}

void lk_lora_plan_run_up(lk_lora_plan *p) {
    if (!p->active || !atomic_load(&p->any_pending)) return;
    lk_lock();
    lk_parallel(lk_lora_plan_up, p, p->nup);
    lk_unlock();
}

/* ---- lk_lora_apply: one linear, the plan alone -------------------------------------- */

int lk_lora_apply(const lk_lora *l, const float *x, int64_t M, int64_t K, int64_t N,
                  float *y) {
    if (!l || l->n_slots <= 0 || M <= 0) return 0;
    lk_init();
    lk_lora_plan p;
    const int rc = lk_lora_plan_make(&p, 1, &l, NULL, &y, &N, x, M, K);
    if (rc || !p.active) return rc;
    p.all = 1; /* y is written already: every output's up pass in the up job */
    lk_lock();
    lk_parallel(lk_lora_plan_down, &p, p.ndown);
    lk_parallel(lk_lora_plan_up, &p, p.nup);
    lk_unlock();
    lk_lora_plan_free(&p);
    return 0;
}
