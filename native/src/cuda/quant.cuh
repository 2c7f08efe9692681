/* GGUF block decoding for the CUDA kernels, written so the same code also compiles as plain host C++
 * (native/src/cuda/emu.cpp builds it that way and the tests check it against the C reference on any machine).
 *
 * Model: a weight row is a sequence of "units". A unit is G groups of 16 elements (G = 2 or 4) whose codes
 * come from one set of loads (e.g. the 16 bytes of Q4_K qs whose low and high nibbles are two different
 * sub-blocks). Within a group every weight is   w = scale * c - off   with c an exact small number:
 *
 *     sum_i w_i x_i = scale * sum_i c_i x_i - off * sum_i x_i
 *
 * so the kernels multiply by the scale once per 16 weights. Codes are made float with the exponent trick
 * (0x4B000000 | u is the float 2^23 + u; subtracting 2^23 + bias leaves u - bias exactly), which costs an
 * integer op and an add instead of a (quarter-rate) int-to-float conversion.
 *
 * Alignment: blocks are packed at their natural 2-byte alignment (Q4_0 18 bytes, Q3_K 110, Q6_K 210). Each
 * type declares ALIGN, the largest power of two (<= 16) dividing its block size; the kernels only use loads
 * wider than 2 bytes when the weight base pointer is ALIGN-aligned (template parameter A), so a block start is
 * never assumed to be more aligned than the layout guarantees.
 *
 * Layout offsets come from blocks.h (offsetof), the one definition shared with the C library. */
#ifndef EORA_CUDA_QUANT_CUH
#define EORA_CUDA_QUANT_CUH

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define _Static_assert static_assert  /* blocks.h is C11; these sources are C++ */
extern "C" {
#include "../blocks.h"
}
#undef _Static_assert

#if defined(__CUDACC__)
#  include <cuda_fp16.h>
#  define EORA_HD __host__ __device__ __forceinline__
#  define EORA_CX __host__ __device__ constexpr
#else
#  define EORA_HD inline
#  define EORA_CX constexpr
#endif

namespace eora_cuda {

/* ---- loads: every pointer here is at least 2-byte aligned ---- */

EORA_HD uint32_t ld_u8(const uint8_t *p) {
#if defined(__CUDA_ARCH__)
    return __ldg(p);
#else
    return *p;
#endif
}

EORA_HD uint32_t ld_u16(const uint8_t *p) {
#if defined(__CUDA_ARCH__)
    return __ldg(reinterpret_cast<const unsigned short *>(p));
#else
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
#endif
}

EORA_HD float as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* Exact IEEE half -> float (subnormals, inf, nan), same bits as the C library's eora_f16_to_f32. */
EORA_HD float f16_to_f32(uint32_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    return as_float(bits);
#endif
}

EORA_HD float bf16_to_f32(uint32_t h) { return as_float(h << 16); }

EORA_HD float ld_f16(const uint8_t *p) { return f16_to_f32(ld_u16(p)); }

/* 16 bytes at p (p is A-aligned, A in {2, 4, 8, 16}) as 4 little-endian words. */
template <int A>
EORA_HD void ld_bytes16(const uint8_t *p, uint32_t w[4]) {
#if defined(__CUDA_ARCH__)
    if constexpr (A >= 16) {
        uint4 v = __ldg(reinterpret_cast<const uint4 *>(p));
        w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (A >= 8) {
        uint2 a = __ldg(reinterpret_cast<const uint2 *>(p)), b = __ldg(reinterpret_cast<const uint2 *>(p + 8));
        w[0] = a.x; w[1] = a.y; w[2] = b.x; w[3] = b.y;
    } else if constexpr (A >= 4) {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __ldg(reinterpret_cast<const unsigned int *>(p + 4 * i));
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = ld_u16(p + 4 * i) | ld_u16(p + 4 * i + 2) << 16;
    }
#else
    memcpy(w, p, 16);
#endif
}

/* Alignment of (A-aligned base + off). */
EORA_CX int align_at(int A, int off) {
    return off % 16 == 0 ? A : off % 8 == 0 ? (A < 8 ? A : 8) : off % 4 == 0 ? (A < 4 ? A : 4) : 2;
}

EORA_CX int pow2_align(int bytes) { return bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : 2; }

/* Byte k (0..15) of 4 words, shifted right by s and masked: the code of element k of a group. */
EORA_HD uint32_t byte_of(const uint32_t w[4], int k, int s, uint32_t mask) { return (w[k >> 2] >> (8 * (k & 3) + s)) & mask; }

/* u - bias as float, exactly, for 0 <= u < 2^22 and small integer bias. */
EORA_HD float code_f(uint32_t u, float bias) { return as_float(0x4B000000u | u) - (8388608.0f + bias); }

/* Bytes of {hi:lo} picked by the 4 selector nibbles (CUDA's __byte_perm, low 3 bits of each nibble). */
EORA_HD uint32_t byte_perm(uint32_t lo, uint32_t hi, uint32_t sel) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(lo, hi, sel);
#else
    uint64_t v = (uint64_t)hi << 32 | lo;
    uint32_t r = 0;
    for (int n = 0; n < 4; n++) r |= (uint32_t)((v >> (8 * ((sel >> (4 * n)) & 7))) & 0xff) << (8 * n);
    return r;
#endif
}

/* The 16 codes of a group whose bytes are already isolated in m (one code per byte): byte k becomes the float
 * 2^23 + code with one byte permute (0x4B0000XX), then one subtraction. */
EORA_HD void codes16(const uint32_t m[4], float bias, float c[16]) {
    for (int k = 0; k < 16; k++) c[k] = as_float(byte_perm(m[k >> 2], 0x4B000000u, 0x7440u | (k & 3))) - (8388608.0f + bias);
}

/* Bits 0..3 of b spread to bit 0 of bytes 0..3 (no carries: the four shifted copies do not overlap). */
EORA_HD uint32_t spread4(uint32_t b) { return (b * 0x00204081u) & 0x01010101u; }

/* Lookup levels (IQ4_NL/IQ4_XS) are passed in as floats; other types ignore `lv`. */

/* ---- per-type decoders ----
 * QK: elements per block; BYTES: bytes per block; UPB: units per block; G: groups per unit;
 * U: the registers one unit needs; load<A>(block, u, U&); start(u, g): first element (within the block) of
 * group g of unit u; codes(U, g, c, lv): the 16 exact codes of group g; scale/off in U. */

struct QQ4_0 {
    static constexpr int TYPE = 2, QK = 32, BYTES = sizeof(blk_q4_0), UPB = 1, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q4_0, qs))>(b + offsetof(blk_q4_0, qs), o.q);
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(blk_q4_0, d));
        o.off[0] = o.off[1] = 0.0f;
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = (o.q[i] >> (4 * g)) & 0x0F0F0F0Fu;
        codes16(m, 8.0f, c);
    }
};

struct QQ4_1 {
    static constexpr int TYPE = 3, QK = 32, BYTES = sizeof(blk_q4_1), UPB = 1, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = true;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q4_1, qs))>(b + offsetof(blk_q4_1, qs), o.q);
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(blk_q4_1, d));
        o.off[0] = o.off[1] = -ld_f16(b + offsetof(blk_q4_1, m));  /* w = d q + m */
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = (o.q[i] >> (4 * g)) & 0x0F0F0F0Fu;
        codes16(m, 0.0f, c);
    }
};

/* Q5_0 (codes centred on 16) and Q5_1 (an fp16 offset: w = d q + m) share the layout of their codes. */
template <class B, int T, bool WITH_M> struct QQ5 {
    static constexpr int TYPE = T, QK = 32, BYTES = sizeof(B), UPB = 1, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = WITH_M;
    struct U { uint32_t q[4]; uint32_t qh; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        ld_bytes16<align_at(A, offsetof(B, qs))>(b + offsetof(B, qs), o.q);
        const uint8_t *h = b + offsetof(B, qh);
        o.qh = ld_u16(h) | ld_u16(h + 2) << 16;
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(B, d));
        o.off[0] = o.off[1] = 0.0f;
        if constexpr (WITH_M) o.off[0] = o.off[1] = -ld_f16(b + offsetof(blk_q5_1, m));
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++)
            m[i] = ((o.q[i] >> (4 * g)) & 0x0F0F0F0Fu) | spread4((o.qh >> (16 * g + 4 * i)) & 15) << 4;
        codes16(m, WITH_M ? 0.0f : 16.0f, c);
    }
};
using QQ5_0 = QQ5<blk_q5_0, 6, false>;
using QQ5_1 = QQ5<blk_q5_1, 7, true>;

struct QQ8_0 {
    static constexpr int TYPE = 8, QK = 32, BYTES = sizeof(blk_q8_0), UPB = 1, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t q[2][4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q8_0, qs))>(b + offsetof(blk_q8_0, qs), o.q[0]);
        ld_bytes16<align_at(A, offsetof(blk_q8_0, qs) + 16)>(b + offsetof(blk_q8_0, qs) + 16, o.q[1]);
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(blk_q8_0, d));
        o.off[0] = o.off[1] = 0.0f;
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *) {
        /* int8 q as offset binary: (q ^ 0x80) = q + 128 */
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = o.q[g][i] ^ 0x80808080u;
        codes16(m, 128.0f, c);
    }
};

struct QIQ4_NL {
    static constexpr int TYPE = 20, QK = 32, BYTES = sizeof(blk_iq4_nl), UPB = 1, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_iq4_nl, qs))>(b + offsetof(blk_iq4_nl, qs), o.q);
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(blk_iq4_nl, d));
        o.off[0] = o.off[1] = 0.0f;
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *lv) {
        for (int k = 0; k < 16; k++) c[k] = lv[byte_of(o.q, k, 4 * g, 15)];
    }
};

/* Q2_K: unit u (0..3) reads qs[16u .. 16u+16); its 4 groups are j = (u & 1) + 8 (u >> 1) + 2k, code shift 2k. */
struct QQ2_K {
    static constexpr int TYPE = 10, QK = 256, BYTES = sizeof(blk_q2_k), UPB = 4, G = 4, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = true;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    EORA_HD static int group(int u, int k) { return (u & 1) + 8 * (u >> 1) + 2 * k; }
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q2_k, qs))>(b + offsetof(blk_q2_k, qs) + 16 * u, o.q);
        float d = ld_f16(b + offsetof(blk_q2_k, d)), dmin = ld_f16(b + offsetof(blk_q2_k, dmin));
        for (int k = 0; k < G; k++) {
            uint32_t sc = ld_u8(b + offsetof(blk_q2_k, scales) + group(u, k));
            o.scale[k] = d * code_f(sc & 15, 0.0f);
            o.off[k] = dmin * code_f(sc >> 4, 0.0f);
        }
    }
    EORA_HD static int start(int u, int k) { return 16 * group(u, k); }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = (o.q[i] >> (2 * k)) & 0x03030303u;
        codes16(m, 0.0f, c);
    }
};

/* Q3_K: qs as Q2_K (at its own offset); the high bit of group j = jb + 2k is bit (j / 2) of hmask[16 (u & 1) + i]. */
struct QQ3_K {
    static constexpr int TYPE = 11, QK = 256, BYTES = sizeof(blk_q3_k), UPB = 4, G = 4, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t q[4], h[4]; int hs; float scale[G], off[G]; };
    EORA_HD static int group(int u, int k) { return (u & 1) + 8 * (u >> 1) + 2 * k; }
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q3_k, qs))>(b + offsetof(blk_q3_k, qs) + 16 * u, o.q);
        ld_bytes16<align_at(A, offsetof(blk_q3_k, hmask))>(b + offsetof(blk_q3_k, hmask) + 16 * (u & 1), o.h);
        o.hs = 4 * (u >> 1);
        float d = ld_f16(b + offsetof(blk_q3_k, d));
        const uint8_t *s = b + offsetof(blk_q3_k, scales);
        for (int k = 0; k < G; k++) {
            int j = group(u, k);
            uint32_t lo = j < 8 ? ld_u8(s + j) & 15 : ld_u8(s + j - 8) >> 4;
            uint32_t hi = (ld_u8(s + 8 + j % 4) >> (2 * (j / 4))) & 3;
            o.scale[k] = d * code_f(lo | hi << 4, 32.0f);
            o.off[k] = 0.0f;
        }
    }
    EORA_HD static int start(int u, int k) { return 16 * group(u, k); }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *) {
        uint32_t m[4];  /* q2 - 4 (1 - h) = (q2 | h << 2) - 4 */
        for (int i = 0; i < 4; i++) m[i] = ((o.q[i] >> (2 * k)) & 0x03030303u) | ((o.h[i] >> (o.hs + k)) & 0x01010101u) << 2;
        codes16(m, 4.0f, c);
    }
};

/* Six-bit scale and min of sub-block g (0..7) of Q4_K/Q5_K; s = the 12 scale bytes. */
EORA_HD void k_scale_min(const uint8_t *s, int g, uint32_t &sc, uint32_t &mn) {
    if (g < 4) {
        sc = ld_u8(s + g) & 63;
        mn = ld_u8(s + g + 4) & 63;
    } else {
        uint32_t m = ld_u8(s + g + 4);
        sc = (m & 15) | (ld_u8(s + g - 4) >> 6) << 4;
        mn = (m >> 4) | (ld_u8(s + g) >> 6) << 4;
    }
}

/* Q4_K: unit u (0..7) reads qs[16u .. 16u+16); low nibbles are sub-block 2 (u >> 1), high nibbles the next. */
struct QQ4_K {
    static constexpr int TYPE = 12, QK = 256, BYTES = sizeof(blk_q4_k), UPB = 8, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = true;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q4_k, qs))>(b + offsetof(blk_q4_k, qs) + 16 * u, o.q);
        float d = ld_f16(b + offsetof(blk_q4_k, d)), dmin = ld_f16(b + offsetof(blk_q4_k, dmin));
        for (int k = 0; k < G; k++) {
            uint32_t sc, mn;
            k_scale_min(b + offsetof(blk_q4_k, scales), 2 * (u >> 1) + k, sc, mn);
            o.scale[k] = d * code_f(sc, 0.0f);
            o.off[k] = dmin * code_f(mn, 0.0f);
        }
    }
    EORA_HD static int start(int u, int k) { return 32 * (2 * (u >> 1) + k) + 16 * (u & 1); }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = (o.q[i] >> (4 * k)) & 0x0F0F0F0Fu;
        codes16(m, 0.0f, c);
    }
};

/* Q5_K: as Q4_K plus the fifth bit, bit g of qh[16 (u & 1) + i] for sub-block g. */
struct QQ5_K {
    static constexpr int TYPE = 13, QK = 256, BYTES = sizeof(blk_q5_k), UPB = 8, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = true;
    struct U { uint32_t q[4], h[4]; int hs; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_q5_k, qs))>(b + offsetof(blk_q5_k, qs) + 16 * u, o.q);
        ld_bytes16<align_at(A, offsetof(blk_q5_k, qh))>(b + offsetof(blk_q5_k, qh) + 16 * (u & 1), o.h);
        o.hs = 2 * (u >> 1);
        float d = ld_f16(b + offsetof(blk_q5_k, d)), dmin = ld_f16(b + offsetof(blk_q5_k, dmin));
        for (int k = 0; k < G; k++) {
            uint32_t sc, mn;
            k_scale_min(b + offsetof(blk_q5_k, scales), 2 * (u >> 1) + k, sc, mn);
            o.scale[k] = d * code_f(sc, 0.0f);
            o.off[k] = dmin * code_f(mn, 0.0f);
        }
    }
    EORA_HD static int start(int u, int k) { return 32 * (2 * (u >> 1) + k) + 16 * (u & 1); }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++) m[i] = ((o.q[i] >> (4 * k)) & 0x0F0F0F0Fu) | ((o.h[i] >> (o.hs + k)) & 0x01010101u) << 4;
        codes16(m, 0.0f, c);
    }
};

/* Q6_K: unit u = (half hh = u >> 1, s = u & 1) holds groups j = 8 hh + 2k + s, k = 0..3: low nibbles from
 * ql[64 hh + 16 s + 32 (k & 1) + i] (shift 4 (k >> 1)), top bits from qh[32 hh + 16 s + i] (shift 2k). */
struct QQ6_K {
    static constexpr int TYPE = 14, QK = 256, BYTES = sizeof(blk_q6_k), UPB = 4, G = 4, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t ql[2][4], qh[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        const uint8_t *ql = b + offsetof(blk_q6_k, ql) + 64 * (u >> 1) + 16 * (u & 1);
        ld_bytes16<align_at(A, offsetof(blk_q6_k, ql))>(ql, o.ql[0]);
        ld_bytes16<align_at(A, offsetof(blk_q6_k, ql))>(ql + 32, o.ql[1]);
        ld_bytes16<align_at(A, offsetof(blk_q6_k, qh))>(b + offsetof(blk_q6_k, qh) + 32 * (u >> 1) + 16 * (u & 1), o.qh);
        float d = ld_f16(b + offsetof(blk_q6_k, d));
        for (int k = 0; k < G; k++) {
            int32_t sc = (int8_t)ld_u8(b + offsetof(blk_q6_k, scales) + 8 * (u >> 1) + 2 * k + (u & 1));
            o.scale[k] = d * code_f((uint32_t)(sc + 128), 128.0f);
            o.off[k] = 0.0f;
        }
    }
    EORA_HD static int start(int u, int k) { return 16 * (8 * (u >> 1) + 2 * k + (u & 1)); }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *) {
        uint32_t m[4];
        for (int i = 0; i < 4; i++)
            m[i] = ((o.ql[k & 1][i] >> (4 * (k >> 1))) & 0x0F0F0F0Fu) | ((o.qh[i] >> (2 * k)) & 0x03030303u) << 4;
        codes16(m, 32.0f, c);
    }
};

/* IQ4_XS: unit u = sub-block u (0..7) of 32: qs[16u + i], low nibbles elements 32u + i, high 32u + 16 + i. */
struct QIQ4_XS {
    static constexpr int TYPE = 23, QK = 256, BYTES = sizeof(blk_iq4_xs), UPB = 8, G = 2, ALIGN = pow2_align(BYTES);
    static constexpr bool HAS_OFF = false;
    struct U { uint32_t q[4]; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int u, U &o) {
        ld_bytes16<align_at(A, offsetof(blk_iq4_xs, qs))>(b + offsetof(blk_iq4_xs, qs) + 16 * u, o.q);
        uint32_t lo = (ld_u8(b + offsetof(blk_iq4_xs, scales_l) + u / 2) >> (4 * (u % 2))) & 15;
        uint32_t hi = (ld_u16(b + offsetof(blk_iq4_xs, scales_h)) >> (2 * u)) & 3;
        o.scale[0] = o.scale[1] = ld_f16(b + offsetof(blk_iq4_xs, d)) * code_f(lo | hi << 4, 32.0f);
        o.off[0] = o.off[1] = 0.0f;
    }
    EORA_HD static int start(int u, int k) { return 32 * u + 16 * k; }
    EORA_HD static void codes(const U &o, int k, float c[16], const float *lv) {
        for (int i = 0; i < 16; i++) c[i] = lv[byte_of(o.q, i, 4 * k, 15)];
    }
};

/* Float weights as 32-element "blocks" (rows must be a multiple of 32 elements); codes are the values. */
template <int T, int ESIZE>
struct QFloat {
    static constexpr int TYPE = T, QK = 32, BYTES = 32 * ESIZE, UPB = 1, G = 2, ALIGN = 2;  /* u16 loads */
    static constexpr bool HAS_OFF = false;
    struct U { const uint8_t *p; float scale[G], off[G]; };
    template <int A> EORA_HD static void load(const uint8_t *b, int, U &o) {
        o.p = b;
        o.scale[0] = o.scale[1] = 1.0f;
        o.off[0] = o.off[1] = 0.0f;
    }
    EORA_HD static int start(int, int g) { return 16 * g; }
    EORA_HD static void codes(const U &o, int g, float c[16], const float *) {
        for (int i = 0; i < 16; i++) {
            const uint8_t *e = o.p + (16 * g + i) * ESIZE;
            if (T == 0) c[i] = as_float(ld_u16(e) | ld_u16(e + 2) << 16);
            else if (T == 1) c[i] = f16_to_f32(ld_u16(e));
            else c[i] = bf16_to_f32(ld_u16(e));
        }
    }
};
using QF32 = QFloat<0, 4>;
using QF16 = QFloat<1, 2>;
using QBF16 = QFloat<30, 2>;

/* Calls f.template operator()<Q>() for the decoder of `type`; returns false for types without one. */
template <class F>
bool dispatch_type(int type, F &&f) {
    switch (type) {
    case 0: f.template run<QF32>(); return true;
    case 1: f.template run<QF16>(); return true;
    case 30: f.template run<QBF16>(); return true;
    case 2: f.template run<QQ4_0>(); return true;
    case 3: f.template run<QQ4_1>(); return true;
    case 6: f.template run<QQ5_0>(); return true;
    case 7: f.template run<QQ5_1>(); return true;
    case 8: f.template run<QQ8_0>(); return true;
    case 10: f.template run<QQ2_K>(); return true;
    case 11: f.template run<QQ3_K>(); return true;
    case 12: f.template run<QQ4_K>(); return true;
    case 13: f.template run<QQ5_K>(); return true;
    case 14: f.template run<QQ6_K>(); return true;
    case 20: f.template run<QIQ4_NL>(); return true;
    case 23: f.template run<QIQ4_XS>(); return true;
    default: return false;
    }
}

/* Dequantized value of element (unit u, group g, index i), rounded as the C reference rounds it:
 * scale * code, then minus off, as two separately rounded operations. Float types are returned as is. */
template <class Q>
EORA_HD float dequant_value(const typename Q::U &o, int g, float c) {
    if (Q::TYPE == 0 || Q::TYPE == 1 || Q::TYPE == 30) return c;
#if defined(__CUDA_ARCH__)
    return Q::HAS_OFF ? __fsub_rn(__fmul_rn(o.scale[g], c), o.off[g]) : __fmul_rn(o.scale[g], c);
#else
    volatile float p = o.scale[g] * c;  /* no contraction into an FMA */
    return Q::HAS_OFF ? p - o.off[g] : p;
#endif
}

/* Adapter element k of a row (F32, F16 or Q8_0), as an fp32 value. */
EORA_HD float adapter_value(int type, const uint8_t *row, int64_t k) {
    if (type == 1) return f16_to_f32(ld_u16(row + 2 * k));
    if (type == 0) return as_float(ld_u16(row + 4 * k) | ld_u16(row + 4 * k + 2) << 16);
    const uint8_t *blk = row + (k / 32) * sizeof(blk_q8_0);  /* Q8_0 */
    int32_t q = (int8_t)ld_u8(blk + offsetof(blk_q8_0, qs) + (k % 32));
    return ld_f16(blk + offsetof(blk_q8_0, d)) * (float)q;
}

}  // namespace eora_cuda

#endif
