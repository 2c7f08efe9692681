/* LoRA terms in llama.cpp's CPU arithmetic: argument checks and dispatch (kernels in lora_kern.c). */
#include "internal.h"

static const unsigned lora_flags = EORA_FLAG_ISA_SCALAR | EORA_FLAG_ISA_AVX2 | EORA_FLAG_ROUNDED;

EORA_API size_t eora_lora_scratch(int64_t k, int64_t n_tokens) {
    if (k <= 0 || n_tokens <= 0) return 0;
    return (size_t)k * (size_t)n_tokens * sizeof(float);
}

/* The checks both calls share: m (rows, k), v (n_tokens, k), out (n_tokens, ldo), the row range, the order. */
static eora_status check_lora(const char *fn, int m_type, const void *m, size_t m_bytes, int64_t rows, int64_t k,
                              const float *v, size_t v_bytes, int64_t n_tokens, int order, int64_t row_begin,
                              int64_t row_end, const float *out, size_t out_bytes, const void *scratch,
                              size_t scratch_bytes, unsigned flags) {
    if (!m || !v || !out) return eora_fail(EORA_ERR_ARGUMENT, "%s: matrix, input and output must not be NULL", fn);
    if (flags & ~lora_flags) return eora_fail(EORA_ERR_ARGUMENT, "%s: unknown flag bits 0x%x", fn, flags);
    if (m_type != EORA_TYPE_F16 && m_type != EORA_TYPE_F32)
        return eora_fail(EORA_ERR_TYPE, "%s: adapter type must be F16 or F32 (got %d)", fn, m_type);
    const int lanes = eora_order_lanes(order);
    if (lanes == 0) return eora_fail(EORA_ERR_ARGUMENT, "%s: unknown order %d", fn, order);
    if (rows <= 0 || k <= 0 || n_tokens <= 0)
        return eora_fail(EORA_ERR_SHAPE, "%s: rows=%lld, k=%lld, n_tokens=%lld must all be positive", fn,
                         (long long)rows, (long long)k, (long long)n_tokens);
    /* the tinyBLAS orders sum whole blocks only; ggml's vec_dot adds an F16 tail in fp64 (an F32 tail in fp32,
     * which its compiler may contract: not reproduced) */
    if (k % lanes && (order == EORA_ORDER_LANES8 || order == EORA_ORDER_LANES16 || m_type == EORA_TYPE_F32))
        return eora_fail(EORA_ERR_SHAPE, "%s: dot length %lld is not a multiple of this order's %d lanes", fn,
                         (long long)k, lanes);
    const uint64_t esz = m_type == EORA_TYPE_F16 ? 2 : 4;
    if ((uint64_t)m_bytes / esz / (uint64_t)k < (uint64_t)rows)
        return eora_fail(EORA_ERR_BUFFER, "%s: matrix has %zu bytes, %llu needed", fn, m_bytes,
                         (unsigned long long)(esz * (uint64_t)rows * (uint64_t)k));  /* unsigned: may wrap, no UB */
    if ((uint64_t)v_bytes / 4 / (uint64_t)k < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "%s: input has %zu bytes, %llu needed", fn, v_bytes,
                         (unsigned long long)((uint64_t)n_tokens * (uint64_t)k * 4));
    if ((uint64_t)out_bytes / 4 / (uint64_t)rows < (uint64_t)n_tokens)
        return eora_fail(EORA_ERR_BUFFER, "%s: output has %zu bytes, %llu needed", fn, out_bytes,
                         (unsigned long long)((uint64_t)n_tokens * (uint64_t)rows * 4));
    if (row_begin < 0 || row_end < row_begin || row_end > rows)
        return eora_fail(EORA_ERR_SHAPE, "%s: row range [%lld, %lld) is not inside [0, %lld)", fn,
                         (long long)row_begin, (long long)row_end, (long long)rows);
    if (m_type == EORA_TYPE_F16 && !(flags & EORA_FLAG_ROUNDED) &&
        (!scratch || scratch_bytes < eora_lora_scratch(k, n_tokens)))
        return eora_fail(EORA_ERR_BUFFER, "%s: scratch has %zu bytes, %zu needed", fn, scratch_bytes,
                         eora_lora_scratch(k, n_tokens));
    return EORA_OK;
}

EORA_API eora_status eora_lora_round_f16(const float *x, float *out, int64_t n, unsigned flags) {
    if (!x || !out) return eora_fail(EORA_ERR_ARGUMENT, "lora_round_f16: x and out must not be NULL");
    if (n < 0) return eora_fail(EORA_ERR_SHAPE, "lora_round_f16: n=%lld is negative", (long long)n);
    if (flags & ~lora_flags) return eora_fail(EORA_ERR_ARGUMENT, "lora_round_f16: unknown flag bits 0x%x", flags);
    eora_select_isa(flags)->lora->round_f16(x, out, n);
    return EORA_OK;
}

/* ggml rounds the other operand of an F16 matmul to F16 first; an F32 matmul takes it as it is. */
static const float *operand(const eora_lora_kernels *lk, int m_type, const float *v, int64_t n, void *scratch,
                            unsigned flags) {
    if (m_type != EORA_TYPE_F16 || (flags & EORA_FLAG_ROUNDED)) return v;
    lk->round_f16(v, scratch, n);
    return scratch;
}

/* Both calls: out[n, r] = dot(m row r, v[n]) (add = 0) or out[n, r] += dot * scale (add = 1), rows [r0, r1). */
static eora_status lora_rows(const char *fn, int m_type, const void *m, size_t m_bytes, int64_t rows, int64_t k,
                             const float *v, size_t v_bytes, int64_t n_tokens, int order, int64_t r0, int64_t r1,
                             float *out, size_t out_bytes, void *scratch, size_t scratch_bytes, unsigned flags,
                             float scale, int add) {
    eora_status s = check_lora(fn, m_type, m, m_bytes, rows, k, v, v_bytes, n_tokens, order, r0, r1, out, out_bytes,
                               scratch, scratch_bytes, flags);
    if (s != EORA_OK || r0 == r1) return s;
    const eora_lora_kernels *lk = eora_select_isa(flags)->lora;
    lk->rows(m_type, m, k, r0, r1, operand(lk, m_type, v, n_tokens * k, scratch, flags), n_tokens, order, out, rows,
             scale, add);
    return EORA_OK;
}

/* The public calls: descriptors to the checks and kernels above (m: the adapter matrix, v: the input). */
static eora_status lora_call(const char *fn, const eora_matrix *m, const eora_matrix *v, int order, int64_t r0,
                             int64_t r1, float *out, size_t out_bytes, void *scratch, size_t scratch_bytes,
                             unsigned flags, float scale, int add) {
    if (!m || !v) return eora_fail(EORA_ERR_ARGUMENT, "%s: matrix and input descriptors must not be NULL", fn);
    if (v->type != EORA_TYPE_F32) return eora_fail(EORA_ERR_TYPE, "%s: the input must be F32 (got type %d)", fn, v->type);
    if (v->cols != m->cols)
        return eora_fail(EORA_ERR_SHAPE, "%s: input has %lld columns but the matrix has %lld", fn,
                         (long long)v->cols, (long long)m->cols);
    return lora_rows(fn, m->type, m->data, m->bytes, m->rows, m->cols, v->data, v->bytes, v->rows, order, r0,
                     r1, out, out_bytes, scratch, scratch_bytes, flags, scale, add);
}

EORA_API eora_status eora_lora_t(const eora_matrix *a, const eora_matrix *x, int order, int64_t row_begin,
                                 int64_t row_end, float *t, size_t t_bytes, void *scratch, size_t scratch_bytes,
                                 unsigned flags) {
    return lora_call("lora_t", a, x, order, row_begin, row_end, t, t_bytes, scratch, scratch_bytes, flags, 1.0f, 0);
}

EORA_API eora_status eora_lora_add(const eora_matrix *b, const eora_matrix *t, float scale, int order,
                                   int64_t row_begin, int64_t row_end, float *y, size_t y_bytes, void *scratch,
                                   size_t scratch_bytes, unsigned flags) {
    return lora_call("lora_add", b, t, order, row_begin, row_end, y, y_bytes, scratch, scratch_bytes, flags, scale, 1);
}
