/* Runtime: CPU feature detection, the worker pool, scratch buffers, half floats, and the
   plugin API table (lattice_plugin.h) that hands the pool and the features to plugins.

   Why one file of ~480 lines: these are the library's process-wide state (the detected
   ISA, the pool's threads, the scratch arena) and the functions that guard it with one
   lock; keeping them in one translation unit keeps that state static to it. */
#define _GNU_SOURCE
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if LK_X86
static inline void cpu_relax(void) { __builtin_ia32_pause(); }
#else
static inline void cpu_relax(void) { __asm__ __volatile__("" ::: "memory"); }
#endif

/* ---- half floats (IEEE binary16), exact conversions ------------------------------ */

float lk_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        /* subnormal half: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t lk_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0);
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return sign | 0x7c00u;
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) return sign; /* < 2^-25 rounds to zero */
        uint32_t man = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(ax >> 23); /* 14..24 */
        uint32_t q = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t q = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1))) q++;
    return sign | (uint16_t)q;
}

/* ---- ISA selection ---------------------------------------------------------------- */

int lk_active_isa = -1;
static int detected_isa = LK_ISA_GENERIC;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static uint32_t cpu_features = 0; /* LK_CPU_* */

static uint32_t detect_features(void) {
    uint32_t f = 0;
#if LK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= LK_CPU_AVX2;
    if (__builtin_cpu_supports("fma")) f |= LK_CPU_FMA;
    if (__builtin_cpu_supports("f16c")) f |= LK_CPU_F16C;
    if (__builtin_cpu_supports("avxvnni")) f |= LK_CPU_AVXVNNI;
    if (__builtin_cpu_supports("avx512f")) f |= LK_CPU_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) f |= LK_CPU_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= LK_CPU_AVX512VL;
    if (__builtin_cpu_supports("avx512vnni")) f |= LK_CPU_AVX512VNNI;
#endif
    return f;
}

static void detect(void) {
    detected_isa = LK_ISA_GENERIC;
    cpu_features = detect_features();
    const uint32_t avx2 = LK_CPU_AVX2 | LK_CPU_FMA | LK_CPU_F16C;
    if ((cpu_features & avx2) == avx2) detected_isa = LK_ISA_AVX2;
    extern int lk_pf_dist, lk_chunks_per_thread, lk_few_blocks, lk_q8_few_rows, lk_f_pf512,
        lk_mv_quarters, lk_pf_rows;
    const char *pfe = getenv("LATTICE_PF");
    if (pfe && *pfe) lk_pf_dist = atoi(pfe);
    const char *cpt = getenv("LATTICE_CHUNKS");
    if (cpt && atoi(cpt) >= 1) lk_chunks_per_thread = atoi(cpt);
    const char *pfr = getenv("LATTICE_PF_ROWS");
    if (pfr && atoi(pfr) >= 4) lk_pf_rows = (atoi(pfr) + 3) & ~3;
    const char *fbe = getenv("LATTICE_FEW_BLOCKS");
    if (fbe && atoi(fbe) >= 1) lk_few_blocks = atoi(fbe);
    const char *pf5 = getenv("LATTICE_PF512");
    if (pf5) lk_f_pf512 = atoi(pf5) != 0;
    const char *mvq = getenv("LATTICE_MV_QUARTERS");
    if (mvq) lk_mv_quarters = atoi(mvq) != 0;
    const char *qfr = getenv("LATTICE_Q8_FEW_ROWS");
    if (qfr && atoi(qfr) >= 1) lk_q8_few_rows = atoi(qfr);
    const char *force = getenv("LATTICE_ISA");
    if (force && strcmp(force, "generic") == 0) detected_isa = LK_ISA_GENERIC;
    lk_active_isa = detected_isa;
}

int lk_init(void) {
    pthread_once(&init_once, detect);
    return lk_active_isa;
}

int lk_isa(void) { return lk_init(); }

uint32_t lk_cpu_features(void) {
    lk_init();
    return cpu_features;
}

int lk_cpu_is_amd(void) {
#if LK_X86
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") ? 1 : 0;
#else
    return 0;
#endif
}

const char *lk_isa_name(void) {
    return lk_init() == LK_ISA_AVX2 ? "avx2" : "generic";
}

int lk_set_isa(int isa) {
    lk_init();
    if (isa == LK_ISA_GENERIC || (isa == LK_ISA_AVX2 && detected_isa >= LK_ISA_AVX2))
        lk_active_isa = isa;
    return lk_active_isa;
}

/* ---- worker pool -------------------------------------------------------------------
 * A job is a count of tasks claimed one at a time from a shared counter, by the caller
 * and by whichever workers show up; no task is bound to a thread. The caller never waits
 * for a worker that has not joined: on a busy machine a descheduled worker would
 * otherwise cost a whole scheduler tick (4 ms) per kernel. It waits only for workers
 * that joined and are finishing a task.
 *
 * Workers spin on a generation counter for a while after each job (decode issues
 * hundreds of small kernels per token, and a futex wake costs tens of microseconds),
 * then sleep on a condition variable.
 */

static pthread_mutex_t op_lock = PTHREAD_MUTEX_INITIALIZER;

#define JOB_OPEN 0x40000000

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;      /* bumped for every job; workers wake on a change */
    atomic_int state;     /* JOB_OPEN | number of workers inside the job */
    atomic_llong next;    /* next task to claim */
    atomic_int sleepers;
    atomic_int quit;
    lk_task_fn fn;
    void *ctx;
    int64_t ntasks;
    int nworkers; /* running worker threads */
    int want;     /* threads requested, including the caller */
    pthread_t tid[LK_MAX_THREADS];
    long spin_ns;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0,
          NULL, NULL, 0, 0, 0, {0}, 0};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void wait_for_job(unsigned seen) {
    long deadline = 0;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(&pool.gen, memory_order_acquire) != seen) return;
        cpu_relax();
        if ((i & 63) == 63) {
            long t = now_ns();
            if (deadline == 0) deadline = t + pool.spin_ns;
            else if (t > deadline) break;
        }
    }
    atomic_fetch_add(&pool.sleepers, 1);
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    atomic_fetch_sub(&pool.sleepers, 1);
}

static void run_tasks(int ith) {
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&pool.next, 1, memory_order_relaxed);
        if (t >= pool.ntasks) break;
        pool.fn(pool.ctx, t, ith);
    }
}

typedef struct { int ith; unsigned gen; } worker_arg;
static worker_arg worker_args[LK_MAX_THREADS];

static void *worker_main(void *p) {
    worker_arg *arg = (worker_arg *)p;
    unsigned seen = arg->gen;
    for (;;) {
        wait_for_job(seen);
        seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (atomic_load(&pool.quit)) break;
        /* join the open job, if it is still open */
        int s = atomic_load_explicit(&pool.state, memory_order_relaxed);
        int joined = 0;
        while (s & JOB_OPEN) {
            if (atomic_compare_exchange_weak_explicit(&pool.state, &s, s + 1, memory_order_acquire,
                                                      memory_order_relaxed)) {
                joined = 1;
                break;
            }
        }
        if (!joined) continue;
        run_tasks(arg->ith);
        atomic_fetch_sub_explicit(&pool.state, 1, memory_order_release);
    }
    return NULL;
}

static void wake_workers(void) {
    atomic_fetch_add(&pool.gen, 1); /* seq_cst: pairs with sleepers++ in wait_for_job */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
}

static void stop_workers(void) {
    if (pool.nworkers == 0) return;
    atomic_store(&pool.quit, 1);
    wake_workers();
    for (int i = 0; i < pool.nworkers; i++) pthread_join(pool.tid[i], NULL);
    pool.nworkers = 0;
    atomic_store(&pool.quit, 0);
}

static int default_threads(void) {
    const char *env = getenv("LATTICE_THREADS");
    if (env && *env) {
        int n = atoi(env);
        if (n >= 1) return n > LK_MAX_THREADS ? LK_MAX_THREADS : n;
    }
    return 2;
}

static void start_workers(void) {
    if (pool.want == 0) pool.want = default_threads();
    if (pool.spin_ns == 0) {
        const char *env = getenv("LATTICE_SPIN_US");
        long us = env && *env ? atol(env) : 2000;
        pool.spin_ns = (us < 0 ? 0 : us) * 1000L + 1;
    }
    int n = pool.want - 1;
    if (n > LK_MAX_THREADS - 1) n = LK_MAX_THREADS - 1;
    unsigned gen = atomic_load(&pool.gen);
    for (int i = 0; i < n; i++) {
        worker_args[i].ith = i + 1;
        worker_args[i].gen = gen;
        if (pthread_create(&pool.tid[i], NULL, worker_main, &worker_args[i]) != 0) break;
        pool.nworkers = i + 1;
    }
}

static void after_fork_child(void) {
    /* The child has no workers; start fresh ones on first use. */
    pthread_mutex_init(&op_lock, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    atomic_store(&pool.sleepers, 0);
    atomic_store(&pool.state, 0);
    atomic_store(&pool.quit, 0);
    pool.nworkers = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

void lk_lock(void) {
    pthread_once(&atfork_once, register_atfork);
    lk_init();
    pthread_mutex_lock(&op_lock);
}

void lk_unlock(void) { pthread_mutex_unlock(&op_lock); }

void lk_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > LK_MAX_THREADS) n = LK_MAX_THREADS;
    lk_lock();
    if (n != pool.want) {
        stop_workers();
        pool.want = n;
    }
    lk_unlock();
}

int lk_threads_locked(void) {
    if (pool.want == 0) pool.want = default_threads();
    return pool.want;
}

int lk_get_threads(void) {
    lk_lock();
    int n = lk_threads_locked();
    lk_unlock();
    return n;
}

void lk_parallel(lk_task_fn fn, void *ctx, int64_t ntasks) {
    if (ntasks <= 0) return;
    if (pool.want == 0) pool.want = default_threads();
    if (ntasks == 1 || pool.want == 1) {
        for (int64_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    if (pool.nworkers == 0) start_workers();
    pool.fn = fn;
    pool.ctx = ctx;
    pool.ntasks = ntasks;
    atomic_store_explicit(&pool.next, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.state, JOB_OPEN, memory_order_release);
    wake_workers();
    run_tasks(0);
    /* close the job; wait only for workers that joined it */
    atomic_fetch_and_explicit(&pool.state, ~JOB_OPEN, memory_order_acq_rel);
    while (atomic_load_explicit(&pool.state, memory_order_acquire) != 0) cpu_relax();
}

typedef struct {
    lk_range_fn fn;
    void *ctx;
    int64_t n, ntasks;
} range_job;

static void range_task(void *vctx, int64_t t, int ith) {
    range_job *r = (range_job *)vctx;
    int64_t i0 = r->n * t / r->ntasks, i1 = r->n * (t + 1) / r->ntasks;
    if (i0 < i1) r->fn(r->ctx, i0, i1, ith);
}

void lk_parallel_for(lk_range_fn fn, void *ctx, int64_t n, int64_t grain) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (n < 2 * grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    lk_lock();
    /* a few pieces per thread, so a thread the OS parks does not hold up the rest */
    int64_t ntasks = (int64_t)lk_threads_locked() * 4;
    if (ntasks > n / grain) ntasks = n / grain;
    range_job r = {fn, ctx, n, ntasks};
    lk_parallel(range_task, &r, ntasks);
    lk_unlock();
}

/* ---- scratch ------------------------------------------------------------------------ */

static struct { void *p; size_t n; } scratch[LK_MAX_THREADS + 1];

static void *grow(int slot, size_t bytes) {
    if (scratch[slot].n >= bytes) return scratch[slot].p;
    size_t n = (bytes + 4095) & ~(size_t)4095;
    void *p = NULL;
    if (posix_memalign(&p, 64, n) != 0) return NULL;
    free(scratch[slot].p);
    scratch[slot].p = p;
    scratch[slot].n = n;
    return p;
}

void *lk_scratch(int ith, size_t bytes) { return grow(ith, bytes); }
void *lk_shared_scratch(size_t bytes) { return grow(LK_MAX_THREADS, bytes); }

void *lk_thread_buffer(void **buf, size_t *cap, size_t bytes) {
    if (bytes > *cap) {
        void *p = NULL;
        if (posix_memalign(&p, 64, bytes)) return NULL;
        free(*buf);
        *buf = p;
        *cap = bytes;
    }
    return *buf;
}

/* ---- bench: streaming read ----------------------------------------------------------- */

typedef struct {
    const float *p;
    int64_t n; /* floats, multiple of 8 */
    int prefetch;
    double part[256];
} read_ctx;

static void read_generic(const float *p, int64_t n, double *out) {
    float acc[8] = {0};
    for (int64_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += p[i + j];
    double s = 0;
    for (int j = 0; j < 8; j++) s += acc[j];
    *out = s;
}

#if LK_X86
LK_AVX2_TARGET static void read_avx2(const float *p, int64_t n, int prefetch, double *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    if (prefetch) {
        for (; i + 32 + 1024 <= n; i += 32) {
            _mm_prefetch((const char *)(p + i + 1024), _MM_HINT_T0);
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
        }
    }
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    for (; i < n; i += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    double s = 0;
    for (int j = 0; j < 8; j++) s += t[j];
    *out = s;
}
#endif

#define READ_TASKS 256

static void read_task(void *vctx, int64_t t, int ith) {
    (void)ith;
    read_ctx *c = (read_ctx *)vctx;
    int64_t per = (c->n / 8 + READ_TASKS - 1) / READ_TASKS * 8;
    int64_t i0 = per * t, i1 = i0 + per > c->n ? c->n : i0 + per;
    double s = 0;
    if (i0 < i1) {
#if LK_X86
        if (lk_active_isa == LK_ISA_AVX2) read_avx2(c->p + i0, i1 - i0, c->prefetch, &s);
        else
#endif
            read_generic(c->p + i0, i1 - i0, &s);
    }
    c->part[t] = s;
}

double lk_bench_read(const void *buf, int64_t nbytes, int prefetch) {
    read_ctx c;
    memset(&c, 0, sizeof c);
    c.p = (const float *)buf;
    c.n = nbytes / 32 * 8;
    c.prefetch = prefetch;
    lk_lock();
    lk_parallel(read_task, &c, READ_TASKS);
    lk_unlock();
    double s = 0;
    for (int i = 0; i < READ_TASKS; i++) s += c.part[i];
    return s;
}

/* ---- plugin ABI (lattice_plugin.h) --------------------------------------------------- */

static const lk_plugin_api plugin_api = {
    LK_PLUGIN_ABI_VERSION,
    (uint32_t)sizeof(lk_plugin_api),
    lk_parallel_for,
    lk_get_threads,
    lk_cpu_features,
};

const lk_plugin_api *lk_plugin_api_get(void) { return &plugin_api; }

int lk_plugin_abi_version(void) { return LK_PLUGIN_ABI_VERSION; }
