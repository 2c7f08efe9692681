"""`eora-gguf run`: the whole job in one command, with a summary table.

HF model (or the SmolLM2 demo) -> F16 GGUF -> calibration statistics (once, reused by every quant, method and
rank) -> an importance matrix from them (unless --no-imatrix) -> each quantization, made with it ->
an adapter per (quant, method, rank) -> llama-perplexity of each with and without
its adapter: mean KL divergence to the F16 model and top-1 agreement (the F16 model's log-probabilities over the
text are computed once, under `<workdir>/<model name>/kld/`) and perplexity over the same tokens.
Outputs go to `<workdir>/<model name>/`; a step whose output exists is reused unless --force.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import assets, compensate, imatrix, llama_tools, llamacpp
from .budgeted import n_params
from .eora import METHODS
from .errors import EoraError, atomic_output
from .evaluate import evaluate
from .hf_model import load_config
from .naming import NameMap
from .prune import Sparsity, prune_model
from .report import format_table
from .solver import check_rank
from .stats import CalibrationStats
from .tasks import parse_tasks

log = logging.getLogger(__name__)


def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EoraError(f"--{what} is empty")
    return items


@dataclass
class RunOptions:
    """What `run` / `sweep` do (the CLI's options): comma-separated quant types, ranks and methods, ..."""

    hf_dir: str | None = None  # None: the SmolLM2 demo
    quant: str = "Q4_K_M,Q3_K_M,Q2_K"
    rank: str = "64"
    method: str = "eora"
    adapter_type: str = "f16"
    calib: str = "demo,stories"
    samples: int = 64
    seqlen: int = 512
    prune: str | None = None
    prune_method: str = "wanda"
    no_imatrix: bool = False
    workdir: str = "eora-out"
    text: str = "eval"
    ctx: int = 512
    chunks: int = 32
    tasks: str | None = None
    limit: int | None = None
    threads: int | None = None
    force: bool = False
    solver: str = "auto"
    device: str | None = None
    verbose: bool = False
    progress: bool = True


def run_all(args: RunOptions) -> dict:
    hf_dir = Path(args.hf_dir) if args.hf_dir else assets.demo_model_dir()
    if not hf_dir.is_dir():
        raise EoraError(f"HF model directory {hf_dir} does not exist")
    text = assets.text_file(args.text)
    quants = [q.upper() for q in _csv(args.quant, "quant")]
    for q in quants:
        if q not in llama_tools.QUANT_TYPES:
            raise EoraError(f"unknown quantization type {q!r} in --quant: "
                            f"choose from {', '.join(llama_tools.QUANT_TYPES)}")
    try:
        ranks = sorted({int(r) for r in _csv(args.rank, "rank")})
    except ValueError:
        raise EoraError(f"--rank takes comma-separated integers, got {args.rank!r}") from None
    methods = _csv(args.method, "method")
    for m in methods:
        if m not in METHODS:
            raise EoraError(f"unknown method {m!r} in --method: choose from {', '.join(METHODS)}")
    names = NameMap.from_config(load_config(hf_dir))
    for r in ranks:
        if r:
            check_rank(names, r)

    task_names, limit = _task_options(args)
    llama = llamacpp.locate(progress=args.progress)
    work = Path(args.workdir) / hf_dir.name
    work.mkdir(parents=True, exist_ok=True)

    def fresh(path: Path) -> bool:
        return args.force or not path.is_file()

    # Every file made from the calibration carries its key, so that another --calib/--samples/--seqlen (or
    # --solver) makes new files instead of reusing ones it did not make.
    key = calib_key(args)

    base = work / "model-F16.gguf"
    if fresh(base):
        log.info("converting %s -> %s", hf_dir, base)
        llama_tools.convert(llama, hf_dir, base, outtype="f16", verbose=args.verbose)
    n_weights = n_params(base)
    pruned_base, tag = _pruned_base(args, llama, hf_dir, work, fresh)

    use_imatrix = not args.no_imatrix
    stats_file = imatrix_file = None
    if any(ranks) or use_imatrix:
        stats_file = work / f"calib-{key}.safetensors"
        if fresh(stats_file):
            log.info("calibrating on %s (%d x %d tokens)", args.calib, args.samples, args.seqlen)
            compensate.calibrate(hf_dir, args.calib, samples=args.samples, seqlen=args.seqlen,
                                 device=args.device).save(stats_file)
    if use_imatrix:
        # the importance matrix follows from the same statistics: diag(Σ x xᵀ) per input, as llama-imatrix sums it
        imatrix_file = work / f"imatrix-{key}.gguf"
        if fresh(imatrix_file):
            imatrix.write_imatrix(CalibrationStats.load(stats_file), names, imatrix_file, datasets=[args.calib])

    quant_files = {}
    for q in quants:
        made_from_calib = f"-{key}" if use_imatrix or tag else ""  # an imatrix or a pruned model: both calibrated
        quant_files[q] = work / f"model-{q}{tag}{'-imatrix' if use_imatrix else ''}{made_from_calib}.gguf"
        if fresh(quant_files[q]):
            log.info("quantizing -> %s", quant_files[q])
            llama_tools.quantize(llama, pruned_base or base, quant_files[q], q, imatrix=imatrix_file,
                              threads=args.threads, verbose=args.verbose)

    def measure(model: Path, lora: list[Path]) -> dict:
        return _evaluate_cached(work, model, lora, text, args, llama, reference=base)

    f16 = measure(base, [])
    ppl_f16 = f16["perplexity"]["ppl"]
    rows = [_row("F16", "-", 0, f16, base, None, n_weights, None, None)]
    label = f"+{args.prune} {args.prune_method}" if pruned_base else ""
    if pruned_base:
        rows.append(_row(f"F16{label}", "-", 0, measure(pruned_base, []), pruned_base, None, n_weights, None, None))
    for q in quants:
        plain = measure(quant_files[q], [])
        rows.append(_row(f"{q}{label}", "-", 0, plain, quant_files[q], None, n_weights, None, None))
        for method in methods:
            solver = "" if args.solver == "auto" else f"-{args.solver}"
            adapters = {r: work / f"adapter-{q}{tag}-{method}-r{r}-{args.adapter_type}-{key}{solver}.gguf"
                        for r in ranks if r}
            if adapters and any(fresh(p) for p in adapters.values()):
                top = max(adapters)
                log.info("compensating %s: %s rank %s", q, method, ",".join(map(str, adapters)))
                compensate.compensate(hf_dir, quant_files[q], adapters[top], rank=top, method=method,
                                      stats=stats_file, adapter_type=args.adapter_type,
                                      also={r: p for r, p in adapters.items() if r != top},
                                      solver=args.solver, device=args.device)
            for rank, adapter in adapters.items():
                res = measure(quant_files[q], [adapter])
                rows.append(_row(f"{q}{label}", method, rank, res, quant_files[q], adapter, n_weights, f16, plain))

    summary = {"hf_dir": str(hf_dir), "model_name": hf_dir.name, "text": str(text), "ctx": args.ctx,
               "chunks": args.chunks, "calib": args.calib, "imatrix": str(imatrix_file) if imatrix_file else None,
               "calib_tokens": args.samples * args.seqlen if stats_file else 0, "tasks": task_names,
               "limit": limit, "n_weights": n_weights, "ppl_f16": ppl_f16, "rows": rows,
               "prune": {"sparsity": args.prune, "method": args.prune_method} if pruned_base else None}
    out_json = work / ("sweep.json" if task_names else "summary.json")
    with atomic_output(out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    summary["summary_file"] = str(out_json)
    summary["table"] = format_table(rows)
    return summary


def calib_key(args: RunOptions) -> str:
    """Short hash of what the calibration statistics depend on (text spec, samples, sequence length)."""
    return hashlib.sha256(f"{args.calib}|{args.samples}|{args.seqlen}".encode()).hexdigest()[:12]


def _pruned_base(args: RunOptions, llama: llamacpp.LlamaCpp, hf_dir: Path, work: Path,
                 fresh) -> tuple[Path | None, str]:
    """With --prune: the pruned HF folder (on the calibration text) and its F16 GGUF, which the quantizations are
    made from; adapters are still solved against the dense `hf_dir`, so they correct pruning and quantization
    together. Returns (that GGUF or None, the file-name tag)."""
    if not args.prune:
        return None, ""
    sparsity = Sparsity.parse(args.prune)
    key = calib_key(args)
    tag = f"-pruned-{args.prune_method}-{str(sparsity).replace(':', 'of')}"
    folder = work / f"hf{tag}-{key}"
    if args.force or not (folder / "pruning.json").is_file():
        log.info("pruning %s to %s (%s) on %s", hf_dir.name, sparsity, args.prune_method, args.calib)
        prune_model(hf_dir, folder, sparsity=sparsity, method=args.prune_method, calib=args.calib,
                    samples=args.samples, seqlen=args.seqlen)
    gguf_path = work / f"model{tag}-{key}-F16.gguf"
    if fresh(gguf_path):
        llama_tools.convert(llama, folder, gguf_path, outtype="f16", verbose=args.verbose)
    return gguf_path, tag


def _evaluate_cached(work: Path, model: Path, lora: list[Path], text: Path, args: RunOptions,
                     llama: llamacpp.LlamaCpp, reference: Path | None = None) -> dict:
    """`evaluate.evaluate` of one configuration, reused from `<work>/eval/` while its inputs are unchanged."""
    task_names, limit = _task_options(args)
    files = [model, *lora, text] + ([reference] if reference else [])
    key_src = json.dumps({"files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                          "ctx": args.ctx, "chunks": args.chunks, "tasks": task_names, "limit": limit,
                          "reference": str(reference)})
    cache = work / "eval" / (hashlib.sha256(key_src.encode()).hexdigest()[:16] + ".json")
    if cache.is_file() and not args.force:
        return json.loads(cache.read_text())
    log.info("evaluating %s%s", model.name, f" + {lora[0].name}" if lora else "")
    res = evaluate(model, lora=lora, ppl_text=text, ctx=args.ctx, chunks=args.chunks, reference=reference,
                   kld_cache=work / "kld", task_names=task_names, limit=limit, threads=args.threads, llama=llama,
                   verbose=args.verbose)
    cache.parent.mkdir(exist_ok=True)
    with atomic_output(cache) as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    return res


def _task_options(args: RunOptions) -> tuple[list[str], int | None]:
    return (parse_tasks(args.tasks) if args.tasks else []), args.limit


def _row(quant: str, method: str, rank: int, res: dict, model: Path, adapter: Path | None, n_weights: int,
         f16: dict | None, plain: dict | None) -> dict:
    """One configuration's results; `gap_recovered_pct` per metric: share of the F16-vs-plain-quant gap closed."""
    model_bytes = model.stat().st_size
    adapter_bytes = adapter.stat().st_size if adapter else 0
    ppl = res["perplexity"]
    div = res.get("divergence") or {}
    row = {"quant": quant, "method": method, "rank": rank, "ppl": ppl["ppl"], "ppl_stderr": ppl["stderr"],
           "kld": div.get("kld"), "kld_stderr": div.get("kld_stderr"), "top1": div.get("top1"),
           "model_bytes": model_bytes, "adapter_bytes": adapter_bytes, "bytes": model_bytes + adapter_bytes,
           "bpw": 8.0 * (model_bytes + adapter_bytes) / n_weights, "gap_recovered_pct": None,
           "tasks": res.get("tasks", {}), "gap_recovered_tasks": {},
           "model": str(model), "adapter": str(adapter) if adapter else None}
    if f16 is not None and plain is not None:
        row["gap_recovered_pct"] = _gap(f16["perplexity"]["ppl"], plain["perplexity"]["ppl"], ppl["ppl"])
        if row["kld"] is not None and (plain.get("divergence") or {}).get("kld") is not None:
            row["kld_recovered_pct"] = _gap(0.0, plain["divergence"]["kld"], row["kld"])
        for name, m in row["tasks"].items():
            metric = "acc_norm" if "acc_norm" in m else "exact_match"
            if name in f16.get("tasks", {}) and name in plain.get("tasks", {}):
                row["gap_recovered_tasks"][name] = _gap(f16["tasks"][name][metric], plain["tasks"][name][metric],
                                                        m[metric])
    return row


def _gap(reference: float, quantized: float, compensated: float) -> float | None:
    """Percent of (quantized - reference) removed by compensation; None when there is no gap to close."""
    if abs(quantized - reference) < 1e-12:
        return None
    return 100.0 * (quantized - compensated) / (quantized - reference)
