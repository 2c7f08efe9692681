"""The `eora-gguf` command line: verbs that mirror the llama.cpp workflow.

Each verb is a function `(args) -> dict` returning its result; `main` prints it as text, or as JSON with --json.
User errors (EoraError) print one line and exit 2; nothing partial is left behind (see errors.atomic_output).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# OpenMP threads that spin while waiting stall torch's LAPACK calls badly when the cores are shared
# (eigh 576x576: 9 s instead of 0.1 s measured here); set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from .errors import EoraError

log = logging.getLogger("eora_gguf")

Verb = Callable[[argparse.Namespace], dict]


# --------------------------------------------------------------------------------------------------------------
# verbs


def cmd_setup_llama_cpp(args: argparse.Namespace) -> dict:
    from . import llamacpp

    if args.patched:  # the fused-LoRA build (native/llama.cpp/), beside the stock one
        llama = (llamacpp.build_patched(progress=not args.json) if args.rebuild
                 else llamacpp.locate(patched=True, progress=not args.json))
    elif args.rebuild and not os.environ.get("LLAMA_CPP_DIR"):
        llama = llamacpp.build_pinned(progress=not args.json)
    else:
        llama = llamacpp.locate(progress=not args.json)
    return {"bin_dir": str(llama.bin_dir), "source_dir": str(llama.source_dir), "origin": llama.origin,
            "commit": llamacpp.COMMIT if llama.origin in ("pinned", "patched") else None}


def cmd_fetch_demo(args: argparse.Namespace) -> dict:
    from . import assets

    files = assets.fetch_demo(force=args.force)
    return {"dir": str(assets.demo_dir()), "files": files}


def cmd_convert(args: argparse.Namespace) -> dict:
    from . import llamacpp

    llama = llamacpp.locate(progress=not args.json)
    out = llamacpp.convert(llama, args.hf_dir, args.output, outtype=args.outtype, verbose=args.verbose)
    return {"output": str(out), "bytes": out.stat().st_size}


def cmd_quantize(args: argparse.Namespace) -> dict:
    from . import llamacpp

    llama = llamacpp.locate(progress=not args.json)
    out = llamacpp.quantize(llama, args.input, args.output, args.type, imatrix=args.imatrix,
                            threads=args.threads, verbose=args.verbose)
    return {"output": str(out), "type": args.type.upper(), "bytes": out.stat().st_size}


def cmd_perplexity(args: argparse.Namespace) -> dict:
    from . import assets, llamacpp

    llama = llamacpp.locate(progress=not args.json)
    text = assets.text_file(args.text)
    res = llamacpp.perplexity(llama, args.model, text, lora=args.lora or (), ctx=args.ctx, chunks=args.chunks,
                              threads=args.threads, verbose=args.verbose)
    return {"model": args.model, "lora": args.lora or [], "text": str(text), "ppl": res.ppl, "stderr": res.stderr,
            "ctx": res.ctx, "tokens": res.tokens}


def cmd_calibrate(args: argparse.Namespace) -> dict:
    from . import compensate
    from .errors import check_writable

    check_writable(args.output)
    stats = compensate.calibrate(args.hf, args.calib, samples=args.samples, seqlen=args.seqlen)
    stats.save(args.output)
    return {"output": args.output, "tokens": stats.meta.get("tokens"), "sites": len(stats.covariances)}


def cmd_compensate(args: argparse.Namespace) -> dict:
    from . import compensate

    report = compensate.compensate(
        args.hf, args.gguf, args.output, rank=args.rank, method=args.method,
        calib=None if args.stats else args.calib, stats=args.stats, samples=args.samples, seqlen=args.seqlen,
        propagate=args.propagate, adapter_type=args.adapter_type, peft_dir=args.peft, eig_floor=args.eig_floor,
        embeddings=args.embeddings, embedding_smoothing=args.embedding_smoothing)
    out = report.as_dict()
    if args.verbose:
        out["per_tensor"] = report.tensors
    return out


def cmd_validate(args: argparse.Namespace) -> dict:
    from .validate import validate

    res = validate(args.hf, args.gguf, args.lora, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
                   max_rows=args.rows, threads=args.threads)
    out = {"summary": res["summary"]}
    if args.json or args.verbose:
        out["tensors"] = res["tensors"]
    else:
        lines = ["| tensor | type | rel. output error, GGUF | with adapter |", "|---|---|---:|---:|"]
        for name, r in res["tensors"].items():
            lines.append(f"| {name} | {r['qtype']} | {r['rel_err_quant']:.3e} | {r.get('rel_err_adapter', float('nan')):.3e} |")
        out["table"] = "\n".join(lines)
    return out


def cmd_run(args: argparse.Namespace) -> dict:
    from .pipeline import run_all

    return run_all(args)


def cmd_eval(args: argparse.Namespace) -> dict:
    from . import assets, llamacpp
    from .evaluate import evaluate, format_result
    from .tasks import parse_tasks

    task_names = parse_tasks(args.tasks) if args.tasks else []
    ppl = args.ppl if args.ppl or task_names else "eval"
    llama = llamacpp.locate(progress=not args.json)
    res = evaluate(args.model, lora=args.lora or (), ppl_text=assets.text_file(ppl) if ppl else None,
                   ctx=args.ctx, chunks=args.chunks or None, task_names=task_names, limit=args.limit,
                   threads=args.threads, gsm8k_max_new=args.max_new, llama=llama, verbose=args.verbose)
    if args.output:
        from .errors import atomic_output

        with atomic_output(args.output) as tmp:
            tmp.write_text(json.dumps(res, indent=1))
    if not args.json:
        return {"table": format_result(res)}
    return res


def cmd_report(args: argparse.Namespace) -> dict:
    from .report import load_sweep, write_report

    return write_report(load_sweep(args.sweep), args.output, title=args.title)


# --------------------------------------------------------------------------------------------------------------
# parser


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
    sp.add_argument("-o", "--output", required=True, metavar="STATS.safetensors")

    sp = verb("compensate", cmd_compensate, "solve EoRA against a quantized GGUF and write a GGUF LoRA adapter")
    sp.add_argument("--hf", required=True, metavar="HF_DIR", help="the original HF model")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf", help="its quantized GGUF")
    calib_options(sp)
    sp.add_argument("--stats", metavar="STATS.safetensors", help="reuse statistics from `calibrate`")
    sp.add_argument("--rank", type=int, required=True)
    sp.add_argument("--method", default="eora", help="eora (default), svd or diag")
    sp.add_argument("--propagate", default="original", help="original (default) or compensated (sequential)")
    sp.add_argument("--adapter-type", default="f16", help="f16 (default), f32 or q8_0")
    sp.add_argument("--peft", metavar="DIR", help="also write a PEFT adapter folder (HF row order)")
    sp.add_argument("--eig-floor", type=float, default=1e-6,
                    help="covariance eigenvalues below this x the largest are lifted (ridge); default 1e-6")
    sp.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=False,
                    help="also compensate token_embd and output where llama.cpp can apply a LoRA (untied models; "
                         "needs --calib); default off")
    sp.add_argument("--embedding-smoothing", type=float, default=0.0, metavar="ALPHA",
                    help="pseudo-count added to every token's calibration count for token_embd (default 0)")
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
        sp.add_argument("--adapter-type", default="f16", help="f16 (default), f32 or q8_0")
        calib_options(sp)
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

    sp = verb("eval", cmd_eval, "perplexity and zero-shot task accuracy of a GGUF model (+ adapters) through "
                               "llama.cpp")
    sp.add_argument("--model", required=True, metavar="BASE.gguf")
    sp.add_argument("--lora", action="append", metavar="ADAPTER.gguf")
    sp.add_argument("--ppl", metavar="FILE", help="perplexity text: a file or built-in 'eval' / 'demo' (default "
                                                  "'eval' when no --tasks are given)")
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

    sp = verb("report", cmd_report, "Markdown + JSON tables and a Pareto plot (bits per weight vs perplexity and "
                                   "accuracy) from a sweep")
    sp.add_argument("sweep", metavar="SWEEP.json", help="the sweep.json (or its folder) that `sweep` wrote")
    sp.add_argument("-o", "--output", default="eora-report", metavar="DIR", help="output folder (default ./eora-report)")
    sp.add_argument("--title", help="model name shown in the report")
    return p


def _print_human(result: dict) -> None:
    table = result.pop("table", None)
    if table:
        result.pop("rows", None)  # the table shows them
    for k, v in result.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2}: {v2}")
        else:
            print(f"{k}: {v}")
    if table:
        print(table)


def _on_sigterm(signum, frame):  # let `finally` blocks remove temporary outputs
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.perf_counter()
    try:
        result = args.fn(args)
    except EoraError as e:
        print(f"eora-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eora-gguf: interrupted", file=sys.stderr)
        return 130
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        result.pop("table", None)
        print(json.dumps(result, indent=1, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
