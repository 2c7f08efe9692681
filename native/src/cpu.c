/* The optimized CPU path: instruction-set dispatch, the threaded fused product and dequantization. */
#include <stdlib.h>

#include "internal.h"
#include "checks.h"
#include "pool.h"

static int detect_level(void) {  /* an index into isa_table */
#if defined(__x86_64__) && defined(EORA_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
    return 0;
}

/* The one ISA table: every kernel family of one instruction set, lowest first. */
static const eora_isa isa_table[] = {
    {"scalar", &eora_kernels_scalar, &eora_direct_scalar, &eora_lora_kernels_scalar},
#if defined(EORA_HAVE_X86_KERNELS)
    {"avx2", &eora_kernels_avx2, &eora_direct_avx2, &eora_lora_kernels_avx2},
    {"avx512", &eora_kernels_avx512, &eora_direct_avx512, &eora_lora_kernels_avx512},
#endif
};

static int cpu_level(void) {  /* detected once (the llama.cpp patch calls in per op); a race only repeats it */
    static volatile int level = -1;
    if (level < 0) level = detect_level();
    return level;
}

const eora_isa *eora_select_isa(unsigned flags) {
    int level = cpu_level();
    if (flags & EORA_FLAG_ISA_SCALAR) level = 0;
    if ((flags & EORA_FLAG_ISA_AVX2) && level > 1) level = 1;
    return &isa_table[level];
}

EORA_API const char *eora_cpu_path(void) { return eora_select_isa(0)->name; }

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
    eora_status s = eora_check_dequant("dequantize", type, src, src_bytes, n_elems, dst, dst_bytes, NULL);
    if (s != EORA_OK) return s;
    deq_job j = {eora_select_isa(0)->k, type, src, dst, 1 << 16, n_elems};
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

EORA_API eora_status eora_fused_matmul(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                       const eora_matrix *b, float *y, size_t y_bytes, int n_threads, unsigned flags) {
    eora_fused_args f;
    eora_status s = eora_fused_args_from("fused_matmul", w, x, a, b, y, y_bytes, &f);
    if (s != EORA_OK) return s;
    const int w_type = f.w_type;
    const int64_t d_out = f.d_out, d_in = f.d_in, n_tokens = f.n_tokens, rank = f.rank;
    if (n_threads < 0) return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: thread count %d is negative", n_threads);
    if (flags & ~(unsigned)(EORA_FLAG_F32_ACT | EORA_FLAG_ISA_SCALAR | EORA_FLAG_ISA_AVX2))
        return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: unknown flag bits 0x%x", flags);
    int threads = resolve_threads(n_threads);
    const eora_isa *isa = eora_select_isa(flags);
    fused_job j = {&f, isa->k, !(flags & EORA_FLAG_F32_ACT) && !is_float_type(w_type), NULL,
                   isa->direct, NULL, NULL, NULL, NULL, scratch_size(d_in, rank)};
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
