// Prompt and decode speed of one llama.cpp build with and without a LoRA adapter, measured side by side in one
// process (tools/bench_llama.py builds it, the CMake target lora_speed, against the stock and the patched libllama).
//
//   lora_speed MODEL ADAPTER THREADS ROUNDS PROMPT_TOKENS DECODE_TOKENS TEXT_FILE
//
// One model, two contexts: one without the adapter, one with it (set once, so neither ever rebuilds its graph
// for a switch). Their work is interleaved token by token, in the order AB BA AB ..., so that the slow phases of
// a shared machine fall on both alike. Per round, what llama-bench's pp and tg tests measure: from an empty KV
// cache, the first PROMPT_TOKENS tokens of TEXT_FILE as one batch in each context (prompt speed), then, from an
// empty cache again, DECODE_TOKENS tokens of the text one at a time in each (decode speed, the first token not
// timed; the text's own tokens, so both do the same work). One JSON line per round on stdout:
//   {"pp_ms": [base, adapter], "pp_tokens": …, "tg_ms": [base, adapter], "tg_tokens": …}

#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

// milliseconds of one llama_decode of `n` tokens from `toks` in `ctx`
static double timed_decode(llama_context * ctx, llama_token * toks, int n) {
    const auto t0 = std::chrono::steady_clock::now();
    if (const int32_t rc = llama_decode(ctx, llama_batch_get_one(toks, n))) {
        std::fprintf(stderr, "lora_speed: llama_decode of %d tokens failed (%d)\n", n, rc);
        std::exit(1);
    }
    llama_get_logits_ith(ctx, -1);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char ** argv) {
    if (argc != 8) {
        std::fprintf(stderr, "usage: %s MODEL ADAPTER THREADS ROUNDS PROMPT_TOKENS DECODE_TOKENS TEXT_FILE\n", argv[0]);
        return 2;
    }
    const int n_threads = std::atoi(argv[3]), n_rounds = std::atoi(argv[4]);
    const int n_pp = std::atoi(argv[5]), n_tg = std::atoi(argv[6]);
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "lora_speed: cannot load %s\n", argv[1]);
        return 1;
    }
    llama_adapter_lora * lora = llama_adapter_lora_init(model, argv[2]);
    if (!lora) {
        std::fprintf(stderr, "lora_speed: cannot load adapter %s\n", argv[2]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (n_pp > n_tg ? n_pp : n_tg) + 16;
    cp.n_batch = cp.n_ubatch = n_pp;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.no_perf = true;
    llama_context * ctx[2] = { llama_init_from_model(model, cp), llama_init_from_model(model, cp) };
    if (!ctx[0] || !ctx[1]) {
        std::fprintf(stderr, "lora_speed: cannot create the contexts\n");
        return 1;
    }
    float scale = 1.0f;
    llama_set_adapters_lora(ctx[1], &lora, 1, &scale);

    std::ifstream in(argv[7]);
    std::stringstream ss;
    ss << in.rdbuf();
    const std::string text = ss.str();
    std::vector<llama_token> toks(text.size() + 16);
    const int n = llama_tokenize(llama_model_get_vocab(model), text.data(), (int32_t) text.size(), toks.data(),
                                 (int32_t) toks.size(), true, false);
    if (n < n_pp || n < n_tg) {
        std::fprintf(stderr, "lora_speed: %s has %d tokens, %d needed\n", argv[7], n, n_pp > n_tg ? n_pp : n_tg);
        return 1;
    }

    int flip = 0;  // AB, then BA, ...
    for (int r = -1; r < n_rounds; r++) {  // round -1 warms both contexts up, not printed
        double pp[2] = { 0, 0 }, tg[2] = { 0, 0 };
        for (llama_context * c : ctx) {
            llama_memory_clear(llama_get_memory(c), true);
        }
        for (int k = 0; k < 2; k++) {
            pp[k ^ flip] += timed_decode(ctx[k ^ flip], toks.data(), n_pp);
        }
        flip ^= 1;
        for (llama_context * c : ctx) {
            llama_memory_clear(llama_get_memory(c), true);
        }
        for (int i = 0; i < n_tg; i++) {
            for (int k = 0; k < 2; k++) {
                const double ms = timed_decode(ctx[k ^ flip], &toks[i], 1);
                if (i > 0) {
                    tg[k ^ flip] += ms;
                }
            }
            flip ^= 1;
        }
        if (r >= 0) {
            std::printf("{\"pp_ms\": [%.4f, %.4f], \"pp_tokens\": %d, \"tg_ms\": [%.4f, %.4f], \"tg_tokens\": %d}\n",
                        pp[0], pp[1], n_pp, tg[0], tg[1], n_tg - 1);
            std::fflush(stdout);
        }
    }
    llama_free(ctx[0]);
    llama_free(ctx[1]);
    llama_adapter_lora_free(lora);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
