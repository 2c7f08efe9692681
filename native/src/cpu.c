/* The optimized CPU path: instruction-set dispatch, the threaded fused product and dequantization. */
#include <stdlib.h>

#include "internal.h"
#include "checks.h"
#include "pool.h"

static int cpu_level(void) {  /* 2 = AVX-512 (F, BW, VL, VNNI), 1 = AVX2 + FMA + F16C, 0 = scalar */
#if defined(__x86_64__) && defined(EORA_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

static int select_level(unsigned flags) {
    int level = cpu_level();
    if (flags & EORA_FLAG_ISA_SCALAR) level = 0;
    if ((flags & EORA_FLAG_ISA_AVX2) && level > 1) level = 1;
    return level;
}

static const eora_kernels *select_kernels(unsigned flags) {
#if defined(EORA_HAVE_X86_KERNELS)
    int level = select_level(flags);
    if (level == 2) return &eora_kernels_avx512;
    if (level == 1) return &eora_kernels_avx2;
#else
    (void)flags;
#endif
    return &eora_kernels_scalar;
}

static const eora_direct_kernels *select_direct(unsigned flags) {
#if defined(EORA_HAVE_X86_KERNELS)
    int level = select_level(flags);
    if (level == 2) return &eora_direct_avx512;
    if (level == 1) return &eora_direct_avx2;
#else
    (void)flags;
#endif
    return &eora_direct_scalar;
}

EORA_API const char *eora_cpu_path(void) { return select_kernels(0)->name; }

static int resolve_threads(int n_threads) { return n_threads > 0 ? n_threads : eora_cpu_count(); }

static int is_float_type(int type) {
    return type == EORA_TYPE_F32 || type == EORA_TYPE_F16 || type == EORA_TYPE_BF16;
}

static size_t row_bytes(int type, int64_t n) {
    const eora_type_traits *t = eora_traits(type);
    return (size_t)(n / t->block_elems * t->block_bytes);
}

/* ---- dequantize ---- */

typedef struct {
    const eora_kernels *k;
    int type;
    const uint8_t *src;
    float *dst;
    int64_t piece;  /* elements per item, a multiple of the block */
    int64_t n_elems;
} deq_job;

static void deq_range(void *ctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    deq_job *j = ctx;
    for (int64_t i = begin; i < end; i++) {
        int64_t e0 = i * j->piece;
        int64_t n = j->n_elems - e0 < j->piece ? j->n_elems - e0 : j->piece;
        j->k->dequant(j->type, j->src + row_bytes(j->type, e0), n, j->dst + e0);
    }
}

EORA_API eora_status eora_dequantize(int type, const void *src, size_t src_bytes, int64_t n_elems, float *dst,
                                     size_t dst_bytes) {
    if (!src || !dst) return eora_fail(EORA_ERR_ARGUMENT, "dequantize: src and dst must not be NULL");
    eora_status s = eora_check_blocks(type, n_elems, src_bytes, "dequantize: src", NULL);
    if (s != EORA_OK) return s;
    if ((uint64_t)n_elems > (uint64_t)dst_bytes / 4)
        return eora_fail(EORA_ERR_BUFFER, "dequantize: dst has %zu bytes, %lld needed", dst_bytes, (long long)n_elems * 4);
    deq_job j = {select_kernels(0), type, src, dst, 1 << 16, n_elems};
    eora_pool_run(resolve_threads(0), (n_elems + j.piece - 1) / j.piece, 1, deq_range, &j);
    return EORA_OK;
}

/* ---- fused product ---- */

typedef struct {
    const eora_fused_args *f;
    const eora_kernels *k;
    int quant_act;
    eora_qx *qx;          /* (n_tokens) quantized tokens (unpack path) */
    const eora_direct_kernels *dk;
    eora_direct_fn direct;  /* non-NULL: direct kernel path */
    eora_xq *xq;          /* (n_tokens) quantized tokens (direct path) */
    float *t;             /* (n_tokens, rank): A x */
    uint8_t *scratch;     /* per thread */
    size_t scratch_bytes;
} fused_job;

/* Per-thread scratch: a W row (codes + ds + dm, or fp32) and an A/B row in fp32. */
static size_t scratch_size(int64_t d_in, int64_t rank) {
    size_t w = (size_t)d_in * 4 + 64;                       /* fp32 row >= codes + ds + dm */
    size_t ab = (size_t)(d_in > rank ? d_in : rank) * 4 + 64;
    return (w + ab + 63) / 64 * 64;
}

/* items [0, n_tokens): quantize token; items [n_tokens, n_tokens + rank): row k of A against every token */
static void phase1(void *ctx, int64_t begin, int64_t end, int tid) {
    fused_job *j = ctx;
    const eora_fused_args *f = j->f;
    float *arow = (float *)(j->scratch + (size_t)tid * j->scratch_bytes + (size_t)f->d_in * 4 + 64);
    for (int64_t it = begin; it < end; it++) {
        if (it < f->n_tokens) {
            if (j->direct) j->dk->quantize(f->w_type, f->x + it * f->d_in, f->d_in, &j->xq[it]);
            else if (j->quant_act) j->k->quantize_x(f->x + it * f->d_in, f->d_in, &j->qx[it]);
            continue;
        }
        int64_t kr = it - f->n_tokens;
        const uint8_t *ar = (const uint8_t *)f->a + kr * row_bytes(f->a_type, f->d_in);
        if (f->n_tokens == 1) {  /* one token: read the row in place */
            j->t[kr] = j->k->adapter_dot(f->a_type, ar, f->x, f->d_in);
            continue;
        }
        j->k->adapter_row(f->a_type, (const uint8_t *)f->a + kr * row_bytes(f->a_type, f->d_in), f->d_in, arow);
        for (int64_t t = 0; t < f->n_tokens; t++)
            j->t[t * f->rank + kr] = j->k->dot_f32(arow, f->x + t * f->d_in, f->d_in);
    }
}

static void phase2(void *ctx, int64_t begin, int64_t end, int tid) {
    fused_job *j = ctx;
    const eora_fused_args *f = j->f;
    const int64_t d_in = f->d_in, rank = f->rank;
    uint8_t *base = j->scratch + (size_t)tid * j->scratch_bytes;
    float *wrow = (float *)base;
    uint8_t *codes = base;
    float *ds = (float *)(base + d_in), *dm = ds + d_in / 16;
    float *brow = (float *)(base + (size_t)d_in * 4 + 64);
    const size_t wb = row_bytes(f->w_type, d_in), bb = rank ? row_bytes(f->b_type, rank) : 0;
    if (j->direct) {  /* blocks read in place, up to 4 tokens per pass over the row */
        const int64_t nb = d_in / eora_traits(f->w_type)->block_elems;
        float v[4];
        for (int64_t o = begin; o < end; o++) {
            const uint8_t *wr = (const uint8_t *)f->w + o * wb;
            const uint8_t *br = rank ? (const uint8_t *)f->b + o * bb : NULL;
            for (int64_t t0 = 0; t0 < f->n_tokens; t0 += 4) {
                int nt = f->n_tokens - t0 < 4 ? (int)(f->n_tokens - t0) : 4;
                j->direct(wr, nb, j->xq + t0, nt, v);
                for (int i = 0; i < nt; i++) {
                    float r = v[i];
                    if (rank) r += j->k->adapter_dot(f->b_type, br, j->t + (t0 + i) * rank, rank);
                    f->y[(t0 + i) * f->d_out + o] = r;
                }
            }
        }
        return;
    }
    for (int64_t o = begin; o < end; o++) {
        const uint8_t *wr = (const uint8_t *)f->w + o * wb;
        if (j->quant_act) j->k->unpack(f->w_type, wr, d_in, codes, ds, dm);
        else j->k->dequant(f->w_type, wr, d_in, wrow);
        if (rank) j->k->adapter_row(f->b_type, (const uint8_t *)f->b + o * bb, rank, brow);
        for (int64_t t = 0; t < f->n_tokens; t++) {
            float v = j->quant_act ? j->k->dot_q(codes, ds, dm, &j->qx[t])
                                   : j->k->dot_f32(wrow, f->x + t * d_in, d_in);
            if (rank) v += j->k->dot_f32(brow, j->t + t * rank, rank);
            f->y[t * f->d_out + o] = v;
        }
    }
}

/* Bytes of quantized activations for n_tokens (a 64-aligned start assumed), and their placement. */
static size_t token_bytes(const fused_job *j, int64_t d_in, int64_t n_tokens) {
    if (j->direct)  /* q (64-aligned), d per block, bs per 16 */
        return (size_t)n_tokens * (((size_t)d_in + 63) / 64 * 64 + (size_t)d_in / 32 * 4 + (size_t)d_in / 16 * 2 + 64 +
                                   (size_t)d_in * 8 + 64);
    if (j->quant_act) return (size_t)n_tokens * ((size_t)d_in + (size_t)d_in / 16 * 8);
    return 0;
}

static void place_tokens(fused_job *j, uint8_t *p, int64_t d_in, int64_t n_tokens, int dblock) {
    for (int64_t t = 0; t < n_tokens && j->direct; t++) {
        j->xq[t].q = (int8_t *)p; p += ((size_t)d_in + 63) / 64 * 64;
        j->xq[t].d = (float *)p; p += (size_t)d_in / dblock * 4;
        j->xq[t].bs = (int16_t *)p; p += ((size_t)d_in / 16 * 2 + 63) / 64 * 64;
        j->xq[t].aux = (float *)p; p += ((size_t)d_in * 8 + 63) / 64 * 64;
    }
    for (int64_t t = 0; t < n_tokens && j->quant_act && !j->direct; t++) {
        j->qx[t].d_in = d_in;
        j->qx[t].d16 = (float *)p; p += (size_t)d_in / 16 * 4;
        j->qx[t].s16 = (float *)p; p += (size_t)d_in / 16 * 4;
        j->qx[t].q = (int8_t *)p; p += (size_t)d_in;
    }
}

EORA_API eora_status eora_fused_matmul(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                       const float *x, size_t x_bytes, int64_t n_tokens, int a_type, const void *a,
                                       size_t a_bytes, int b_type, const void *b, size_t b_bytes, int64_t rank,
                                       float *y, size_t y_bytes, int n_threads, unsigned flags) {
    eora_fused_args f = {w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens,
                         a_type, a, a_bytes, b_type, b, b_bytes, rank, y, y_bytes};
    eora_status s = eora_check_fused(&f);
    if (s != EORA_OK) return s;
    if (n_threads < 0) return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: thread count %d is negative", n_threads);
    if (flags & ~(unsigned)(EORA_FLAG_F32_ACT | EORA_FLAG_ISA_SCALAR | EORA_FLAG_ISA_AVX2))
        return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: unknown flag bits 0x%x", flags);
    int threads = resolve_threads(n_threads);
    fused_job j = {&f, select_kernels(flags), !(flags & EORA_FLAG_F32_ACT) && !is_float_type(w_type), NULL,
                   select_direct(flags), NULL, NULL, NULL, NULL, scratch_size(d_in, rank)};
    const int dblock = j.quant_act && j.dk->block ? j.dk->block(w_type) : 0;
    if (dblock) j.direct = j.dk->kernel(w_type);
    size_t qx_bytes = token_bytes(&j, d_in, n_tokens);
    size_t total = (size_t)threads * j.scratch_bytes + qx_bytes + (size_t)n_tokens * (size_t)rank * 4 +
                   (size_t)n_tokens * (sizeof(eora_qx) + sizeof(eora_xq)) + 128;
    uint8_t *mem = aligned_alloc(64, (total + 63) / 64 * 64);
    if (!mem) return eora_fail(EORA_ERR_MEMORY, "fused_matmul: cannot allocate %zu bytes of scratch", total);
    uint8_t *p = mem;
    j.scratch = p; p += (size_t)threads * j.scratch_bytes;
    j.qx = (eora_qx *)p; p += (size_t)n_tokens * sizeof(eora_qx);
    j.xq = (eora_xq *)p; p += (size_t)n_tokens * sizeof(eora_xq);
    j.t = (float *)p; p += (size_t)n_tokens * (size_t)rank * 4;
    p = mem + (p - mem + 63) / 64 * 64;
    place_tokens(&j, p, d_in, n_tokens, dblock);
    /* The pool finishes every job even if some workers fail to start (fewer threads do it), so its
     * return value needs no handling here. */
    if (j.quant_act || rank) eora_pool_run(threads, n_tokens + rank, 1, phase1, &j);
    int64_t chunk = d_out / ((int64_t)threads * 8);
    if (chunk < 1) chunk = 1;
    if (chunk > 64) chunk = 64;
    eora_pool_run(threads, d_out, chunk, phase2, &j);
    free(mem);
    return EORA_OK;
}

/* ---- one range of rows on the calling thread (callers with their own thread pool) ---- */

static const unsigned known_flags = EORA_FLAG_F32_ACT | EORA_FLAG_ISA_SCALAR | EORA_FLAG_ISA_AVX2;

/* b (d_out, rank) and t (n_tokens, rank), rank > 0. */
static eora_status check_bt(int b_type, const void *b, size_t b_bytes, int64_t d_out, const float *t, size_t t_bytes,
                            int64_t n_tokens, int64_t rank, const char *what) {
    eora_status s;
    if (!b || !t) return eora_fail(EORA_ERR_ARGUMENT, "%s: rank %lld needs non-NULL b and t", what, (long long)rank);
    if (b_type != EORA_TYPE_F32 && b_type != EORA_TYPE_F16 && b_type != EORA_TYPE_Q8_0)
        return eora_fail(EORA_ERR_TYPE, "%s: b type must be F32, F16 or Q8_0 (got %d)", what, b_type);
    if (rank % eora_traits(b_type)->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "%s: b row length (rank %lld) is not a multiple of its block size", what,
                         (long long)rank);
    if ((s = eora_check_blocks(b_type, d_out * rank, b_bytes, what, NULL)) != EORA_OK) return s;
    if ((uint64_t)t_bytes / 4 / (uint64_t)rank < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "%s: t has %zu bytes, %lld needed", what, t_bytes, (long long)(n_tokens * rank * 4));
    return EORA_OK;
}

/* Checks w/x/y through the fused-product checks (rank 0), then b, t and the row range. */
static eora_status check_rows(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in, const float *x,
                              size_t x_bytes, int64_t n_tokens, int b_type, const void *b, size_t b_bytes,
                              const float *t, size_t t_bytes, int64_t rank, int64_t row_begin, int64_t row_end,
                              float *y, size_t y_bytes) {
    eora_fused_args f = {w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens,
                         EORA_TYPE_F32, NULL, 0, b_type, b, b_bytes, 0, y, y_bytes};
    eora_status s = eora_check_fused(&f);
    if (s != EORA_OK) return s;
    if (row_begin < 0 || row_end < row_begin || row_end > d_out)
        return eora_fail(EORA_ERR_SHAPE, "fused_rows: row range [%lld, %lld) is not inside [0, %lld)",
                         (long long)row_begin, (long long)row_end, (long long)d_out);
    if (rank < 0) return eora_fail(EORA_ERR_SHAPE, "fused_rows: rank %lld is negative", (long long)rank);
    return rank ? check_bt(b_type, b, b_bytes, d_out, t, t_bytes, n_tokens, rank, "fused_rows") : EORA_OK;
}

/* The job for one call: kernels chosen as eora_fused_matmul chooses them. */
static fused_job rows_job(const eora_fused_args *f, unsigned flags, int *dblock) {
    fused_job j = {f, select_kernels(flags), !(flags & EORA_FLAG_F32_ACT) && !is_float_type(f->w_type), NULL,
                   select_direct(flags), NULL, NULL, NULL, NULL, scratch_size(f->d_in, f->rank)};
    *dblock = j.quant_act && j.dk->block ? j.dk->block(f->w_type) : 0;
    if (*dblock) j.direct = j.dk->kernel(f->w_type);
    return j;
}

static size_t rows_scratch(const fused_job *j, int64_t d_in, int64_t n_tokens, int64_t rank) {
    return j->scratch_bytes + (size_t)n_tokens * (sizeof(eora_qx) + sizeof(eora_xq)) +
           ((size_t)n_tokens * (size_t)rank * 4 + 63) / 64 * 64 + token_bytes(j, d_in, n_tokens) + 128;
}

EORA_API size_t eora_fused_rows_scratch(int w_type, int64_t d_in, int64_t n_tokens, int64_t rank, unsigned flags) {
    if (!eora_traits(w_type) || d_in <= 0 || n_tokens <= 0 || rank < 0) return 0;
    eora_fused_args f = {w_type, NULL, 0, 1, d_in, NULL, 0, n_tokens, EORA_TYPE_F32, NULL, 0, EORA_TYPE_F32, NULL, 0,
                         rank, NULL, 0};
    int dblock;
    fused_job j = rows_job(&f, flags, &dblock);
    return rows_scratch(&j, d_in, n_tokens, rank);
}

EORA_API eora_status eora_fused_rows(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                     const float *x, size_t x_bytes, int64_t n_tokens, int b_type, const void *b,
                                     size_t b_bytes, const float *t, size_t t_bytes, int64_t rank, float t_scale,
                                     int64_t row_begin, int64_t row_end, float *y, size_t y_bytes, void *scratch,
                                     size_t scratch_bytes, unsigned flags) {
    eora_status s = check_rows(w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens, b_type, b, b_bytes, t, t_bytes,
                               rank, row_begin, row_end, y, y_bytes);
    if (s != EORA_OK) return s;
    if (flags & ~known_flags) return eora_fail(EORA_ERR_ARGUMENT, "fused_rows: unknown flag bits 0x%x", flags);
    if (row_begin == row_end) return EORA_OK;
    eora_fused_args f = {w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens,
                         EORA_TYPE_F32, NULL, 0, b_type, b, b_bytes, rank, y, y_bytes};
    int dblock;
    fused_job j = rows_job(&f, flags, &dblock);
    size_t need = rows_scratch(&j, d_in, n_tokens, rank);
    if (!scratch || ((uintptr_t)scratch & 63))
        return eora_fail(EORA_ERR_ARGUMENT, "fused_rows: scratch must be non-NULL and 64-byte aligned");
    if (scratch_bytes < need)
        return eora_fail(EORA_ERR_BUFFER, "fused_rows: scratch has %zu bytes, %zu needed", scratch_bytes, need);
    uint8_t *p = scratch;
    j.scratch = p; p += j.scratch_bytes;
    j.qx = (eora_qx *)p; p += (size_t)n_tokens * sizeof(eora_qx);
    j.xq = (eora_xq *)p; p += (size_t)n_tokens * sizeof(eora_xq);
    p = (uint8_t *)scratch + (p - (uint8_t *)scratch + 63) / 64 * 64;
    if (rank && t_scale != 1.0f) {  /* B.(s t): the scale costs n_tokens * rank multiplies, not one per output */
        float *ts = (float *)p;
        for (int64_t i = 0; i < n_tokens * rank; i++) ts[i] = t_scale * t[i];
        j.t = ts;
    } else {
        j.t = (float *)(uintptr_t)t;  /* only read on this path */
    }
    p += ((size_t)n_tokens * (size_t)rank * 4 + 63) / 64 * 64;
    place_tokens(&j, p, d_in, n_tokens, dblock);
    for (int64_t it = 0; it < n_tokens; it++) {
        if (j.direct) j.dk->quantize(w_type, x + it * d_in, d_in, &j.xq[it]);
        else if (j.quant_act) j.k->quantize_x(x + it * d_in, d_in, &j.qx[it]);
    }
    phase2(&j, row_begin, row_end, 0);
    return EORA_OK;
}

/* Scalar reference of eora_fused_rows (kept beside it: it shares check_rows). */
EORA_API eora_status eora_fused_rows_ref(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                         const float *x, size_t x_bytes, int64_t n_tokens, int b_type, const void *b,
                                         size_t b_bytes, const float *t, size_t t_bytes, int64_t rank, float t_scale,
                                         int64_t row_begin, int64_t row_end, float *y, size_t y_bytes) {
    eora_status s = check_rows(w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens, b_type, b, b_bytes, t, t_bytes,
                               rank, row_begin, row_end, y, y_bytes);
    if (s != EORA_OK) return s;
    size_t wb = row_bytes(w_type, d_in), bb = rank ? row_bytes(b_type, rank) : 0;
    float *row = malloc(sizeof(float) * (size_t)(d_in > rank ? d_in : rank));
    double *acc = malloc(sizeof(double) * (size_t)n_tokens);
    if (!row || !acc) { free(row); free(acc); return eora_fail(EORA_ERR_MEMORY, "fused_rows_ref: out of memory"); }
    for (int64_t o = row_begin; o < row_end; o++) {
        eora_dequant_row_ref(w_type, (const uint8_t *)w + o * wb, row, d_in);
        for (int64_t n = 0; n < n_tokens; n++) {
            acc[n] = 0;
            for (int64_t i = 0; i < d_in; i++) acc[n] += (double)row[i] * (double)x[n * d_in + i];
        }
        if (rank) {
            eora_dequant_row_ref(b_type, (const uint8_t *)b + o * bb, row, rank);
            for (int64_t n = 0; n < n_tokens; n++) {
                double bt = 0;
                for (int64_t k = 0; k < rank; k++) bt += (double)row[k] * (double)t[n * rank + k];
                acc[n] += (double)t_scale * bt;
            }
        }
        for (int64_t n = 0; n < n_tokens; n++) y[n * d_out + o] = (float)acc[n];
    }
    free(acc);
    free(row);
    return EORA_OK;
}

EORA_API eora_status eora_adapter_rows(int b_type, const void *b, size_t b_bytes, int64_t d_out, int64_t rank,
                                       const float *t, size_t t_bytes, int64_t n_tokens, float t_scale,
                                       int64_t row_begin, int64_t row_end, float *y, size_t y_bytes, unsigned flags) {
    if (!y) return eora_fail(EORA_ERR_ARGUMENT, "adapter_rows: y must not be NULL");
    if (d_out <= 0 || n_tokens <= 0 || rank <= 0)
        return eora_fail(EORA_ERR_SHAPE, "adapter_rows: d_out=%lld, n_tokens=%lld, rank=%lld must all be positive",
                         (long long)d_out, (long long)n_tokens, (long long)rank);
    if ((uint64_t)y_bytes / 4 / (uint64_t)d_out < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "adapter_rows: y has %zu bytes, %lld needed", y_bytes,
                         (long long)(n_tokens * d_out * 4));
    if (row_begin < 0 || row_end < row_begin || row_end > d_out)
        return eora_fail(EORA_ERR_SHAPE, "adapter_rows: row range [%lld, %lld) is not inside [0, %lld)",
                         (long long)row_begin, (long long)row_end, (long long)d_out);
    eora_status s = check_bt(b_type, b, b_bytes, d_out, t, t_bytes, n_tokens, rank, "adapter_rows");
    if (s != EORA_OK) return s;
    if (flags & ~known_flags) return eora_fail(EORA_ERR_ARGUMENT, "adapter_rows: unknown flag bits 0x%x", flags);
    const eora_kernels *k = select_kernels(flags);
    const size_t bb = row_bytes(b_type, rank);
    for (int64_t o = row_begin; o < row_end; o++) {
        const uint8_t *br = (const uint8_t *)b + o * bb;
        for (int64_t n = 0; n < n_tokens; n++) y[n * d_out + o] += t_scale * k->adapter_dot(b_type, br, t + n * rank, rank);
    }
    return EORA_OK;
}

EORA_API eora_status eora_adapter_t(int a_type, const void *a, size_t a_bytes, int64_t rank, int64_t d_in,
                                    const float *x, size_t x_bytes, int64_t n_tokens, float *t, size_t t_bytes,
                                    unsigned flags) {
    if (!a || !x || !t) return eora_fail(EORA_ERR_ARGUMENT, "adapter_t: a, x and t must not be NULL");
    if (rank <= 0 || d_in <= 0 || n_tokens <= 0)
        return eora_fail(EORA_ERR_SHAPE, "adapter_t: rank=%lld, d_in=%lld, n_tokens=%lld must all be positive",
                         (long long)rank, (long long)d_in, (long long)n_tokens);
    if (a_type != EORA_TYPE_F32 && a_type != EORA_TYPE_F16 && a_type != EORA_TYPE_Q8_0)
        return eora_fail(EORA_ERR_TYPE, "adapter_t: a type must be F32, F16 or Q8_0 (got %d)", a_type);
    if (d_in % eora_traits(a_type)->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "adapter_t: a row length %lld is not a multiple of its block size", (long long)d_in);
    eora_status s = eora_check_blocks(a_type, rank * d_in, a_bytes, "adapter_t: a", NULL);
    if (s != EORA_OK) return s;
    if ((uint64_t)x_bytes / 4 / (uint64_t)d_in < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "adapter_t: x has %zu bytes, %lld needed", x_bytes, (long long)(n_tokens * d_in * 4));
    if ((uint64_t)t_bytes / 4 / (uint64_t)rank < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "adapter_t: t has %zu bytes, %lld needed", t_bytes, (long long)(n_tokens * rank * 4));
    if (flags & ~known_flags) return eora_fail(EORA_ERR_ARGUMENT, "adapter_t: unknown flag bits 0x%x", flags);
    const eora_kernels *k = select_kernels(flags);
    const size_t ab = row_bytes(a_type, d_in);
    for (int64_t r = 0; r < rank; r++)
        for (int64_t n = 0; n < n_tokens; n++)
            t[n * rank + r] = k->adapter_dot(a_type, (const uint8_t *)a + r * ab, x + n * d_in, d_in);
    return EORA_OK;
}
