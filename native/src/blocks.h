/* GGUF block layouts, written from the format description (ggml's ggml-common.h at the pinned commit
 * defines the same bytes). Every struct holds only 1- and 2-byte members, so the natural alignment is 2
 * and the sizes below come out exactly (Q3_K 110 bytes, Q6_K 210): no packing pragma is needed, but a
 * 4-byte load from a block pointer is unaligned in general and must go through memcpy.
 * Half-precision fields are kept as raw uint16_t bits. */
#ifndef EORA_BLOCKS_H
#define EORA_BLOCKS_H

#include <stdint.h>

#define EORA_QK32 32   /* elements in a legacy block */
#define EORA_QKK 256   /* elements in a K-quant super-block */

typedef struct { uint16_t d; uint8_t qs[16]; } blk_q4_0;              /* w = d * (q - 8) */
_Static_assert(sizeof(blk_q4_0) == 18, "q4_0 block size");
typedef struct { uint16_t d, m; uint8_t qs[16]; } blk_q4_1;           /* w = d * q + m */
_Static_assert(sizeof(blk_q4_1) == 20, "q4_1 block size");
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_0;  /* w = d * (q - 16) */
_Static_assert(sizeof(blk_q5_0) == 22, "q5_0 block size");
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } blk_q5_1;  /* w = d * q + m */
_Static_assert(sizeof(blk_q5_1) == 24, "q5_1 block size");
typedef struct { uint16_t d; int8_t qs[32]; } blk_q8_0;               /* w = d * q */
_Static_assert(sizeof(blk_q8_0) == 34, "q8_0 block size");
typedef struct { uint16_t d; uint8_t qs[16]; } blk_iq4_nl;            /* w = d * kvalues[q] */
_Static_assert(sizeof(blk_iq4_nl) == 18, "iq4_nl block size");

/* 16 groups of 16: w = d * (scales[g] & 15) * q - dmin * (scales[g] >> 4), q 2-bit */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; uint16_t d, dmin; } blk_q2_k;
_Static_assert(sizeof(blk_q2_k) == 84, "q2_K block size");
/* 16 groups of 16: w = d * (s6[g] - 32) * (q2 - (hbit ? 0 : 4)) */
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; uint16_t d; } blk_q3_k;
_Static_assert(sizeof(blk_q3_k) == 110, "q3_K block size");
/* 8 groups of 32: w = d * sc6[g] * q4 - dmin * m6[g] */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } blk_q4_k;
_Static_assert(sizeof(blk_q4_k) == 144, "q4_K block size");
/* 8 groups of 32: w = d * sc6[g] * q5 - dmin * m6[g] */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } blk_q5_k;
_Static_assert(sizeof(blk_q5_k) == 176, "q5_K block size");
/* 16 groups of 16: w = d * scales[g] * (q6 - 32) */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } blk_q6_k;
_Static_assert(sizeof(blk_q6_k) == 210, "q6_K block size");
/* 8 groups of 32: w = d * (s6[g] - 32) * kvalues[q4] */
typedef struct { uint16_t d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } blk_iq4_xs;
_Static_assert(sizeof(blk_iq4_xs) == 136, "iq4_xs block size");

/* The 16 non-linear levels shared by IQ4_NL and IQ4_XS. */
static const int8_t eora_iq4_levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                           1, 13, 25, 38, 53, 69, 89, 113};

#endif
