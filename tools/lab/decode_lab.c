/* Kernel lab: the one-token product of an adapted linear, y = W x + B (A x), as the llama.cpp patch's two fused
 * ops compute it (native/llama.cpp/README.md), in numbered variants: where the adapter's rows are read relative
 * to W's rows, and what is prefetched when. Variant 0 is the fp64 reference; every variant is validated against
 * it (nmse) and against variant 1 (bit for bit: the variants move reads, not arithmetic), then timed in
 * interleaved rounds and reported in GB/s of the bytes one call must read, next to a plain read of the same bytes.
 *
 *   decode_lab [--d N] [--rank R] [--mb MB] [--rounds N] [--calls N] [--only 1,3,10] [--json FILE]
 *
 * W is Q8_0 (d x d) with its own row kernel here (x quantized to 8 bits per 32, int8 dot per block, as ggml's
 * vec_dot does); A (rank x d) and B (d x rank) are F16 and go through libeora_native's eora_lora_t / eora_lora_add
 * in ggml's vec_dot order, the calls the patch makes. One thread; enough layers are allocated (--mb) that every
 * call reads its weights from memory, not from the caches. The tuning history these variants replay, with the
 * figures measured inside llama.cpp, is tools/lab/README.md. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "eora_native.h"

enum { PF_NONE, PF_T0, PF_T1, PF_T2, PF_NTA };
enum { SPREAD, CHUNK_BEFORE, CHUNK_AHEAD, LAST_ROWS };

typedef struct {
    int id;
    const char *name;
    int chunk;        /* > 0: W rows in chunks of this many, each followed by its share of the adapter rows */
    int pf;           /* prefetch instruction for the adapter rows */
    int mode;         /* when: spread over the W rows, the next chunk before its W rows, one chunk ahead, or the
                       * last W rows only */
    int pf_w;         /* also prefetch the W chunk */
    size_t pf_max;    /* at most this many adapter bytes prefetched per op (0: all) */
    size_t pf_window; /* LAST_ROWS: prefetch during the last W rows of at most this many bytes */
    const char *verdict;
} variant;

static const variant VARIANTS[] = {
    {1, "W rows, then the adapter rows, no prefetch (EORA_LLAMA_PREFETCH=0)", 0, PF_NONE, SPREAD, 0, 0, 0,
     "kept as the switch"},
    {2, "W and adapter rows interleaved in chunks of 8 W rows, no prefetch", 8, PF_NONE, SPREAD, 0, 0, 0, "rejected"},
    {3, "interleaved, the adapter chunk prefetched before its W rows", 8, PF_T0, CHUNK_BEFORE, 0, 0, 0, "rejected"},
    {4, "interleaved, adapter and W chunks prefetched", 8, PF_T0, CHUNK_BEFORE, 1, 0, 0, "rejected"},
    {5, "interleaved, the adapter prefetched one chunk further ahead", 8, PF_T0, CHUNK_AHEAD, 0, 0, 0, "rejected"},
    {6, "prefetcht0 of the adapter rows spread over all W rows", 0, PF_T0, SPREAD, 0, 0, 0, "rejected"},
    {7, "prefetcht1, spread over all W rows", 0, PF_T1, SPREAD, 0, 0, 0, "rejected for 10"},
    {8, "prefetcht2, spread over all W rows", 0, PF_T2, SPREAD, 0, 0, 0, "rejected"},
    {9, "prefetchnta, spread over all W rows", 0, PF_NTA, SPREAD, 0, 0, 0, "rejected"},
    {10, "the patch: prefetcht1, at most 128 KB, during the last W rows of at most 256 KB", 0, PF_T1, LAST_ROWS, 0,
     128 << 10, 256 << 10, "the patch"},
};
#define N_VARIANTS (int)(sizeof VARIANTS / sizeof VARIANTS[0])

typedef struct { uint16_t d; int8_t qs[32]; } blk_q8;  /* Q8_0 */

typedef struct {
    int64_t d, rank;
    blk_q8 *w;       /* (d, d / 32) */
    uint16_t *a, *b; /* (rank, d), (d, rank) F16 */
} layer;

static float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    }
    bits = e == 31 ? s | 0x7f800000u | m << 13 : s | (e + 112) << 23 | m << 13;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_f16(float f) {  /* finite, normal-range values only (the lab's data) */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax < 0x38800000u) return (uint16_t)sign;
    uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax >> 13) & 0x3ffu), rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;
static float frand(void) {  /* uniform in [-1, 1) */
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the W row kernel: x quantized like ggml's Q8_0 activations, int8 dot per block ---- */

static void quantize_x(const float *x, int64_t d, blk_q8 *out) {
    for (int64_t b = 0; b < d / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[32 * b + i]));
        float s = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        out[b].d = f32_to_f16(s);
        for (int i = 0; i < 32; i++) out[b].qs[i] = (int8_t)lrintf(x[32 * b + i] * id);
    }
}

static float w_row(const blk_q8 *w, const blk_q8 *xq, int64_t nb) {
    float sum = 0;
    for (int64_t b = 0; b < nb; b++) {
        int s = 0;
        for (int i = 0; i < 32; i++) s += w[b].qs[i] * xq[b].qs[i];
        sum += f16_to_f32(w[b].d) * f16_to_f32(xq[b].d) * (float)s;
    }
    return sum;
}

static void prefetch(const char *p, int kind) {
    switch (kind) {
    case PF_T0: __builtin_prefetch(p, 0, 3); break;
    case PF_T1: __builtin_prefetch(p, 0, 2); break;
    case PF_T2: __builtin_prefetch(p, 0, 1); break;
    case PF_NTA: __builtin_prefetch(p, 0, 0); break;
    default: break;
    }
}

/* ---- one op: W rows [r0, r1) into y, adapter rows [0, m_rows) of m (the A or the B part) ---- */

typedef struct {
    const variant *v;
    const layer *L;
    const blk_q8 *xq;
    float *y;
} op_ctx;

static void check(eora_status s, const char *what) {
    if (s != EORA_OK) {
        fprintf(stderr, "decode_lab: %s failed: %s\n", what, eora_last_error());
        exit(1);
    }
}

/* adapter rows [k0, k1): t = A x (is_a) or y += B t */
static void adapter_rows(const op_ctx *c, int is_a, const float *in, float *out, int64_t k0, int64_t k1) {
    if (k0 >= k1) return;
    const int64_t d = c->L->d, r = c->L->rank;
    if (is_a) {
        eora_matrix am = {EORA_TYPE_F16, c->L->a, (size_t)(r * d * 2), r, d};
        eora_matrix xm = {EORA_TYPE_F32, in, (size_t)d * 4, 1, d};
        check(eora_lora_t(&am, &xm, EORA_ORDER_VEC8, k0, k1, out, (size_t)r * 4, NULL, 0, EORA_FLAG_ROUNDED), "lora_t");
    } else {
        eora_matrix bm = {EORA_TYPE_F16, c->L->b, (size_t)(d * r * 2), d, r};
        eora_matrix tm = {EORA_TYPE_F32, in, (size_t)r * 4, 1, r};
        check(eora_lora_add(&bm, &tm, 1.0f, EORA_ORDER_VEC8, k0, k1, out, (size_t)d * 4, NULL, 0, EORA_FLAG_ROUNDED),
              "lora_add");
    }
}

static void run_op(const op_ctx *c, int64_t r0, int64_t r1, int is_a, const float *in, float *out) {
    const variant *v = c->v;
    const int64_t d = c->L->d, nb = d / 32, rank = c->L->rank;
    const int64_t m_rows = is_a ? rank : d, m_row_bytes = (is_a ? d : rank) * 2;
    const char *m = (const char *)(is_a ? c->L->a : c->L->b);
    const size_t m_bytes = (size_t)(m_rows * m_row_bytes), w_row_bytes = (size_t)nb * sizeof(blk_q8);
    size_t pf_total = v->pf_max && v->pf_max < m_bytes ? v->pf_max : m_bytes, pf_done = 0;
    const int64_t n_w = r1 - r0;
    if (v->chunk) {
        const int64_t n_chunks = (n_w + v->chunk - 1) / v->chunk;
        int64_t k_done = 0;
        for (int64_t ch = 0; ch < n_chunks; ch++) {
            int64_t w0 = r0 + ch * v->chunk, w1 = w0 + v->chunk < r1 ? w0 + v->chunk : r1;
            int64_t k_next = (ch + 1) * m_rows / n_chunks;
            if (v->pf != PF_NONE) {
                int64_t ahead = v->mode == CHUNK_AHEAD ? 1 : 0;
                int64_t p0 = (ch + ahead) * m_rows / n_chunks, p1 = (ch + 1 + ahead) * m_rows / n_chunks;
                if (p1 > m_rows) p1 = m_rows;
                for (const char *p = m + p0 * m_row_bytes; p < m + p1 * m_row_bytes; p += 64) prefetch(p, v->pf);
                if (v->pf_w)
                    for (const char *p = (const char *)(c->L->w + w0 * nb), *e = (const char *)(c->L->w + w1 * nb);
                         p < e; p += 64)
                        prefetch(p, v->pf);
            }
            for (int64_t o = w0; o < w1; o++) c->y[o] += w_row(c->L->w + o * nb, c->xq, nb);
            adapter_rows(c, is_a, in, out, k_done, k_next);
            k_done = k_next;
        }
        return;
    }
    /* W rows, prefetching the adapter's first pf_total bytes over the rows that qualify, then the adapter rows */
    int64_t first = r0;
    if (v->mode == LAST_ROWS && v->pf_window) {
        int64_t rows = (int64_t)(v->pf_window / w_row_bytes);
        first = r1 - rows > r0 ? r1 - rows : r0;
    }
    for (int64_t o = r0; o < r1; o++) {
        if (v->pf != PF_NONE && o >= first && pf_done < pf_total) {
            size_t share = (pf_total - pf_done + (size_t)(r1 - o) - 1) / (size_t)(r1 - o);
            for (size_t k = 0; k < share && pf_done < pf_total; k += 64, pf_done += 64) prefetch(m + pf_done, v->pf);
        }
        c->y[o] += w_row(c->L->w + o * nb, c->xq, nb);
    }
    adapter_rows(c, is_a, in, out, 0, m_rows);
}

/* The two ops of one token: W's first half + t = A x, then W's second half + y += B t. */
static void decode_call(const variant *v, const layer *L, const float *x, float *y, blk_q8 *xq, float *xr, float *t) {
    const int64_t d = L->d;
    memset(y, 0, sizeof(float) * (size_t)d);
    quantize_x(x, d, xq);
    check(eora_lora_round_f16(x, xr, d, 0), "lora_round_f16");
    op_ctx c = {v, L, xq, y};
    run_op(&c, 0, d / 2, 1, xr, t);
    check(eora_lora_round_f16(t, t, L->rank, 0), "lora_round_f16");
    run_op(&c, d / 2, d, 0, t, y);
}

/* Variant 0: fp64, W dequantized, x as given; the adapter from its F16 values. */
static void reference(const layer *L, const float *x, double *y) {
    const int64_t d = L->d, r = L->rank;
    double *t = calloc((size_t)r, sizeof(double));
    for (int64_t k = 0; k < r; k++)
        for (int64_t i = 0; i < d; i++) t[k] += (double)f16_to_f32(L->a[k * d + i]) * x[i];
    for (int64_t o = 0; o < d; o++) {
        double s = 0;
        for (int64_t i = 0; i < d; i++) {
            const blk_q8 *b = L->w + o * (d / 32) + i / 32;
            s += (double)f16_to_f32(b->d) * b->qs[i % 32] * x[i];
        }
        for (int64_t k = 0; k < r; k++) s += (double)f16_to_f32(L->b[o * r + k]) * t[k];
        y[o] = s;
    }
    free(t);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* A plain read of the same bytes a call reads (the bound the variants are measured against). */
static double read_bytes(const layer *L) {
    const int64_t d = L->d;
    uint64_t acc = 0;
    const uint64_t *p = (const uint64_t *)L->w;
    for (size_t i = 0; i < (size_t)(d * (d / 32)) * sizeof(blk_q8) / 8; i++) acc += p[i];
    for (size_t i = 0; i < (size_t)(L->rank * d); i++) acc += L->a[i] + L->b[i];
    return (double)acc;
}

int main(int argc, char **argv) {
    int64_t d = 2048, rank = 64;
    double mb = 256;
    int rounds = 7, calls = 20;
    const char *json = NULL, *only = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--d")) d = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--rank")) rank = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--mb")) mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--rounds")) rounds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--calls")) calls = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--only")) only = argv[i + 1];
        else if (!strcmp(argv[i], "--json")) json = argv[i + 1];
        else {
            fprintf(stderr, "decode_lab: unknown option %s (see the comment at the top of decode_lab.c)\n", argv[i]);
            return 2;
        }
    }
    if (d <= 0 || d % 64 || rank <= 0 || rank % 64 || rank > d || rounds < 1 || calls < 1) {
        fprintf(stderr, "decode_lab: --d and --rank must be positive multiples of 64 (rank <= d), "
                        "rounds and calls >= 1\n");
        return 2;
    }
    const size_t w_bytes = (size_t)(d * (d / 32)) * sizeof(blk_q8), ab_bytes = (size_t)(2 * rank * d * 2);
    const double call_bytes = (double)(w_bytes + ab_bytes) + 8.0 * (double)d;
    int n_layers = (int)ceil(mb * 1048576.0 / (double)(w_bytes + ab_bytes));
    if (n_layers < 2) n_layers = 2;
    layer *layers = calloc((size_t)n_layers, sizeof(layer));
    for (int l = 0; l < n_layers; l++) {
        layer *L = &layers[l];
        L->d = d, L->rank = rank;
        L->w = aligned_alloc(64, (w_bytes + 63) / 64 * 64);
        L->a = aligned_alloc(64, ((size_t)(rank * d * 2) + 63) / 64 * 64);
        L->b = aligned_alloc(64, ((size_t)(rank * d * 2) + 63) / 64 * 64);
        if (!L->w || !L->a || !L->b) { fprintf(stderr, "decode_lab: out of memory (lower --mb)\n"); return 1; }
        for (int64_t b = 0; b < d * (d / 32); b++) {
            L->w[b].d = f32_to_f16(0.01f * (1.5f + frand()));
            for (int i = 0; i < 32; i++) L->w[b].qs[i] = (int8_t)(127.0f * frand());
        }
        for (int64_t i = 0; i < rank * d; i++) {
            L->a[i] = f32_to_f16(0.05f * frand());
            L->b[i] = f32_to_f16(0.05f * frand());
        }
    }
    float *x = malloc(sizeof(float) * (size_t)d), *xr = malloc(sizeof(float) * (size_t)d);
    float *y = malloc(sizeof(float) * (size_t)d), *y1 = malloc(sizeof(float) * (size_t)d);
    float *t = malloc(sizeof(float) * (size_t)rank);
    double *yref = malloc(sizeof(double) * (size_t)d);
    blk_q8 *xq = malloc(sizeof(blk_q8) * (size_t)(d / 32));
    for (int64_t i = 0; i < d; i++) x[i] = frand();

    int use[N_VARIANTS];
    for (int v = 0; v < N_VARIANTS; v++) {
        char key[16];
        snprintf(key, sizeof key, "%d", VARIANTS[v].id);
        use[v] = 1;
        if (only) {
            use[v] = 0;
            for (const char *p = only; *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : p + strlen(p))
                if (atoi(p) == VARIANTS[v].id) use[v] = 1;
        }
    }

    /* validate: every variant against the fp64 reference, and bit for bit against variant 1 */
    reference(&layers[0], x, yref);
    decode_call(&VARIANTS[0], &layers[0], x, y1, xq, xr, t);
    double nmse[N_VARIANTS];
    int same[N_VARIANTS];
    for (int v = 0; v < N_VARIANTS; v++) {
        decode_call(&VARIANTS[v], &layers[0], x, y, xq, xr, t);
        double num = 0, den = 0;
        for (int64_t o = 0; o < d; o++) num += (y[o] - yref[o]) * (y[o] - yref[o]), den += yref[o] * yref[o];
        nmse[v] = num / den;
        same[v] = memcmp(y, y1, sizeof(float) * (size_t)d) == 0;
    }

    /* benchmark: rounds of `calls` calls per variant, variants in a rotated order each round */
    double *ms = calloc((size_t)(N_VARIANTS * rounds), sizeof(double));
    double *stream_ms = calloc((size_t)rounds, sizeof(double));
    int layer_at = 1;
    volatile double sink = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = now();
        for (int c = 0; c < calls; c++) sink += read_bytes(&layers[layer_at++ % n_layers]);
        stream_ms[r] = (now() - t0) * 1e3 / calls;
        for (int k = 0; k < N_VARIANTS; k++) {
            int v = (k + r) % N_VARIANTS;
            if (!use[v]) continue;
            t0 = now();
            for (int c = 0; c < calls; c++) decode_call(&VARIANTS[v], &layers[layer_at++ % n_layers], x, y, xq, xr, t);
            ms[v * rounds + r] = (now() - t0) * 1e3 / calls;
        }
    }
    (void)sink;

    FILE *out = json ? fopen(json, "w") : stdout;
    if (!out) { fprintf(stderr, "decode_lab: cannot write %s\n", json); return 1; }
    qsort(stream_ms, (size_t)rounds, sizeof(double), cmp_double);
    const double stream_gbps = call_bytes / (stream_ms[rounds / 2] * 1e6);
    fprintf(out, "{\"op\": \"decode: y = W x + B (A x), one token, one thread\", \"d\": %lld, \"rank\": %lld, "
            "\"w_type\": \"Q8_0\", \"adapter_type\": \"F16\", \"layers\": %d, \"rounds\": %d, \"calls\": %d,\n"
            " \"bytes_per_call\": %.0f, \"read_ms\": %.6g, \"read_gbps\": %.4g,\n \"variants\": [\n",
            (long long)d, (long long)rank, n_layers, rounds, calls, call_bytes, stream_ms[rounds / 2], stream_gbps);
    int first = 1, failed = 0;
    for (int v = 0; v < N_VARIANTS; v++) {
        if (!use[v]) continue;
        double *row = ms + v * rounds;
        qsort(row, (size_t)rounds, sizeof(double), cmp_double);
        double med = row[rounds / 2], gbps = call_bytes / (med * 1e6);
        int ok = same[v] && nmse[v] < 1e-4;
        failed |= !ok;
        fprintf(out, "%s  {\"id\": %d, \"name\": \"%s\", \"verdict\": \"%s\", \"ms_median\": %.6g, \"ms_min\": %.6g, "
                "\"ms_max\": %.6g, \"gbps\": %.4g, \"of_read\": %.3f, \"nmse_vs_reference\": %.3g, "
                "\"same_bits_as_1\": %s}", first ? "" : ",\n", VARIANTS[v].id, VARIANTS[v].name, VARIANTS[v].verdict,
                med, row[0], row[rounds - 1], gbps, gbps / stream_gbps, nmse[v], same[v] ? "true" : "false");
        fprintf(stderr, "%2d  %7.3f ms  %6.2f GB/s  %4.0f%% of a plain read  nmse %.2g  %s  %s\n", VARIANTS[v].id, med,
                gbps, 100 * gbps / stream_gbps, nmse[v], ok ? "valid" : "INVALID", VARIANTS[v].name);
        first = 0;
    }
    fprintf(out, "\n ]}\n");
    if (json) fclose(out);
    return failed;
}
