/* Shared internals: error reporting, half-precision conversion, type table, kernel table. */
#ifndef EORA_INTERNAL_H
#define EORA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "eora_native.h"
#include "blocks.h"

/* Records a printf-style message for eora_last_error() and returns `status`. */
eora_status eora_fail(eora_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline float eora_f16_to_f32(uint16_t h) {
    /* Exact for every input (normals, subnormals, inf, nan). */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t eora_f32_to_f16(float f) {
    /* Round to nearest even, like the F16C instruction: overflow to inf, subnormals, NaN kept quiet. */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                      /* below 2^-14: subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;             /* below half the smallest subnormal */
        uint32_t man = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(ax >> 23);                       /* 14 .. 24: man >> shift = units of 2^-24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax >> 13) & 0x3ffu);
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;     /* a carry into the exponent is right too */
    return (uint16_t)(sign | h);
}

static inline float eora_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The AVX2 kernels' reduction of eight fp32 lanes (add the 128-bit halves, then movehl, then movehdup), for the
 * portable twins that reproduce their bits. */
static inline float eora_hsum8(const float v[8]) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

typedef struct {
    int64_t block_elems;
    int64_t block_bytes;
} eora_type_traits;

/* NULL for unknown types. */
const eora_type_traits *eora_traits(int type);

/* Checks that n_elems is a positive whole number of blocks and src holds them; sets *bytes_out. */
eora_status eora_check_blocks(int type, int64_t n_elems, size_t have_bytes, const char *what, int64_t *bytes_out);

/* Scalar reference dequantization of whole blocks (n_elems a multiple of the block size). */
void eora_dequant_row_ref(int type, const void *src, float *dst, int64_t n_elems);

/* --- Optimized kernels, one table per instruction set (cpu_kern.c compiled several times). ---
 *
 * A weight row is first "unpacked" into a uniform form that covers every supported type:
 *   codes[i] (uint8), and per group g of 16 elements ds[g], dm[g] (float) with
 *   w[i] = ds[g] * codes[i] - dm[g]             (g = i / 16)
 * which the integer dot product against 8-bit activations then consumes. */
typedef struct {
    int64_t d_in;
    int8_t *q;       /* (d_in) int8 codes of x, blocks of 32 */
    float *d16;      /* (d_in / 16) scale of the 32-block holding each 16-group */
    float *s16;      /* (d_in / 16) scale * sum of the 16 codes of the group */
} eora_qx;

typedef struct {
    const char *name;
    /* w row -> codes (d_in bytes), ds, dm (d_in/16 floats each). */
    void (*unpack)(int type, const void *row, int64_t d_in, uint8_t *codes, float *ds, float *dm);
    /* dequantize a row to fp32 (bit-exact with the reference) */
    void (*dequant)(int type, const void *row, int64_t d_in, float *out);
    /* adapter row -> fp32 (F16 through the hardware converter: equal to dequant except NaN payloads) */
    void (*adapter_row)(int type, const void *row, int64_t n, float *out);
    /* sum_i w[i] * x[i] for an unpacked row and a quantized token */
    float (*dot_q)(const uint8_t *codes, const float *ds, const float *dm, const eora_qx *x);
    /* sum_i row[i] * v[i] for an adapter row (F32, F16, Q8_0) read in place, in fp32 */
    float (*adapter_dot)(int type, const void *row, const float *v, int64_t n);
    /* sum_i a[i] * b[i] in fp32 */
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    /* quantize one token */
    void (*quantize_x)(const float *x, int64_t d_in, eora_qx *out);
} eora_kernels;

/* --- Direct kernels (qdot.c, also compiled per instruction set): integer dot products that read the GGUF
 * blocks in place, against activations quantized per block of 256 (K-quants) or 32 (Q4_0, Q8_0). The scalar
 * build has the same kernels in portable C, with the AVX2 kernels' blocks and summation order. --- */
typedef struct {
    float *d;      /* (d_in / block) scales */
    int8_t *q;     /* (d_in) codes; 32-element chunks of each 256-block in the kernel's order */
    int16_t *bs;   /* code sums: per 16 elements (256-blocks, natural order) or per 32-block */
    float *aux;    /* 32-blocks, AVX-512 (2 * d_in floats): Q8_0 per pair of blocks 16 scales (each block's
                    * d x8), then 16 int32 start values (-128 * bs in lanes 0 and 8); Q4_0 per group of 4
                    * blocks 16 scales (d x4), then 16 int32 (-8 * bs in lanes 0, 4, 8, 12); q of such a
                    * Q4_0 group holds the four first halves, then the four second halves */
} eora_xq;

/* out[t] = sum_i w[i] x_t[i] for one weight row (nb blocks) and nt <= 4 tokens xs[0..nt-1]. */
typedef void (*eora_direct_fn)(const uint8_t *row, int64_t nb, const eora_xq *xs, int nt, float *out);

typedef struct {
    int (*block)(int type);  /* activation block size if `type` has a direct kernel, else 0 */
    void (*quantize)(int type, const float *x, int64_t d_in, eora_xq *out);
    eora_direct_fn (*kernel)(int type);
} eora_direct_kernels;

extern const eora_direct_kernels eora_direct_scalar;
extern const eora_direct_kernels eora_direct_avx2;
extern const eora_direct_kernels eora_direct_avx512;

/* --- LoRA products in llama.cpp's CPU arithmetic (lora_kern.c, compiled per instruction set; lora.c) --- */
static inline int eora_order_lanes(int order) {  /* flat lanes of an eora_order, 0 if unknown */
    switch (order) {
    case EORA_ORDER_LANES8: return 8;
    case EORA_ORDER_LANES16: return 16;
    case EORA_ORDER_VEC8: return 32;
    case EORA_ORDER_VEC16: return 64;
    default: return 0;
    }
}

typedef struct {
    /* out[n * ldo + r] = dot(m row r, v[n]) (add = 0) or out[...] += dot * scale (add = 1), rows [r0, r1), summed
     * in `order`; m F16 or F32, (rows, k); v (nt, k) */
    void (*rows)(int m_type, const void *m, int64_t k, int64_t r0, int64_t r1, const float *v, int64_t nt,
                 int order, float *out, int64_t ldo, float scale, int add);
    /* out[i] = f16(x[i]) as fp32 */
    void (*round_f16)(const float *x, float *out, int64_t n);
} eora_lora_kernels;

extern const eora_lora_kernels eora_lora_kernels_scalar;
extern const eora_lora_kernels eora_lora_kernels_avx2;
extern const eora_lora_kernels eora_lora_kernels_avx512;

extern const eora_kernels eora_kernels_scalar;
extern const eora_kernels eora_kernels_avx2;
extern const eora_kernels eora_kernels_avx512;

/* --- The one ISA selection table (cpu.c): every kernel family of one instruction set. --- */
typedef struct {
    const char *name;                     /* "scalar", "avx2", "avx512" (eora_cpu_path) */
    const eora_kernels *k;
    const eora_direct_kernels *direct;
    const eora_lora_kernels *lora;
} eora_isa;

/* The best entry this CPU runs (AVX-512 with VNNI, AVX2 + FMA + F16C, portable C), lowered by the ISA flags
 * (EORA_FLAG_ISA_SCALAR, EORA_FLAG_ISA_AVX2). */
const eora_isa *eora_select_isa(unsigned flags);

#endif
