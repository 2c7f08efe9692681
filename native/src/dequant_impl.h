/* Scalar dequantization of each block type, written from the formats in blocks.h. Included by ref.c and by
 * cpu_kern.c (compiled once per instruction set, so the compiler may vectorize it); both must be compiled
 * with -ffp-contract=off so every weight gets the float32 roundings gguf-py uses (a product, then a sum). */
#ifndef EORA_DEQUANT_IMPL_H
#define EORA_DEQUANT_IMPL_H

#include "internal.h"

static inline void deq_q4_0(const blk_q4_0 *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((b->qs[j] & 15) - 8);
        y[j + 16] = d * (float)((b->qs[j] >> 4) - 8);
    }
}

static inline void deq_q4_1(const blk_q4_1 *b, float *y) {
    float d = eora_f16_to_f32(b->d), m = eora_f16_to_f32(b->m);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(b->qs[j] & 15) + m;
        y[j + 16] = d * (float)(b->qs[j] >> 4) + m;
    }
}

static inline uint32_t load_u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static inline void deq_q5_0(const blk_q5_0 *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    uint32_t qh = load_u32(b->qh);
    for (int j = 0; j < 16; j++) {
        int lo = (b->qs[j] & 15) | (int)((qh >> j) & 1) << 4;
        int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static inline void deq_q5_1(const blk_q5_1 *b, float *y) {
    float d = eora_f16_to_f32(b->d), m = eora_f16_to_f32(b->m);
    uint32_t qh = load_u32(b->qh);
    for (int j = 0; j < 16; j++) {
        int lo = (b->qs[j] & 15) | (int)((qh >> j) & 1) << 4;
        int hi = (b->qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static inline void deq_q8_0(const blk_q8_0 *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    for (int j = 0; j < 32; j++) y[j] = d * (float)b->qs[j];
}

static inline void deq_iq4_nl(const blk_iq4_nl *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)eora_iq4_levels[b->qs[j] & 15];
        y[j + 16] = d * (float)eora_iq4_levels[b->qs[j] >> 4];
    }
}

static inline void deq_q2_k(const blk_q2_k *b, float *y) {
    float d = eora_f16_to_f32(b->d), dmin = eora_f16_to_f32(b->dmin);
    /* element e: byte 32*(e/128) + e%32, bits 2*((e/32)%4); group e/16 */
    for (int e = 0; e < 256; e++) {
        int q = (b->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        uint8_t sc = b->scales[e / 16];
        float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        y[e] = dl * (float)q - ml;
    }
}

/* The 16 six-bit scales of Q3_K: low nibbles from bytes 0..7, high two bits from bytes 8..11. */
static inline void q3_k_scales(const uint8_t *s, int out[16]) {
    for (int g = 0; g < 16; g++) {
        int lo = g < 8 ? s[g] & 15 : s[g - 8] >> 4;
        int hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        out[g] = (lo | hi << 4) - 32;
    }
}

static inline void deq_q3_k(const blk_q3_k *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    int sc[16];
    q3_k_scales(b->scales, sc);
    for (int e = 0; e < 256; e++) {
        int q = (b->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        int h = (b->hmask[e % 32] >> (e / 32)) & 1;
        float dl = d * (float)sc[e / 16];
        y[e] = dl * (float)(q - (h ? 0 : 4));
    }
}

/* The 8 six-bit scales and mins of Q4_K/Q5_K. */
static inline void k_scale_min(const uint8_t *s, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

static inline void deq_q4_k(const blk_q4_k *b, float *y) {
    float d = eora_f16_to_f32(b->d), dmin = eora_f16_to_f32(b->dmin);
    int sc[8], mn[8];
    k_scale_min(b->scales, sc, mn);
    for (int e = 0; e < 256; e++) {
        int g = e / 32;
        int q = (b->qs[32 * (g / 2) + e % 32] >> (4 * (g % 2))) & 15;
        float dl = d * (float)sc[g], ml = dmin * (float)mn[g];
        y[e] = dl * (float)q - ml;
    }
}

static inline void deq_q5_k(const blk_q5_k *b, float *y) {
    float d = eora_f16_to_f32(b->d), dmin = eora_f16_to_f32(b->dmin);
    int sc[8], mn[8];
    k_scale_min(b->scales, sc, mn);
    for (int e = 0; e < 256; e++) {
        int g = e / 32;
        int q = ((b->qs[32 * (g / 2) + e % 32] >> (4 * (g % 2))) & 15) | ((b->qh[e % 32] >> g) & 1) << 4;
        float dl = d * (float)sc[g], ml = dmin * (float)mn[g];
        y[e] = dl * (float)q - ml;
    }
}

static inline void deq_q6_k(const blk_q6_k *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    /* element e = 128 h + 32 k + l: low nibble of ql[64 h + l + 32 (k % 2)] (high nibble when k >= 2),
     * top two bits from qh[32 h + l] >> 2k */
    for (int e = 0; e < 256; e++) {
        int h = e / 128, k = (e / 32) % 4, l = e % 32;
        int lo = (b->ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2))) & 15;
        int hi = (b->qh[32 * h + l] >> (2 * k)) & 3;
        float dl = d * (float)b->scales[e / 16];
        y[e] = dl * (float)((lo | hi << 4) - 32);
    }
}

static inline void deq_iq4_xs(const blk_iq4_xs *b, float *y) {
    float d = eora_f16_to_f32(b->d);
    for (int g = 0; g < 8; g++) {
        int ls = ((b->scales_l[g / 2] >> (4 * (g % 2))) & 15) | ((b->scales_h >> (2 * g)) & 3) << 4;
        float dl = d * (float)(ls - 32);
        for (int j = 0; j < 16; j++) {
            y[32 * g + j] = dl * (float)eora_iq4_levels[b->qs[16 * g + j] & 15];
            y[32 * g + j + 16] = dl * (float)eora_iq4_levels[b->qs[16 * g + j] >> 4];
        }
    }
}

static inline void dequant_row(int type, const void *src, float *dst, int64_t n_elems) {
    const uint8_t *p = src;
    switch (type) {
    case EORA_TYPE_F32: memcpy(dst, src, (size_t)n_elems * 4); return;
    case EORA_TYPE_F16:
        for (int64_t i = 0; i < n_elems; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = eora_f16_to_f32(h); }
        return;
    case EORA_TYPE_BF16:
        for (int64_t i = 0; i < n_elems; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); dst[i] = eora_bf16_to_f32(h); }
        return;
    default: break;
    }
    const eora_type_traits *t = eora_traits(type);
    for (int64_t i = 0; i < n_elems / t->block_elems; i++, p += t->block_bytes, dst += t->block_elems) {
        switch (type) {
        case EORA_TYPE_Q4_0: deq_q4_0((const blk_q4_0 *)p, dst); break;
        case EORA_TYPE_Q4_1: deq_q4_1((const blk_q4_1 *)p, dst); break;
        case EORA_TYPE_Q5_0: deq_q5_0((const blk_q5_0 *)p, dst); break;
        case EORA_TYPE_Q5_1: deq_q5_1((const blk_q5_1 *)p, dst); break;
        case EORA_TYPE_Q8_0: deq_q8_0((const blk_q8_0 *)p, dst); break;
        case EORA_TYPE_Q2_K: deq_q2_k((const blk_q2_k *)p, dst); break;
        case EORA_TYPE_Q3_K: deq_q3_k((const blk_q3_k *)p, dst); break;
        case EORA_TYPE_Q4_K: deq_q4_k((const blk_q4_k *)p, dst); break;
        case EORA_TYPE_Q5_K: deq_q5_k((const blk_q5_k *)p, dst); break;
        case EORA_TYPE_Q6_K: deq_q6_k((const blk_q6_k *)p, dst); break;
        case EORA_TYPE_IQ4_NL: deq_iq4_nl((const blk_iq4_nl *)p, dst); break;
        case EORA_TYPE_IQ4_XS: deq_iq4_xs((const blk_iq4_xs *)p, dst); break;
        default: return;
        }
    }
}

#endif
