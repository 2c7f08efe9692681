/* eora_native: dequantization of GGUF weight blocks and the fused EoRA product
 *
 *     y = dequant(Wq) . x + B . (A . x)
 *
 * on the CPU and, where built with CUDA, on NVIDIA GPUs. This is the only public header; Python reads the declarations between the cffi markers
 * below (preprocessor lines and EORA_API are stripped), so keep them plain C that cffi can parse.
 *
 * Conventions
 *  - Every function returns an eora_status; on failure eora_last_error() returns a one-line message
 *    (thread-local, valid until the next failing call on the same thread). Nothing is printed, nothing
 *    aborts: the library runs inside the Python process.
 *  - Every caller buffer comes with its length in bytes and is checked before it is read or written.
 *  - Types are numbered as ggml/gguf number them (GGMLQuantizationType), so values pass through
 *    unchanged from gguf-py.
 *  - Matrices are row-major. A weight of shape (d_out, d_in) is d_out rows of d_in elements, each row a
 *    whole number of blocks, exactly as stored in a GGUF file.
 */
#ifndef EORA_NATIVE_H
#define EORA_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(EORA_BUILDING)
#    define EORA_API __declspec(dllexport)
#  else
#    define EORA_API __declspec(dllimport)
#  endif
#else
#  define EORA_API __attribute__((visibility("default")))
#endif

#define EORA_ABI_VERSION 2

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin */
typedef enum {
    EORA_OK = 0,
    EORA_ERR_ARGUMENT = 1,     /* NULL pointer, bad flag or thread count */
    EORA_ERR_TYPE = 2,         /* type not supported for this use */
    EORA_ERR_SHAPE = 3,        /* zero/negative size, row not a multiple of the block, rank too large */
    EORA_ERR_BUFFER = 4,       /* a buffer is shorter than its shape needs */
    EORA_ERR_MEMORY = 5,       /* scratch allocation failed */
    EORA_ERR_INTERNAL = 6,     /* thread start failure or a bug */
    EORA_ERR_CUDA = 7          /* built without CUDA, no usable device, or a CUDA runtime error */
} eora_status;

typedef enum {
    EORA_TYPE_F32 = 0, EORA_TYPE_F16 = 1, EORA_TYPE_Q4_0 = 2, EORA_TYPE_Q4_1 = 3,
    EORA_TYPE_Q5_0 = 6, EORA_TYPE_Q5_1 = 7, EORA_TYPE_Q8_0 = 8,
    EORA_TYPE_Q2_K = 10, EORA_TYPE_Q3_K = 11, EORA_TYPE_Q4_K = 12, EORA_TYPE_Q5_K = 13, EORA_TYPE_Q6_K = 14,
    EORA_TYPE_IQ4_NL = 20, EORA_TYPE_IQ4_XS = 23, EORA_TYPE_BF16 = 30
} eora_type;

/* Flags for eora_fused_matmul. */
enum {
    EORA_FLAG_F32_ACT = 1,     /* keep x in fp32 (dequantize weights, fp32 dot); default quantizes x to 8 bit */
    EORA_FLAG_ISA_SCALAR = 2,  /* use the portable C kernels even where AVX2/AVX-512 are present */
    EORA_FLAG_ISA_AVX2 = 4     /* use at most AVX2 (for testing that path on an AVX-512 machine) */
};

/* EORA_ABI_VERSION of the built library; the binding refuses a mismatch. */
EORA_API int eora_abi_version(void);

/* Message of the last failure on this thread ("" if none). */
EORA_API const char *eora_last_error(void);

/* The SIMD level the optimized path uses on this CPU: "avx512", "avx2" or "scalar". */
EORA_API const char *eora_cpu_path(void);

/* Elements and bytes of one block of `type` (1 and the element size for F32/F16/BF16). */
EORA_API eora_status eora_type_info(int type, int64_t *block_elems, int64_t *block_bytes);

/* Dequantize n_elems elements (a whole number of blocks) from src into dst (fp32).
 * Bit-exact with gguf-py's gguf.quants.dequantize. The _ref variant is the plain scalar reference;
 * the other one may use SIMD and produces the same bits. */
EORA_API eora_status eora_dequantize_ref(int type, const void *src, size_t src_bytes, int64_t n_elems,
                                         float *dst, size_t dst_bytes);
EORA_API eora_status eora_dequantize(int type, const void *src, size_t src_bytes, int64_t n_elems,
                                     float *dst, size_t dst_bytes);

/* Fused product for n_tokens >= 1 activations (tuned for 1..64):
 *     y[t, o] = sum_i W[o, i] x[t, i] + sum_k B[o, k] (sum_i A[k, i] x[t, i])
 *  w: (d_out, d_in) in w_type (any type above);   x: (n_tokens, d_in) fp32;   y: (n_tokens, d_out) fp32
 *  a: (rank, d_in), b: (d_out, rank), each F32, F16 or Q8_0; rank 0 means no adapter (a, b may be NULL)
 *  and rank must not exceed min(d_in, d_out).
 * The _ref variant is the scalar reference: fp32 dequantization, fp64 accumulation.
 * eora_fused_matmul splits output rows over n_threads (0 = all cores) and by default quantizes each
 * token of x to 8 bits (scale = max|x| / 127 per block: 256 elements for Q2_K..Q6_K weights on the
 * AVX2/AVX-512 direct kernels, 32 otherwise), then uses integer dot products against the weight codes;
 * A.x and B.(A.x) always stay in fp32. Each x element is off by at most half a step, max|x_block| / 254
 * (see docs/native.md for the resulting error); EORA_FLAG_F32_ACT removes it. */
EORA_API eora_status eora_fused_matmul_ref(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                           const float *x, size_t x_bytes, int64_t n_tokens,
                                           int a_type, const void *a, size_t a_bytes,
                                           int b_type, const void *b, size_t b_bytes, int64_t rank,
                                           float *y, size_t y_bytes);
EORA_API eora_status eora_fused_matmul(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                       const float *x, size_t x_bytes, int64_t n_tokens,
                                       int a_type, const void *a, size_t a_bytes,
                                       int b_type, const void *b, size_t b_bytes, int64_t rank,
                                       float *y, size_t y_bytes, int n_threads, unsigned flags);

/* Rows [row_begin, row_end) of the fused product on the calling thread only, with t = A.x given; for callers
 * that bring their own threads (the llama.cpp patch: each ggml thread takes one range of rows):
 *     y[n, o] = sum_i W[o, i] x[n, i] + t_scale * sum_k B[o, k] t[n, k]      row_begin <= o < row_end
 *  w, x, b as for eora_fused_matmul; t: (n_tokens, rank) fp32; rank 0 means no adapter (b, t may be NULL).
 *  y is the whole (n_tokens, d_out) output; only the given rows are written.
 *  scratch: at least eora_fused_rows_scratch(w_type, d_in, n_tokens, rank, flags) bytes, 64-byte aligned,
 *  private to the call (each call quantizes x itself, n_tokens * d_in work: give it few, large ranges).
 * Same arithmetic as eora_fused_matmul (flags alike). The _ref variant is the scalar reference (fp32
 * dequantization, fp64 accumulation) and needs no scratch. */
EORA_API size_t eora_fused_rows_scratch(int w_type, int64_t d_in, int64_t n_tokens, int64_t rank, unsigned flags);
EORA_API eora_status eora_fused_rows_ref(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                         const float *x, size_t x_bytes, int64_t n_tokens,
                                         int b_type, const void *b, size_t b_bytes, const float *t, size_t t_bytes,
                                         int64_t rank, float t_scale, int64_t row_begin, int64_t row_end,
                                         float *y, size_t y_bytes);
EORA_API eora_status eora_fused_rows(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                     const float *x, size_t x_bytes, int64_t n_tokens,
                                     int b_type, const void *b, size_t b_bytes, const float *t, size_t t_bytes,
                                     int64_t rank, float t_scale, int64_t row_begin, int64_t row_end,
                                     float *y, size_t y_bytes, void *scratch, size_t scratch_bytes, unsigned flags);

/* The adapter term alone, added in place, for rows [row_begin, row_end) on the calling thread:
 *     y[n, o] += t_scale * sum_k B[o, k] t[n, k]
 * b: (d_out, rank) F32, F16 or Q8_0; t: (n_tokens, rank) fp32; y: (n_tokens, d_out) fp32 (for a base product
 * computed elsewhere, e.g. by ggml for a weight type without a direct kernel). Flags: the ISA caps only. */
EORA_API eora_status eora_adapter_rows(int b_type, const void *b, size_t b_bytes, int64_t d_out, int64_t rank,
                                       const float *t, size_t t_bytes, int64_t n_tokens, float t_scale,
                                       int64_t row_begin, int64_t row_end, float *y, size_t y_bytes, unsigned flags);

/* t = A.x on the calling thread: t[n, k] = sum_i A[k, i] x[n, i] in fp32, A (rank, d_in) F32, F16 or Q8_0 read
 * in place, x (n_tokens, d_in), t (n_tokens, rank). For a few tokens, where each thread of a caller's pool
 * computing all of t is cheaper than a synchronization point. Flags: the ISA caps only. */
EORA_API eora_status eora_adapter_t(int a_type, const void *a, size_t a_bytes, int64_t rank, int64_t d_in,
                                    const float *x, size_t x_bytes, int64_t n_tokens, float *t, size_t t_bytes,
                                    unsigned flags);

/* ---- CUDA ----
 * Present in every build. Without CUDA support (built without nvcc) or without a usable device/driver,
 * eora_cuda_available() returns 0 and every other call returns EORA_ERR_CUDA; nothing needs libcuda at
 * load time (the CUDA runtime is linked statically and finds the driver on first use).
 * Device variants take device pointers and run asynchronously on `stream` (a cudaStream_t; NULL = the
 * legacy default stream) on the current device. Arguments are checked as for eora_fused_matmul, plus:
 * x 16-byte aligned, y 4-byte, w/a/b 2-byte; pointers must be device (or managed) memory; float weights
 * (F32/F16/BF16) need d_in % 32 == 0. Arithmetic is fp32 throughout (x is not quantized): the result
 * matches eora_fused_matmul_ref to fp32 summation error. Host variants copy their inputs to the device,
 * run, copy the result back and wait: for validation, not for speed. */

/* 1 if the library has CUDA kernels and a device is usable; 0 otherwise. Never fails. */
EORA_API int eora_cuda_available(void);

/* One line: runtime version, architectures built for, and the device or why there is none. */
EORA_API const char *eora_cuda_describe(void);

/* Compute capability, SM count and theoretical memory bandwidth (GB/s, 0 if unknown) of the current device. */
EORA_API eora_status eora_cuda_device_props(int *cc_major, int *cc_minor, int *sm_count, double *peak_gbps);

/* Bytes of device workspace eora_cuda_fused_matmul may use for these sizes (0 for rank 0). */
EORA_API eora_status eora_cuda_workspace_bytes(int64_t d_in, int64_t n_tokens, int64_t rank, size_t *bytes);

/* Dequantization on the device; bit-exact with eora_dequantize_ref. */
EORA_API eora_status eora_cuda_dequantize(int type, const void *src, size_t src_bytes, int64_t n_elems,
                                          float *dst, size_t dst_bytes, void *stream);
EORA_API eora_status eora_cuda_dequantize_host(int type, const void *src, size_t src_bytes, int64_t n_elems,
                                               float *dst, size_t dst_bytes);

/* The fused product on the device, shapes and types as eora_fused_matmul (any weight type above).
 * workspace: device memory of eora_cuda_workspace_bytes() bytes, or NULL to allocate stream-ordered
 * (cudaMallocAsync) per call. */
EORA_API eora_status eora_cuda_fused_matmul(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                            const float *x, size_t x_bytes, int64_t n_tokens,
                                            int a_type, const void *a, size_t a_bytes,
                                            int b_type, const void *b, size_t b_bytes, int64_t rank,
                                            float *y, size_t y_bytes, void *workspace, size_t workspace_bytes,
                                            void *stream);
EORA_API eora_status eora_cuda_fused_matmul_host(int w_type, const void *w, size_t w_bytes, int64_t d_out,
                                                 int64_t d_in, const float *x, size_t x_bytes, int64_t n_tokens,
                                                 int a_type, const void *a, size_t a_bytes,
                                                 int b_type, const void *b, size_t b_bytes, int64_t rank,
                                                 float *y, size_t y_bytes);
/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif
