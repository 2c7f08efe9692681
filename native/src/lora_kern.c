/* LoRA products in llama.cpp's CPU arithmetic (eora_lora_t / eora_lora_add in lora.c). Compiled once per
 * instruction set like cpu_kern.c.
 *
 * An order (eora_native.h) fixes how a dot of length k is summed: L partial sums ("flat lanes"), flat lane j
 * adding m[e] * v[e] for e = j (mod L) with fused multiply-adds from +0 in increasing e, over the whole blocks
 * of L elements; then the lanes are added pairwise, halving: s[j] += s[j + h] for h = L/2 ... 1, except that
 * EORA_ORDER_VEC8 ends on adjacent pairs, (s0 + s1) + (s2 + s3); then, for the VEC orders only, the elements
 * after the last whole block are added one by one in fp64 (each product rounded to fp32 first). The result does
 * not depend on how rows or tokens are blocked: each flat lane is an independent chain, so the SIMD code below
 * may compute the chains in any grouping and gives the portable emulation's bits. */
#include <math.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LORA_SIMD 1
#endif

#include "internal.h"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define K(name) CAT(name, EORA_ISA)

static inline float m_elem(int m_type, const void *m, int64_t i) {
#ifdef LORA_SIMD
    if (m_type == EORA_TYPE_F16) return _cvtsh_ss(((const uint16_t *)m)[i]);
#endif
    return m_type == EORA_TYPE_F16 ? eora_f16_to_f32(((const uint16_t *)m)[i]) : ((const float *)m)[i];
}

#ifndef LORA_SIMD
/* The reference: one output, the order written out lane by lane. */
static float dot_order_scalar(int m_type, const void *row, const float *v, int64_t k, int order) {
    const int L = eora_order_lanes(order);
    const int64_t whole = k / L * L;
    float s[64] = {0};
    for (int64_t i = 0; i < whole; i += L)
        for (int j = 0; j < L; j++) s[j] = fmaf(m_elem(m_type, row, i + j), v[i + j], s[j]);
    const int stop = order == EORA_ORDER_VEC8 ? 4 : 1;
    for (int h = L / 2; h >= stop; h /= 2)
        for (int j = 0; j < h; j++) s[j] = s[j] + s[j + h];
    if (order == EORA_ORDER_VEC8) s[0] = (s[0] + s[1]) + (s[2] + s[3]);
    if (whole == k) return s[0];
    double sum = s[0];
    for (int64_t i = whole; i < k; i++) sum += (double)(m_elem(m_type, row, i) * v[i]);
    return (float)sum;
}
#endif

#ifdef LORA_SIMD
static inline __m256 load8(int m_type, const void *m, int64_t i) {
    return m_type == EORA_TYPE_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)m + i)))
                                   : _mm256_loadu_ps((const float *)m + i);
}

/* The last three levels of four 8-lane sums at once (lane j of the result: sum c[j]): lo + hi, then halving
 * ((s0 + s2) + (s1 + s3)) or, for EORA_ORDER_VEC8, adjacent pairs ((s0 + s1) + (s2 + s3)). */
static inline __m128 tree4(__m256 c0, __m256 c1, __m256 c2, __m256 c3, int order) {
    __m128 s0 = _mm_add_ps(_mm256_castps256_ps128(c0), _mm256_extractf128_ps(c0, 1));
    __m128 s1 = _mm_add_ps(_mm256_castps256_ps128(c1), _mm256_extractf128_ps(c1, 1));
    __m128 s2 = _mm_add_ps(_mm256_castps256_ps128(c2), _mm256_extractf128_ps(c2, 1));
    __m128 s3 = _mm_add_ps(_mm256_castps256_ps128(c3), _mm256_extractf128_ps(c3, 1));
    _MM_TRANSPOSE4_PS(s0, s1, s2, s3);  /* s_j now holds lane j of the four sums */
    if (order == EORA_ORDER_VEC8) return _mm_add_ps(_mm_add_ps(s0, s1), _mm_add_ps(s2, s3));
    return _mm_add_ps(_mm_add_ps(s0, s2), _mm_add_ps(s1, s3));
}

/* Chains j1 and j2 (8 flat lanes each) of four rows over the whole blocks of L elements; out[r] = c_j1 + c_j2
 * (j2 < 0: chain j1 alone). */
static inline void chains4(int m_type, const void *const *m, const float *x, int64_t whole, int L, int j1, int j2,
                           __m256 *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    if (j2 < 0) {
        for (int64_t i = 8 * j1; i < whole; i += L) {
            const __m256 xv = _mm256_loadu_ps(x + i);
            a0 = _mm256_fmadd_ps(load8(m_type, m[0], i), xv, a0);
            a1 = _mm256_fmadd_ps(load8(m_type, m[1], i), xv, a1);
            a2 = _mm256_fmadd_ps(load8(m_type, m[2], i), xv, a2);
            a3 = _mm256_fmadd_ps(load8(m_type, m[3], i), xv, a3);
        }
        out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
        return;
    }
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const int64_t d = 8 * (j2 - j1);
    for (int64_t i = 8 * j1; i < whole; i += L) {
        const __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + d);
        a0 = _mm256_fmadd_ps(load8(m_type, m[0], i), xa, a0);
        b0 = _mm256_fmadd_ps(load8(m_type, m[0], i + d), xb, b0);
        a1 = _mm256_fmadd_ps(load8(m_type, m[1], i), xa, a1);
        b1 = _mm256_fmadd_ps(load8(m_type, m[1], i + d), xb, b1);
        a2 = _mm256_fmadd_ps(load8(m_type, m[2], i), xa, a2);
        b2 = _mm256_fmadd_ps(load8(m_type, m[2], i + d), xb, b2);
        a3 = _mm256_fmadd_ps(load8(m_type, m[3], i), xa, a3);
        b3 = _mm256_fmadd_ps(load8(m_type, m[3], i + d), xb, b3);
    }
    out[0] = _mm256_add_ps(a0, b0), out[1] = _mm256_add_ps(a1, b1);
    out[2] = _mm256_add_ps(a2, b2), out[3] = _mm256_add_ps(a3, b3);
}

/* The VEC orders' tail for four rows: each row's sum so far (d) plus the products of elements whole .. k - 1, one
 * by one in fp64, the four rows side by side in one vector (the products are fp32, as in the scalar code). */
static inline __m128 tail4(int m_type, const void *const *m, const float *x, int64_t whole, int64_t k, __m128 d) {
    __m256d sum = _mm256_cvtps_pd(d);
    int64_t i = whole;
    for (; i + 4 <= k; i += 4) {  /* products of four elements of each row, transposed to four per element */
        const __m128 xv = _mm_loadu_ps(x + i);
        __m128 p0, p1, p2, p3;
        if (m_type == EORA_TYPE_F16) {
            p0 = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)m[0] + i))), xv);
            p1 = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)m[1] + i))), xv);
            p2 = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)m[2] + i))), xv);
            p3 = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)((const uint16_t *)m[3] + i))), xv);
        } else {
            p0 = _mm_mul_ps(_mm_loadu_ps((const float *)m[0] + i), xv);
            p1 = _mm_mul_ps(_mm_loadu_ps((const float *)m[1] + i), xv);
            p2 = _mm_mul_ps(_mm_loadu_ps((const float *)m[2] + i), xv);
            p3 = _mm_mul_ps(_mm_loadu_ps((const float *)m[3] + i), xv);
        }
        _MM_TRANSPOSE4_PS(p0, p1, p2, p3);
        sum = _mm256_add_pd(sum, _mm256_cvtps_pd(p0));
        sum = _mm256_add_pd(sum, _mm256_cvtps_pd(p1));
        sum = _mm256_add_pd(sum, _mm256_cvtps_pd(p2));
        sum = _mm256_add_pd(sum, _mm256_cvtps_pd(p3));
    }
    for (; i < k; i++) {
        const __m128 p = _mm_set_ps(m_elem(m_type, m[3], i) * x[i], m_elem(m_type, m[2], i) * x[i],
                                    m_elem(m_type, m[1], i) * x[i], m_elem(m_type, m[0], i) * x[i]);
        sum = _mm256_add_pd(sum, _mm256_cvtps_pd(p));
    }
    return _mm256_cvtpd_ps(sum);
}

/* EORA_ORDER_LANES8, four rows against two tokens (k a multiple of 8). */
static inline void lanes8_4x2(int m_type, const void *const *m, const float *x0, const float *x1, int64_t k,
                              __m128 *d0, __m128 *d1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < k; i += 8) {
        const __m256 u = _mm256_loadu_ps(x0 + i), w = _mm256_loadu_ps(x1 + i);
        __m256 mv = load8(m_type, m[0], i);
        a0 = _mm256_fmadd_ps(mv, u, a0), b0 = _mm256_fmadd_ps(mv, w, b0);
        mv = load8(m_type, m[1], i);
        a1 = _mm256_fmadd_ps(mv, u, a1), b1 = _mm256_fmadd_ps(mv, w, b1);
        mv = load8(m_type, m[2], i);
        a2 = _mm256_fmadd_ps(mv, u, a2), b2 = _mm256_fmadd_ps(mv, w, b2);
        mv = load8(m_type, m[3], i);
        a3 = _mm256_fmadd_ps(mv, u, a3), b3 = _mm256_fmadd_ps(mv, w, b3);
    }
    *d0 = tree4(a0, a1, a2, a3, EORA_ORDER_LANES8);
    *d1 = tree4(b0, b1, b2, b3, EORA_ORDER_LANES8);
}

/* Four rows against one token in any order: the chains in pairs that the tree adds first, then its last levels. */
static inline __m128 dot4(int m_type, const void *const *m, const float *x, int64_t whole, int order) {
    __m256 v[4], w[4];
    switch (order) {
    case EORA_ORDER_LANES8: chains4(m_type, m, x, whole, 8, 0, -1, v); break;
    case EORA_ORDER_LANES16: chains4(m_type, m, x, whole, 16, 0, 1, v); break;
    case EORA_ORDER_VEC8:  /* (c0 + c2) + (c1 + c3) */
        chains4(m_type, m, x, whole, 32, 0, 2, v);
        chains4(m_type, m, x, whole, 32, 1, 3, w);
        for (int r = 0; r < 4; r++) v[r] = _mm256_add_ps(v[r], w[r]);
        break;
    default: {  /* VEC16: ((c0 + c4) + (c2 + c6)) + ((c1 + c5) + (c3 + c7)) */
        __m256 q[4][4];
        for (int j = 0; j < 4; j++) chains4(m_type, m, x, whole, 64, j, j + 4, q[j]);
        for (int r = 0; r < 4; r++)
            v[r] = _mm256_add_ps(_mm256_add_ps(q[0][r], q[2][r]), _mm256_add_ps(q[1][r], q[3][r]));
    }
    }
    return tree4(v[0], v[1], v[2], v[3], order);
}

/* One output of any order: chain c (8 lanes) holds flat lanes 8c .. 8c + 7. */
static float dot_order_simd(int m_type, const void *row, const float *x, int64_t k, int order) {
    const int L = eora_order_lanes(order), C = L / 8;
    const int64_t whole = k / L * L;
    __m256 c[8];
    for (int j = 0; j < C; j++) c[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += L)
        for (int j = 0; j < C; j++) c[j] = _mm256_fmadd_ps(load8(m_type, row, i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), c[j]);
    for (int h = C / 2; h >= 1; h /= 2)  /* the tree's levels above 8 lanes */
        for (int j = 0; j < h; j++) c[j] = _mm256_add_ps(c[j], c[j + h]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(c[0]), _mm256_extractf128_ps(c[0], 1));
    float r;
    if (order == EORA_ORDER_VEC8) {
        s = _mm_hadd_ps(s, s);
        r = _mm_cvtss_f32(_mm_hadd_ps(s, s));
    } else {
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        r = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    if (whole == k) return r;
    double sum = r;
    for (int64_t i = whole; i < k; i++) sum += (double)(m_elem(m_type, row, i) * x[i]);
    return (float)sum;
}
#endif

/* out[n * ldo + r] = dot(m row r, v[n])  (add = 0), or  out[n * ldo + r] += dot(...) * scale  (add = 1),
 * for rows r in [r0, r1) of m (rows of k elements, F16 or F32) and tokens n < nt of v (rows of k floats). */
static void K(lora_rows)(int m_type, const void *m, int64_t k, int64_t r0, int64_t r1, const float *v,
                         int64_t nt, int order, float *out, int64_t ldo, float scale, int add) {
    const size_t esz = m_type == EORA_TYPE_F16 ? 2 : 4;
#define ROW(r) ((const void *)((const uint8_t *)m + (size_t)(r) * (size_t)k * esz))
#define PUT(n, r, val) do { float *o_ = out + (n) * ldo + (r); *o_ = add ? *o_ + (val) * scale : (val); } while (0)
    int64_t r = r0;
#ifdef LORA_SIMD
    const __m128 vs = _mm_set1_ps(scale);
    const int64_t whole = k / eora_order_lanes(order) * eora_order_lanes(order);
    for (; r + 4 <= r1; r += 4) {
        const void *rows[4] = {ROW(r), ROW(r + 1), ROW(r + 2), ROW(r + 3)};
        int64_t n = 0;
        if (order == EORA_ORDER_LANES8)  /* batches: two tokens at a time share each converted row vector */
            for (; n + 2 <= nt; n += 2) {
                __m128 d0, d1;
                lanes8_4x2(m_type, rows, v + n * k, v + (n + 1) * k, k, &d0, &d1);
                float *o0 = out + n * ldo + r, *o1 = o0 + ldo;
                _mm_storeu_ps(o0, add ? _mm_add_ps(_mm_loadu_ps(o0), _mm_mul_ps(d0, vs)) : d0);
                _mm_storeu_ps(o1, add ? _mm_add_ps(_mm_loadu_ps(o1), _mm_mul_ps(d1, vs)) : d1);
            }
        for (; n < nt; n++) {
            const float *x = v + n * k;
            __m128 d = dot4(m_type, rows, x, whole, order);
            if (whole != k) d = tail4(m_type, rows, x, whole, k, d);
            float *o = out + n * ldo + r;
            _mm_storeu_ps(o, add ? _mm_add_ps(_mm_loadu_ps(o), _mm_mul_ps(d, vs)) : d);
        }
    }
    for (; r < r1; r++)
        for (int64_t n = 0; n < nt; n++) PUT(n, r, dot_order_simd(m_type, ROW(r), v + n * k, k, order));
#else
    for (; r < r1; r++)
        for (int64_t n = 0; n < nt; n++) PUT(n, r, dot_order_scalar(m_type, ROW(r), v + n * k, k, order));
#endif
#undef ROW
#undef PUT
}

/* out[i] = f16(x[i]) as fp32 (round to nearest even, as ggml's F16C conversion). */
static void K(round_f16)(const float *x, float *out, int64_t n) {
    int64_t i = 0;
#ifdef LORA_SIMD
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
#endif
    for (; i < n; i++) out[i] = eora_f16_to_f32(eora_f32_to_f16(x[i]));
}

const eora_lora_kernels K(eora_lora_kernels) = {
    .rows = K(lora_rows),
    .round_f16 = K(round_f16),
};
