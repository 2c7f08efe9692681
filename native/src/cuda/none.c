/* The CUDA entry points of a build without CUDA: eora_cuda_available() is 0, everything else says why. */
#include "../internal.h"

static eora_status no_cuda(const char *fn) {
    return eora_fail(EORA_ERR_CUDA, "%s: this eora_native was built without CUDA (rebuild with nvcc present, "
                     "EORA_CUDA=AUTO or ON): use the CPU functions", fn);
}

EORA_API int eora_cuda_available(void) { return 0; }

EORA_API const char *eora_cuda_describe(void) { return "built without CUDA"; }

EORA_API eora_status eora_cuda_device_props(int *cc_major, int *cc_minor, int *sm_count, double *peak_gbps) {
    (void)cc_major, (void)cc_minor, (void)sm_count, (void)peak_gbps;
    return no_cuda("cuda_device_props");
}

EORA_API eora_status eora_cuda_workspace_bytes(int64_t d_in, int64_t n_tokens, int64_t rank, size_t *bytes) {
    (void)d_in, (void)n_tokens, (void)rank, (void)bytes;
    return no_cuda("cuda_workspace_bytes");
}

EORA_API eora_status eora_cuda_dequantize(int type, const void *src, size_t src_bytes, int64_t n_elems, float *dst,
                                          size_t dst_bytes, void *stream) {
    (void)type, (void)src, (void)src_bytes, (void)n_elems, (void)dst, (void)dst_bytes, (void)stream;
    return no_cuda("cuda_dequantize");
}

EORA_API eora_status eora_cuda_dequantize_host(int type, const void *src, size_t src_bytes, int64_t n_elems,
                                               float *dst, size_t dst_bytes) {
    (void)type, (void)src, (void)src_bytes, (void)n_elems, (void)dst, (void)dst_bytes;
    return no_cuda("cuda_dequantize");
}

EORA_API eora_status eora_cuda_fused_matmul(int w_type, const void *w, size_t w_bytes, int64_t d_out, int64_t d_in,
                                            const float *x, size_t x_bytes, int64_t n_tokens, int a_type,
                                            const void *a, size_t a_bytes, int b_type, const void *b, size_t b_bytes,
                                            int64_t rank, float *y, size_t y_bytes, void *workspace,
                                            size_t workspace_bytes, void *stream) {
    (void)w_type, (void)w, (void)w_bytes, (void)d_out, (void)d_in, (void)x, (void)x_bytes, (void)n_tokens;
    (void)a_type, (void)a, (void)a_bytes, (void)b_type, (void)b, (void)b_bytes, (void)rank, (void)y, (void)y_bytes;
    (void)workspace, (void)workspace_bytes, (void)stream;
    return no_cuda("cuda_fused_matmul");
}

EORA_API eora_status eora_cuda_fused_matmul_host(int w_type, const void *w, size_t w_bytes, int64_t d_out,
                                                 int64_t d_in, const float *x, size_t x_bytes, int64_t n_tokens,
                                                 int a_type, const void *a, size_t a_bytes, int b_type, const void *b,
                                                 size_t b_bytes, int64_t rank, float *y, size_t y_bytes) {
    (void)w_type, (void)w, (void)w_bytes, (void)d_out, (void)d_in, (void)x, (void)x_bytes, (void)n_tokens;
    (void)a_type, (void)a, (void)a_bytes, (void)b_type, (void)b, (void)b_bytes, (void)rank, (void)y, (void)y_bytes;
    return no_cuda("cuda_fused_matmul");
}
