#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
#define SPIN_NS 2000000  /* a worker polls this long (2 ms) after a job before it sleeps: waking a sleeping
                          * worker costs tens of microseconds, more than a whole batch-1 product */

static struct {
    pthread_mutex_t call_lock;   /* one job at a time */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int n_workers;
    _Atomic uint64_t generation;
    _Atomic int64_t next;
    /* Workers inside the current job, plus JOB_CLOSED once every item is claimed. A worker joins by
     * incrementing it and backs out if it sees JOB_CLOSED, so the caller never waits for a worker that
     * has not woken up yet (on a loaded machine that wait costs a scheduler slice). */
    _Atomic uint32_t state;
    int participants;            /* workers (not counting the caller) allowed in this job */
    int64_t n_items, chunk;
    eora_range_fn fn;
    void *ctx;
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

#define JOB_CLOSED 0x80000000u

static uint64_t start_generation[MAX_THREADS];

static void run_share(int tid) {
    for (;;) {
        int64_t begin = atomic_fetch_add(&pool.next, pool.chunk);
        if (begin >= pool.n_items) return;
        int64_t end = begin + pool.chunk < pool.n_items ? begin + pool.chunk : pool.n_items;
        pool.fn(pool.ctx, begin, end, tid);
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;  /* 1-based thread id */
    /* The generation before the job that created this worker: a worker that starts late must still see it. */
    uint64_t seen = start_generation[index];
    for (;;) {
        uint64_t gen;
        long spins = 0;
        int64_t spin_start = now_ns();
        while ((gen = atomic_load_explicit(&pool.generation, memory_order_acquire)) == seen) {
            if ((++spins & 255) || now_ns() - spin_start < SPIN_NS) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&pool.lock);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        uint32_t st = atomic_fetch_add_explicit(&pool.state, 1, memory_order_acq_rel);
        if (!(st & JOB_CLOSED) && index <= pool.participants) run_share(index);
        atomic_fetch_sub_explicit(&pool.state, 1, memory_order_release);
    }
    return NULL;
}

/* A forked child has none of the parent's workers: start from an empty pool. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.state, 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int eora_cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int)n;
}

int eora_pool_run(int n_threads, int64_t n_items, int64_t chunk, eora_range_fn fn, void *ctx) {
    int status = 0;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (chunk < 1) chunk = 1;
    if (n_threads > (n_items + chunk - 1) / chunk) n_threads = (int)((n_items + chunk - 1) / chunk);
    if (n_threads <= 1) {
        if (n_items > 0) fn(ctx, 0, n_items, 0);
        return 0;
    }
    pthread_once(&fork_once, register_fork);
    pthread_mutex_lock(&pool.call_lock);
    while (pool.n_workers < n_threads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_generation[pool.n_workers + 1] = atomic_load(&pool.generation);
        int rc = pthread_create(&th, &attr, worker, (void *)(intptr_t)(pool.n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) { status = -1; break; }
        pool.n_workers++;
    }
    pool.participants = n_threads - 1 < pool.n_workers ? n_threads - 1 : pool.n_workers;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_items = n_items;
    pool.chunk = chunk;
    atomic_store(&pool.next, 0);
    /* Open the job: workers that joined the previous one have all left (the caller waited for that). */
    atomic_fetch_and_explicit(&pool.state, ~JOB_CLOSED, memory_order_release);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_share(0);
    /* Every item is claimed: close the job, then wait for the workers still running a claimed chunk.
     * Yield now and then: on an oversubscribed machine the straggler may need this core. */
    atomic_fetch_or_explicit(&pool.state, JOB_CLOSED, memory_order_acq_rel);
    for (long spins = 0; (atomic_load_explicit(&pool.state, memory_order_acquire) & ~JOB_CLOSED) != 0; spins++) {
        if (spins % 256 == 255) sched_yield();
        else CPU_RELAX();
    }
    pthread_mutex_unlock(&pool.call_lock);
    return status;
}
