/* Errors, the type table and the argument checks shared by the reference and optimized paths. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"
#include "checks.h"

static _Thread_local char last_error[512];

eora_status eora_fail(eora_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

EORA_API const char *eora_last_error(void) { return last_error; }

EORA_API int eora_abi_version(void) { return EORA_ABI_VERSION; }

const eora_type_traits *eora_traits(int type) {
    static const eora_type_traits f32 = {1, 4}, f16 = {1, 2}, q4_0 = {32, 18}, q4_1 = {32, 20},
                                  q5_0 = {32, 22}, q5_1 = {32, 24}, q8_0 = {32, 34}, q2_k = {256, 84},
                                  q3_k = {256, 110}, q4_k = {256, 144}, q5_k = {256, 176}, q6_k = {256, 210},
                                  iq4_nl = {32, 18}, iq4_xs = {256, 136};
    switch (type) {
    case EORA_TYPE_F32: return &f32;
    case EORA_TYPE_F16: case EORA_TYPE_BF16: return &f16;
    case EORA_TYPE_Q4_0: return &q4_0;
    case EORA_TYPE_Q4_1: return &q4_1;
    case EORA_TYPE_Q5_0: return &q5_0;
    case EORA_TYPE_Q5_1: return &q5_1;
    case EORA_TYPE_Q8_0: return &q8_0;
    case EORA_TYPE_Q2_K: return &q2_k;
    case EORA_TYPE_Q3_K: return &q3_k;
    case EORA_TYPE_Q4_K: return &q4_k;
    case EORA_TYPE_Q5_K: return &q5_k;
    case EORA_TYPE_Q6_K: return &q6_k;
    case EORA_TYPE_IQ4_NL: return &iq4_nl;
    case EORA_TYPE_IQ4_XS: return &iq4_xs;
    default: return NULL;
    }
}

EORA_API eora_status eora_type_info(int type, int64_t *block_elems, int64_t *block_bytes) {
    const eora_type_traits *t = eora_traits(type);
    if (!t) return eora_fail(EORA_ERR_TYPE, "unsupported tensor type %d", type);
    if (!block_elems || !block_bytes) return eora_fail(EORA_ERR_ARGUMENT, "eora_type_info: NULL output pointer");
    *block_elems = t->block_elems;
    *block_bytes = t->block_bytes;
    return EORA_OK;
}

eora_status eora_check_blocks(int type, int64_t n_elems, size_t have_bytes, const char *what, int64_t *bytes_out) {
    const eora_type_traits *t = eora_traits(type);
    if (!t) return eora_fail(EORA_ERR_TYPE, "%s: unsupported tensor type %d", what, type);
    if (n_elems <= 0) return eora_fail(EORA_ERR_SHAPE, "%s: element count %lld must be positive", what, (long long)n_elems);
    if (n_elems % t->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "%s: %lld elements is not a multiple of the block size %lld of type %d",
                         what, (long long)n_elems, (long long)t->block_elems, type);
    if (n_elems / t->block_elems > INT64_MAX / t->block_bytes)
        return eora_fail(EORA_ERR_SHAPE, "%s: %lld elements overflow the byte count", what, (long long)n_elems);
    int64_t need = n_elems / t->block_elems * t->block_bytes;
    /* exactly: a longer buffer means the caller's shape and its data disagree (e.g. a weight of twice the rows) */
    if ((uint64_t)need != (uint64_t)have_bytes)
        return eora_fail(EORA_ERR_BUFFER, "%s: buffer has %zu bytes, its shape needs exactly %lld", what, have_bytes,
                         (long long)need);
    if (bytes_out) *bytes_out = need;
    return EORA_OK;
}

static eora_status check_f32(int64_t rows, int64_t cols, size_t have, const char *what) {
    if (rows > INT64_MAX / 4 / cols) return eora_fail(EORA_ERR_SHAPE, "%s: shape overflows", what);
    if ((uint64_t)(rows * cols * 4) != (uint64_t)have)
        return eora_fail(EORA_ERR_BUFFER, "%s: buffer has %zu bytes, its shape (%lld x %lld) needs exactly %lld", what,
                         have, (long long)rows, (long long)cols, (long long)(rows * cols * 4));
    return EORA_OK;
}

eora_status eora_check_fused(const eora_fused_args *f) {
    eora_status s;
    if (!f->w || !f->x || !f->y) return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: w, x and y must not be NULL");
    if (!eora_traits(f->w_type)) return eora_fail(EORA_ERR_TYPE, "fused_matmul: unsupported weight type %d", f->w_type);
    if (f->d_out <= 0 || f->d_in <= 0 || f->n_tokens <= 0)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: d_out=%lld, d_in=%lld, n_tokens=%lld must all be positive",
                         (long long)f->d_out, (long long)f->d_in, (long long)f->n_tokens);
    if (f->d_in % eora_traits(f->w_type)->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: weight row length %lld is not a multiple of the block size %lld",
                         (long long)f->d_in, (long long)eora_traits(f->w_type)->block_elems);
    int64_t row_bytes = f->d_in / eora_traits(f->w_type)->block_elems * eora_traits(f->w_type)->block_bytes;
    if (f->d_out > INT64_MAX / row_bytes) return eora_fail(EORA_ERR_SHAPE, "fused_matmul: weight shape overflows");
    if ((uint64_t)(f->d_out * row_bytes) != (uint64_t)f->w_bytes)
        return eora_fail(EORA_ERR_BUFFER, "fused_matmul: weight buffer has %zu bytes, its type and shape (%lld x %lld) "
                         "need exactly %lld", f->w_bytes, (long long)f->d_out, (long long)f->d_in,
                         (long long)(f->d_out * row_bytes));
    if ((s = check_f32(f->n_tokens, f->d_in, f->x_bytes, "fused_matmul: x")) != EORA_OK) return s;
    if ((s = check_f32(f->n_tokens, f->d_out, f->y_bytes, "fused_matmul: y")) != EORA_OK) return s;
    if (f->rank < 0) return eora_fail(EORA_ERR_SHAPE, "fused_matmul: rank %lld is negative", (long long)f->rank);
    if (f->rank == 0) {
        if (f->a_bytes || f->b_bytes)
            return eora_fail(EORA_ERR_SHAPE, "fused_matmul: rank 0 but adapter buffers of %zu and %zu bytes were given",
                             f->a_bytes, f->b_bytes);
        return EORA_OK;
    }
    int64_t lim = f->d_in < f->d_out ? f->d_in : f->d_out;
    if (f->rank > lim)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: rank %lld exceeds min(d_in, d_out) = %lld", (long long)f->rank,
                         (long long)lim);
    if (!f->a || !f->b) return eora_fail(EORA_ERR_ARGUMENT, "fused_matmul: rank %lld needs non-NULL a and b", (long long)f->rank);
    const int ok[] = {EORA_TYPE_F32, EORA_TYPE_F16, EORA_TYPE_Q8_0};
    int a_ok = 0, b_ok = 0;
    for (int i = 0; i < 3; i++) { a_ok |= f->a_type == ok[i]; b_ok |= f->b_type == ok[i]; }
    if (!a_ok || !b_ok)
        return eora_fail(EORA_ERR_TYPE, "fused_matmul: adapter types must be F32, F16 or Q8_0 (got a=%d, b=%d)",
                         f->a_type, f->b_type);
    if (f->d_in % eora_traits(f->a_type)->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: a row length %lld is not a multiple of its block size", (long long)f->d_in);
    if (f->rank % eora_traits(f->b_type)->block_elems)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: b row length (rank %lld) is not a multiple of its block size 32",
                         (long long)f->rank);
    /* a is (rank, d_in) and b is (d_out, rank): exact byte counts tie A's width to d_in, B's height to d_out and
     * both to one rank */
    if (f->rank > INT64_MAX / f->d_in || f->rank > INT64_MAX / f->d_out)
        return eora_fail(EORA_ERR_SHAPE, "fused_matmul: adapter shape overflows");
    if ((s = eora_check_blocks(f->a_type, f->rank * f->d_in, f->a_bytes, "fused_matmul: a (rank x d_in)", NULL)) != EORA_OK)
        return s;
    if ((s = eora_check_blocks(f->b_type, f->d_out * f->rank, f->b_bytes, "fused_matmul: b (d_out x rank)", NULL)) != EORA_OK)
        return s;
    return EORA_OK;
}

eora_status eora_fused_args_from(const char *fn, const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                 const eora_matrix *b, float *y, size_t y_bytes, eora_fused_args *f) {
    if (!w || !x) return eora_fail(EORA_ERR_ARGUMENT, "%s: the w and x descriptors must not be NULL", fn);
    if (!a != !b) return eora_fail(EORA_ERR_ARGUMENT, "%s: pass both adapter descriptors a and b, or neither", fn);
    if (x->type != EORA_TYPE_F32) return eora_fail(EORA_ERR_TYPE, "%s: x must be F32 (got type %d)", fn, x->type);
    if (x->cols != w->cols)
        return eora_fail(EORA_ERR_SHAPE, "%s: x has %lld columns but w has %lld", fn, (long long)x->cols,
                         (long long)w->cols);
    if (a && (a->cols != w->cols || b->rows != w->rows || b->cols != a->rows))
        return eora_fail(EORA_ERR_SHAPE, "%s: adapter shapes a (%lld x %lld) and b (%lld x %lld) do not fit w (%lld x "
                         "%lld): a must be (rank, d_in) and b (d_out, rank)", fn, (long long)a->rows,
                         (long long)a->cols, (long long)b->rows, (long long)b->cols, (long long)w->rows,
                         (long long)w->cols);
    eora_fused_args out = {w->type, w->data, w->bytes, w->rows, w->cols, x->data, x->bytes, x->rows,
                           a ? a->type : EORA_TYPE_F32, a ? a->data : NULL, a ? a->bytes : 0,
                           b ? b->type : EORA_TYPE_F32, b ? b->data : NULL, b ? b->bytes : 0, a ? a->rows : 0,
                           y, y_bytes};
    *f = out;
    return eora_check_fused(f);
}

eora_status eora_check_dequant(const char *fn, int type, const void *src, size_t src_bytes, int64_t n_elems,
                              const float *dst, size_t dst_bytes, int64_t *src_need) {
    if (!src || !dst) return eora_fail(EORA_ERR_ARGUMENT, "%s: src and dst must not be NULL", fn);
    char what[64];
    snprintf(what, sizeof what, "%s: src", fn);
    eora_status s = eora_check_blocks(type, n_elems, src_bytes, what, src_need);
    if (s != EORA_OK) return s;
    if ((uint64_t)n_elems != (uint64_t)dst_bytes / 4 || dst_bytes % 4)
        return eora_fail(EORA_ERR_BUFFER, "%s: dst has %zu bytes, exactly %llu needed", fn, dst_bytes,
                         (unsigned long long)n_elems * 4);
    return EORA_OK;
}
