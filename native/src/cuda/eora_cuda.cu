/* CUDA kernels and entry points: dequantization and the fused product y = dequant(Wq) x + B (A x).
 *
 * Two launches per fused call (one without an adapter):
 *  1. ax_kernel: partial[s][tok][k] = A[k, slice s] . x[tok, slice s], one warp per (row k, slice s); the K
 *     dimension is split so that even a rank-16 adapter spreads over every SM.
 *  2. fused_kernel<Q, A, NT>: a block first sums the slices of t = A x for its NT tokens into shared memory,
 *     then each warp takes R weight rows; every lane walks units (16-byte code loads, 32 or 64 weights) of
 *     those rows with the activations of the unit's groups in registers, shared by the R rows. Then
 *     B[row] . t is added to the same accumulators, one warp reduction, one store per output.
 * All arithmetic is fp32 (activations are not quantized); see docs/native.md. */
#include <cuda_runtime.h>

#include <mutex>
#include <stdio.h>
#include <stdlib.h>

#include "fused.cuh"  /* first: it includes blocks.h the C++ way */
extern "C" {
#include "../checks.h"
}

using namespace eora_cuda;

namespace {

struct Levels { float v[16]; };

Levels iq4_levels() {
    Levels l;
    for (int i = 0; i < 16; i++) l.v[i] = (float)eora_iq4_levels[i];
    return l;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* ---- kernels ---- */

struct AxParams {
    const uint8_t *a;
    int a_type;
    int64_t a_row_bytes, d_in, n_tokens, rank, slice;
    int ksplit;
    const float *x;
    float *partial;  /* (ksplit, n_tokens, rank) */
};

constexpr int AX_WARPS = 4;

__global__ void __launch_bounds__(32 * AX_WARPS) ax_kernel(AxParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cudaTriggerProgrammaticLaunchCompletion();  /* let fused_kernel start its weight rows now (see there) */
#endif
    const int lane = threadIdx.x & 31;
    const int64_t gw = (int64_t)blockIdx.x * AX_WARPS + (threadIdx.x >> 5);
    if (gw >= p.rank * p.ksplit) return;
    const int64_t k = gw % p.rank, s = gw / p.rank;
    const int64_t i0 = s * p.slice, i1 = i0 + p.slice < p.d_in ? i0 + p.slice : p.d_in;
    const uint8_t *arow = p.a + k * p.a_row_bytes;
    for (int64_t tok0 = 0; tok0 < p.n_tokens; tok0 += AX_TOKENS) {
        const int nt = p.n_tokens - tok0 < AX_TOKENS ? (int)(p.n_tokens - tok0) : AX_TOKENS;
        float acc[AX_TOKENS] = {0.0f, 0.0f, 0.0f, 0.0f};
        lane_ax(p.a_type, arow, i0, i1, lane, 32, p.x, p.d_in, tok0, nt, acc);
#pragma unroll
        for (int t = 0; t < AX_TOKENS; t++) {
            float v = warp_sum(acc[t]);
            if (lane == 0 && t < nt) p.partial[(s * p.n_tokens + tok0 + t) * p.rank + k] = v;
        }
    }
}

struct FusedParams {
    const uint8_t *w;
    int64_t w_row_bytes, d_out, d_in, n_units, n_tokens, n_tok_groups;
    const float *x;
    const uint8_t *b;
    int b_type;
    int64_t b_row_bytes, rank;
    const float *partial;  /* (ksplit, n_tokens, rank); ksplit == 1 when t is not staged in shared memory */
    int ksplit, t_shared;
    float *y;
    Levels levels;
};

template <class Q, int A, int NT>
__global__ void __launch_bounds__(32 * Geometry<NT, Q::G>::WARPS) fused_kernel(FusedParams p) {
    constexpr int R = Geometry<NT, Q::G>::R, WARPS = Geometry<NT, Q::G>::WARPS;
    extern __shared__ float smem[];
    float *lv = smem, *tsh = smem + 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t tg = blockIdx.x % p.n_tok_groups, rg = blockIdx.x / p.n_tok_groups;
    const int64_t tok0 = tg * NT;
    const int64_t o0 = (rg * WARPS + warp) * R;
    const bool active = o0 < p.d_out;  /* warps past the last row only help with the block-wide steps */
    if (threadIdx.x < 16) lv[threadIdx.x] = p.levels.v[threadIdx.x];
    const uint8_t *rows[R];
    const uint8_t *brows[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        int64_t o = o0 + r < p.d_out ? o0 + r : p.d_out - 1;  /* tail rows repeat the last row, not stored */
        rows[r] = p.w + o * p.w_row_bytes;
        brows[r] = p.rank ? p.b + o * p.b_row_bytes : nullptr;
    }
    const float *xt[NT];
    const float *tt[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) {
        int64_t tok = tok0 + t < p.n_tokens ? tok0 + t : p.n_tokens - 1;  /* tail tokens likewise */
        xt[t] = p.x + tok * p.d_in;
        tt[t] = p.t_shared ? tsh + t * p.rank : p.partial + tok * p.rank;
    }
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;
    __syncthreads();  /* levels */
    if (active) lane_rows<Q, A, NT, R>(rows, p.n_units, lane, 32, xt, lv, acc);
    if (p.rank) {
        /* t = A x comes from ax_kernel. Launched with programmatic dependent launch (sm_90+), this block may
         * have started before ax_kernel finished: wait for it only now, after the weight rows. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        cudaGridDependencySynchronize();
#endif
        if (p.t_shared) {
            for (int64_t idx = threadIdx.x; idx < NT * p.rank; idx += blockDim.x) {
                int64_t t = idx / p.rank, k = idx % p.rank;
                int64_t tok = tok0 + t < p.n_tokens ? tok0 + t : p.n_tokens - 1;
                float sum = 0.0f;
                for (int sp = 0; sp < p.ksplit; sp++) sum += p.partial[(sp * p.n_tokens + tok) * p.rank + k];
                tsh[idx] = sum;
            }
        }
        __syncthreads();
        if (active) lane_adapter<NT, R>(p.b_type, brows, p.rank, lane, 32, tt, acc);
    }
    if (!active) return;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = warp_sum(acc[r][t]);
            if (lane == r * NT + t && o0 + r < p.d_out && tok0 + t < p.n_tokens) p.y[(tok0 + t) * p.d_out + o0 + r] = v;
        }
}

template <class Q, int A>
__global__ void dequant_kernel(const uint8_t *src, int64_t n_units, float *dst, Levels levels) {
    __shared__ float lv[16];
    if (threadIdx.x < 16) lv[threadIdx.x] = levels.v[threadIdx.x];
    __syncthreads();
    const int64_t un = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (un >= n_units) return;
    const int64_t blk = un / Q::UPB;
    const int u = (int)(un % Q::UPB);
    typename Q::U U;
    Q::template load<A>(src + blk * Q::BYTES, u, U);
#pragma unroll
    for (int g = 0; g < Q::G; g++) {
        float c[16];
        Q::codes(U, g, c, lv);
        float *out = dst + blk * Q::QK + Q::start(u, g);
#pragma unroll
        for (int i = 0; i < 16; i++) out[i] = dequant_value<Q>(U, g, c[i]);
    }
}

__global__ void float_kernel(int type, const uint8_t *src, int64_t n, float *dst) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (type == 0) dst[i] = as_float(ld_u16(src + 4 * i) | ld_u16(src + 4 * i + 2) << 16);
    else if (type == 1) dst[i] = f16_to_f32(ld_u16(src + 2 * i));
    else dst[i] = bf16_to_f32(ld_u16(src + 2 * i));
}

/* ---- host side ---- */

eora_status cuda_fail(cudaError_t e, const char *what) {
    cudaGetLastError();  /* clear a non-sticky error so the next call starts clean */
    return eora_fail(EORA_ERR_CUDA, "%s: CUDA error: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

#define EORA_CU(call, what)                              \
    do {                                                 \
        cudaError_t e_ = (call);                         \
        if (e_ != cudaSuccess) return cuda_fail(e_, what); \
    } while (0)

std::once_flag probe_once;
int probe_count = 0;
cudaError_t probe_error = cudaSuccess;

void probe() {
    std::call_once(probe_once, [] {
        probe_error = cudaGetDeviceCount(&probe_count);
        if (probe_error != cudaSuccess) probe_count = 0;
        cudaGetLastError();
    });
}

eora_status require_device(const char *what) {
    probe();
    if (probe_error != cudaSuccess)
        return eora_fail(EORA_ERR_CUDA, "%s: no usable CUDA device (%s): use the CPU functions", what,
                         cudaGetErrorString(probe_error));
    if (probe_count == 0) return eora_fail(EORA_ERR_CUDA, "%s: no CUDA device found: use the CPU functions", what);
    return EORA_OK;
}

/* The fused product's checks shared by the device and host entry points. */
eora_status device_args(const char *fn, const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                        const eora_matrix *b, float *y, size_t y_bytes, eora_fused_args *f) {
    eora_status s = require_device(fn);
    return s != EORA_OK ? s : eora_fused_args_from(fn, w, x, a, b, y, y_bytes, f);
}

/* Programmatic dependent launch: compute capability 9.0 or newer, unless EORA_CUDA_PDL=0 (for comparisons). */
bool use_pdl() {
    const char *env = getenv("EORA_CUDA_PDL");
    if (env && env[0] == '0') return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return major >= 9;
}

int sm_count() {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        cudaGetLastError();
        return 80;
    }
    return n;
}

/* Device (or managed) memory, not a host pointer the kernel would fault on. Skipped while `stream` is being
 * captured into a graph (the pointers were checked by the eager calls that usually precede a capture). */
eora_status check_device_ptr(const void *p, const char *what, const char *fn, cudaStream_t stream) {
    if (!p) return EORA_OK;
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &cap) != cudaSuccess || cap != cudaStreamCaptureStatusNone) {
        cudaGetLastError();
        return EORA_OK;
    }
    cudaPointerAttributes at;
    cudaError_t e = cudaPointerGetAttributes(&at, p);
    if (e != cudaSuccess) return cuda_fail(e, fn);
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged)
        return eora_fail(EORA_ERR_ARGUMENT, "%s: %s is not device memory: pass device pointers, or use the _host variant",
                         fn, what);
    return EORA_OK;
}

size_t row_bytes(int type, int64_t n) {
    const eora_type_traits *t = eora_traits(type);
    return (size_t)(n / t->block_elems * t->block_bytes);
}

/* The fused launch for decoder Q; picks the aligned load variant when the weight base allows it. */
struct FusedLaunch {
    FusedParams p;
    int nt;
    size_t smem;
    cudaStream_t stream;
    bool pdl;  /* overlap with ax_kernel through programmatic dependent launch */
    template <class Q, int A, int NT>
    void launch() {
        using Geo = Geometry<NT, Q::G>;
        int64_t row_groups = (p.d_out + Geo::R * Geo::WARPS - 1) / (Geo::R * Geo::WARPS);
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3((unsigned)(row_groups * p.n_tok_groups));
        cfg.blockDim = dim3(32 * Geo::WARPS);
        cfg.dynamicSmemBytes = smem;
        cfg.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = pdl ? 1 : 0;
        cudaLaunchKernelEx(&cfg, fused_kernel<Q, A, NT>, p);
    }
    template <class Q, int A>
    void go() {
        if (nt == 1) launch<Q, A, 1>();
        else launch<Q, A, 4>();
    }
    template <class Q>
    void run() {
        if constexpr (Q::ALIGN > 2) {
            if ((uintptr_t)p.w % Q::ALIGN == 0) return go<Q, Q::ALIGN>();
        }
        go<Q, 2>();
    }
};

struct DequantLaunch {
    const uint8_t *src;
    int64_t n_elems;
    float *dst;
    cudaStream_t stream;
    template <class Q, int A>
    void go() {
        int64_t units = n_elems / Q::QK * Q::UPB;
        dequant_kernel<Q, A><<<(unsigned)((units + 127) / 128), 128, 0, stream>>>(src, units, dst, iq4_levels());
    }
    template <class Q>
    void run() {
        if constexpr (Q::TYPE == 0 || Q::TYPE == 1 || Q::TYPE == 30) {
            float_kernel<<<(unsigned)((n_elems + 255) / 256), 256, 0, stream>>>(Q::TYPE, src, n_elems, dst);
        } else {
            if constexpr (Q::ALIGN > 2) {
                if ((uintptr_t)src % Q::ALIGN == 0) return go<Q, Q::ALIGN>();
            }
            go<Q, 2>();
        }
    }
};

}  // namespace

extern "C" {

EORA_API int eora_cuda_available(void) {
    probe();
    return probe_error == cudaSuccess && probe_count > 0;
}

EORA_API const char *eora_cuda_describe(void) {
    static char text[512];
    static std::once_flag once;
    std::call_once(once, [] {
        int rt = 0, drv = 0;
        cudaRuntimeGetVersion(&rt);
        cudaDriverGetVersion(&drv);
        int n = snprintf(text, sizeof text, "CUDA runtime %d.%d (static), built for sm %s; ", rt / 1000, rt % 1000 / 10,
                         EORA_CUDA_ARCHS);
        probe();
        if (probe_error != cudaSuccess || probe_count == 0) {
            snprintf(text + n, sizeof text - n, "no usable device (%s)",
                     probe_error != cudaSuccess ? cudaGetErrorString(probe_error) : "device count 0");
        } else {
            cudaDeviceProp prop;
            int dev = 0;
            cudaGetDevice(&dev);
            if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
                snprintf(text + n, sizeof text - n, "driver %d.%d, device %d: %s (sm_%d%d, %d SMs)", drv / 1000,
                         drv % 1000 / 10, dev, prop.name, prop.major, prop.minor, prop.multiProcessorCount);
        }
        cudaGetLastError();
    });
    return text;
}

EORA_API eora_status eora_cuda_device_props(int *cc_major, int *cc_minor, int *sm_count_out, double *peak_gbps) {
    eora_status s = require_device("cuda_device_props");
    if (s != EORA_OK) return s;
    if (!cc_major || !cc_minor || !sm_count_out || !peak_gbps)
        return eora_fail(EORA_ERR_ARGUMENT, "cuda_device_props: NULL output pointer");
    int dev = 0, clock_khz = 0, bus_bits = 0;
    EORA_CU(cudaGetDevice(&dev), "cuda_device_props");
    EORA_CU(cudaDeviceGetAttribute(cc_major, cudaDevAttrComputeCapabilityMajor, dev), "cuda_device_props");
    EORA_CU(cudaDeviceGetAttribute(cc_minor, cudaDevAttrComputeCapabilityMinor, dev), "cuda_device_props");
    EORA_CU(cudaDeviceGetAttribute(sm_count_out, cudaDevAttrMultiProcessorCount, dev), "cuda_device_props");
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) != cudaSuccess) {
        cudaGetLastError();
        clock_khz = bus_bits = 0;
    }
    *peak_gbps = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;  /* double data rate; 0 if unknown */
    return EORA_OK;
}

EORA_API eora_status eora_cuda_workspace_bytes(int64_t d_in, int64_t n_tokens, int64_t rank, size_t *bytes) {
    if (!bytes) return eora_fail(EORA_ERR_ARGUMENT, "cuda_workspace_bytes: NULL output pointer");
    if (d_in <= 0 || n_tokens <= 0 || rank < 0)
        return eora_fail(EORA_ERR_SHAPE, "cuda_workspace_bytes: d_in=%lld, n_tokens=%lld must be positive, rank=%lld >= 0",
                         (long long)d_in, (long long)n_tokens, (long long)rank);
    *bytes = (size_t)KSPLIT_MAX * (size_t)n_tokens * (size_t)rank * 4;
    return EORA_OK;
}

EORA_API eora_status eora_cuda_dequantize(int type, const void *src, size_t src_bytes, int64_t n_elems, float *dst,
                                          size_t dst_bytes, void *stream) {
    const char *fn = "cuda_dequantize";
    eora_status s = require_device(fn);
    if (s != EORA_OK) return s;
    if ((s = eora_check_dequant(fn, type, src, src_bytes, n_elems, dst, dst_bytes, NULL)) != EORA_OK) return s;
    if ((uintptr_t)src % 2 || (uintptr_t)dst % 4)
        return eora_fail(EORA_ERR_ARGUMENT, "%s: src must be 2-byte and dst 4-byte aligned", fn);
    cudaStream_t st = (cudaStream_t)stream;
    if ((s = check_device_ptr(src, "src", fn, st)) != EORA_OK || (s = check_device_ptr(dst, "dst", fn, st)) != EORA_OK) return s;
    DequantLaunch l{(const uint8_t *)src, n_elems, dst, st};
    dispatch_type(type, l);
    EORA_CU(cudaGetLastError(), fn);
    return EORA_OK;
}

EORA_API eora_status eora_cuda_fused_matmul(const eora_matrix *wm, const eora_matrix *xm, const eora_matrix *am,
                                            const eora_matrix *bm, float *y, size_t y_bytes, void *workspace,
                                            size_t workspace_bytes, void *stream) {
    const char *fn = "cuda_fused_matmul";
    eora_fused_args f;
    eora_status s = device_args(fn, wm, xm, am, bm, y, y_bytes, &f);
    if (s != EORA_OK) return s;
    const int w_type = f.w_type, a_type = f.a_type, b_type = f.b_type;
    const void *w = f.w, *a = f.a, *b = f.b;
    const float *x = f.x;
    const int64_t d_out = f.d_out, d_in = f.d_in, n_tokens = f.n_tokens, rank = f.rank;
    if ((w_type == EORA_TYPE_F32 || w_type == EORA_TYPE_F16 || w_type == EORA_TYPE_BF16) && d_in % 32)
        return eora_fail(EORA_ERR_SHAPE, "%s: float weights need a row length that is a multiple of 32 (got %lld)", fn,
                         (long long)d_in);
    if ((uintptr_t)w % 2 || (uintptr_t)x % 16 || (uintptr_t)y % 4 || (rank && ((uintptr_t)a % 2 || (uintptr_t)b % 2)))
        return eora_fail(EORA_ERR_ARGUMENT, "%s: x must be 16-byte aligned, y 4-byte, w, a and b 2-byte", fn);
    cudaStream_t st = (cudaStream_t)stream;
    if ((s = check_device_ptr(w, "w", fn, st)) != EORA_OK || (s = check_device_ptr(x, "x", fn, st)) != EORA_OK ||
        (s = check_device_ptr(y, "y", fn, st)) != EORA_OK)
        return s;
    if (rank && ((s = check_device_ptr(a, "a", fn, st)) != EORA_OK || (s = check_device_ptr(b, "b", fn, st)) != EORA_OK))
        return s;
    const int nt = n_tokens == 1 ? 1 : 4;
    const bool shared_t = t_in_shared(nt, rank);
    AxSplit sp = rank ? ax_split(d_in, rank, sm_count(), shared_t) : AxSplit{1, d_in};
    size_t need = (size_t)sp.ksplit * (size_t)n_tokens * (size_t)rank * 4;
    float *partial = nullptr;
    bool own = false;
    if (rank) {
        if (workspace) {
            if (workspace_bytes < need)
                return eora_fail(EORA_ERR_BUFFER, "%s: workspace has %zu bytes, %zu needed (eora_cuda_workspace_bytes)", fn,
                                 workspace_bytes, need);
            if ((uintptr_t)workspace % 4) return eora_fail(EORA_ERR_ARGUMENT, "%s: workspace must be 4-byte aligned", fn);
            partial = (float *)workspace;
        } else {
            EORA_CU(cudaMallocAsync((void **)&partial, need, st), fn);
            own = true;
        }
        AxParams ap = {(const uint8_t *)a, a_type, (int64_t)row_bytes(a_type, d_in), d_in, n_tokens, rank, sp.slice,
                       sp.ksplit, x, partial};
        int64_t warps = rank * sp.ksplit;
        ax_kernel<<<(unsigned)((warps + AX_WARPS - 1) / AX_WARPS), 32 * AX_WARPS, 0, st>>>(ap);
    }
    const eora_type_traits *wt = eora_traits(w_type);
    int64_t qk = w_type == EORA_TYPE_F32 || w_type == EORA_TYPE_F16 || w_type == EORA_TYPE_BF16 ? 32 : wt->block_elems;
    int64_t upb = 1;
    switch (w_type) {
    case EORA_TYPE_Q2_K: case EORA_TYPE_Q3_K: case EORA_TYPE_Q6_K: upb = 4; break;
    case EORA_TYPE_Q4_K: case EORA_TYPE_Q5_K: case EORA_TYPE_IQ4_XS: upb = 8; break;
    default: break;
    }
    FusedLaunch l;
    l.p = FusedParams{(const uint8_t *)w, (int64_t)row_bytes(w_type, d_in), d_out, d_in, d_in / qk * upb, n_tokens,
                      (n_tokens + nt - 1) / nt, x, (const uint8_t *)b, b_type,
                      rank ? (int64_t)row_bytes(b_type, rank) : 0, rank, partial, sp.ksplit, shared_t ? 1 : 0, y,
                      iq4_levels()};
    l.nt = nt;
    l.smem = (16 + (shared_t ? (size_t)nt * (size_t)rank : 0)) * 4;
    l.stream = st;
    l.pdl = rank > 0 && use_pdl();
    if (!dispatch_type(w_type, l)) {
        if (own) cudaFreeAsync(partial, st);
        return eora_fail(EORA_ERR_TYPE, "%s: no CUDA kernel for weight type %d", fn, w_type);
    }
    cudaError_t launch = cudaGetLastError();
    if (own) cudaFreeAsync(partial, st);
    if (launch != cudaSuccess) return cuda_fail(launch, fn);
    return EORA_OK;
}

/* ---- host-pointer variants: copy in, run on a private stream, copy out, wait ---- */

namespace {
struct DeviceBuffers {
    void *p[6] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    cudaStream_t stream = nullptr;
    ~DeviceBuffers() {
        if (stream) cudaStreamSynchronize(stream);
        for (void *q : p)
            if (q) cudaFree(q);
        if (stream) cudaStreamDestroy(stream);
    }
};

eora_status upload(DeviceBuffers &d, int slot, const void *src, size_t bytes, const char *fn) {
    if (!src || !bytes) return EORA_OK;
    EORA_CU(cudaMalloc(&d.p[slot], bytes), fn);
    EORA_CU(cudaMemcpyAsync(d.p[slot], src, bytes, cudaMemcpyHostToDevice, d.stream), fn);
    return EORA_OK;
}
}  // namespace

EORA_API eora_status eora_cuda_dequantize_host(int type, const void *src, size_t src_bytes, int64_t n_elems, float *dst,
                                               size_t dst_bytes) {
    const char *fn = "cuda_dequantize";
    eora_status s = require_device(fn);
    if (s != EORA_OK) return s;
    int64_t need = 0;
    if ((s = eora_check_dequant(fn, type, src, src_bytes, n_elems, dst, dst_bytes, &need)) != EORA_OK) return s;
    DeviceBuffers d;
    EORA_CU(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking), fn);
    if ((s = upload(d, 0, src, (size_t)need, fn)) != EORA_OK) return s;
    EORA_CU(cudaMalloc(&d.p[1], (size_t)n_elems * 4), fn);
    if ((s = eora_cuda_dequantize(type, d.p[0], (size_t)need, n_elems, (float *)d.p[1], (size_t)n_elems * 4, d.stream)) != EORA_OK)
        return s;
    EORA_CU(cudaMemcpyAsync(dst, d.p[1], (size_t)n_elems * 4, cudaMemcpyDeviceToHost, d.stream), fn);
    EORA_CU(cudaStreamSynchronize(d.stream), fn);
    return EORA_OK;
}

EORA_API eora_status eora_cuda_fused_matmul_host(const eora_matrix *wm, const eora_matrix *xm, const eora_matrix *am,
                                                 const eora_matrix *bm, float *y, size_t y_bytes) {
    const char *fn = "cuda_fused_matmul";
    eora_fused_args f;
    eora_status s = device_args(fn, wm, xm, am, bm, y, y_bytes, &f);
    if (s != EORA_OK) return s;
    /* eora_check_fused made every buffer exactly as long as its shape needs: copy them whole. */
    DeviceBuffers d;
    EORA_CU(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking), fn);
    if ((s = upload(d, 0, f.w, f.w_bytes, fn)) != EORA_OK || (s = upload(d, 1, f.x, f.x_bytes, fn)) != EORA_OK ||
        (s = upload(d, 2, f.a, f.a_bytes, fn)) != EORA_OK || (s = upload(d, 3, f.b, f.b_bytes, fn)) != EORA_OK)
        return s;
    EORA_CU(cudaMalloc(&d.p[4], y_bytes), fn);
    eora_matrix dw = *wm, dx = *xm, da = am ? *am : eora_matrix{}, db = bm ? *bm : eora_matrix{};
    dw.data = d.p[0], dx.data = d.p[1], da.data = d.p[2], db.data = d.p[3];
    s = eora_cuda_fused_matmul(&dw, &dx, am ? &da : nullptr, bm ? &db : nullptr, (float *)d.p[4], y_bytes, nullptr, 0,
                               d.stream);
    if (s != EORA_OK) return s;
    EORA_CU(cudaMemcpyAsync(y, d.p[4], y_bytes, cudaMemcpyDeviceToHost, d.stream), fn);
    EORA_CU(cudaStreamSynchronize(d.stream), fn);
    return EORA_OK;
}

}  // extern "C"
