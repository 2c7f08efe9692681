"""`eora-gguf run`: the whole job in one command, with a summary table.

HF model (or the SmolLM2 demo) -> F16 GGUF -> each requested quantization -> llama-perplexity of each.
Outputs go to `<workdir>/<model name>/`; a step whose output already exists is reused unless --force.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import assets, llamacpp
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)


def run_all(args: argparse.Namespace) -> dict:
    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
        if not hf_dir.is_dir():
            raise EoraError(f"HF model directory {hf_dir} does not exist")
    else:
        hf_dir = assets.demo_model_dir()
    text = assets.text_file(args.text)
    quants = [q.strip().upper() for q in args.quant.split(",") if q.strip()]
    for q in quants:
        if q not in llamacpp.QUANT_TYPES:
            raise EoraError(f"unknown quantization type {q!r} in --quant: choose from {', '.join(llamacpp.QUANT_TYPES)}")

    llama = llamacpp.locate(progress=not args.json)
    work = Path(args.workdir) / hf_dir.name
    work.mkdir(parents=True, exist_ok=True)

    base = work / "model-F16.gguf"
    if args.force or not base.is_file():
        log.info("converting %s -> %s", hf_dir, base)
        llamacpp.convert(llama, hf_dir, base, outtype="f16", verbose=args.verbose)

    rows = []
    models = [("F16", base)]
    for q in quants:
        out = work / f"model-{q}.gguf"
        if args.force or not out.is_file():
            log.info("quantizing -> %s", out)
            llamacpp.quantize(llama, base, out, q, threads=args.threads, verbose=args.verbose)
        models.append((q, out))

    for name, path in models:
        log.info("llama-perplexity %s (%d chunks of %d tokens)", name, args.chunks, args.ctx)
        res = llamacpp.perplexity(llama, path, text, ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                                  verbose=args.verbose)
        rows.append({"model": name, "file": str(path), "bytes": path.stat().st_size, "ppl": res.ppl,
                     "ppl_stderr": res.stderr, "tokens": res.tokens})

    summary = {"hf_dir": str(hf_dir), "text": str(text), "ctx": args.ctx, "chunks": args.chunks, "rows": rows}
    out_json = work / "summary.json"
    with atomic_output(out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    summary["summary_file"] = str(out_json)
    summary["table"] = format_table(rows)
    return summary


def format_table(rows: list[dict]) -> str:
    lines = ["| model | file size (MB) | perplexity |", "|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} ± {r['ppl_stderr']:.3f} |")
    return "\n".join(lines)

