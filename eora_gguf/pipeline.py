"""`eora-gguf run`: the whole job in one command, with a summary table.

HF model (or the SmolLM2 demo) -> F16 GGUF -> each quantization -> calibration statistics (once, reused by every
quant, method and rank) -> an adapter per (quant, method, rank) -> llama-perplexity of each with and without
its adapter. Outputs go to `<workdir>/<model name>/`; a step whose output exists is reused unless --force.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

from . import assets, llamacpp
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EoraError(f"--{what} is empty")
    return items


def run_all(args: argparse.Namespace) -> dict:
    from . import compensate
    from .eora import METHODS

    hf_dir = Path(args.hf_dir) if args.hf_dir else assets.demo_model_dir()
    if not hf_dir.is_dir():
        raise EoraError(f"HF model directory {hf_dir} does not exist")
    text = assets.text_file(args.text)
    quants = [q.upper() for q in _csv(args.quant, "quant")]
    for q in quants:
        if q not in llamacpp.QUANT_TYPES:
            raise EoraError(f"unknown quantization type {q!r} in --quant: choose from {', '.join(llamacpp.QUANT_TYPES)}")
    try:
        ranks = sorted({int(r) for r in _csv(args.rank, "rank")})
    except ValueError:
        raise EoraError(f"--rank takes comma-separated integers, got {args.rank!r}") from None
    methods = _csv(args.method, "method")
    for m in methods:
        if m not in METHODS:
            raise EoraError(f"unknown method {m!r} in --method: choose from {', '.join(METHODS)}")
    names = compensate.NameMap.from_config(compensate.load_config(hf_dir))
    for r in ranks:
        if r:
            compensate.check_rank(names, r)

    llama = llamacpp.locate(progress=not args.json)
    work = Path(args.workdir) / hf_dir.name
    work.mkdir(parents=True, exist_ok=True)

    def fresh(path: Path) -> bool:
        return args.force or not path.is_file()

    base = work / "model-F16.gguf"
    if fresh(base):
        log.info("converting %s -> %s", hf_dir, base)
        llamacpp.convert(llama, hf_dir, base, outtype="f16", verbose=args.verbose)
    n_weights = compensate.n_params(base)

    quant_files = {}
    for q in quants:
        quant_files[q] = work / f"model-{q}.gguf"
        if fresh(quant_files[q]):
            log.info("quantizing -> %s", quant_files[q])
            llamacpp.quantize(llama, base, quant_files[q], q, threads=args.threads, verbose=args.verbose)

    stats_file = None
    if any(ranks):
        key = hashlib.sha256(f"{args.calib}|{args.samples}|{args.seqlen}".encode()).hexdigest()[:12]
        stats_file = work / f"calib-{key}.safetensors"
        if fresh(stats_file):
            log.info("calibrating on %s (%d x %d tokens)", args.calib, args.samples, args.seqlen)
            compensate.calibrate(hf_dir, args.calib, samples=args.samples, seqlen=args.seqlen).save(stats_file)

    def ppl(model: Path, lora: list[Path]) -> llamacpp.Perplexity:
        log.info("llama-perplexity %s%s (%d chunks of %d tokens)", model.name,
                 f" + {lora[0].name}" if lora else "", args.chunks, args.ctx)
        return llamacpp.perplexity(llama, model, text, lora=lora, ctx=args.ctx, chunks=args.chunks,
                                   threads=args.threads, verbose=args.verbose)

    f16 = ppl(base, [])
    rows = [_row("F16", "-", 0, f16, base, None, n_weights, f16.ppl, None)]
    for q in quants:
        plain = ppl(quant_files[q], [])
        rows.append(_row(q, "-", 0, plain, quant_files[q], None, n_weights, f16.ppl, plain.ppl))
        for method in methods:
            adapters = {r: work / f"adapter-{q}-{method}-r{r}-{args.adapter_type}.gguf" for r in ranks if r}
            if adapters and any(fresh(p) for p in adapters.values()):
                top = max(adapters)
                log.info("compensating %s: %s rank %s", q, method, ",".join(map(str, adapters)))
                compensate.compensate(hf_dir, quant_files[q], adapters[top], rank=top, method=method,
                                      stats=stats_file, adapter_type=args.adapter_type,
                                      also={r: p for r, p in adapters.items() if r != top})
            for rank, adapter in adapters.items():
                res = ppl(quant_files[q], [adapter])
                rows.append(_row(q, method, rank, res, quant_files[q], adapter, n_weights, f16.ppl, plain.ppl))

    summary = {"hf_dir": str(hf_dir), "text": str(text), "ctx": args.ctx, "chunks": args.chunks,
               "calib": args.calib, "calib_tokens": args.samples * args.seqlen if stats_file else 0,
               "n_weights": n_weights, "rows": rows}
    out_json = work / "summary.json"
    with atomic_output(out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    summary["summary_file"] = str(out_json)
    summary["table"] = format_table(rows)
    return summary


def _row(quant: str, method: str, rank: int, res: llamacpp.Perplexity, model: Path, adapter: Path | None,
         n_weights: int, ppl_f16: float, ppl_quant: float | None) -> dict:
    model_bytes = model.stat().st_size
    adapter_bytes = adapter.stat().st_size if adapter else 0
    gap = None
    if ppl_quant is not None and ppl_quant != ppl_f16 and adapter is not None:
        gap = 100.0 * (ppl_quant - res.ppl) / (ppl_quant - ppl_f16)
    return {"quant": quant, "method": method, "rank": rank, "ppl": res.ppl, "ppl_stderr": res.stderr,
            "model_bytes": model_bytes, "adapter_bytes": adapter_bytes,
            "bpw": 8.0 * (model_bytes + adapter_bytes) / n_weights, "gap_recovered_pct": gap,
            "model": str(model), "adapter": str(adapter) if adapter else None}


def format_table(rows: list[dict]) -> str:
    lines = ["| model | method | rank | perplexity | model MB | adapter MB | bits/weight (incl. adapter) "
             "| gap recovered |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['gap_recovered_pct']:.1f}%" if r["gap_recovered_pct"] is not None else ""
        lines.append(f"| {r['quant']} | {r['method']} | {r['rank'] or ''} | {r['ppl']:.3f} | "
                     f"{r['model_bytes'] / 1e6:.1f} | {r['adapter_bytes'] / 1e6:.2f} | {r['bpw']:.3f} | {gap} |")
    return "\n".join(lines)
