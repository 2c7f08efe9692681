/* The fused product's arguments, gathered once so both paths check them the same way. */
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

#endif
