/* Oracle for eora_lora_t / eora_lora_add: stock ggml's four LoRA ops against libeora_native, bit for bit.
 *
 * For each case (adapter type, d_in, rank, d_out, tokens, threads, scale) it builds the graph stock llama.cpp's
 * build_lora_mm builds for one adapter on the CPU backend,
 *     t = mul_mat(A, x);  y = add(res, scale(mul_mat(B, t), s))
 * on random data, computes the same with eora_lora_t then eora_lora_add in each eora_order, and prints one JSON
 * line per case with the orders that gave ggml's exact t and y. Built and run by tests/test_lora.py against the
 * ggml of the llama.cpp build in use. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eora_native.h"
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static uint64_t rng = 88172645463325252ULL;

static float rnd(float scale) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)(((double)(rng >> 11) / 9007199254740992.0 - 0.5) * 2.0 * scale);
}

static int run_case(enum ggml_type type, int64_t d_in, int64_t rank, int64_t d_out, int64_t n, int threads,
                    float s) {
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, threads);
    struct ggml_init_params ip = { 16 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *a = ggml_new_tensor_2d(ctx, type, d_in, rank);
    struct ggml_tensor *b = ggml_new_tensor_2d(ctx, type, rank, d_out);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d_in, n);
    struct ggml_tensor *res = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, d_out, n);
    struct ggml_tensor *t = ggml_mul_mat(ctx, a, x);
    struct ggml_tensor *y = ggml_add(ctx, res, ggml_scale(ctx, ggml_mul_mat(ctx, b, t), s));
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    if (!buf) { fprintf(stderr, "oracle: cannot allocate\n"); return 1; }

    size_t esz = type == GGML_TYPE_F16 ? 2 : 4;
    float *af = malloc(sizeof(float) * rank * d_in), *bf = malloc(sizeof(float) * d_out * rank);
    float *xf = malloc(sizeof(float) * n * d_in), *rf = malloc(sizeof(float) * n * d_out);
    void *araw = malloc(esz * rank * d_in), *braw = malloc(esz * d_out * rank);
    /* EoRA-like magnitudes: A whitens (large entries), B small, x of varied size */
    for (int64_t i = 0; i < rank * d_in; i++) af[i] = rnd(3.0f);
    for (int64_t i = 0; i < d_out * rank; i++) bf[i] = rnd(0.05f);
    for (int64_t i = 0; i < n * d_in; i++) xf[i] = rnd(i % 7 == 0 ? 20.0f : 1.0f);
    for (int64_t i = 0; i < n * d_out; i++) rf[i] = rnd(2.0f);
    if (type == GGML_TYPE_F16) {
        ggml_fp32_to_fp16_row(af, araw, rank * d_in);
        ggml_fp32_to_fp16_row(bf, braw, d_out * rank);
    } else {
        memcpy(araw, af, esz * rank * d_in);
        memcpy(braw, bf, esz * d_out * rank);
    }
    ggml_backend_tensor_set(a, araw, 0, esz * rank * d_in);
    ggml_backend_tensor_set(b, braw, 0, esz * d_out * rank);
    ggml_backend_tensor_set(x, xf, 0, sizeof(float) * n * d_in);
    ggml_backend_tensor_set(res, rf, 0, sizeof(float) * n * d_out);
    if (ggml_backend_graph_compute(be, gf) != GGML_STATUS_SUCCESS) { fprintf(stderr, "oracle: compute failed\n"); return 1; }
    float *t_ref = malloc(sizeof(float) * n * rank), *y_ref = malloc(sizeof(float) * n * d_out);
    ggml_backend_tensor_get(t, t_ref, 0, sizeof(float) * n * rank);
    ggml_backend_tensor_get(y, y_ref, 0, sizeof(float) * n * d_out);

    float *t_ours = malloc(sizeof(float) * n * rank), *y_ours = malloc(sizeof(float) * n * d_out);
    size_t sb = eora_lora_scratch(d_in > rank ? d_in : rank, n);
    void *scratch = malloc(sb);
    printf("{\"type\": \"%s\", \"d_in\": %lld, \"rank\": %lld, \"d_out\": %lld, \"tokens\": %lld, \"threads\": %d, "
           "\"scale\": %g", ggml_type_name(type), (long long)d_in, (long long)rank, (long long)d_out, (long long)n,
           threads, s);
    const char *names[] = {"", "lanes8", "lanes16", "vec8", "vec16"};
    printf(", \"t_orders\": [");
    int first_t = 1;
    char y_list[128] = "";
    for (int order = EORA_ORDER_LANES8; order <= EORA_ORDER_VEC16; order++) {
        memcpy(y_ours, rf, sizeof(float) * n * d_out);
        /* in two row ranges, as two threads of the patch would */
        int64_t half = rank / 8 * 4;
        const eora_matrix am = {type, araw, esz * rank * d_in, rank, d_in};
        const eora_matrix xm = {EORA_TYPE_F32, xf, sizeof(float) * n * d_in, n, d_in};
        const eora_matrix bm = {type, braw, esz * d_out * rank, d_out, rank};
        const eora_matrix tm = {EORA_TYPE_F32, t_ref, sizeof(float) * n * rank, n, rank};
        eora_status st = eora_lora_t(&am, &xm, order, 0, half, t_ours, sizeof(float) * n * rank, scratch, sb, 0);
        if (st == EORA_OK) st = eora_lora_t(&am, &xm, order, half, rank, t_ours, sizeof(float) * n * rank, scratch, sb, 0);
        if (st != EORA_OK) continue;  /* a shape this order does not take */
        if (memcmp(t_ours, t_ref, sizeof(float) * n * rank) == 0) {
            printf("%s\"%s\"", first_t ? "" : ", ", names[order]);
            first_t = 0;
        }
        /* y from ggml's own t, so the second product is checked on its own */
        if (eora_lora_add(&bm, &tm, s, order, 0, d_out, y_ours, sizeof(float) * n * d_out, scratch, sb, 0) == EORA_OK &&
            memcmp(y_ours, y_ref, sizeof(float) * n * d_out) == 0) {
            snprintf(y_list + strlen(y_list), sizeof(y_list) - strlen(y_list), "%s\"%s\"", y_list[0] ? ", " : "",
                     names[order]);
        }
    }
    printf("], \"y_orders\": [%s]", y_list);
    printf("}\n");
    free(af); free(bf); free(xf); free(rf); free(araw); free(braw); free(t_ref); free(y_ref); free(t_ours);
    free(y_ours); free(scratch);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    ggml_backend_free(be);
    return 0;
}

int main(void) {
    static const struct { int64_t d_in, rank, d_out, n; int threads; float s; } cases[] = {
        {576, 64, 576, 1, 1, 1.0f}, {576, 64, 192, 1, 2, 1.0f}, {576, 16, 1536, 3, 2, 0.5f},
        {1536, 64, 576, 8, 2, 1.0f}, {256, 32, 96, 37, 2, 2.0f}, {576, 64, 576, 512, 2, 1.0f},
        {1024, 128, 64, 5, 3, 0.25f}, {576, 16, 576, 1, 2, 1.0f}, {200, 8, 40, 1, 1, 1.0f},
    };
    for (int ti = 0; ti < 2; ti++)
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
            if (run_case(ti ? GGML_TYPE_F32 : GGML_TYPE_F16, cases[i].d_in, cases[i].rank, cases[i].d_out, cases[i].n,
                         cases[i].threads, cases[i].s))
                return 1;
    return 0;
}
