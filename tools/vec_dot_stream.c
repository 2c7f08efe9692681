// How fast ggml's own one-token row kernel (vec_dot) streams a weight type from memory, against plain F16 rows:
// the measurement behind the patch's prefetch (tools/lab/README.md). The CMake target vec_dot_stream of
// tools/CMakeLists.txt builds it against a llama.cpp build (stock or patched); run it on an idle machine:
//
//   B=~/.cache/eora-gguf/llama.cpp-0c1e57098
//   cmake -S tools -B build/tools -DEORA_NATIVE_LIB=<libeora_native.so> -DEORA_LLAMA_CPP_SRC=$B/src \
//     -DEORA_LLAMA_CPP_LIB=$B/build/bin && cmake --build build/tools --target vec_dot_stream
//   build/tools/bin/vec_dot_stream TYPE MB THREADS     # e.g. q5_0 100 2   (MB 0.5: rows that stay in L2)
//
// One JSON line: the best of 20 passes of vec_dot over every row (576 wide, as SmolLM2's), split evenly over the
// threads, in GB/s of the weight's bytes.
#include "ggml.h"
#include "ggml-cpu.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s TYPE MB THREADS (TYPE: a ggml type name such as q5_0, q8_0, q6_K, f16)\n", argv[0]);
        return 2;
    }
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * name = ggml_type_name((enum ggml_type) t);
        if (name && strcmp(name, argv[1]) == 0) {
            type = t;
        }
    }
    const double mb = atof(argv[2]);
    const int nth = atoi(argv[3]);
    const int k = 576;
    ggml_cpu_init();
    const struct ggml_type_traits_cpu * tr = type < 0 ? NULL : ggml_get_type_traits_cpu((enum ggml_type) type);
    if (type < 0) {
        fprintf(stderr, "vec_dot_stream: unknown type %s: give a ggml type name such as q5_0\n", argv[1]);
        return 2;
    }
    if (tr == NULL || tr->vec_dot == NULL || k % ggml_blck_size((enum ggml_type) type) != 0) {
        fprintf(stderr, "vec_dot_stream: ggml has no one-token row kernel for %s at width %d\n", argv[1], k);
        return 2;
    }
    if (mb <= 0 || nth < 1) {
        fprintf(stderr, "vec_dot_stream: MB and THREADS must be positive\n");
        return 2;
    }
    const size_t row_bytes = ggml_row_size((enum ggml_type) type, k);
    const size_t rows = (size_t) (mb * 1e6 / row_bytes);
    char * w = malloc(rows * row_bytes);
    float * src = malloc(k * sizeof(float));
    float * y = malloc(rows * sizeof(float));
    char * xq = malloc(ggml_row_size(tr->vec_dot_type, k));
    if (!w || !src || !y || !xq || rows == 0) {
        fprintf(stderr, "vec_dot_stream: cannot allocate %.1f MB\n", mb);
        return 1;
    }
    for (size_t r = 0; r < rows; r++) {  // varied values, quantized row by row
        for (int i = 0; i < k; i++) {
            src[i] = (float) ((r * 31 + i * 7) % 101) / 101.0f - 0.5f;
        }
        ggml_quantize_chunk((enum ggml_type) type, src, w + r * row_bytes, 0, 1, k, NULL);
    }
    for (int i = 0; i < k; i++) {
        src[i] = (float) (i % 17) / 17.0f - 0.5f;
    }
    if (tr->vec_dot_type == GGML_TYPE_F32) {
        memcpy(xq, src, k * sizeof(float));
    } else {
        ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float(src, xq, k);
    }
    double best = 1e30;
    for (int pass = 0; pass < 20; pass++) {
        const double t0 = now();
#pragma omp parallel num_threads(nth)
        {
            const size_t per = rows / nth, id = (size_t) omp_get_thread_num();
            const size_t r0 = id * per, r1 = id + 1 == (size_t) nth ? rows : r0 + per;
            for (size_t r = r0; r < r1; r++) {
                tr->vec_dot(k, y + r, 0, w + r * row_bytes, 0, xq, 0, 1);
            }
        }
        const double dt = now() - t0;
        best = dt < best ? dt : best;
    }
    printf("{\"type\": \"%s\", \"mb\": %.1f, \"threads\": %d, \"ms\": %.3f, \"gb_per_s\": %.2f}\n", argv[1],
           rows * row_bytes / 1e6, nth, best * 1e3, rows * row_bytes / best / 1e9);
    free(w); free(src); free(y); free(xq);
    return 0;
}
