"""The `eora-gguf` command line: verbs that mirror the llama.cpp workflow.

Each verb is a function `(args) -> dict` returning its result; `main` prints it as text, or as JSON with --json.
User errors (EoraError) print one line and exit 2; nothing partial is left behind (see errors.atomic_output).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
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
# argument checks: everything a verb can check is checked before its work starts

# option -> (smallest, largest) accepted value; None values (option not given) are not checked
_LIMITS = {"ctx": (16, 1 << 20), "chunks": (0, 1 << 24), "threads": (1, 1024), "samples": (1, 1 << 24),
           "seqlen": (2, 1 << 20), "rows": (1, 1 << 24), "limit": (1, 1 << 31), "max_new": (1, 1 << 16)}


def _check_numbers(args: argparse.Namespace) -> None:
    for name, (lo, hi) in _LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and not lo <= value <= hi:
            raise EoraError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {value}")
    floor = getattr(args, "eig_floor", None)
    if floor is not None and not (math.isfinite(floor) and 0.0 <= floor < 1.0):
        raise EoraError(f"--eig-floor must lie in [0, 1), got {floor}")


def _check_text(spec: str | None, what: str) -> None:
    """A user's text file must be non-empty UTF-8 (llama-perplexity aborts on other bytes)."""
    if spec is None or spec in ("eval", "demo") and not Path(spec).is_file():
        return
    p = Path(spec)
    if not p.is_file():
        raise EoraError(f"{what} {spec} does not exist (built-in names: eval, demo)")
    data = p.read_bytes()
    if not data.strip():
        raise EoraError(f"{what} {spec} is empty: give a text of at least --ctx tokens")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EoraError(f"{what} {spec} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                        "convert it, e.g. `iconv -t UTF-8`") from None


def _check_memory(hf: str | os.PathLike[str] | None, samples: int, seqlen: int) -> None:
    """Refuse a calibration whose activations cannot fit in memory (instead of failing after the model load)."""
    from .hf_model import read_config_json

    if hf is None or not Path(hf).is_dir():
        return
    cfg = read_config_json(Path(hf))
    hidden = cfg.get("text_config", cfg).get("hidden_size") if isinstance(cfg.get("text_config", cfg), dict) else None
    if not isinstance(hidden, int) or hidden <= 0:
        return
    need = 4 * samples * seqlen * hidden * 4  # float32 activations of all samples: input, output, two buffers
    avail = _available_memory()
    if avail and need > avail:
        raise EoraError(f"--samples {samples} x --seqlen {seqlen} needs about {need / 2**30:.1f} GiB for the "
                        f"activations, {avail / 2**30:.1f} GiB is available: lower --samples or --seqlen")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_hf(hf: str, *, tokenizer: bool = True) -> None:
    """The HF folder's files, then that we support its architecture, then its tokenizer: one line each."""
    from .hf_model import check_model_folder, check_tokenizer_files, load_config
    from .naming import NameMap

    check_model_folder(hf, tokenizer=False)
    NameMap.from_config(load_config(hf))
    if tokenizer:
        check_tokenizer_files(hf)


def _output_sizes(hf: str, rank: int = 0) -> tuple[int, int, int]:
    """Expected bytes of (calibration statistics, GGUF adapter at F16 / F32, PEFT folder) for this model."""
    from .hf_model import load_config
    from .naming import LINEAR_MODULES, NameMap

    dims = NameMap.from_config(load_config(hf)).dims
    shapes = [dims.linear_shape(m) for m in LINEAR_MODULES]
    # one covariance (float64) per input site: q/k/v share one, gate/up share one
    stats = 8 * dims.n_layers * (2 * dims.hidden ** 2 + (dims.n_head * dims.head_dim) ** 2 + dims.ffn ** 2)
    factors = dims.n_layers * sum(rank * (d_out + d_in) for d_out, d_in in shapes)
    return stats, 4 * factors, 4 * factors


def _check_gguf_inputs(model: str, loras: Sequence[str] = ()) -> None:
    """Open the model GGUF and check each adapter against it with our reader: one line naming the file."""
    from .adapter import check_gguf_lora
    from .gguf_io import open_gguf

    with open_gguf(model) as base:
        for lora in loras:
            check_gguf_lora(lora, base, require_unit_scale=False)


# --------------------------------------------------------------------------------------------------------------
# verbs


def cmd_setup_llama_cpp(args: argparse.Namespace) -> dict:
    from . import llamacpp
    from .cache import locked

    if args.patched:  # the fused-LoRA build (native/llama.cpp/), beside the stock one
        if args.rebuild:
            with locked(llamacpp.patched_root().name):  # the lock locate_patched takes: no overlapping builds
                llama = llamacpp.build_patched(progress=not args.json)
        else:
            llama = llamacpp.locate(patched=True, progress=not args.json)
    elif args.rebuild and not os.environ.get("LLAMA_CPP_DIR"):
        with locked(f"llama.cpp-{llamacpp.COMMIT}"):  # the lock locate() takes before building
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
    from . import llama_tools, llamacpp
    from .errors import check_output
    from .hf_model import check_model_folder

    check_output(args.output, inputs=[args.hf_dir])
    check_model_folder(args.hf_dir)
    llama = llamacpp.locate(progress=not args.json)
    out = llama_tools.convert(llama, args.hf_dir, args.output, outtype=args.outtype, verbose=args.verbose)
    return {"output": str(out), "bytes": out.stat().st_size}


def cmd_quantize(args: argparse.Namespace) -> dict:
    from . import llama_tools, llamacpp
    from .errors import check_output

    check_output(args.output, inputs=[args.input, args.imatrix])
    llama_tools.require_gguf(args.input)
    llama = llamacpp.locate(progress=not args.json)
    out = llama_tools.quantize(llama, args.input, args.output, args.type, imatrix=args.imatrix,
                            threads=args.threads, verbose=args.verbose)
    return {"output": str(out), "type": args.type.upper(), "bytes": out.stat().st_size}


def cmd_perplexity(args: argparse.Namespace) -> dict:
    from . import assets, llama_eval, llamacpp

    _check_text(args.text, "--text")
    _check_gguf_inputs(args.model, args.lora or ())
    llama = llamacpp.locate(progress=not args.json)
    text = assets.text_file(args.text)
    res = llama_eval.text_eval(llama, args.model, text=text, lora=args.lora or (), ctx=args.ctx, chunks=args.chunks,
                               threads=args.threads, verbose=args.verbose)
    return {"model": args.model, "lora": args.lora or [], "text": str(text), "ppl": res.ppl,
            "stderr": res.ppl_stderr, "ctx": res.ctx, "chunks": res.chunks, "tokens": res.chunks * res.ctx,
            "scored_tokens": res.tokens}


def cmd_calibrate(args: argparse.Namespace) -> dict:
    from . import compensate
    from .errors import check_output

    _check_hf(args.hf)
    check_output(args.output, inputs=[args.hf], need_bytes=_output_sizes(args.hf)[0])
    if args.imatrix:
        check_output(args.imatrix, inputs=[args.hf, args.output])
    _check_memory(args.hf, args.samples, args.seqlen)
    stats = compensate.calibrate(args.hf, args.calib, samples=args.samples, seqlen=args.seqlen, device=args.device)
    out = {"output": args.output, "tokens": stats.meta.get("tokens"), "sites": len(stats.covariances)}
    if not _is_main():  # under torchrun every process holds the summed statistics; rank 0 writes them
        return out
    stats.save(args.output, inputs=(args.hf,))
    if args.imatrix:
        out["imatrix"] = _write_imatrix(args.hf, stats, args.imatrix)
    return out


def _write_imatrix(hf: str, stats, path: str) -> dict:
    from . import imatrix
    from .hf_model import load_config
    from .naming import NameMap

    im = imatrix.from_stats(stats, NameMap.from_config(load_config(hf)))
    im.save(path)
    return {"output": path, "weights": len(im.sums), "tokens": int(max(c.max() for c in im.counts.values()))}


def cmd_imatrix(args: argparse.Namespace) -> dict:
    from . import compensate
    from .errors import check_output
    from .stats import CalibrationStats

    check_output(args.output, inputs=[args.hf, args.stats])
    _check_hf(args.hf, tokenizer=not args.stats)
    if args.stats:
        stats = CalibrationStats.load(args.stats)
        stats.check_model(args.hf)
    else:
        _check_memory(args.hf, args.samples, args.seqlen)
        stats = compensate.calibrate(args.hf, args.calib, samples=args.samples, seqlen=args.seqlen)
    return _write_imatrix(args.hf, stats, args.output)


def cmd_compensate(args: argparse.Namespace) -> dict:
    from . import compensate
    from .adapter import PEFT_FILES
    from .errors import check_output

    adapter_type = args.adapter_type or ("auto" if args.budget else "f16")
    if args.rank is None and args.budget is None:
        raise EoraError("give --rank R (every tensor) or --budget SPEC (ranks chosen per tensor)")
    if args.budget is None and (args.solution or args.no_importance):
        raise EoraError("--solution and --no-importance go with --budget")
    inputs = [args.hf, args.gguf, args.stats]
    check_output(args.output, inputs=inputs)
    if args.peft:
        check_output(args.peft, inputs=[*inputs, args.output], what="--peft", folder=True, folder_may_hold=PEFT_FILES)
    if args.solution:
        check_output(args.solution, inputs=[*inputs, args.output])
    _check_hf(args.hf, tokenizer=not args.stats)
    if args.rank is not None and args.rank >= 1:
        _, adapter_bytes, peft_bytes = _output_sizes(args.hf, args.rank)
        check_output(args.output, inputs=inputs, need_bytes=adapter_bytes + (peft_bytes if args.peft else 0))
    if not args.stats:
        _check_memory(args.hf, args.samples, args.seqlen)
    report = compensate.compensate(
        args.hf, args.gguf, args.output, rank=args.rank, method=args.method,
        calib=None if args.stats else args.calib, stats=args.stats, samples=args.samples, seqlen=args.seqlen,
        propagate=args.propagate, adapter_type=adapter_type, peft_dir=args.peft, eig_floor=args.eig_floor,
        budget=args.budget, solution_out=args.solution, importance_weights=not args.no_importance,
        allow_mismatch=args.allow_mismatch, embeddings=args.embeddings,
        embedding_smoothing=args.embedding_smoothing, solver=args.solver, device=args.device,
        resume=args.resume and not args.budget)
    out = report.as_dict()
    if args.verbose:
        out["per_tensor"] = report.tensors
    return out


def cmd_prune(args: argparse.Namespace) -> dict:
    from .prune import Sparsity, prune_model

    _check_hf(args.hf_dir)
    sparsity = Sparsity.parse(args.sparsity)
    _check_memory(args.hf_dir, args.samples, args.seqlen)
    return prune_model(args.hf_dir, args.output, sparsity=sparsity, method=args.method, calib=args.calib,
                       samples=args.samples, seqlen=args.seqlen)


def cmd_finetune(args: argparse.Namespace) -> dict:
    from .finetune import finetune

    _check_hf(args.hf)
    rec = finetune(args.hf, args.gguf, args.output, init=args.init, data=args.data, rank=args.rank,
                   steps=args.steps, lr=args.lr, batch_size=args.batch_size, seqlen=args.seqlen,
                   heldout=args.heldout, eval_every=args.eval_every, seed=args.seed, calib=args.calib,
                   calib_samples=args.samples, calib_seqlen=args.calib_seqlen, log_path=args.log,
                   peft_dir=args.peft, adapter_type=args.adapter_type)
    held = [e["heldout_loss"] for e in rec["log"] if "heldout_loss" in e]
    return {"output": args.output, "init": rec["init"], "rank": rec["rank"], "steps": rec["steps"],
            "heldout_loss_start": held[0], "heldout_loss_end": held[-1], "log": args.log,
            "train_seconds": rec["seconds"]["train"]}


def cmd_adapt(args: argparse.Namespace) -> dict:
    from . import compensate
    from .errors import check_output

    check_output(args.output, inputs=[args.gguf, args.solution])
    report = compensate.adapt(args.solution, args.gguf, args.output, args.budget, adapter_type=args.adapter_type,
                              peft_dir=args.peft, hf_dir=args.hf)
    out = report.as_dict()
    if args.verbose:
        out["per_tensor"] = report.tensors
    return out


def cmd_validate(args: argparse.Namespace) -> dict:
    from .validate import validate

    _check_hf(args.hf)
    _check_memory(args.hf, args.samples, args.seqlen)
    res = validate(args.hf, args.gguf, args.lora, calib=args.calib, samples=args.samples, seqlen=args.seqlen,
                   max_rows=args.rows, threads=args.threads)
    out = {"summary": res["summary"]}
    if args.json or args.verbose:
        out["tensors"] = res["tensors"]
    else:
        lines = ["| tensor | type | rel. output error, GGUF | with adapter |", "|---|---|---:|---:|"]
        for name, r in res["tensors"].items():
            with_adapter = r.get("rel_err_adapter", float("nan"))
            lines.append(f"| {name} | {r['qtype']} | {r['rel_err_quant']:.3e} | {with_adapter:.3e} |")
        out["table"] = "\n".join(lines)
    return out


def cmd_run(args: argparse.Namespace) -> dict:
    from .pipeline import RunOptions, run_all

    _check_text(args.text, "--text")
    if args.hf_dir:
        _check_hf(args.hf_dir)
        _check_memory(args.hf_dir, args.samples, args.seqlen)
    if args.prune:
        from .prune import METHODS, Sparsity

        Sparsity.parse(args.prune)
        if args.prune_method not in METHODS:
            raise EoraError(f"unknown --prune-method {args.prune_method!r}: choose one of {', '.join(METHODS)}")
    work = Path(args.workdir)
    if work.exists() and not work.is_dir():
        raise EoraError(f"--workdir {work} is a file: give a folder")
    return run_all(RunOptions(
        hf_dir=args.hf_dir, quant=args.quant, rank=args.rank, method=args.method, adapter_type=args.adapter_type,
        calib=args.calib, samples=args.samples, seqlen=args.seqlen, prune=args.prune, prune_method=args.prune_method,
        no_imatrix=args.no_imatrix, workdir=args.workdir, text=args.text, ctx=args.ctx, chunks=args.chunks,
        tasks=args.tasks, limit=args.limit, threads=args.threads, force=args.force, solver=args.solver,
        device=args.device, verbose=args.verbose, progress=not args.json))


def cmd_eval(args: argparse.Namespace) -> dict:
    from . import assets, llamacpp
    from .errors import check_output
    from .evaluate import evaluate, format_result
    from .tasks import parse_tasks

    task_names = parse_tasks(args.tasks) if args.tasks else []
    ppl = args.ppl if args.ppl or task_names else "eval"
    if args.output:  # before the evaluation, not after it
        check_output(args.output, inputs=[args.model, *(args.lora or [])])
    _check_text(args.ppl, "--ppl")
    _check_gguf_inputs(args.model, args.lora or ())
    llama = llamacpp.locate(progress=not args.json)
    if args.reference and not ppl:
        raise EoraError("--reference measures KL divergence over the --ppl text: give --ppl too")
    res = evaluate(args.model, lora=args.lora or (), ppl_text=assets.text_file(ppl) if ppl else None,
                   ctx=args.ctx, chunks=args.chunks or None, reference=args.reference, task_names=task_names,
                   limit=args.limit,
                   threads=args.threads, gsm8k_max_new=args.max_new, llama=llama, verbose=args.verbose)
    if args.output:
        from .errors import atomic_output

        with atomic_output(args.output, inputs=[args.model, *(args.lora or [])]) as tmp:
            tmp.write_text(json.dumps(res, indent=1))
    if not args.json:
        return {"table": format_result(res)}
    return res


def cmd_make(args: argparse.Namespace) -> dict:
    from . import assets
    from .make import make, parse_calibs

    _check_hf(args.hf_dir)
    _check_text(args.text, "--text")
    _check_memory(args.hf_dir, args.samples, args.seqlen)
    res = make(Path(args.hf_dir), Path(args.output), quant=args.quant, calibs=parse_calibs(args.calib or ["demo"]),
               rank=args.rank, budget=args.budget, method=args.method, adapter_type=args.adapter_type,
               samples=args.samples, seqlen=args.seqlen, use_imatrix=not args.no_imatrix, peft=args.peft,
               text=assets.text_file(args.text) if args.text else None, ctx=args.ctx, chunks=args.chunks or None,
               threads=args.threads, port=args.port, prompt=args.prompt, force=args.force, verbose=args.verbose)
    if args.json:
        return res
    return {"output": res["output"], "base": res["base"]["file"],
            "adapters": ", ".join(a["file"] for a in res["adapters"]), "model card": f"{res['output']}/README.md"}


def cmd_info(args: argparse.Namespace) -> dict:
    from .info import check_fit, describe, format_info

    desc = describe(args.file)
    if args.base:
        if desc["kind"] != "adapter":
            raise EoraError(f"--base checks an adapter against a base, but {args.file} is a {desc['kind']}")
        desc["fit"] = check_fit(args.file, args.base)
    if args.json:
        return desc
    return {"table": format_info(desc) + (f"\nverdict: {desc['fit']['verdict']}" if args.base else "")}


def cmd_ladder(args: argparse.Namespace) -> dict:
    from . import assets
    from .ladder import DEFAULT_TYPES, run_ladder

    hf_dir = Path(args.hf_dir) if args.hf_dir else assets.demo_model_dir()
    types = [t.strip() for t in (args.types or ",".join(DEFAULT_TYPES)).split(",") if t.strip()]
    if args.chunks is not None and args.chunks < 1:
        raise EoraError(f"--chunks must be >= 1, got {args.chunks}")
    if args.refine < 0:
        raise EoraError(f"--refine must be >= 0, got {args.refine}")
    if args.bases_per_rung < 1:
        raise EoraError(f"--bases-per-rung must be >= 1, got {args.bases_per_rung}")
    res = run_ladder(hf_dir, Path(args.output), calib=args.calib, samples=args.samples, seqlen=args.seqlen,
                     text=assets.text_file(args.text), types=types, ctx=args.ctx, chunks=args.chunks,
                     threads=args.threads, bases_per_rung=args.bases_per_rung,
                     embedding_types=[e for e in (args.embedding_types or "").split(",") if e.strip()],
                     refine_iterations=args.refine, adapter_type=args.adapter_type,
                     pairs_for=[t for t in (args.pairs_for or "").split(",") if t.strip()] or None,
                     verbose=args.verbose)
    if args.json:
        return res
    from .ladder import markdown

    return {"outputs": res["outputs"], "table": markdown(res)}


def cmd_report(args: argparse.Namespace) -> dict:
    from .errors import check_output
    from .report import load_sweep, write_report

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise EoraError(f"-o {out} is a file: `report` writes a folder (report.md, report.json, pareto.png)")
    if out.is_dir():
        for name in ("report.md", "report.json", "pareto.png"):
            check_output(out / name, inputs=[args.sweep])
    return write_report(load_sweep(args.sweep), args.output, title=args.title)


# --------------------------------------------------------------------------------------------------------------
# parser


def scale_options(sp: argparse.ArgumentParser, *, solver: bool = True) -> None:
    """--device (and --solver): where layers run and solves happen, and which solver (see README "Large models")."""
    sp.add_argument("--device", default="auto", help="auto (default: the first GPU torch sees, else the CPU), cpu, "
                                                     "cuda or cuda:N; under torchrun, cuda is each process's GPU")
    if solver:
        sp.add_argument("--solver", default="auto", choices=("auto", "exact", "fast"),
                        help="exact (eigendecomposition), fast (certified randomized block Krylov, within 1%% of "
                             "the optimum) or auto (default: fast for weights wider than 2048 at rank <= 1/8 of "
                             "that)")


def _is_main() -> bool:
    from . import distributed

    return distributed.is_main()


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
    sp.add_argument("--adapter-type", default="f16", help="f16 (default), f32, q8_0, ...")
    sp.add_argument("--peft", metavar="DIR", help="also write a PEFT adapter folder")
    sp.add_argument("--log", metavar="LOG.json", help="write the per-step loss log here")
    sp.add_argument("-o", "--output", required=True, metavar="ADAPTER.gguf")

    sp = verb("adapt", cmd_adapt, "write the adapter a byte budget buys from a saved solve (compensate --budget "
                                   "--solution), without solving again")
    sp.add_argument("--solution", required=True, metavar="SOLUTION.safetensors")
    sp.add_argument("--gguf", required=True, metavar="BASE.gguf", help="the quantized GGUF it was solved against")
    sp.add_argument("--budget", required=True, metavar="SPEC", help="95MB, 95MiB, 5.8bpw or adapter:6MB")
    sp.add_argument("--adapter-type", default="auto", help="auto (default) or one of f16, q8_0, q5_1, q5_0, q4_1, "
                                                           "q4_0")
    sp.add_argument("--peft", metavar="DIR", help="also write a PEFT adapter folder (needs --hf)")
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


class _Summaries(logging.Filter):
    """Repeated warnings (records with `extra={"summary": (key, text, severity, detail)}`) become one line each:
    how many, and the worst one. The single records pass only with --verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.seen: dict[str, list] = {}  # key -> [count, text, worst severity, its detail]

    def filter(self, record: logging.LogRecord) -> bool:
        summary = getattr(record, "summary", None)
        if summary is None:
            return True
        key, text, severity, detail = summary
        entry = self.seen.setdefault(key, [0, text, float("-inf"), detail])
        entry[0] += 1
        if severity > entry[2]:
            entry[2:] = [severity, detail]
        return self.verbose

    def flush(self) -> None:
        for count, text, _, detail in self.seen.values():
            log.warning("%d %s; the largest: %s", count, text, detail)
        self.seen.clear()


def _on_sigterm(signum, frame):  # let `finally` blocks remove temporary outputs
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    if not args.verbose:  # gguf-py narrates every file it writes at INFO
        logging.getLogger("gguf").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)
    summaries = _Summaries(args.verbose)
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(summaries)
    t0 = time.perf_counter()
    try:
        _check_numbers(args)
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # started by torchrun: join its process group
            from . import devices, distributed

            if args.verb not in ("calibrate", "compensate"):
                raise EoraError(f"`{args.verb}` runs in one process: only calibrate and compensate run under "
                                "torchrun")
            distributed.init_from_env(devices.resolve(getattr(args, "device", None)))
            if not distributed.is_main():  # one process narrates; the others speak only of problems
                logging.getLogger().setLevel(logging.WARNING)
        result = args.fn(args)
    except EoraError as e:
        print(f"eora-gguf: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("eora-gguf: error: out of memory: lower --samples/--seqlen (or the model size) or free memory",
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports a failed allocation as a RuntimeError
        if not re.search(r"can't allocate memory|out of memory|DefaultCPUAllocator", str(e)):
            raise
        print(f"eora-gguf: error: out of memory ({str(e).splitlines()[0][:200]}): lower --samples/--seqlen or "
              "free memory", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG):
            raise
        print(f"eora-gguf: error: {e.strerror}{f': {e.filename}' if e.filename else ''}: free space or choose "
              "another output path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eora-gguf: interrupted", file=sys.stderr)
        return 130
    finally:
        for h in handlers:
            h.removeFilter(summaries)
    if not _is_main():  # under torchrun, rank 0 reports
        return 0
    summaries.flush()  # on success only: after an error its one line is all the user needs
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        result.pop("table", None)
        print(json.dumps(result, indent=1, default=str))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
