/* Times stock ggml (the pinned llama.cpp's libggml) on the products eora_native fuses:
 *   mode 0: y = mul_mat(W, x)
 *   mode 1: y = mul_mat(W, x) + scale(mul_mat(B, mul_mat(A, x)), 1)   -- llama.cpp's LoRA op sequence
 *   mode 2: eora_fused_matmul on the same bytes (rank 0 = base only), timed the same way
 * usage: ggml_bench TYPE D_OUT D_IN N_TOKENS RANK THREADS ITERS REPACK(0|1) MODE(0|1) ADAPTER_TYPE
 * Prints one JSON line: median and min seconds per graph, and the weight buffer type actually used.
 * Built by tools/bench_fused.py (the CMake target ggml_bench of tools/CMakeLists.txt) against that llama.cpp. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "eora_native.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill_random(float *v, size_t n, unsigned *seed) {
    for (size_t i = 0; i < n; i++) v[i] = ((float)rand_r(seed) / RAND_MAX - 0.5f) * 2.0f;
}

/* Quantizes random floats into t (any type ggml can quantize), uploading through the tensor's buffer. */
static void *set_random(struct ggml_tensor *t, unsigned *seed) {
    int64_t n_per_row = t->ne[0], rows = ggml_nrows(t);
    float *f = malloc(sizeof(float) * (size_t)(n_per_row * rows));
    fill_random(f, (size_t)(n_per_row * rows), seed);
    void *q = malloc(ggml_nbytes(t));
    if (t->type == GGML_TYPE_F32) memcpy(q, f, ggml_nbytes(t));
    else ggml_quantize_chunk(t->type, f, q, 0, rows, n_per_row, NULL);
    ggml_backend_tensor_set(t, q, 0, ggml_nbytes(t));
    free(f);
    return q;  /* the GGUF-layout bytes, kept for the eora path */
}

int main(int argc, char **argv) {
    if (argc != 11) {
        fprintf(stderr, "usage: %s TYPE D_OUT D_IN N RANK THREADS ITERS REPACK MODE ADAPTER_TYPE\n", argv[0]);
        return 2;
    }
    enum ggml_type wt = (enum ggml_type)atoi(argv[1]), at = (enum ggml_type)atoi(argv[10]);
    int64_t d_out = atoll(argv[2]), d_in = atoll(argv[3]), n = atoll(argv[4]), r = atoll(argv[5]);
    int threads = atoi(argv[6]), iters = atoi(argv[7]), repack = atoi(argv[8]), mode = atoi(argv[9]);
    unsigned seed = 1234;

    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);
    ggml_backend_buffer_type_t wbuft = ggml_backend_cpu_buffer_type();
    if (repack) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        ggml_backend_dev_get_extra_bufts_t get_extra =
            (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
        for (ggml_backend_buffer_type_t *b = get_extra ? get_extra(dev) : NULL; b && *b; b++)
            if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) wbuft = *b;
    }

    struct ggml_init_params wp = {16 * ggml_tensor_overhead(), NULL, true};
    struct ggml_context *cw = ggml_init(wp), *co = ggml_init(wp);
    struct ggml_tensor *W = ggml_new_tensor_2d(cw, wt, d_in, d_out);
    struct ggml_tensor *x = ggml_new_tensor_2d(co, GGML_TYPE_F32, d_in, n);
    struct ggml_tensor *A = r ? ggml_new_tensor_2d(co, at, d_in, r) : NULL;
    struct ggml_tensor *B = r ? ggml_new_tensor_2d(co, at, r, d_out) : NULL;
    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(cw, wbuft);
    ggml_backend_buffer_t bo = ggml_backend_alloc_ctx_tensors(co, backend);
    /* The repack buffer only repacks tensors whose use it supports; otherwise it fails the allocation. */
    if (!bw || !bo) { fprintf(stderr, "allocation failed\n"); return 1; }
    void *hw = set_random(W, &seed), *hx = set_random(x, &seed);
    void *ha = r ? set_random(A, &seed) : NULL, *hb = r ? set_random(B, &seed) : NULL;
    double *ts = malloc(sizeof(double) * (size_t)iters);
    if (mode == 2) {
        float *y = malloc(sizeof(float) * (size_t)(n * d_out));
        const eora_matrix wm = {wt, hw, ggml_nbytes(W), d_out, d_in}, xm = {EORA_TYPE_F32, hx, ggml_nbytes(x), n, d_in};
        const eora_matrix am = {at, ha, r ? ggml_nbytes(A) : 0, r, d_in}, bm = {at, hb, r ? ggml_nbytes(B) : 0, d_out, r};
        for (int i = -3; i < iters; i++) {
            double t0 = now();
            int s = eora_fused_matmul(&wm, &xm, r ? &am : NULL, r ? &bm : NULL, y, sizeof(float) * (size_t)(n * d_out),
                                      threads, 0);
            if (s) { fprintf(stderr, "eora_fused_matmul: %s\n", eora_last_error()); return 1; }
            if (i >= 0) ts[i] = now() - t0;
        }
        qsort(ts, (size_t)iters, sizeof(double), cmp);
        printf("{\"median_s\": %.9g, \"min_s\": %.9g, \"weight_buffer\": \"eora:%s\"}\n", ts[iters / 2], ts[0],
               eora_cpu_path());
        return 0;
    }

    size_t gsize = ggml_tensor_overhead() * 64 + ggml_graph_overhead();
    struct ggml_init_params gp = {gsize, NULL, true};
    struct ggml_context *cg = ggml_init(gp);
    struct ggml_tensor *y = ggml_mul_mat(cg, W, x);
    if (mode) {
        struct ggml_tensor *t = ggml_mul_mat(cg, A, x);
        struct ggml_tensor *u = ggml_mul_mat(cg, B, t);
        u = ggml_scale(cg, u, 1.0f);
        y = ggml_add(cg, y, u);
    }
    struct ggml_cgraph *gf = ggml_new_graph(cg);
    ggml_build_forward_expand(gf, y);
    ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
    if (!ggml_gallocr_alloc_graph(galloc, gf)) { fprintf(stderr, "graph allocation failed\n"); return 1; }

    for (int i = 0; i < 3; i++) ggml_backend_graph_compute(backend, gf);
    for (int i = 0; i < iters; i++) {
        double t0 = now();
        ggml_backend_graph_compute(backend, gf);
        ts[i] = now() - t0;
    }
    qsort(ts, (size_t)iters, sizeof(double), cmp);
    printf("{\"median_s\": %.9g, \"min_s\": %.9g, \"weight_buffer\": \"%s\"}\n", ts[iters / 2], ts[0],
           ggml_backend_buft_name(ggml_backend_buffer_get_type(bw)));
    ggml_gallocr_free(galloc);
    ggml_backend_buffer_free(bw);
    ggml_backend_buffer_free(bo);
    ggml_free(cg); ggml_free(cw); ggml_free(co);
    ggml_backend_free(backend);
    free(ts);
    return 0;
}
