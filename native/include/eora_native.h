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
 *  - Every caller buffer comes with its length in bytes and is checked before it is read or written: input
 *    buffers and the output of dequantize/fused_matmul must have exactly the length their type and shape
 *    need (a longer one means the shape and the data disagree: EORA_ERR_BUFFER).
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

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin */
/* The version of the interface below; eora_abi_version() returns the one the library was built with, and the
 * binding refuses a library whose version differs from this header's. 4: matrix descriptors (eora_matrix). */
enum { EORA_ABI_VERSION = 4 };

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

/* Flags for eora_fused_matmul (and the ISA caps for the other CPU calls). */
enum {
    EORA_FLAG_F32_ACT = 1,     /* keep x in fp32 (dequantize weights, fp32 dot); default quantizes x to 8 bit */
    EORA_FLAG_ISA_SCALAR = 2,  /* use the portable C kernels (twins of the AVX2 ones: their bits) on any CPU */
    EORA_FLAG_ISA_AVX2 = 4,    /* use at most AVX2 (for testing that path on an AVX-512 machine) */
    EORA_FLAG_ROUNDED = 8      /* eora_lora_t / _add: the input already holds F16 values (eora_lora_round_f16) */
};

/* A matrix the caller passes in, as ggml passes a tensor: `rows` rows of `cols` elements of `type`, row-major,
 * each row a whole number of blocks (exactly as stored in a GGUF file), in `bytes` bytes at `data`. `bytes` must
 * be exactly what type and shape need (a longer buffer means the shape and the data disagree: EORA_ERR_BUFFER).
 * Outputs are plain fp32 buffers with their length: their shape follows from the inputs. */
typedef struct {
    int type;            /* eora_type */
    const void *data;
    size_t bytes;
    int64_t rows, cols;
} eora_matrix;

/* EORA_ABI_VERSION of the built library. */
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
 *  w: (d_out, d_in), any type above;   x: (n_tokens, d_in) F32;   y: n_tokens * d_out fp32 (y_bytes exactly)
 *  a: (rank, d_in), b: (d_out, rank), each F32, F16 or Q8_0, or both NULL for no adapter (rank 0);
 *  rank must not exceed min(d_in, d_out).
 * The _ref variant is the scalar reference: fp32 dequantization, fp64 accumulation.
 * eora_fused_matmul splits output rows over n_threads (0 = all cores) and by default quantizes each
 * token of x to 8 bits (scale = max|x| / 127 per block: 256 elements for Q2_K..Q6_K weights, 32 for Q4_0 and
 * Q8_0 (the direct kernels) and for the other types), then uses integer dot products against the weight codes;
 * A.x and B.(A.x) always stay in fp32. Each x element is off by at most half a step, max|x_block| / 254
 * (see docs/native.md for the resulting error); EORA_FLAG_F32_ACT removes it. EORA_FLAG_ISA_SCALAR runs the
 * portable C twins of the SIMD kernels: the same activation blocks, and the AVX2 kernels' summation order. */
EORA_API eora_status eora_fused_matmul_ref(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                           const eora_matrix *b, float *y, size_t y_bytes);
EORA_API eora_status eora_fused_matmul(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                       const eora_matrix *b, float *y, size_t y_bytes, int n_threads, unsigned flags);

/* ---- LoRA terms in llama.cpp's own CPU arithmetic (what the llama.cpp patch runs) ----
 * Stock llama.cpp adds an adapter to res = W x with four ggml ops: t = A x, u = B t, u * scale, res + u. For F16
 * and F32 adapters ggml rounds the other operand of each product to F16 (F16 adapters only) and sums each
 * output as a dot in one of these orders, chosen by its build and the shapes (on x86: tinyBLAS for 2 tokens or
 * more, rows in fours and whole blocks; ggml_vec_dot for one token or otherwise):
 *   EORA_ORDER_LANES8, _LANES16  tinyBLAS with 8 (AVX2) / 16 (AVX-512) lanes: lane j adds the products of
 *                                 elements j, j + L, j + 2L, ... with fused multiply-adds from +0, then the lanes
 *                                 are added pairwise, halving (s[j] += s[j + h], h = L/2 ... 1). k % L == 0.
 *   EORA_ORDER_VEC8, _VEC16      ggml_vec_dot_f16/_f32 with 8 / 16-wide vectors: the same over L = 32 / 64
 *                                 flat lanes (four vectors), except that VEC8 ends on adjacent pairs
 *                                 ((s0 + s1) + (s2 + s3)); elements after the last whole block of L are added
 *                                 one by one in fp64, each product rounded to fp32 (F16 only; F32: k % L == 0).
 * These two calls compute the stock bits in two steps:
 *     eora_lora_t:   t[n, k] = dot(A[k, :], x[n, :])                  k in [row_begin, row_end)
 *     eora_lora_add: y[n, o] = y[n, o] + dot(B[o, :], t[n, :]) * scale   o in [row_begin, row_end)
 * a: (rank, d_in), b: (d_out, rank), F16 or F32; x (n_tokens, d_in) and t (n_tokens, rank) F32 (for eora_lora_add
 * t is the input); outputs t (n_tokens, rank) and y (n_tokens, d_out) fp32, at least that long. Only the given rows are written, on the calling thread (callers split the rows over
 * their own threads; t = A x has to be complete before eora_lora_add reads it). scratch: eora_lora_scratch(dot
 * length, n_tokens) bytes, private to the call (the rounded operand); F32 adapters need none. Which order a
 * llama.cpp build uses is for the caller to establish (the patch compares with ggml's own mul_mat once per dot
 * length). Flags: the ISA caps; EORA_FLAG_ISA_SCALAR runs the portable C emulation of the order (the
 * reference); EORA_FLAG_ROUNDED says the input was rounded already (eora_lora_round_f16: callers that make many
 * calls on one input round it once), so no scratch is needed. */
typedef enum {
    EORA_ORDER_LANES8 = 1, EORA_ORDER_LANES16 = 2, EORA_ORDER_VEC8 = 3, EORA_ORDER_VEC16 = 4
} eora_order;

EORA_API size_t eora_lora_scratch(int64_t k, int64_t n_tokens);
EORA_API eora_status eora_lora_round_f16(const float *x, float *out, int64_t n, unsigned flags);
EORA_API eora_status eora_lora_t(const eora_matrix *a, const eora_matrix *x, int order, int64_t row_begin,
                                 int64_t row_end, float *t, size_t t_bytes, void *scratch, size_t scratch_bytes,
                                 unsigned flags);
EORA_API eora_status eora_lora_add(const eora_matrix *b, const eora_matrix *t, float scale, int order,
                                   int64_t row_begin, int64_t row_end, float *y, size_t y_bytes, void *scratch,
                                   size_t scratch_bytes, unsigned flags);

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
EORA_API eora_status eora_cuda_fused_matmul(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                            const eora_matrix *b, float *y, size_t y_bytes, void *workspace,
                                            size_t workspace_bytes, void *stream);
EORA_API eora_status eora_cuda_fused_matmul_host(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                                 const eora_matrix *b, float *y, size_t y_bytes);
/* cffi-end */

#ifdef __cplusplus
}
#endif

#endif
