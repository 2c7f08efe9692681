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

EORA_API eora_status eora_cuda_fused_matmul(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                            const eora_matrix *b, float *y, size_t y_bytes, void *workspace,
                                            size_t workspace_bytes, void *stream) {
    (void)w, (void)x, (void)a, (void)b, (void)y, (void)y_bytes, (void)workspace, (void)workspace_bytes, (void)stream;
    return no_cuda("cuda_fused_matmul");
}

EORA_API eora_status eora_cuda_fused_matmul_host(const eora_matrix *w, const eora_matrix *x, const eora_matrix *a,
                                                 const eora_matrix *b, float *y, size_t y_bytes) {
    (void)w, (void)x, (void)a, (void)b, (void)y, (void)y_bytes;
    return no_cuda("cuda_fused_matmul");
}
