/* The per-lane arithmetic of the CUDA kernels, as host/device functions: the kernels in eora_cuda.cu call them
 * with lane = threadIdx.x % 32, and emu.cpp calls them for lanes 0..31 in a loop, so the tests exercise the
 * decode, the unit-to-lane split, the token and row clamping and the adapter split on machines without a GPU.
 * Only the warp reductions, shared-memory staging and launch geometry are GPU-only. */
#ifndef EORA_CUDA_FUSED_CUH
#define EORA_CUDA_FUSED_CUH

#include <math.h>

#include "quant.cuh"

namespace eora_cuda {

EORA_HD float fma_f(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return fmaf(a, b, c);
#endif
}

/* 16 consecutive floats of x; p is 16-byte aligned (x base checked, rows and groups are multiples of 16). */
EORA_HD void ld_x16(const float *p, float v[16]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float4 f = __ldg(reinterpret_cast<const float4 *>(p) + i);
        v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
    }
#else
    memcpy(v, p, 64);
#endif
}

/* acc[r][t] += this lane's share of sum_i W[row r, i] x[token t, i]: units lane, lane + nlanes, ... of each
 * row. rows[r] points at row r's first block; xt[t] at token t's activations; lv = the 16 IQ4 levels. */
template <class Q, int A, int NT, int R>
EORA_HD void lane_rows(const uint8_t *const rows[R], int64_t n_units, int lane, int nlanes,
                       const float *const xt[NT], const float *lv, float acc[R][NT]) {
    for (int64_t un = lane; un < n_units; un += nlanes) {
        const int64_t blk = un / Q::UPB;
        const int u = (int)(un % Q::UPB);
        typename Q::U U[R];
#pragma unroll
        for (int r = 0; r < R; r++) Q::template load<A>(rows[r] + blk * Q::BYTES, u, U[r]);
#pragma unroll
        for (int g = 0; g < Q::G; g++) {
            const int64_t e0 = blk * Q::QK + Q::start(u, g);
            float xv[NT][16], xs[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) {
                ld_x16(xt[t] + e0, xv[t]);
                xs[t] = 0.0f;
                if (Q::HAS_OFF) {
#pragma unroll
                    for (int i = 0; i < 16; i++) xs[t] += xv[t][i];
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float c[16];
                Q::codes(U[r], g, c, lv);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    float s = 0.0f;
#pragma unroll
                    for (int i = 0; i < 16; i++) s = fma_f(c[i], xv[t][i], s);
                    acc[r][t] = fma_f(U[r].scale[g], s, acc[r][t]);
                    if (Q::HAS_OFF) acc[r][t] = fma_f(-U[r].off[g], xs[t], acc[r][t]);
                }
            }
        }
    }
}

/* acc[r][t] += this lane's share of sum_k B[row r, k] t[token t, k]; tt[t] points at token t's rank values. */
template <int NT, int R>
EORA_HD void lane_adapter(int b_type, const uint8_t *const brows[R], int64_t rank, int lane, int nlanes,
                          const float *const tt[NT], float acc[R][NT]) {
    for (int64_t k = lane; k < rank; k += nlanes) {
        float tv[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) tv[t] = tt[t][k];
#pragma unroll
        for (int r = 0; r < R; r++) {
            float bv = adapter_value(b_type, brows[r], k);
#pragma unroll
            for (int t = 0; t < NT; t++) acc[r][t] = fma_f(bv, tv[t], acc[r][t]);
        }
    }
}

/* acc[t] += this lane's share of sum_{i in [i0, i1)} A[row, i] x[token t, i] for tokens tok0 .. tok0 + nt - 1. */
constexpr int AX_TOKENS = 4;
EORA_HD void lane_ax(int a_type, const uint8_t *arow, int64_t i0, int64_t i1, int lane, int nlanes, const float *x,
                     int64_t d_in, int64_t tok0, int nt, float acc[AX_TOKENS]) {
    for (int64_t i = i0 + lane; i < i1; i += nlanes) {
        float av = adapter_value(a_type, arow, i);
#pragma unroll
        for (int t = 0; t < AX_TOKENS; t++)
            if (t < nt) acc[t] = fma_f(av, x[(tok0 + t) * d_in + i], acc[t]);
    }
}

/* How A.x is split over the K dimension: ksplit slices of `slice` elements (a multiple of 32). */
struct AxSplit {
    int ksplit;
    int64_t slice;
};

constexpr int KSPLIT_MAX = 16;

inline AxSplit ax_split(int64_t d_in, int64_t rank, int sm_count, bool t_shared) {
    int64_t want = t_shared ? ((int64_t)sm_count * 16 + rank - 1) / rank : 1;
    int64_t most = d_in / 128 > 1 ? d_in / 128 : 1;
    if (want > most) want = most;
    if (want > KSPLIT_MAX) want = KSPLIT_MAX;
    if (want < 1) want = 1;
    int64_t slice = (d_in + want - 1) / want;
    slice = (slice + 31) / 32 * 32;
    return AxSplit{(int)((d_in + slice - 1) / slice), slice};
}

/* Launch geometry of the fused kernel: R rows per warp (sharing each activation load), WARPS warps per block,
 * for NT tokens per pass and G groups per unit (G = 4 units hold twice the code registers: fewer rows keep
 * them out of local memory). First thing to tune on a GPU. */
template <int NT, int G>
struct Geometry {
    static constexpr int R = NT == 1 ? (G == 4 ? 2 : 4) : (G == 4 ? 1 : 2);
    static constexpr int WARPS = 4;
};

/* Shared memory of a fused block: 16 levels + NT * rank staged values of t = A x, when that fits. */
constexpr size_t SMEM_LIMIT = 48 * 1024;
inline bool t_in_shared(int nt, int64_t rank) { return (16 + (size_t)nt * (size_t)rank) * 4 <= SMEM_LIMIT; }

}  // namespace eora_cuda

#endif
