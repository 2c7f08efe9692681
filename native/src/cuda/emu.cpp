/* Host emulation of the CUDA kernels, for tests on machines without a GPU (tests/test_cuda.py compiles it with
 * the host C++ compiler). It runs the kernels' own per-lane code from quant.cuh / fused.cuh for every lane of
 * every warp, with the same unit split, K split of A x, token groups and row/token clamping; only the warp
 * shuffles (replaced by a sum over lanes), shared memory and the launch itself are not exercised.
 *
 *   c++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -Inative/src native/src/cuda/emu.cpp -o libeora_cuda_emu.so
 */
#include <vector>

#include "fused.cuh"

using namespace eora_cuda;

namespace {

float levels[16];

void init_levels() {
    for (int i = 0; i < 16; i++) levels[i] = (float)eora_iq4_levels[i];
}

size_t adapter_row_bytes(int type, int64_t n) { return type == 8 ? (size_t)(n / 32 * 34) : (size_t)n * (type == 0 ? 4 : 2); }

struct Dequant {
    const uint8_t *src;
    int64_t n;
    float *dst;
    template <class Q>
    void run() {
        if constexpr (Q::TYPE == 0 || Q::TYPE == 1 || Q::TYPE == 30) {
            for (int64_t i = 0; i < n; i++)
                dst[i] = Q::TYPE == 0 ? as_float(ld_u16(src + 4 * i) | ld_u16(src + 4 * i + 2) << 16)
                                      : Q::TYPE == 1 ? f16_to_f32(ld_u16(src + 2 * i)) : bf16_to_f32(ld_u16(src + 2 * i));
        } else {
            for (int64_t un = 0; un < n / Q::QK * Q::UPB; un++) {  /* one thread per unit */
                int64_t blk = un / Q::UPB;
                int u = (int)(un % Q::UPB);
                typename Q::U U;
                Q::template load<2>(src + blk * Q::BYTES, u, U);
                for (int g = 0; g < Q::G; g++) {
                    float c[16];
                    Q::codes(U, g, c, levels);
                    for (int i = 0; i < 16; i++) dst[blk * Q::QK + Q::start(u, g) + i] = dequant_value<Q>(U, g, c[i]);
                }
            }
        }
    }
};

struct Fused {
    const uint8_t *w;
    int64_t d_out, d_in, n;
    const float *x;
    int b_type;
    const uint8_t *b;
    int64_t rank;
    const float *partial;
    int ksplit;
    bool t_shared;
    float *y;
    template <class Q, int NT>
    void rows_pass() {
        constexpr int R = Geometry<NT, Q::G>::R;
        const int64_t qk = Q::QK, row_bytes = d_in / qk * Q::BYTES, n_units = d_in / qk * Q::UPB;
        const int64_t b_row = rank ? (int64_t)adapter_row_bytes(b_type, rank) : 0;
        std::vector<float> tsh((size_t)(NT * (rank ? rank : 1)));
        for (int64_t tok0 = 0; tok0 < n; tok0 += NT) {
            const float *xt[NT];
            const float *tt[NT];
            for (int t = 0; t < NT; t++) {
                int64_t tok = tok0 + t < n ? tok0 + t : n - 1;
                xt[t] = x + tok * d_in;
                if (t_shared) {
                    for (int64_t k = 0; k < rank; k++) {
                        float s = 0.0f;
                        for (int sp = 0; sp < ksplit; sp++) s += partial[(sp * n + tok) * rank + k];
                        tsh[(size_t)(t * rank + k)] = s;
                    }
                    tt[t] = tsh.data() + t * rank;
                } else {
                    tt[t] = partial + tok * rank;
                }
            }
            for (int64_t o0 = 0; o0 < d_out; o0 += R) {  /* one warp */
                const uint8_t *rows[R];
                const uint8_t *brows[R];
                for (int r = 0; r < R; r++) {
                    int64_t o = o0 + r < d_out ? o0 + r : d_out - 1;
                    rows[r] = w + o * row_bytes;
                    brows[r] = rank ? b + o * b_row : nullptr;
                }
                float acc[R][NT] = {};
                for (int lane = 0; lane < 32; lane++) {
                    float l[R][NT] = {};
                    lane_rows<Q, Q::ALIGN, NT, R>(rows, n_units, lane, 32, xt, levels, l);
                    if (rank) lane_adapter<NT, R>(b_type, brows, rank, lane, 32, tt, l);
                    for (int r = 0; r < R; r++)
                        for (int t = 0; t < NT; t++) acc[r][t] += l[r][t];
                }
                for (int r = 0; r < R; r++)
                    for (int t = 0; t < NT; t++)
                        if (o0 + r < d_out && tok0 + t < n) y[(tok0 + t) * d_out + o0 + r] = acc[r][t];
            }
        }
    }
    template <class Q>
    void run() {
        if (n == 1) rows_pass<Q, 1>();
        else rows_pass<Q, 4>();
    }
};

}  // namespace

extern "C" {

/* Same contract as eora_cuda_dequantize_host (no argument checks: the tests pass valid input). */
int emu_dequantize(int type, const void *src, int64_t n_elems, float *dst) {
    init_levels();
    Dequant d{(const uint8_t *)src, n_elems, dst};
    return dispatch_type(type, d) ? 0 : 2;
}

/* Same contract as eora_cuda_fused_matmul_host, on a pretend device with sm_count SMs. */
int emu_fused_matmul(int w_type, const void *w, int64_t d_out, int64_t d_in, const float *x, int64_t n_tokens,
                     int a_type, const void *a, int b_type, const void *b, int64_t rank, float *y, int sm_count) {
    init_levels();
    const int nt = n_tokens == 1 ? 1 : 4;
    const bool shared_t = t_in_shared(nt, rank);
    AxSplit sp = rank ? ax_split(d_in, rank, sm_count, shared_t) : AxSplit{1, d_in};
    std::vector<float> partial((size_t)(sp.ksplit * n_tokens * (rank ? rank : 1)));
    const size_t a_row = rank ? adapter_row_bytes(a_type, d_in) : 0;
    for (int64_t k = 0; k < rank; k++)  /* ax_kernel: one warp per (k, slice) */
        for (int s = 0; s < sp.ksplit; s++) {
            int64_t i0 = s * sp.slice, i1 = i0 + sp.slice < d_in ? i0 + sp.slice : d_in;
            for (int64_t tok0 = 0; tok0 < n_tokens; tok0 += AX_TOKENS) {
                int cnt = n_tokens - tok0 < AX_TOKENS ? (int)(n_tokens - tok0) : AX_TOKENS;
                float acc[AX_TOKENS] = {};
                for (int lane = 0; lane < 32; lane++) {
                    float l[AX_TOKENS] = {};
                    lane_ax(a_type, (const uint8_t *)a + k * a_row, i0, i1, lane, 32, x, d_in, tok0, cnt, l);
                    for (int t = 0; t < AX_TOKENS; t++) acc[t] += l[t];
                }
                for (int t = 0; t < cnt; t++) partial[(size_t)((s * n_tokens + tok0 + t) * rank + k)] = acc[t];
            }
        }
    Fused f{(const uint8_t *)w, d_out, d_in, n_tokens, x, b_type, (const uint8_t *)b, rank, partial.data(), sp.ksplit,
            shared_t, y};
    return dispatch_type(w_type, f) ? 0 : 2;
}

/* The K split the device code would use (for the tests to cover ksplit > 1 and the unstaged path). */
int emu_ax_split(int64_t d_in, int64_t n_tokens, int64_t rank, int sm_count, int64_t *slice) {
    const int nt = n_tokens == 1 ? 1 : 4;
    AxSplit sp = ax_split(d_in, rank, sm_count, t_in_shared(nt, rank));
    *slice = sp.slice;
    return sp.ksplit;
}

}  // extern "C"
