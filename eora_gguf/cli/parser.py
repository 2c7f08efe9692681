"""The argparse parser: one subcommand per verb, with the options the verbs share."""
from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import __version__
from .verbs import (
    cmd_adapt,
    cmd_calibrate,
    cmd_compensate,
    cmd_convert,
    cmd_eval,
    cmd_fetch_demo,
    cmd_finetune,
    cmd_imatrix,
    cmd_info,
    cmd_ladder,
    cmd_make,
    cmd_perplexity,
    cmd_prune,
    cmd_quantize,
    cmd_report,
    cmd_run,
    cmd_setup_llama_cpp,
    cmd_validate,
)

Verb = Callable[[argparse.Namespace], dict]




def scale_options(sp: argparse.ArgumentParser, *, solver: bool = True) -> None:
    """--device (and --solver): where layers run and solves happen, and which solver (see README "Large models")."""
    sp.add_argument("--device", default="auto", help="auto (default: the first GPU torch sees, else the CPU), cpu, "
                                                     "cuda or cuda:N; under torchrun, cuda is each process's GPU")
    if solver:
        sp.add_argument("--solver", default="auto", choices=("auto", "exact", "fast"),
                        help="exact (eigendecomposition), fast (certified randomized block Krylov, within 1%% of "
                             "the optimum) or auto (default: fast for weights wider than 2048 at rank <= 1/8 of "
                             "that)")


def adapter_outputs(sp: argparse.ArgumentParser, adapter_type: str, type_help: str, peft_help: str) -> None:
    """--adapter-type (default `adapter_type`) and --peft DIR of a verb that writes an adapter."""
    sp.add_argument("--adapter-type", default=adapter_type, help=type_help)
    sp.add_argument("--peft", metavar="DIR", help=peft_help)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging and tool output")
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    p = argparse.ArgumentParser(prog="eora-gguf", parents=[common],
                                description="EoRA low-rank compensation for llama.cpp GGUF quantization.")
    p.add_argument("--version", action="version", version=f"eora-gguf {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, fn: Verb, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("setup-llama-cpp", cmd_setup_llama_cpp,
              "locate or build the pinned llama.cpp (commit 0c1e57098), or check LLAMA_CPP_DIR")
    sp.add_argument("--rebuild", action="store_true", help="rebuild the pinned llama.cpp even if cached")
    sp.add_argument("--patched", action="store_true",
                    help="the pinned llama.cpp with eora-gguf's fused LoRA kernel (native/llama.cpp/); the stock "
                         "build stays the default everywhere")

    sp = verb("fetch-demo", cmd_fetch_demo, "fetch SmolLM2-135M-Instruct and the demo data sets into the cache")
    sp.add_argument("--force", action="store_true", help="fetch and rebuild everything again")

    sp = verb("convert", cmd_convert, "HF model folder -> GGUF with llama.cpp's convert_hf_to_gguf.py")
    sp.add_argument("hf_dir", metavar="HF_DIR")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.gguf")
    sp.add_argument("--outtype", default="f16", help="f16 (default), bf16, f32 or q8_0")

    sp = verb("quantize", cmd_quantize, "GGUF -> quantized GGUF with llama-quantize")
    sp.add_argument("input", metavar="IN.gguf")
    sp.add_argument("output", metavar="OUT.gguf")
    sp.add_argument("type", metavar="TYPE", help="Q2_K, Q3_K_M, Q4_K_M, Q4_0, IQ4_XS, Q8_0, ...")
    sp.add_argument("--imatrix", metavar="FILE", help="importance matrix from llama-imatrix")
    sp.add_argument("--threads", type=int)

    sp = verb("perplexity", cmd_perplexity, "llama-perplexity of a GGUF model, optionally with LoRA adapters")
    sp.add_argument("model", metavar="MODEL.gguf")
    sp.add_argument("--lora", action="append", metavar="ADAPTER.gguf")
    sp.add_argument("--text", default="eval", help="text file, or built-in 'eval' (default) / 'demo'")
    sp.add_argument("--ctx", type=int, default=512)
    sp.add_argument("--chunks", type=int, help="limit the number of ctx-sized chunks")
    sp.add_argument("--threads", type=int)

    def calib_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--calib", default="demo,stories",
                        help="calibration data: a .txt or .jsonl file, a built-in name (demo, stories, arc_easy, "
                             "arc_challenge, gsm8k) or a weighted mix like 'arc_easy:1,demo:1' "
                             "(default: demo,stories — SQuAD paragraphs and CoQA stories, equal parts)")
        sp.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
        sp.add_argument("--seqlen", type=int, default=512, help="tokens per sample (default 512)")

    sp = verb("calibrate", cmd_calibrate, "collect reusable calibration statistics (input covariances, float64)")
    sp.add_argument("--hf", required=True, metavar="HF_DIR")
    calib_options(sp)
    scale_options(sp, solver=False)
    sp.add_argument("-o", "--output", required=True, metavar="STATS.safetensors")
    sp.add_argument("--imatrix", metavar="OUT.gguf", help="also write an importance matrix for llama-quantize")

    sp = verb("imatrix", cmd_imatrix, "importance matrix for `llama-quantize --imatrix` (llama-imatrix's GGUF format) "
                                     "from calibration statistics")
    sp.add_argument("--hf", required=True, metavar="HF_DIR")
    calib_options(sp)
    sp.add_argument("--stats", metavar="STATS.safetensors", help="use statistics from `calibrate` (no --calib run)")
    sp.add_argument("-o", "--output", required=True, metavar="OUT.gguf")

    sp = verb("compensate", cmd_compensate, "solve EoRA against a quantized GGUF and write a GGUF LoRA adapter")
    sp.add_argument("--hf", required=True, metavar="HF_DIR", help="the original HF model")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf", help="its quantized GGUF")
    calib_options(sp)
    sp.add_argument("--stats", metavar="STATS.safetensors", help="reuse statistics from `calibrate`")
    sp.add_argument("--rank", type=int, help="the rank of every tensor; with --budget, the largest rank any "
                                              "tensor may get (default 256)")
    sp.add_argument("--budget", metavar="SPEC", help="choose per-tensor ranks and types to fit a byte budget: "
                    "model + adapter (95MB, 95MiB, 5.8bpw) or the adapter alone (adapter:6MB)")
    sp.add_argument("--solution", metavar="SOLUTION.safetensors",
                    help="with --budget: keep the solve (factors, gains, objectives, importance) for `adapt`")
    sp.add_argument("--no-importance", action="store_true",
                    help="with --budget: weigh tensors by their calibration objective alone, not by their "
                         "measured effect on the output")
    sp.add_argument("--method", default="eora", help="eora (default), svd or diag")
    sp.add_argument("--propagate", default="original", help="original (default) or compensated (sequential)")
    sp.add_argument("--adapter-type", help="f16 (default without --budget), f32, q8_0, q5_1, q5_0, q4_1, q4_0, or "
                                           "auto (default with --budget: the budget chooses per tensor)")
    sp.add_argument("--peft", metavar="DIR", help="also write a PEFT adapter folder (HF row order)")
    sp.add_argument("--eig-floor", type=float, default=1e-6,
                    help="covariance eigenvalues below this x the largest are lifted (ridge); default 1e-6")
    sp.add_argument("--allow-mismatch", action="store_true",
                    help="compensate a GGUF whose weights differ from the HF model's by more than quantization does "
                         "(refused by default: it is most likely another model's GGUF)")
    sp.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=False,
                    help="also compensate token_embd and output where llama.cpp can apply a LoRA (untied models; "
                         "needs --calib); default off")
    sp.add_argument("--embedding-smoothing", type=float, default=0.0, metavar="ALPHA",
                    help="pseudo-count added to every token's calibration count for token_embd (default 0)")
    sp.add_argument("-o", "--output", required=True, metavar="ADAPTER.gguf")
    scale_options(sp)
    sp.add_argument("--resume", action="store_true",
                    help="keep per-layer checkpoints in OUTPUT.eora-resume/ and, when a run with the same inputs "
                         "was interrupted, continue from them (with --rank; removed when the adapter is written)")

    sp = verb("prune", cmd_prune, "prune an HF model (Wanda or SparseGPT, N:M or unstructured) layer by layer on "
                                 "calibration text into an HF folder with zeros; convert/quantize it and compensate "
                                 "it against the dense model")
    sp.add_argument("hf_dir", metavar="HF_DIR")
    sp.add_argument("-o", "--output", required=True, metavar="PRUNED_DIR")
    sp.add_argument("--sparsity", default="2:4", help="N:M (2:4, 4:8: at most N non-zeros in every M inputs) or a "
                                                      "fraction pruned per row (0.5); default 2:4")
    sp.add_argument("--method", default="wanda", help="wanda (default: |W|·‖x‖) or sparsegpt (OBS update)")
    calib_options(sp)

    sp = verb("finetune", cmd_finetune, "LoRA fine-tuning (PEFT) of an adapter on the frozen dequantized GGUF base, "
                                       "initialised from EoRA, an adapter file or the standard LoRA init; writes "
                                       "a GGUF LoRA")
    sp.add_argument("--hf", required=True, metavar="HF_DIR", help="the original HF model (config, tokenizer; the "
                                                                  "EoRA init's W)")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf", help="the quantized GGUF to train on (frozen)")
    sp.add_argument("--init", required=True, metavar="ADAPTER.gguf|eora|lora",
                    help="eora (solve EoRA on --calib first), an adapter file, or lora (A random, B = 0)")
    sp.add_argument("--data", required=True, metavar="SPEC",
                    help="arc_easy_val or arc_challenge_val (ARC validation splits), or a .jsonl of ARC rows "
                         "(query, choices, gold) or prompt/completion pairs")
    sp.add_argument("--rank", type=int, default=64, help="LoRA rank for eora/lora (default 64)")
    sp.add_argument("--steps", type=int, default=200)
    sp.add_argument("--lr", type=float, default=1e-4)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--seqlen", type=int, default=128, help="longest training sequence in tokens (default 128)")
    sp.add_argument("--heldout", type=int, default=64, help="examples held out for the logged held-out loss")
    sp.add_argument("--eval-every", type=int, default=25, help="held-out loss every N steps (default 25)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--calib", default="demo,stories",
                    help="the EoRA init's calibration spec (default demo,stories, as compensate)")
    sp.add_argument("--samples", type=int, default=64, help="EoRA init calibration samples (default 64)")
    sp.add_argument("--calib-seqlen", type=int, default=512, help="EoRA init calibration sample length (default "
                                                                  "512)")
    adapter_outputs(sp, "f16", "f16 (default), f32, q8_0, ...", "also write a PEFT adapter folder")
    sp.add_argument("--log", metavar="LOG.json", help="write the per-step loss log here")
    sp.add_argument("-o", "--output", required=True, metavar="ADAPTER.gguf")

    sp = verb("adapt", cmd_adapt, "write the adapter a byte budget buys from a saved solve (compensate --budget "
                                   "--solution), without solving again")
    sp.add_argument("--solution", required=True, metavar="SOLUTION.safetensors")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf", help="the quantized GGUF it was solved against")
    sp.add_argument("--budget", required=True, metavar="SPEC", help="95MB, 95MiB, 5.8bpw or adapter:6MB")
    adapter_outputs(sp, "auto", "auto (default) or one of f16, q8_0, q5_1, q5_0, q4_1, q4_0",
                    "also write a PEFT adapter folder (needs --hf)")
    sp.add_argument("--hf", metavar="HF_DIR", help="the original HF model (for --peft)")
    sp.add_argument("-o", "--output", required=True, metavar="ADAPTER.gguf")

    sp = verb("validate", cmd_validate, "run real activations through the native fused kernel: per-tensor output "
                                       "error against the original weights, without and with the adapter")
    sp.add_argument("--hf", required=True, metavar="HF_DIR")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf")
    sp.add_argument("--lora", required=True, metavar="ADAPTER.gguf")
    sp.add_argument("--calib", default="demo", help="text to take activations from (a calibration spec)")
    sp.add_argument("--samples", type=int, default=4)
    sp.add_argument("--seqlen", type=int, default=256)
    sp.add_argument("--rows", type=int, default=256, help="input rows sampled per tensor")
    sp.add_argument("--threads", type=int)

    def pipeline_options(sp: argparse.ArgumentParser, *, rank: str, method: str, tasks: str | None) -> None:
        sp.add_argument("hf_dir", nargs="?", metavar="HF_DIR")
        sp.add_argument("--quant", default="Q4_K_M,Q3_K_M,Q2_K", help="comma-separated quant types")
        sp.add_argument("--rank", default=rank, help=f"comma-separated ranks; 0 = no adapter (default {rank})")
        sp.add_argument("--method", default=method,
                        help=f"comma-separated methods: eora, svd, diag (default {method})")
        sp.add_argument("--adapter-type", default="f16", help="f16 (default), f32, q8_0, q5_1, q5_0, q4_1 or q4_0")
        calib_options(sp)
        sp.add_argument("--prune", metavar="N:M|FRACTION",
                        help="prune the model first (e.g. 2:4, on the calibration text; see `prune`), quantize the "
                             "pruned model and compensate it against the dense one")
        sp.add_argument("--prune-method", default="wanda", help="with --prune: wanda (default) or sparsegpt")
        sp.add_argument("--no-imatrix", action="store_true",
                        help="quantize without an importance matrix (default: one made from the calibration "
                             "statistics, as serious GGUF publishers quantize)")
        sp.add_argument("--workdir", default="eora-out", help="where GGUFs and the summary go (default ./eora-out)")
        sp.add_argument("--text", default="eval", help="perplexity text (default: built-in 'eval', LAMBADA)")
        sp.add_argument("--ctx", type=int, default=512)
        sp.add_argument("--chunks", type=int, default=32)
        sp.add_argument("--tasks", default=tasks,
                        help="comma-separated tasks evaluated for every configuration: arc_easy, arc_challenge, "
                             f"gsm8k, ... (default {tasks or 'none'})")
        sp.add_argument("--limit", type=int, help="first N items of each task (default: all)")
        sp.add_argument("--threads", type=int)
        sp.add_argument("--force", action="store_true", help="redo steps whose outputs exist")

    sp = verb("run", cmd_run, "all in one: convert -> quantize -> calibrate -> compensate -> llama-perplexity "
                             "with and without the adapter, with a summary table (no HF_DIR: the SmolLM2 demo)")
    pipeline_options(sp, rank="64", method="eora", tasks=None)
    scale_options(sp)

    sp = verb("eval", cmd_eval, "perplexity and zero-shot task accuracy of a GGUF model (+ adapters) through "
                               "llama.cpp")
    sp.add_argument("--model", required=True, metavar="BASE.gguf")
    sp.add_argument("--lora", action="append", metavar="ADAPTER.gguf")
    sp.add_argument("--ppl", metavar="FILE", help="perplexity text: a file or built-in 'eval' / 'demo' (default "
                                                  "'eval' when no --tasks are given)")
    sp.add_argument("--reference", metavar="F16.gguf", help="also the KL divergence to this model (its F16 GGUF) "
                                                            "and top-1 agreement over the --ppl text")
    sp.add_argument("--ctx", type=int, default=512, help="perplexity context (default 512)")
    sp.add_argument("--chunks", type=int, default=32, help="perplexity chunks (default 32; 0 = the whole text)")
    sp.add_argument("--tasks", help="comma-separated: arc_easy, arc_challenge (test sets), arc_easy_val, "
                                    "arc_challenge_val, gsm8k")
    sp.add_argument("--limit", type=int, help="first N items of each task (default: all)")
    sp.add_argument("--max-new", type=int, default=256, help="GSM8K: most tokens generated per answer")
    sp.add_argument("--threads", type=int)
    sp.add_argument("-o", "--output", metavar="RESULT.json", help="also write the result here")

    sp = verb("sweep", cmd_run, "quant types x ranks x methods, reusing one calibration: perplexity and task "
                               "accuracy of each, written to <workdir>/<model>/sweep.json (then `report`)")
    pipeline_options(sp, rank="0,16,64", method="eora,svd", tasks="arc_easy,arc_challenge")
    scale_options(sp)

    sp = verb("make", cmd_make, "HF folder -> OUT_DIR ready to run: a quantized base GGUF (with our imatrix), one "
                               "EoRA adapter per --calib spec, and a README.md model card with measurements and the "
                               "llama-cli / llama-server commands; re-running reuses finished steps")
    sp.add_argument("hf_dir", metavar="HF_DIR")
    sp.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    sp.add_argument("--quant", required=True, metavar="TYPE", help="llama-quantize type of the base, e.g. Q4_K_M")
    sp.add_argument("--rank", type=int, help="the rank of every tensor")
    sp.add_argument("--budget", metavar="SPEC", help="instead of --rank: per-tensor ranks and types under a byte "
                    "budget (95MB, 5.8bpw, adapter:6MB; see compensate --budget)")
    sp.add_argument("--calib", action="append", metavar="[NAME=]SPEC",
                    help="one adapter per --calib (repeatable), e.g. --calib general=demo --calib "
                         "arc=arc_challenge:1,demo:1; the first one also makes the importance matrix (default: demo)")
    sp.add_argument("--samples", type=int, default=32, help="calibration samples per spec (default 32)")
    sp.add_argument("--seqlen", type=int, default=512, help="tokens per sample (default 512)")
    sp.add_argument("--method", default="eora", help="eora (default), svd or diag")
    sp.add_argument("--adapter-type", help="f16 (default with --rank), q8_0, ..., auto (default with --budget)")
    sp.add_argument("--no-imatrix", action="store_true", help="quantize the base without an importance matrix")
    sp.add_argument("--peft", action="store_true", help="also write each adapter as a PEFT folder")
    sp.add_argument("--text", metavar="FILE", help="evaluation text (or built-in 'eval'): KL divergence to F16 and "
                                                   "perplexity of the base with and without each adapter")
    sp.add_argument("--ctx", type=int, default=512)
    sp.add_argument("--chunks", type=int, default=16, help="evaluation chunks of --ctx tokens (default 16)")
    sp.add_argument("--port", type=int, default=8080, help="port in the model card's llama-server command")
    sp.add_argument("--prompt", default="The capital of France is", help="prompt in the model card's commands")
    sp.add_argument("--threads", type=int)
    sp.add_argument("--force", action="store_true", help="redo every step")

    sp = verb("info", cmd_info, "what a GGUF is (model or adapter: ranks, calibration, base identity); with --base, "
                               "whether an adapter fits that base")
    sp.add_argument("file", metavar="FILE.gguf")
    sp.add_argument("--base", metavar="BASE.gguf", help="check that the adapter FILE fits this base")

    sp = verb("ladder", cmd_ladder, "accuracy per byte: every stock quantization type with and without an "
                                   "importance matrix against the best base + EoRA adapter pair of no more bytes "
                                   "(KL divergence to F16); writes DIR/ladder.json, ladder.md, ladder.png")
    sp.add_argument("hf_dir", nargs="?", metavar="HF_DIR", help="HF model folder (default: the SmolLM2 demo)")
    sp.add_argument("-o", "--output", required=True, metavar="DIR")
    calib_options(sp)
    sp.add_argument("--text", default="eval", help="evaluation text, disjoint from --calib (default: built-in "
                                                   "'eval', LAMBADA)")
    sp.add_argument("--types", help="comma-separated stock types (default: " + "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_K_S,"
                                    "Q4_K_M,Q5_K_M,IQ3_XXS,IQ3_S,IQ4_XS,Q4_0)")
    sp.add_argument("--embedding-types", metavar="T1,T2",
                    help="also try bases whose token embedding is stored as these types (llama-quantize "
                         "--token-embedding-type, e.g. q5_0), each measured alone too")
    sp.add_argument("--refine", type=int, default=0, metavar="N",
                    help="joint base + adapter: re-quantize W - BA and re-solve N times for each rung's best pair, "
                         "keeping every measured iterate (default 0)")
    sp.add_argument("--pairs-for", metavar="T1,T2",
                    help="search pairs only at these rungs, in this order (default: every rung, smallest first)")
    sp.add_argument("--adapter-type", default="auto",
                    help="adapter storage: auto (the budget chooses among f16, q8_0, q5_1, q5_0, q4_1, q4_0) or one")
    sp.add_argument("--bases-per-rung", type=int, default=2,
                    help="pairs tried per rung: the N largest bases below it that no smaller base beats on KLD "
                         "(per token-embedding kind; default 2)")
    sp.add_argument("--ctx", type=int, default=512)
    sp.add_argument("--chunks", type=int, default=32)
    sp.add_argument("--threads", type=int)

    sp = verb("report", cmd_report, "Markdown + JSON tables and a Pareto plot (bits per weight vs perplexity and "
                                   "accuracy) from a sweep")
    sp.add_argument("sweep", metavar="SWEEP.json", help="the sweep.json (or its folder) that `sweep` wrote")
    sp.add_argument("-o", "--output", default="eora-report", metavar="DIR",
                    help="output folder (default ./eora-report)")
    sp.add_argument("--title", help="model name shown in the report")
    return p
