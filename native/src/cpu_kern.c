/* Optimized CPU kernels. This file is compiled once per instruction set (EORA_ISA = scalar, avx2, avx512,
 * with the matching -m flags) and cpu.c picks a table at run time; the portable C below is what the
 * scalar build runs and what the SIMD builds fall back to for the parts without intrinsics. Where a kernel
 * has AVX2 intrinsics, the scalar build's branch is their twin: the same lanes, fused multiply-adds and final
 * reduction (eora_hsum8), so isa="scalar" reproduces the AVX2 bits. */
#include <math.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "internal.h"
#include "dequant_impl.h"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define K(name) CAT(name, EORA_ISA)

/* ---- unpack: one weight row -> codes (uint8) + per-16 ds, dm with w = ds * code - dm ---- */

static inline void nibbles32(const uint8_t *qs, uint8_t *lo_out, uint8_t *hi_out) {
    for (int j = 0; j < 32; j++) { lo_out[j] = qs[j] & 15; hi_out[j] = qs[j] >> 4; }
}

static void unpack_block_k(int type, const uint8_t *p, uint8_t *c, float *ds, float *dm) {
    switch (type) {
    case EORA_TYPE_Q2_K: {
        const blk_q2_k *b = (const blk_q2_k *)p;
        float d = eora_f16_to_f32(b->d), dmin = eora_f16_to_f32(b->dmin);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) c[128 * h + 32 * s + l] = (b->qs[32 * h + l] >> (2 * s)) & 3;
        for (int g = 0; g < 16; g++) { ds[g] = d * (float)(b->scales[g] & 15); dm[g] = dmin * (float)(b->scales[g] >> 4); }
        break;
    }
    case EORA_TYPE_Q3_K: {
        const blk_q3_k *b = (const blk_q3_k *)p;
        float d = eora_f16_to_f32(b->d);
        int sc[16];
        q3_k_scales(b->scales, sc);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) {
                    int e = 128 * h + 32 * s + l;
                    c[e] = (uint8_t)(((b->qs[32 * h + l] >> (2 * s)) & 3) | ((b->hmask[l] >> (e / 32)) & 1) << 2);
                }
        for (int g = 0; g < 16; g++) { ds[g] = d * (float)sc[g]; dm[g] = 4.0f * ds[g]; }
        break;
    }
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: {
        const int is5 = type == EORA_TYPE_Q5_K;
        const blk_q4_k *b4 = (const blk_q4_k *)p;
        const blk_q5_k *b5 = (const blk_q5_k *)p;
        const uint8_t *qs = is5 ? b5->qs : b4->qs;
        float d = eora_f16_to_f32(b4->d), dmin = eora_f16_to_f32(b4->dmin);  /* same offsets in both */
        int sc[8], mn[8];
        k_scale_min(is5 ? b5->scales : b4->scales, sc, mn);
        for (int k = 0; k < 4; k++) nibbles32(qs + 32 * k, c + 64 * k, c + 64 * k + 32);
        if (is5)
            for (int g = 0; g < 8; g++)
                for (int l = 0; l < 32; l++) c[32 * g + l] |= ((b5->qh[l] >> g) & 1) << 4;
        for (int g = 0; g < 8; g++) {
            ds[2 * g] = ds[2 * g + 1] = d * (float)sc[g];
            dm[2 * g] = dm[2 * g + 1] = dmin * (float)mn[g];
        }
        break;
    }
    case EORA_TYPE_Q6_K: {
        const blk_q6_k *b = (const blk_q6_k *)p;
        float d = eora_f16_to_f32(b->d);
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++)
                    c[128 * h + 32 * k + l] = (uint8_t)(((b->ql[64 * h + l + 32 * (k % 2)] >> (4 * (k / 2))) & 15) |
                                                        ((b->qh[32 * h + l] >> (2 * k)) & 3) << 4);
        for (int g = 0; g < 16; g++) { ds[g] = d * (float)b->scales[g]; dm[g] = 32.0f * ds[g]; }
        break;
    }
    case EORA_TYPE_IQ4_XS: {
        const blk_iq4_xs *b = (const blk_iq4_xs *)p;
        float d = eora_f16_to_f32(b->d);
        for (int g = 0; g < 8; g++) {
            int ls = ((b->scales_l[g / 2] >> (4 * (g % 2))) & 15) | ((b->scales_h >> (2 * g)) & 3) << 4;
            ds[2 * g] = ds[2 * g + 1] = d * (float)(ls - 32);
            dm[2 * g] = dm[2 * g + 1] = 128.0f * ds[2 * g];
            for (int j = 0; j < 16; j++) {
                c[32 * g + j] = (uint8_t)(eora_iq4_levels[b->qs[16 * g + j] & 15] + 128);
                c[32 * g + j + 16] = (uint8_t)(eora_iq4_levels[b->qs[16 * g + j] >> 4] + 128);
            }
        }
        break;
    }
    default: break;
    }
}

static void unpack_block_32(int type, const uint8_t *p, uint8_t *c, float *ds, float *dm) {
    float d, m;
    switch (type) {
    case EORA_TYPE_Q4_0: {
        const blk_q4_0 *b = (const blk_q4_0 *)p;
        for (int j = 0; j < 16; j++) { c[j] = b->qs[j] & 15; c[j + 16] = b->qs[j] >> 4; }
        d = eora_f16_to_f32(b->d); m = 8.0f * d;
        break;
    }
    case EORA_TYPE_Q4_1: {
        const blk_q4_1 *b = (const blk_q4_1 *)p;
        for (int j = 0; j < 16; j++) { c[j] = b->qs[j] & 15; c[j + 16] = b->qs[j] >> 4; }
        d = eora_f16_to_f32(b->d); m = -eora_f16_to_f32(b->m);
        break;
    }
    case EORA_TYPE_Q5_0: case EORA_TYPE_Q5_1: {
        const int is1 = type == EORA_TYPE_Q5_1;
        const uint8_t *qh = is1 ? ((const blk_q5_1 *)p)->qh : ((const blk_q5_0 *)p)->qh;
        const uint8_t *qs = is1 ? ((const blk_q5_1 *)p)->qs : ((const blk_q5_0 *)p)->qs;
        uint32_t h = load_u32(qh);
        for (int j = 0; j < 16; j++) {
            c[j] = (uint8_t)((qs[j] & 15) | ((h >> j) & 1) << 4);
            c[j + 16] = (uint8_t)((qs[j] >> 4) | ((h >> (j + 16)) & 1) << 4);
        }
        d = eora_f16_to_f32(((const blk_q5_0 *)p)->d);
        m = is1 ? -eora_f16_to_f32(((const blk_q5_1 *)p)->m) : 16.0f * d;
        break;
    }
    case EORA_TYPE_Q8_0: {
        const blk_q8_0 *b = (const blk_q8_0 *)p;
        for (int j = 0; j < 32; j++) c[j] = (uint8_t)b->qs[j] ^ 0x80;
        d = eora_f16_to_f32(b->d); m = 128.0f * d;
        break;
    }
    case EORA_TYPE_IQ4_NL: {
        const blk_iq4_nl *b = (const blk_iq4_nl *)p;
        for (int j = 0; j < 16; j++) {
            c[j] = (uint8_t)(eora_iq4_levels[b->qs[j] & 15] + 128);
            c[j + 16] = (uint8_t)(eora_iq4_levels[b->qs[j] >> 4] + 128);
        }
        d = eora_f16_to_f32(b->d); m = 128.0f * d;
        break;
    }
    default: d = m = 0; break;
    }
    ds[0] = ds[1] = d;
    dm[0] = dm[1] = m;
}

#if defined(__AVX2__)
/* Hand-vectorized unpacking of the types in the benchmark table; the portable C above covers the rest.
 * 16-bit lane shifts are safe here because every shift is followed by a per-byte mask. */
static inline float f16c(uint16_t h) { return _cvtsh_ss(h); }

/* ds[0..15] = d * u8/i8 values, 16 groups */
static inline void scale16_u8(__m128i v, float d, float *out) {
    __m256 dv = _mm256_set1_ps(d);
    _mm256_storeu_ps(out, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)))));
}
static inline void scale16_i8(__m128i v, float d, float *out) {
    __m256 dv = _mm256_set1_ps(d);
    _mm256_storeu_ps(out, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))));
}
static inline __m256i load256(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void store256(void *p, __m256i v) { _mm256_storeu_si256((__m256i *)p, v); }

/* Q4_K/Q5_K six-bit scales and mins, each duplicated to the two 16-groups of its 32-group. */
static inline void k_scales_simd(const uint8_t *s, float d, float dmin, float *ds, float *dm) {
    uint32_t w0, w1, w2;
    memcpy(&w0, s, 4); memcpy(&w1, s + 4, 4); memcpy(&w2, s + 8, 4);
    uint32_t sc_lo = w0 & 0x3f3f3f3fu, mn_lo = w1 & 0x3f3f3f3fu;
    uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    uint32_t mn_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    __m128i sc = _mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo), mn = _mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo);
    scale16_u8(_mm_unpacklo_epi8(sc, sc), d, ds);
    scale16_u8(_mm_unpacklo_epi8(mn, mn), dmin, dm);
}

static inline __attribute__((always_inline)) int unpack_block_simd(int type, const uint8_t *p, uint8_t *c, float *ds, float *dm) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    switch (type) {
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: {
        const int is5 = type == EORA_TYPE_Q5_K;
        const uint8_t *qs = is5 ? ((const blk_q5_k *)p)->qs : ((const blk_q4_k *)p)->qs;
        const blk_q4_k *b = (const blk_q4_k *)p;
        __m256i hv = is5 ? load256(((const blk_q5_k *)p)->qh) : _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            __m256i v = load256(qs + 32 * k);
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (is5) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * k), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * k + 1), one), 4));
            }
            store256(c + 64 * k, lo);
            store256(c + 64 * k + 32, hi);
        }
        k_scales_simd(is5 ? ((const blk_q5_k *)p)->scales : b->scales, f16c(b->d), f16c(b->dmin), ds, dm);
        return 1;
    }
    case EORA_TYPE_Q6_K: {
        const blk_q6_k *b = (const blk_q6_k *)p;
        const __m256i m30 = _mm256_set1_epi8(0x30);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = load256(b->ql + 64 * h), l1 = load256(b->ql + 64 * h + 32), hv = load256(b->qh + 32 * h);
            uint8_t *o = c + 128 * h;
            store256(o, _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 4), m30)));
            store256(o + 32, _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hv, 2), m30)));
            store256(o + 64, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hv, m30)));
            store256(o + 96, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                             _mm256_and_si256(_mm256_srli_epi16(hv, 2), m30)));
        }
        float d = f16c(b->d);
        scale16_i8(_mm_loadu_si128((const __m128i *)b->scales), d, ds);
        for (int g = 0; g < 16; g++) dm[g] = 32.0f * ds[g];
        return 1;
    }
    case EORA_TYPE_Q2_K: {
        const blk_q2_k *b = (const blk_q2_k *)p;
        for (int h = 0; h < 2; h++) {
            __m256i v = load256(b->qs + 32 * h);
            for (int s = 0; s < 4; s++) store256(c + 128 * h + 32 * s, _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), m2));
        }
        __m128i sc = _mm_loadu_si128((const __m128i *)b->scales);
        scale16_u8(_mm_and_si128(sc, _mm_set1_epi8(0x0f)), f16c(b->d), ds);
        scale16_u8(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(0x0f)), f16c(b->dmin), dm);
        return 1;
    }
    case EORA_TYPE_Q3_K: {
        const blk_q3_k *b = (const blk_q3_k *)p;
        __m256i hm = load256(b->hmask);
        for (int h = 0; h < 2; h++) {
            __m256i v = load256(b->qs + 32 * h);
            for (int s = 0; s < 4; s++) {
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(v, 2 * s), m2);
                __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + s), one);
                store256(c + 128 * h + 32 * s, _mm256_or_si256(q, _mm256_slli_epi16(hb, 2)));
            }
        }
        int sc[16];
        q3_k_scales(b->scales, sc);
        float d = f16c(b->d);
        for (int g = 0; g < 16; g++) { ds[g] = d * (float)sc[g]; dm[g] = 4.0f * ds[g]; }
        return 1;
    }
    case EORA_TYPE_Q4_0: {
        const blk_q4_0 *b = (const blk_q4_0 *)p;
        __m128i v = _mm_loadu_si128((const __m128i *)b->qs);
        _mm_storeu_si128((__m128i *)c, _mm_and_si128(v, _mm_set1_epi8(0x0f)));
        _mm_storeu_si128((__m128i *)(c + 16), _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0f)));
        ds[0] = ds[1] = f16c(b->d);
        dm[0] = dm[1] = 8.0f * ds[0];
        return 1;
    }
    case EORA_TYPE_Q8_0: {
        const blk_q8_0 *b = (const blk_q8_0 *)p;
        store256(c, _mm256_xor_si256(load256(b->qs), _mm256_set1_epi8((char)0x80)));
        ds[0] = ds[1] = f16c(b->d);
        dm[0] = dm[1] = 128.0f * ds[0];
        return 1;
    }
    default: return 0;
    }
}
#else
static inline __attribute__((always_inline)) int unpack_block_simd(int type, const uint8_t *p, uint8_t *c, float *ds, float *dm) {
    (void)type; (void)p; (void)c; (void)ds; (void)dm;
    return 0;
}
#endif

static void K(unpack)(int type, const void *row, int64_t d_in, uint8_t *codes, float *ds, float *dm) {
    const eora_type_traits *t = eora_traits(type);
    const uint8_t *p = row;
    int64_t nb = d_in / t->block_elems;
    const int64_t e = t->block_elems;
#if defined(__AVX2__)
    const int64_t g = e / 16;
#define SIMD_LOOP(T)                                                                                         \
    case T:                                                                                                  \
        for (int64_t i = 0; i < nb; i++) unpack_block_simd(T, p + i * t->block_bytes, codes + e * i, ds + g * i, dm + g * i); \
        return;
    switch (type) {  /* one loop per type so the block decoder inlines without a per-block switch */
    SIMD_LOOP(EORA_TYPE_Q4_K) SIMD_LOOP(EORA_TYPE_Q5_K) SIMD_LOOP(EORA_TYPE_Q6_K) SIMD_LOOP(EORA_TYPE_Q2_K)
    SIMD_LOOP(EORA_TYPE_Q3_K) SIMD_LOOP(EORA_TYPE_Q4_0) SIMD_LOOP(EORA_TYPE_Q8_0)
    default: break;
    }
#undef SIMD_LOOP
#endif
    if (e == 256) {
        for (int64_t i = 0; i < nb; i++) unpack_block_k(type, p + i * t->block_bytes, codes + 256 * i, ds + 16 * i, dm + 16 * i);
    } else {
        for (int64_t i = 0; i < nb; i++) unpack_block_32(type, p + i * t->block_bytes, codes + 32 * i, ds + 2 * i, dm + 2 * i);
    }
}

static void K(dequant)(int type, const void *row, int64_t d_in, float *out) { dequant_row(type, row, out, d_in); }

static void K(adapter_row)(int type, const void *row, int64_t n, float *out) {
#if defined(__F16C__) && defined(__AVX2__)
    if (type == EORA_TYPE_F16) {
        const uint16_t *h = row;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
        for (; i < n; i++) out[i] = eora_f16_to_f32(h[i]);
        return;
    }
#endif
    dequant_row(type, row, out, n);
}

static float K(dot_f32)(const float *a, const float *b, int64_t n);

static float K(adapter_dot)(int type, const void *row, const float *v, int64_t n) {
    if (type == EORA_TYPE_F32) return K(dot_f32)(row, v, n);
    int64_t i = 0;
    float total = 0;
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
    if (type == EORA_TYPE_F16) {
        const uint16_t *h = row;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))), _mm256_loadu_ps(v + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i + 8))), _mm256_loadu_ps(v + i + 8), acc1);
        }
        __m256 acc = _mm256_add_ps(acc0, acc1);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        total = _mm_cvtss_f32(s);
        for (; i < n; i++) total += eora_f16_to_f32(h[i]) * v[i];
        return total;
    }
#endif
    if (type == EORA_TYPE_F16) {
        const uint16_t *h = row;
#if !defined(__AVX2__)
        float acc[2][8] = {{0}}, lane[8];
        for (; i + 16 <= n; i += 16)
            for (int j = 0; j < 16; j++) acc[j / 8][j % 8] = fmaf(eora_f16_to_f32(h[i + j]), v[i + j], acc[j / 8][j % 8]);
        for (int j = 0; j < 8; j++) lane[j] = acc[0][j] + acc[1][j];
        total = eora_hsum8(lane);
#endif
        for (; i < n; i++) total += eora_f16_to_f32(h[i]) * v[i];
        return total;
    }
    /* Q8_0 */
    const blk_q8_0 *b = row;
    for (int64_t k = 0; k < n / 32; k++) {
        float s = 0;
        for (int j = 0; j < 32; j++) s += (float)b[k].qs[j] * v[32 * k + j];
        total += eora_f16_to_f32(b[k].d) * s;
    }
    return total;
}

/* ---- activations: 8-bit codes in blocks of 32, scale max|x| / 127 ---- */

static void K(quantize_x)(const float *x, int64_t d_in, eora_qx *o) {
    for (int64_t b = 0; b < d_in / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = d > 0 ? 127.0f / amax : 0.0f;
        int sum[2] = {0, 0};
        for (int j = 0; j < 32; j++) {
            int q = (int)lrintf(xb[j] * id);
            o->q[32 * b + j] = (int8_t)q;
            sum[j / 16] += q;
        }
        for (int h = 0; h < 2; h++) { o->d16[2 * b + h] = d; o->s16[2 * b + h] = d * (float)sum[h]; }
    }
}

/* ---- sum_i w[i] x[i] = sum_g ds[g] d16[g] sum_{i in g} codes[i] q[i]  -  sum_g dm[g] s16[g] ---- */

static float K(dot_q)(const uint8_t *codes, const float *ds, const float *dm, const eora_qx *x) {
    const int64_t ng = x->d_in / 16;
    int64_t g = 0;
    float total = 0, mins = 0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    {
        const __m512i lane_group = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; g + 8 <= ng; g += 8) {  /* 128 elements, 8 groups */
            __m256 sc8 = _mm256_mul_ps(_mm256_loadu_ps(ds + g), _mm256_loadu_ps(x->d16 + g));
            __m512 sc = _mm512_castps256_ps512(sc8);
            __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(codes + 16 * g),
                                             _mm512_loadu_si512(x->q + 16 * g));
            __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(codes + 16 * g + 64),
                                             _mm512_loadu_si512(x->q + 16 * g + 64));
            __m512 s0 = _mm512_permutexvar_ps(lane_group, sc);
            __m512 s1 = _mm512_permutexvar_ps(_mm512_add_epi32(lane_group, _mm512_set1_epi32(4)), sc);
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), s0, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), s1, acc1);
        }
        total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    {
        __m256 acc = _mm256_setzero_ps();
        for (; g < ng; g++) {
            __m256i cw = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + 16 * g)));
            __m256i cx = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(x->q + 16 * g)));
            __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(cw, cx));
            acc = _mm256_fmadd_ps(p, _mm256_set1_ps(ds[g] * x->d16[g]), acc);
        }
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        total = _mm_cvtss_f32(s);
    }
#else
    {
        float acc[8] = {0};
        for (; g < ng; g++)
            for (int j = 0; j < 8; j++)
                acc[j] = fmaf((float)(codes[16 * g + 2 * j] * x->q[16 * g + 2 * j] +
                                      codes[16 * g + 2 * j + 1] * x->q[16 * g + 2 * j + 1]),
                              ds[g] * x->d16[g], acc[j]);
        total = eora_hsum8(acc);
    }
#endif
    for (; g < ng; g++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += (int32_t)codes[16 * g + j] * (int32_t)x->q[16 * g + j];
        total += ds[g] * x->d16[g] * (float)s;
    }
    float part[16] = {0};
    int64_t h = 0;
    for (; h + 16 <= ng; h += 16)
        for (int j = 0; j < 16; j++) part[j] += dm[h + j] * x->s16[h + j];
    for (; h < ng; h++) mins += dm[h] * x->s16[h];
    for (int j = 0; j < 16; j++) mins += part[j];
    return total - mins;
}

static float K(dot_f32)(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float total = 0;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    total = _mm_cvtss_f32(s);
#else
    float acc[2][8] = {{0}}, lane[8];
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j / 8][j % 8] = fmaf(a[i + j], b[i + j], acc[j / 8][j % 8]);
    for (int j = 0; j < 8; j++) lane[j] = acc[0][j] + acc[1][j];
    total = eora_hsum8(lane);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

const eora_kernels K(eora_kernels) = {
    .name = EORA_ISA_NAME,
    .unpack = K(unpack),
    .dequant = K(dequant),
    .adapter_row = K(adapter_row),
    .dot_q = K(dot_q),
    .dot_f32 = K(dot_f32),
    .adapter_dot = K(adapter_dot),
    .quantize_x = K(quantize_x),
};
