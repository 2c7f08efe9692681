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
    eora_status s = eora_check_dequant("dequantize", type, src, src_bytes, n_elems, dst, dst_bytes, NULL);
    if (s != EORA_OK) return s;
    eora_dequant_row_ref(type, src, dst, n_elems);
    return EORA_OK;
}

EORA_API eora_status eora_fused_matmul_ref(const eora_matrix *wm, const eora_matrix *xm, const eora_matrix *am,
                                           const eora_matrix *bm, float *y, size_t y_bytes) {
    eora_fused_args f;
    eora_status s = eora_fused_args_from("fused_matmul_ref", wm, xm, am, bm, y, y_bytes, &f);
    if (s != EORA_OK) return s;
    const int w_type = f.w_type, a_type = f.a_type, b_type = f.b_type;
    const void *w = f.w, *a = f.a, *b = f.b;
    const float *x = f.x;
    const int64_t d_out = f.d_out, d_in = f.d_in, n_tokens = f.n_tokens, rank = f.rank;
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
