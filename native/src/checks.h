/* The fused product's arguments, gathered once so every path (reference, CPU, CUDA) checks them the same way. */
#ifndef EORA_CHECKS_H
#define EORA_CHECKS_H

#include "internal.h"

typedef struct {
    int w_type;
    const void *w;
    size_t w_bytes;
    int64_t d_out, d_in;
    const float *x;
    size_t x_bytes;
    int64_t n_tokens;
    int a_type;
    const void *a;
    size_t a_bytes;
    int b_type;
    const void *b;
    size_t b_bytes;
    int64_t rank;
    float *y;
    size_t y_bytes;
} eora_fused_args;

eora_status eora_check_fused(const eora_fused_args *f);

/* Fills *f from the public descriptors (a and b both NULL: no adapter) and checks it as eora_check_fused. */
eora_status eora_fused_args_from(const char *fn, const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                 const eora_matrix *b, float *y, size_t y_bytes, eora_fused_args *f);

/* A dequantization's buffers: src exactly n_elems elements of type (its length in *src_need, may be NULL),
 * dst exactly n_elems floats. */
eora_status eora_check_dequant(const char *fn, int type, const void *src, size_t src_bytes, int64_t n_elems,
                              const float *dst, size_t dst_bytes, int64_t *src_need);

#endif
