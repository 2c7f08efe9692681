/* Scalar reference: dequantization (dequant_impl.h) and the fused product, accumulated in fp64. */
#include <math.h>
#include <stdlib.h>

#include "internal.h"
#include "checks.h"
#include "dequant_impl.h"

void eora_dequant_row_ref(int type, const void *src, float *dst, int64_t n_elems) {
    dequant_row(type, src, dst, n_elems);
}

EORA_API eora_status eora_dequantize_ref(int type, const void *src, size_t src_bytes, int64_t n_elems, float *dst,
                                         size_t dst_bytes) {
    if (!src || !dst) return eora_fail(EORA_ERR_ARGUMENT, "dequantize: src and dst must not be NULL");
    eora_status s = eora_check_blocks(type, n_elems, src_bytes, "dequantize: src", NULL);
    if (s != EORA_OK) return s;
    if ((uint64_t)n_elems != (uint64_t)dst_bytes / 4 || dst_bytes % 4)
        return eora_fail(EORA_ERR_BUFFER, "dequantize: dst has %zu bytes, exactly %llu needed", dst_bytes,
                         (unsigned long long)n_elems * 4);
    eora_dequant_row_ref(type, src, dst, n_elems);
    return EORA_OK;
}

EORA_API eora_status eora_fused_matmul_ref(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                           const float *x, size_t x_bytes, int64_t n_tokens, int a_type,
                                           const void *a, size_t a_bytes, int b_type, const void *b, size_t b_bytes,
                                           int64_t rank, float *y, size_t y_bytes) {
    eora_fused_args f = {w_type, w, w_bytes, d_out, d_in, x, x_bytes, n_tokens,
                         a_type, a, a_bytes, b_type, b, b_bytes, rank, y, y_bytes};
    eora_status s = eora_check_fused(&f);
    if (s != EORA_OK) return s;
    const eora_type_traits *wt = eora_traits(w_type);
    size_t w_row = (size_t)(d_in / wt->block_elems * wt->block_bytes);
    int64_t rmax = rank > 0 ? rank : 1;
    float *row = malloc(sizeof(float) * (size_t)(d_in > rmax ? d_in : rmax));
    double *t = malloc(sizeof(double) * (size_t)(n_tokens * rmax));
    double *acc_tok = malloc(sizeof(double) * (size_t)n_tokens);
    if (!row || !t || !acc_tok) { free(row); free(t); free(acc_tok); return eora_fail(EORA_ERR_MEMORY, "fused_matmul_ref: out of memory"); }
    if (rank > 0) {  /* t = A x, (n_tokens, rank) */
        size_t a_row = (size_t)(d_in / eora_traits(a_type)->block_elems * eora_traits(a_type)->block_bytes);
        for (int64_t k = 0; k < rank; k++) {
            eora_dequant_row_ref(a_type, (const uint8_t *)a + k * a_row, row, d_in);
            for (int64_t j = 0; j < n_tokens; j++) {
                double acc = 0;
                for (int64_t i = 0; i < d_in; i++) acc += (double)row[i] * x[j * d_in + i];
                t[j * rank + k] = acc;
            }
        }
    }
    size_t b_row = rank > 0 ? (size_t)(rank / eora_traits(b_type)->block_elems * eora_traits(b_type)->block_bytes) : 0;
    for (int64_t o = 0; o < d_out; o++) {
        eora_dequant_row_ref(w_type, (const uint8_t *)w + o * w_row, row, d_in);
        for (int64_t j = 0; j < n_tokens; j++) {
            double acc = 0;
            for (int64_t i = 0; i < d_in; i++) acc += (double)row[i] * x[j * d_in + i];
            acc_tok[j] = acc;
        }
        if (rank > 0) {
            eora_dequant_row_ref(b_type, (const uint8_t *)b + o * b_row, row, rank);
            for (int64_t j = 0; j < n_tokens; j++)
                for (int64_t k = 0; k < rank; k++) acc_tok[j] += (double)row[k] * t[j * rank + k];
        }
        for (int64_t j = 0; j < n_tokens; j++) y[j * d_out + o] = (float)acc_tok[j];
    }
    free(acc_tok);
    free(row);
    free(t);
    return EORA_OK;
}
