"""The verbs: one function `(args) -> dict` per command, each checking its arguments before its work.

Heavy modules (torch, transformers) are imported inside the verb that needs them, so `eora-gguf --help` and the
light verbs start fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..errors import EoraError
from .checks import check_gguf_inputs, check_hf, check_memory, check_text, output_sizes

log = logging.getLogger("eora_gguf")



def cmd_setup_llama_cpp(args: argparse.Namespace) -> dict:
    from .. import llamacpp
    from ..cache import locked

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
    from .. import assets

    files = assets.fetch_demo(force=args.force)
    return {"dir": str(assets.demo_dir()), "files": files}


def cmd_convert(args: argparse.Namespace) -> dict:
    from .. import llama_tools, llamacpp
    from ..errors import check_output
    from ..hf_model import check_model_folder

    check_output(args.output, inputs=[args.hf_dir])
    check_model_folder(args.hf_dir)
    llama = llamacpp.locate(progress=not args.json)
    out = llama_tools.convert(llama, args.hf_dir, args.output, outtype=args.outtype, verbose=args.verbose)
    return {"output": str(out), "bytes": out.stat().st_size}


def cmd_quantize(args: argparse.Namespace) -> dict:
    from .. import llama_tools, llamacpp
    from ..errors import check_output

    check_output(args.output, inputs=[args.input, args.imatrix])
    llama_tools.require_gguf(args.input)
    llama = llamacpp.locate(progress=not args.json)
    out = llama_tools.quantize(llama, args.input, args.output, args.type, imatrix=args.imatrix,
                            threads=args.threads, verbose=args.verbose)
    return {"output": str(out), "type": args.type.upper(), "bytes": out.stat().st_size}


def cmd_perplexity(args: argparse.Namespace) -> dict:
    from .. import assets, llama_eval, llamacpp

    check_text(args.text, "--text")
    check_gguf_inputs(args.model, args.lora or ())
    llama = llamacpp.locate(progress=not args.json)
    text = assets.text_file(args.text)
    res = llama_eval.text_eval(llama, args.model, text=text, lora=args.lora or (), ctx=args.ctx, chunks=args.chunks,
                               threads=args.threads, verbose=args.verbose)
    return {"model": args.model, "lora": args.lora or [], "text": str(text), "ppl": res.ppl,
            "stderr": res.ppl_stderr, "ctx": res.ctx, "chunks": res.chunks, "tokens": res.chunks * res.ctx,
            "scored_tokens": res.tokens}


def cmd_calibrate(args: argparse.Namespace) -> dict:
    from .. import compensate
    from ..errors import check_output

    check_hf(args.hf)
    check_output(args.output, inputs=[args.hf], need_bytes=output_sizes(args.hf)[0])
    if args.imatrix:
        check_output(args.imatrix, inputs=[args.hf, args.output])
    check_memory(args.hf, args.samples, args.seqlen)
    stats = compensate.calibrate(args.hf, args.calib, samples=args.samples, seqlen=args.seqlen, device=args.device)
    out = {"output": args.output, "tokens": stats.meta.get("tokens"), "sites": len(stats.covariances)}
    if not is_main():  # under torchrun every process holds the summed statistics; rank 0 writes them
        return out
    stats.save(args.output, inputs=(args.hf,))
    if args.imatrix:
        out["imatrix"] = _write_imatrix(args.hf, stats, args.imatrix)
    return out


def _write_imatrix(hf: str, stats, path: str) -> dict:
    from .. import imatrix
    from ..hf_model import load_config
    from ..naming import NameMap

    im = imatrix.from_stats(stats, NameMap.from_config(load_config(hf)))
    im.save(path)
    return {"output": path, "weights": len(im.sums), "tokens": int(max(c.max() for c in im.counts.values()))}


def cmd_imatrix(args: argparse.Namespace) -> dict:
    from .. import compensate
    from ..errors import check_output
    from ..stats import CalibrationStats

    check_output(args.output, inputs=[args.hf, args.stats])
    check_hf(args.hf, tokenizer=not args.stats)
    if args.stats:
        stats = CalibrationStats.load(args.stats)
        stats.check_model(args.hf)
    else:
        check_memory(args.hf, args.samples, args.seqlen)
        stats = compensate.calibrate(args.hf, args.calib, samples=args.samples, seqlen=args.seqlen)
    return _write_imatrix(args.hf, stats, args.output)


def cmd_compensate(args: argparse.Namespace) -> dict:
    from .. import compensate
    from ..errors import check_output
    from ..peft import PEFT_FILES

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
    check_hf(args.hf, tokenizer=not args.stats)
    if args.rank is not None and args.rank >= 1:
        _, adapter_bytes, peft_bytes = output_sizes(args.hf, args.rank)
        check_output(args.output, inputs=inputs, need_bytes=adapter_bytes + (peft_bytes if args.peft else 0))
    if not args.stats:
        check_memory(args.hf, args.samples, args.seqlen)
    report = compensate.compensate(
        args.hf, args.gguf, args.output, rank=args.rank, method=args.method,
        calib=None if args.stats else args.calib, stats=args.stats, samples=args.samples, seqlen=args.seqlen,
        propagate=args.propagate, adapter_type=adapter_type, peft_dir=args.peft, eig_floor=args.eig_floor,
        budget=args.budget, solution_out=args.solution, importance_weights=not args.no_importance,
        allow_mismatch=args.allow_mismatch, embeddings=args.embeddings,
        embedding_smoothing=args.embedding_smoothing, solver=args.solver, device=args.device,
        resume=args.resume and not args.budget)
    return _report_dict(report, args.verbose)


def cmd_prune(args: argparse.Namespace) -> dict:
    from ..prune import Sparsity, prune_model

    check_hf(args.hf_dir)
    sparsity = Sparsity.parse(args.sparsity)
    check_memory(args.hf_dir, args.samples, args.seqlen)
    return prune_model(args.hf_dir, args.output, sparsity=sparsity, method=args.method, calib=args.calib,
                       samples=args.samples, seqlen=args.seqlen)


def cmd_finetune(args: argparse.Namespace) -> dict:
    from ..finetune import finetune

    check_hf(args.hf)
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
    from .. import compensate
    from ..errors import check_output

    check_output(args.output, inputs=[args.gguf, args.solution])
    report = compensate.adapt(args.solution, args.gguf, args.output, args.budget, adapter_type=args.adapter_type,
                              peft_dir=args.peft, hf_dir=args.hf)
    return _report_dict(report, args.verbose)


def cmd_validate(args: argparse.Namespace) -> dict:
    from ..validate import validate

    check_hf(args.hf)
    check_memory(args.hf, args.samples, args.seqlen)
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
    from ..pipeline import RunOptions, run_all

    check_text(args.text, "--text")
    if args.hf_dir:
        check_hf(args.hf_dir)
        check_memory(args.hf_dir, args.samples, args.seqlen)
    if args.prune:
        from ..prune import METHODS, Sparsity

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
    from .. import assets, llamacpp
    from ..errors import check_output
    from ..evaluate import evaluate, format_result
    from ..tasks import parse_tasks

    task_names = parse_tasks(args.tasks) if args.tasks else []
    ppl = args.ppl if args.ppl or task_names else "eval"
    if args.output:  # before the evaluation, not after it
        check_output(args.output, inputs=[args.model, *(args.lora or [])])
    check_text(args.ppl, "--ppl")
    check_gguf_inputs(args.model, args.lora or ())
    llama = llamacpp.locate(progress=not args.json)
    if args.reference and not ppl:
        raise EoraError("--reference measures KL divergence over the --ppl text: give --ppl too")
    res = evaluate(args.model, lora=args.lora or (), ppl_text=assets.text_file(ppl) if ppl else None,
                   ctx=args.ctx, chunks=args.chunks or None, reference=args.reference, task_names=task_names,
                   limit=args.limit,
                   threads=args.threads, gsm8k_max_new=args.max_new, llama=llama, verbose=args.verbose)
    if args.output:
        from ..errors import atomic_output

        with atomic_output(args.output, inputs=[args.model, *(args.lora or [])]) as tmp:
            tmp.write_text(json.dumps(res, indent=1))
    if not args.json:
        return {"table": format_result(res)}
    return res


def cmd_make(args: argparse.Namespace) -> dict:
    from .. import assets
    from ..make import make, parse_calibs

    check_hf(args.hf_dir)
    check_text(args.text, "--text")
    check_memory(args.hf_dir, args.samples, args.seqlen)
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
    from ..info import check_fit, describe, format_info

    desc = describe(args.file)
    if args.base:
        if desc["kind"] != "adapter":
            raise EoraError(f"--base checks an adapter against a base, but {args.file} is a {desc['kind']}")
        desc["fit"] = check_fit(args.file, args.base)
    if args.json:
        return desc
    return {"table": format_info(desc) + (f"\nverdict: {desc['fit']['verdict']}" if args.base else "")}


def cmd_ladder(args: argparse.Namespace) -> dict:
    from .. import assets
    from ..ladder import DEFAULT_TYPES, run_ladder

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
    from ..ladder import markdown

    return {"outputs": res["outputs"], "table": markdown(res)}


def cmd_report(args: argparse.Namespace) -> dict:
    from ..errors import check_output
    from ..report import load_sweep, write_report

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise EoraError(f"-o {out} is a file: `report` writes a folder (report.md, report.json, pareto.png)")
    if out.is_dir():
        for name in ("report.md", "report.json", "pareto.png"):
            check_output(out / name, inputs=[args.sweep])
    return write_report(load_sweep(args.sweep), args.output, title=args.title)



def _report_dict(report, verbose: bool) -> dict:
    """A compensation report as the verb's result; --verbose adds the per-tensor rows."""
    out = report.as_dict()
    if verbose:
        out["per_tensor"] = report.tensors
    return out

def is_main() -> bool:
    from .. import distributed

    return distributed.is_main()
