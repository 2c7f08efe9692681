/* A small persistent thread pool: workers spin briefly, then sleep, between jobs. */
#ifndef EORA_POOL_H
#define EORA_POOL_H

#include <stdint.h>

/* fn(ctx, begin, end, tid) is called on disjoint item ranges until [0, n_items) is covered. */
typedef void (*eora_range_fn)(void *ctx, int64_t begin, int64_t end, int tid);

/* Runs the job on n_threads threads (the caller is thread 0). Returns 0, or -1 if threads could not start
 * (the job then ran entirely on the caller). */
int eora_pool_run(int n_threads, int64_t n_items, int64_t chunk, eora_range_fn fn, void *ctx);

/* Number of online CPUs (at least 1). */
int eora_cpu_count(void);

#endif
