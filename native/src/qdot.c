/* Direct integer dot products: GGUF weight blocks (read in place, no row buffer) against activations
 * quantized to 8 bits. Compiled once per instruction set like cpu_kern.c. The scalar build runs portable C
 * twins of the AVX2 kernels (the end of this file): the same activation blocks and codes, the same integer
 * sums in the same eight lanes, the same fused multiply-adds and the same final reduction, so isa="scalar"
 * gives the AVX2 bits and serves as their oracle (AVX-512 sums its lanes in another order).
 *
 * Activations (eora_xq, one per token) come in blocks matching the weight type:
 *  - K-quants (Q2_K..Q6_K): 256-element blocks, one fp32 scale d = max|x|/127 each, int8 codes, and the
 *    int16 sums of the codes of every 16 consecutive elements (natural order);
 *  - Q4_0, Q8_0: 32-element blocks, one scale and one int16 code sum each.
 * Within a 256-block the codes are stored as eight 32-element chunks in the order the AVX-512 kernel
 * decodes the weight chunks (x_perm below), so every weight vector meets its activations with one load.
 *
 * Math per 256-block of a K-quant (d, dmin: the block's fp16 scales; s_g, m_g: integer sub-block scale and
 * offset multiplier of 16-group g; c: the unsigned weight code; x = dx * q):
 *     sum_i w_i x_i = d dx sum_g s_g (sum_{i in g} c_i q_i)  -  dmin dx sum_g m_g bs_g
 * Sub-block sums are multiplied by their integer scales in the integer domain (pmaddubsw -> vpdpwssd /
 * pmaddwd) and converted to float once per block. Offsets (Q3_K's -4, Q6_K's -32, the mins of Q2_K/Q4_K/
 * Q5_K) all go through the block sums bs_g ("bsums"): m_g = 4 s_g (Q3_K), 32 s_g (Q6_K), min_g (others). */
#include <math.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "internal.h"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define K(name) CAT(name, EORA_ISA)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QD512 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QD256 1
#endif
#define INL static inline __attribute__((always_inline))

static int K(direct_block)(int type) {
    switch (type) {
    case EORA_TYPE_Q2_K: case EORA_TYPE_Q3_K: case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: case EORA_TYPE_Q6_K:
        return 256;
    case EORA_TYPE_Q4_0: case EORA_TYPE_Q8_0: return 32;
    default: return 0;
    }
}

#if defined(QD256)

/* ---------------------------------------------------------------- activations */

/* Stored chunk p of a 256-block holds natural chunk perm[p] (AVX-512 only; the AVX2 kernels walk the
 * weight chunks in natural order). */
#if defined(QD512)
static const uint8_t PERM_Q4K[8] = {0, 2, 1, 3, 4, 6, 5, 7};
static const uint8_t PERM_Q2K[8] = {0, 4, 1, 5, 2, 6, 3, 7};
#endif

static const uint8_t *x_perm(int type) {
#if defined(QD512)
    if (type == EORA_TYPE_Q4_K || type == EORA_TYPE_Q5_K) return PERM_Q4K;
    if (type == EORA_TYPE_Q2_K || type == EORA_TYPE_Q3_K) return PERM_Q2K;
#else
    (void)type;
#endif
    return NULL;
}

INL float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

INL float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 floats times id, rounded to nearest even, to int8 in order. */
INL __m256i quant32(const float *x, __m256 id) {
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), id));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id));
    __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id));
    __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

INL int sum16_i8(const int8_t *q) {
    __m128i v = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)q));
    __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(q + 8)));
    __m128i s = _mm_madd_epi16(_mm_add_epi16(v, w), _mm_set1_epi16(1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static void K(quantize_direct)(int type, const float *x, int64_t d_in, eora_xq *o) {
    const int bl = K(direct_block)(type);
    const uint8_t *perm = x_perm(type);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int8_t tmp[256] __attribute__((aligned(32)));
    for (int64_t b = 0; b < d_in / bl; b++) {
        const float *xb = x + b * bl;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < bl; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        float amax = hmax256(m);
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        for (int c = 0; c < bl / 32; c++) _mm256_store_si256((__m256i *)(tmp + 32 * c), quant32(xb + 32 * c, idv));
        o->d[b] = d;
        int8_t *dst = o->q + b * bl;
        if (bl == 256) {
            for (int g = 0; g < 16; g++) o->bs[16 * b + g] = (int16_t)sum16_i8(tmp + 16 * g);
            for (int c = 0; c < 8; c++) memcpy(dst + 32 * c, tmp + 32 * (perm ? perm[c] : c), 32);
        } else {
            o->bs[b] = (int16_t)(sum16_i8(tmp) + sum16_i8(tmp + 16));
            memcpy(dst, tmp, 32);
        }
    }
#if defined(QD512)
    if (type == EORA_TYPE_Q4_0) {  /* per group of 4 blocks: halves regrouped, scales, start values (dot_q4_0_n) */
        for (int64_t b = 0; b + 3 < d_in / 32; b += 4) {
            int8_t g[128];
            memcpy(g, o->q + 32 * b, 128);
            for (int k = 0; k < 4; k++) {
                memcpy(o->q + 32 * b + 16 * k, g + 32 * k, 16);
                memcpy(o->q + 32 * b + 64 + 16 * k, g + 32 * k + 16, 16);
            }
            float *a = o->aux + 8 * b;
            int32_t st[16] = {0};
            for (int k = 0; k < 4; k++) {
                for (int i = 0; i < 4; i++) a[4 * k + i] = o->d[b + k];
                st[4 * k] = -8 * o->bs[b + k];
            }
            memcpy(a + 16, st, sizeof st);
        }
    } else if (bl == 32) {  /* Q8_0, per pair of blocks: scale vector and dpbusd start vector (dot_32_n) */
        const int off = 128;
        for (int64_t b = 0; b + 1 < d_in / 32; b += 2) {
            float *a = o->aux + 16 * b;
            int32_t st[16] = {0};
            for (int i = 0; i < 8; i++) { a[i] = o->d[b]; a[8 + i] = o->d[b + 1]; }
            st[0] = -off * o->bs[b];
            st[8] = -off * o->bs[b + 1];
            memcpy(a + 16, st, sizeof st);
        }
    }
#endif
}

INL float f16(uint16_t h) { return _cvtsh_ss(h); }

/* Q4_K/Q5_K: 8 six-bit scales (bytes 0..7) and mins (bytes 8..15). */
INL __m128i k4_scales_mins(const uint8_t *s) {
    uint32_t w0, w1, w2;
    memcpy(&w0, s, 4); memcpy(&w1, s + 4, 4); memcpy(&w2, s + 8, 4);
    uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    return _mm_set_epi32((int)mn_hi, (int)mn_lo, (int)sc_hi, (int)sc_lo);
}

/* Q3_K: the 16 signed six-bit scales (s6 - 32) as int8. */
INL __m128i q3k_scales(const uint8_t *s) {
    uint64_t lo8;
    uint32_t w;
    memcpy(&lo8, s, 8); memcpy(&w, s + 8, 4);
    const __m128i m4 = _mm_set1_epi8(15);
    __m128i a = _mm_cvtsi64_si128((long long)lo8);
    __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(a, m4), _mm_and_si128(_mm_srli_epi16(a, 4), m4));
    const uint32_t m = 0x03030303u;
    __m128i hb = _mm_set_epi32((int)((w >> 6) & m), (int)((w >> 4) & m), (int)((w >> 2) & m), (int)(w & m));
    return _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hb, 4)), _mm_set1_epi8(32));
}

#if defined(QD512)
/* ---------------------------------------------------------------- AVX-512 (BW, VL, VNNI) K-quants
 * A 256-block is four 64-byte code vectors; vector k holds stored chunks 2k, 2k+1 (x_perm). pmaddubsw
 * turns each into 32 int16 pair sums, 128-bit lane L of which lies in one 16-group; vpdpwssd multiplies
 * them by that group's integer scale (a vpermw of the block's scale vector) and accumulates in int32. */

static const int16_t IDX_Q6K[4][32] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};
static const int16_t IDX_Q2K[4][32] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};
/* vpshufb controls: 128-bit lane L of Q4_K vector k takes int16 element PERM_Q4K[2k + L/2] of its lane. */
#define SH2(e) (int16_t)(((2 * (e) + 1) << 8) | (2 * (e)))
#define SH8(e) SH2(e), SH2(e), SH2(e), SH2(e), SH2(e), SH2(e), SH2(e), SH2(e)
static const int16_t SHUF_Q4K[4][32] __attribute__((aligned(64))) = {
    {SH8(0), SH8(0), SH8(2), SH8(2)}, {SH8(1), SH8(1), SH8(3), SH8(3)},
    {SH8(4), SH8(4), SH8(6), SH8(6)}, {SH8(5), SH8(5), SH8(7), SH8(7)},
};

typedef struct {
    __m512i c[4], s[4];  /* codes and per-lane int16 scales of the four vectors */
    __m256i m;           /* m_g, 16 x int16 */
    float d, dmin;
} kblock;

INL __m512i idx(const int16_t *p) { return _mm512_load_si512((const void *)p); }
INL __m512i bcast256(const uint8_t *p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p)); }
INL __m512i halves8(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)lo)), _mm256_set1_epi8((char)hi), 1);
}
INL __m512i halves16(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)lo)), _mm256_set1_epi16((short)hi), 1);
}

INL void dec_q4k(const uint8_t *p, int is5, kblock *o) {
    const blk_q4_k *b4 = (const blk_q4_k *)p;
    const blk_q5_k *b5 = (const blk_q5_k *)p;
    const uint8_t *qs = is5 ? b5->qs : b4->qs;
    __m128i sm = k4_scales_mins(is5 ? b5->scales : b4->scales);
    __m512i S = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(sm));  /* 8 scales as int16 in every lane */
    for (int k = 0; k < 4; k++) o->s[k] = _mm512_shuffle_epi8(S, idx(SHUF_Q4K[k]));
    o->m = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i v0 = _mm512_loadu_si512(qs), v1 = _mm512_loadu_si512(qs + 64);
    o->c[0] = _mm512_and_si512(v0, m4);
    o->c[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
    o->c[2] = _mm512_and_si512(v1, m4);
    o->c[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
    if (is5) {
        __m512i qh = bcast256(b5->qh), h16 = _mm512_set1_epi8(16);
        for (int k = 0; k < 4; k++) {
            __mmask64 hb = _mm512_test_epi8_mask(qh, halves8(1 << PERM_Q4K[2 * k], 1 << PERM_Q4K[2 * k + 1]));
            o->c[k] = _mm512_mask_add_epi8(o->c[k], hb, o->c[k], h16);
        }
    }
    o->d = f16(b4->d);
    o->dmin = f16(b4->dmin);
}

INL void dec_q6k(const uint8_t *p, kblock *o) {
    const blk_q6_k *b = (const blk_q6_k *)p;
    const __m512i m4 = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        __m512i l = _mm512_loadu_si512(b->ql + 64 * h), qh = bcast256(b->qh + 32 * h);
        o->c[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4),
                                      _mm512_and_si512(_mm512_sllv_epi16(qh, halves16(4, 2)), m30));
        o->c[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                          _mm512_and_si512(_mm512_srlv_epi16(qh, halves16(0, 2)), m30));
    }
    __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    __m512i S = _mm512_castsi256_si512(s16);
    for (int k = 0; k < 4; k++) o->s[k] = _mm512_permutexvar_epi16(idx(IDX_Q6K[k]), S);
    o->m = _mm256_slli_epi16(s16, 5);
    o->d = o->dmin = f16(b->d);
}

INL void dec_q23k(const uint8_t *p, int is3, kblock *o) {
    const blk_q2_k *b2 = (const blk_q2_k *)p;
    const blk_q3_k *b3 = (const blk_q3_k *)p;
    __m512i v = _mm512_loadu_si512(is3 ? b3->qs : b2->qs), m2 = _mm512_set1_epi8(3);
    for (int k = 0; k < 4; k++) o->c[k] = _mm512_and_si512(_mm512_srli_epi16(v, 2 * k), m2);
    __m256i s16;
    if (is3) {
        __m512i hm = bcast256(b3->hmask), h4 = _mm512_set1_epi8(4);
        for (int k = 0; k < 4; k++) {
            __mmask64 hb = _mm512_test_epi8_mask(hm, halves8(1 << k, 1 << (k + 4)));
            o->c[k] = _mm512_mask_add_epi8(o->c[k], hb, o->c[k], h4);
        }
        s16 = _mm256_cvtepi8_epi16(q3k_scales(b3->scales));
        o->m = _mm256_slli_epi16(s16, 2);
        o->d = o->dmin = f16(b3->d);
    } else {
        __m128i sc = _mm_loadu_si128((const __m128i *)b2->scales), m4 = _mm_set1_epi8(15);
        s16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc, m4));
        o->m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
        o->d = f16(b2->d);
        o->dmin = f16(b2->dmin);
    }
    __m512i S = _mm512_castsi256_si512(s16);
    for (int k = 0; k < 4; k++) o->s[k] = _mm512_permutexvar_epi16(idx(IDX_Q2K[k]), S);
}

INL void dec_k(int type, const uint8_t *p, kblock *o) {
    switch (type) {
    case EORA_TYPE_Q4_K: dec_q4k(p, 0, o); break;
    case EORA_TYPE_Q5_K: dec_q4k(p, 1, o); break;
    case EORA_TYPE_Q6_K: dec_q6k(p, o); break;
    case EORA_TYPE_Q2_K: dec_q23k(p, 0, o); break;
    default: dec_q23k(p, 1, o); break;
    }
}

INL void dot_k_n(int type, const uint8_t *row, size_t bb, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    __m512 accf[4];
    __m256 accm[4];
    for (int t = 0; t < nt; t++) { accf[t] = _mm512_setzero_ps(); accm[t] = _mm256_setzero_ps(); }
    for (int64_t b = 0; b < nb; b++) {
        kblock k;
        dec_k(type, row + b * bb, &k);
        for (int t = 0; t < nt; t++) {
            const int8_t *q = xs[t].q + 256 * b;
            __m512i acc = _mm512_setzero_si512();
            for (int v = 0; v < 4; v++)
                acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(k.c[v], _mm512_loadu_si512(q + 64 * v)), k.s[v]);
            float dx = xs[t].d[b];
            accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(k.d * dx), accf[t]);
            __m256i mm = _mm256_madd_epi16(k.m, _mm256_loadu_si256((const __m256i *)(xs[t].bs + 16 * b)));
            accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mm), _mm256_set1_ps(k.dmin * dx), accm[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = _mm512_reduce_add_ps(accf[t]) - hsum256(accm[t]);
}

/* Q4_0, AVX-512: four blocks per step. Low nibbles of the four blocks form one zmm, high nibbles another
 * (128-bit lane k = block k), against x regrouped the same way at quantization; the two vpdpbusd leave
 * block k's sum in lanes 4k..4k+3, started from -8 * (code sum of x). An odd tail goes per ymm. */
INL void dot_q4_0_n(const uint8_t *row, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    const size_t bb = sizeof(blk_q4_0);
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i bidx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc4[4];
    __m256 acc[4];
    for (int t = 0; t < nt; t++) { acc[t] = _mm256_setzero_ps(); acc4[t] = _mm512_setzero_ps(); }
    int64_t b = 0;
    for (; b + 3 < nb; b += 4) {
        const uint8_t *p = row + b * bb;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + 2)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + bb + 2)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * bb + 2)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * bb + 2)), 3);
        __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        uint16_t h[4];
        for (int k = 0; k < 4; k++) memcpy(&h[k], p + k * bb, 2);
        uint64_t h64 = (uint64_t)h[0] | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 32 | (uint64_t)h[3] << 48;
        __m512 dw = _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128((long long)h64))));
        for (int t = 0; t < nt; t++) {
            const float *a = xs[t].aux + 8 * b;
            const int8_t *q = xs[t].q + 32 * b;
            __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(a + 16), lo, _mm512_loadu_si512(q));
            s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(q + 64));
            acc4[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(a)), dw, acc4[t]);
        }
    }
    for (; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        __m128i v = _mm_loadu_si128((const __m128i *)((const blk_q4_0 *)p)->qs);
        __m256i c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
        float d = f16(((const blk_q4_0 *)p)->d);
        for (int t = 0; t < nt; t++) {
            __m256i s = _mm256_dpbusd_epi32(_mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xs[t].bs[b])), c,
                                            _mm256_loadu_si256((const __m256i *)(xs[t].q + 32 * b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xs[t].d[b]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++)
        out[t] = hsum256(_mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(acc4[t]), _mm512_extractf32x8_ps(acc4[t], 1)), acc[t]));
}

/* Q8_0, AVX-512: two 32-blocks per zmm (lanes 0-7 and 8-15 of the int32 sums); codes offset by 128 to make
 * them unsigned, vpdpbusd started from -128 * (code sum of x) of each block (the aux vectors); an odd last
 * block per ymm. */
INL void dot_32_n(int type, const uint8_t *row, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    (void)type;  /* Q8_0 only: Q4_0 has dot_q4_0_n */
    const size_t bb = sizeof(blk_q8_0);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc2[4];
    __m256 acc[4];
    for (int t = 0; t < nt; t++) { acc[t] = _mm256_setzero_ps(); acc2[t] = _mm512_setzero_ps(); }
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const blk_q8_0 *p = (const blk_q8_0 *)(row + b * bb), *p1 = p + 1;
        __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p->qs)),
                                       _mm256_loadu_si256((const __m256i *)p1->qs), 1);
        c = _mm512_xor_si512(c, flip);
        __m512 dw = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)p->d)),
                                                            _mm_set1_epi16((short)p1->d), 1));
        for (int t = 0; t < nt; t++) {
            const float *a = xs[t].aux + 16 * b;
            __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512(a + 16), c, _mm512_loadu_si512(xs[t].q + 32 * b));
            acc2[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(a)), dw, acc2[t]);
        }
    }
    for (; b < nb; b++) {
        const blk_q8_0 *p = (const blk_q8_0 *)(row + b * bb);
        __m256i c = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p->qs), _mm512_castsi512_si256(flip));
        float d = f16(p->d);
        for (int t = 0; t < nt; t++) {
            __m256i s = _mm256_dpbusd_epi32(_mm256_zextsi128_si256(_mm_cvtsi32_si128(-128 * xs[t].bs[b])), c,
                                            _mm256_loadu_si256((const __m256i *)(xs[t].q + 32 * b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xs[t].d[b]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++)
        out[t] = hsum256(_mm256_add_ps(_mm256_add_ps(_mm512_castps512_ps256(acc2[t]), _mm512_extractf32x8_ps(acc2[t], 1)), acc[t]));
}

#else
/* ---------------------------------------------------------------- AVX2 K-quants
 * Eight 32-byte code vectors per block in natural chunk order; pmaddubsw then pmaddwd by the chunk's two
 * 16-group scales (lane 0: first 16 elements, lane 1: the next 16), added in int32. */

typedef struct {
    __m256i T;    /* int16 scale table: lane 0 element c = scale of chunk c's first 16-group, lane 1 its second */
    __m256i m;    /* m_g, 16 x int16 */
    float d, dmin;
} kblock;

INL __m256i even_odd(__m128i s8, int is_signed) {  /* 16 group scales (int8) -> table T */
    __m128i eo = _mm_shuffle_epi8(s8, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    return is_signed ? _mm256_cvtepi8_epi16(eo) : _mm256_cvtepu8_epi16(eo);
}
INL __m256i chunk_scale(__m256i T, int c) { return _mm256_shuffle_epi8(T, _mm256_set1_epi16((short)(((2 * c + 1) << 8) | (2 * c)))); }
INL __m256i ld256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

INL void dec_k(int type, const uint8_t *p, kblock *o) {
    switch (type) {
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: {
        const blk_q4_k *b = (const blk_q4_k *)p;
        __m128i sm = k4_scales_mins(type == EORA_TYPE_Q5_K ? ((const blk_q5_k *)p)->scales : b->scales);
        o->T = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        o->m = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
        o->d = f16(b->d);
        o->dmin = f16(b->dmin);
        break;
    }
    case EORA_TYPE_Q6_K: {
        const blk_q6_k *b = (const blk_q6_k *)p;
        __m128i s8 = _mm_loadu_si128((const __m128i *)b->scales);
        o->T = even_odd(s8, 1);
        o->m = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 5);
        o->d = o->dmin = f16(b->d);
        break;
    }
    case EORA_TYPE_Q2_K: {
        const blk_q2_k *b = (const blk_q2_k *)p;
        __m128i sc = _mm_loadu_si128((const __m128i *)b->scales), m4 = _mm_set1_epi8(15);
        o->T = even_odd(_mm_and_si128(sc, m4), 0);
        o->m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
        o->d = f16(b->d);
        o->dmin = f16(b->dmin);
        break;
    }
    default: {
        const blk_q3_k *b = (const blk_q3_k *)p;
        __m128i s8 = q3k_scales(b->scales);
        o->T = even_odd(s8, 1);
        o->m = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 2);
        o->d = o->dmin = f16(b->d);
        break;
    }
    }
}

/* Codes of natural chunk c (elements 32c .. 32c+31) of the block at p. */
INL __m256i chunk_codes(int type, const uint8_t *p, int c) {
    const __m256i m4 = _mm256_set1_epi8(15);
    switch (type) {
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: {
        const int is5 = type == EORA_TYPE_Q5_K;
        const uint8_t *qs = is5 ? ((const blk_q5_k *)p)->qs : ((const blk_q4_k *)p)->qs;
        __m256i v = ld256(qs + 32 * (c / 2));
        __m256i q = (c & 1) ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m4) : _mm256_and_si256(v, m4);
        if (is5) {
            __m256i qh = ld256(((const blk_q5_k *)p)->qh);
            __m256i h = c <= 4 ? _mm256_slli_epi16(qh, 4 - c) : _mm256_srli_epi16(qh, c - 4);
            q = _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
        }
        return q;
    }
    case EORA_TYPE_Q6_K: {
        const blk_q6_k *b = (const blk_q6_k *)p;
        const int h = c / 4, k = c % 4;
        __m256i l = ld256(b->ql + 64 * h + 32 * (k % 2)), qh = ld256(b->qh + 32 * h);
        __m256i lo = k < 2 ? _mm256_and_si256(l, m4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
        __m256i hi = 2 * k <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * k) : _mm256_srli_epi16(qh, 2 * k - 4);
        return _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
    }
    case EORA_TYPE_Q2_K:
        return _mm256_and_si256(_mm256_srli_epi16(ld256(((const blk_q2_k *)p)->qs + 32 * (c / 4)), 2 * (c % 4)),
                                _mm256_set1_epi8(3));
    default: {
        const blk_q3_k *b = (const blk_q3_k *)p;
        __m256i q = _mm256_and_si256(_mm256_srli_epi16(ld256(b->qs + 32 * (c / 4)), 2 * (c % 4)), _mm256_set1_epi8(3));
        __m256i hm = ld256(b->hmask);
        __m256i h = c <= 2 ? _mm256_slli_epi16(hm, 2 - c) : _mm256_srli_epi16(hm, c - 2);
        return _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi8(4)));
    }
    }
}

INL void dot_k_n(int type, const uint8_t *row, size_t bb, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    __m256 accf[4], accm[4];
    for (int t = 0; t < nt; t++) accf[t] = accm[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        kblock k;
        dec_k(type, p, &k);
        __m256i acc[4];
        for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            __m256i code = chunk_codes(type, p, c), s = chunk_scale(k.T, c);
            for (int t = 0; t < nt; t++)
                acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(code, ld256(xs[t].q + 256 * b + 32 * c)), s));
        }
        for (int t = 0; t < nt; t++) {
            float dx = xs[t].d[b];
            accf[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_set1_ps(k.d * dx), accf[t]);
            __m256i mm = _mm256_madd_epi16(k.m, ld256(xs[t].bs + 16 * b));
            accm[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mm), _mm256_set1_ps(k.dmin * dx), accm[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum256(_mm256_sub_ps(accf[t], accm[t]));
}

/* Q4_0: pmaddubsw of the 0..15 codes, started from -8 * (code sum of x). Q8_0: signed codes through
 * |w| * sign(x, w) (pmaddubsw needs an unsigned operand; |w| <= 128 keeps the pair sums in int16). */
INL void dot_32_n(int type, const uint8_t *row, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    const int is8 = type == EORA_TYPE_Q8_0;
    const size_t bb = is8 ? sizeof(blk_q8_0) : sizeof(blk_q4_0);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        __m256i c;
        if (is8) {
            c = ld256(((const blk_q8_0 *)p)->qs);
        } else {
            __m128i v = _mm_loadu_si128((const __m128i *)((const blk_q4_0 *)p)->qs);
            c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
        }
        float d = f16(((const blk_q4_0 *)p)->d);
        for (int t = 0; t < nt; t++) {
            __m256i x = ld256(xs[t].q + 32 * b), s;
            if (is8) {
                s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c)), ones);
            } else {
                s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones),
                                     _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * xs[t].bs[b])));
            }
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xs[t].d[b]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = hsum256(acc[t]);
}
#endif

#else
/* ---------------------------------------------------------------- portable C twins of the AVX2 kernels */
#include "dequant_impl.h"

/* _mm256_cvtps_epi32 (nearest even; NaN and overflow give INT_MIN), then the saturating packs to int8. */
static inline int8_t round_i8(float v) {
    if (!(v > -2147483648.0f && v < 2147483648.0f)) return -128;
    long r = lrintf(v);
    return (int8_t)(r < -128 ? -128 : r > 127 ? 127 : r);
}

static void K(quantize_direct)(int type, const float *x, int64_t d_in, eora_xq *o) {
    const int bl = K(direct_block)(type);
    for (int64_t b = 0; b < d_in / bl; b++) {
        const float *xb = x + b * bl;
        float amax = 0;
        for (int i = 0; i < bl; i++) amax = amax > fabsf(xb[i]) ? amax : fabsf(xb[i]);
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        int8_t *q = o->q + b * bl;
        int sum[16] = {0};
        for (int i = 0; i < bl; i++) sum[i / 16] += q[i] = round_i8(xb[i] * id);
        o->d[b] = d;
        if (bl == 256)
            for (int g = 0; g < 16; g++) o->bs[16 * b + g] = (int16_t)sum[g];
        else
            o->bs[b] = (int16_t)(sum[0] + sum[1]);
    }
}

/* One K-quant block: 256 unsigned codes in natural order, per 16-group the integer scale s and offset
 * multiplier m (w = d s c - dmin m), as the AVX2 decoder holds them. */
typedef struct {
    uint8_t c[256];
    int s[16], m[16];
    float d, dmin;
} kblock;

static inline void dec_k(int type, const uint8_t *p, kblock *o) {
    switch (type) {
    case EORA_TYPE_Q2_K: {
        const blk_q2_k *b = (const blk_q2_k *)p;
        for (int e = 0; e < 256; e++) o->c[e] = (b->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        for (int g = 0; g < 16; g++) { o->s[g] = b->scales[g] & 15; o->m[g] = b->scales[g] >> 4; }
        o->d = eora_f16_to_f32(b->d);
        o->dmin = eora_f16_to_f32(b->dmin);
        break;
    }
    case EORA_TYPE_Q3_K: {
        const blk_q3_k *b = (const blk_q3_k *)p;
        for (int e = 0; e < 256; e++)
            o->c[e] = (uint8_t)(((b->qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3) |
                                ((b->hmask[e % 32] >> (e / 32)) & 1) << 2);
        q3_k_scales(b->scales, o->s);
        for (int g = 0; g < 16; g++) o->m[g] = 4 * o->s[g];
        o->d = o->dmin = eora_f16_to_f32(b->d);
        break;
    }
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: {
        const blk_q4_k *b4 = (const blk_q4_k *)p;
        const blk_q5_k *b5 = (const blk_q5_k *)p;
        const int is5 = type == EORA_TYPE_Q5_K;
        const uint8_t *qs = is5 ? b5->qs : b4->qs;
        int sc[8], mn[8];
        k_scale_min(is5 ? b5->scales : b4->scales, sc, mn);
        for (int e = 0; e < 256; e++) {
            int c = (qs[32 * (e / 64) + e % 32] >> (4 * ((e / 32) % 2))) & 15;
            o->c[e] = (uint8_t)(is5 ? c | ((b5->qh[e % 32] >> (e / 32)) & 1) << 4 : c);
        }
        for (int g = 0; g < 16; g++) { o->s[g] = sc[g / 2]; o->m[g] = mn[g / 2]; }
        o->d = eora_f16_to_f32(b4->d);  /* same offsets in both */
        o->dmin = eora_f16_to_f32(b4->dmin);
        break;
    }
    default: {  /* Q6_K */
        const blk_q6_k *b = (const blk_q6_k *)p;
        for (int e = 0; e < 256; e++) {
            int h = e / 128, k = (e / 32) % 4, l = e % 32;
            o->c[e] = (uint8_t)(((b->ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2))) & 15) |
                                ((b->qh[32 * h + l] >> (2 * k)) & 3) << 4);
        }
        for (int g = 0; g < 16; g++) { o->s[g] = b->scales[g]; o->m[g] = 32 * b->scales[g]; }
        o->d = o->dmin = eora_f16_to_f32(b->d);
        break;
    }
    }
}

/* Lane j of a 32-element chunk holds elements 4j..4j+3 (pmaddubsw + pmaddwd); lanes 0-3 take the chunk's
 * first 16-group scale, lanes 4-7 its second; per block, fma(lane sum, d dx) into fp32 lanes. */
INL void dot_k_n(int type, const uint8_t *row, size_t bb, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    float accf[4][8] = {{0}}, accm[4][8] = {{0}};
    kblock k;
    for (int64_t b = 0; b < nb; b++) {
        dec_k(type, row + b * bb, &k);
        for (int t = 0; t < nt; t++) {
            const int8_t *q = xs[t].q + 256 * b;
            const int16_t *bs = xs[t].bs + 16 * b;
            const float dx = xs[t].d[b];
            int32_t acc[8] = {0};
            for (int c = 0; c < 8; c++)
                for (int j = 0; j < 8; j++) {
                    int sum = 0;
                    for (int i = 32 * c + 4 * j; i < 32 * c + 4 * j + 4; i++) sum += k.c[i] * q[i];
                    acc[j] += sum * k.s[2 * c + j / 4];
                }
            for (int j = 0; j < 8; j++) {
                accf[t][j] = fmaf((float)acc[j], k.d * dx, accf[t][j]);
                accm[t][j] = fmaf((float)(k.m[2 * j] * bs[2 * j] + k.m[2 * j + 1] * bs[2 * j + 1]), k.dmin * dx,
                                  accm[t][j]);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        float v[8];
        for (int j = 0; j < 8; j++) v[j] = accf[t][j] - accm[t][j];
        out[t] = eora_hsum8(v);
    }
}

/* Q4_0 (codes 0..15, lane 0 started from -8 * the code sum of x) and Q8_0 (signed codes). */
INL void dot_32_n(int type, const uint8_t *row, int64_t nb, const eora_xq *xs, const int nt, float *out) {
    const int is8 = type == EORA_TYPE_Q8_0;
    const size_t bb = is8 ? sizeof(blk_q8_0) : sizeof(blk_q4_0);
    float acc[4][8] = {{0}};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        int c[32];
        for (int j = 0; j < 32; j++)
            c[j] = is8 ? ((const blk_q8_0 *)p)->qs[j] : (((const blk_q4_0 *)p)->qs[j % 16] >> (4 * (j / 16))) & 15;
        const float d = eora_f16_to_f32(((const blk_q4_0 *)p)->d);
        for (int t = 0; t < nt; t++) {
            const int8_t *q = xs[t].q + 32 * b;
            for (int j = 0; j < 8; j++) {
                int s = j == 0 && !is8 ? -8 * xs[t].bs[b] : 0;
                for (int i = 4 * j; i < 4 * j + 4; i++) s += c[i] * q[i];
                acc[t][j] = fmaf((float)s, d * xs[t].d[b], acc[t][j]);
            }
        }
    }
    for (int t = 0; t < nt; t++) out[t] = eora_hsum8(acc[t]);
}
#endif

/* ---------------------------------------------------------------- dispatch: one specialization per type
 * and token count, so the block decoder and the token loop are fully inlined and unrolled. */
#define KQ(T, bb)                                                                                           \
    static void K(dot_##T)(const uint8_t *row, int64_t nb, const eora_xq *xs, int nt, float *out) {       \
        switch (nt) {                                                                                       \
        case 1: dot_k_n(EORA_TYPE_##T, row, bb, nb, xs, 1, out); break;                                   \
        case 2: dot_k_n(EORA_TYPE_##T, row, bb, nb, xs, 2, out); break;                                   \
        case 3: dot_k_n(EORA_TYPE_##T, row, bb, nb, xs, 3, out); break;                                   \
        default: dot_k_n(EORA_TYPE_##T, row, bb, nb, xs, 4, out); break;                                  \
        }                                                                                                   \
    }
KQ(Q2_K, sizeof(blk_q2_k))
KQ(Q3_K, sizeof(blk_q3_k))
KQ(Q4_K, sizeof(blk_q4_k))
KQ(Q5_K, sizeof(blk_q5_k))
KQ(Q6_K, sizeof(blk_q6_k))
#define LQ(T)                                                                                               \
    static void K(dot_##T)(const uint8_t *row, int64_t nb, const eora_xq *xs, int nt, float *out) {       \
        switch (nt) {                                                                                       \
        case 1: dot_32_n(EORA_TYPE_##T, row, nb, xs, 1, out); break;                                       \
        case 2: dot_32_n(EORA_TYPE_##T, row, nb, xs, 2, out); break;                                       \
        case 3: dot_32_n(EORA_TYPE_##T, row, nb, xs, 3, out); break;                                       \
        default: dot_32_n(EORA_TYPE_##T, row, nb, xs, 4, out); break;                                      \
        }                                                                                                   \
    }
#if defined(QD512)
static void K(dot_Q4_0)(const uint8_t *row, int64_t nb, const eora_xq *xs, int nt, float *out) {
    switch (nt) {
    case 1: dot_q4_0_n(row, nb, xs, 1, out); break;
    case 2: dot_q4_0_n(row, nb, xs, 2, out); break;
    case 3: dot_q4_0_n(row, nb, xs, 3, out); break;
    default: dot_q4_0_n(row, nb, xs, 4, out); break;
    }
}
#else
LQ(Q4_0)
#endif
LQ(Q8_0)

static eora_direct_fn K(direct_kernel)(int type) {
    switch (type) {
    case EORA_TYPE_Q2_K: return K(dot_Q2_K);
    case EORA_TYPE_Q3_K: return K(dot_Q3_K);
    case EORA_TYPE_Q4_K: return K(dot_Q4_K);
    case EORA_TYPE_Q5_K: return K(dot_Q5_K);
    case EORA_TYPE_Q6_K: return K(dot_Q6_K);
    case EORA_TYPE_Q4_0: return K(dot_Q4_0);
    case EORA_TYPE_Q8_0: return K(dot_Q8_0);
    default: return NULL;
    }
}

const eora_direct_kernels K(eora_direct) = {
    .block = K(direct_block),
    .quantize = K(quantize_direct),
    .kernel = K(direct_kernel),
};

