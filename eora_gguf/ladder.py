"""`eora-gguf ladder`: accuracy per byte — every stock rung of llama.cpp's quantization ladder, with and without an
importance matrix, against the best eora-gguf pair (base GGUF + adapter) that fits in each rung's bytes.

Measured as llama.cpp people measure a quantization: mean KL divergence to the F16 model (and top-1 agreement and
perplexity over the same tokens) on a text disjoint from the calibration text. Every number in `ladder.json`,
`ladder.md` and `ladder.png` is read from the files this run wrote.

Steps (outputs in DIR, each reused when it exists, so an interrupted ladder resumes):
  F16 GGUF → calibration statistics (one pass, `--calib`) → importance matrix from those statistics →
  each stock type plain and with the imatrix → for each rung size, candidate pairs: a smaller base (with the
  imatrix, on the measured KLD-per-byte front of its token-embedding kind, `pair_bases`) + an EoRA adapter that
  fills the remaining bytes (ranks and adapter storage types chosen by `make_pair`) → KLD of everything → the best
  pair per rung.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import budgeted, calib_data, compensate, imatrix, llama_eval, llama_tools, llamacpp, refine
from .budget import Budget
from .errors import EoraError, atomic_output
from .hf_model import load_config
from .ladder_report import Row, best_per_rung, write_outputs
from .naming import NameMap
from .stats import CalibrationStats

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ3_XXS", "IQ3_S",
                 "IQ4_XS", "Q4_0")
# llama-quantize refuses these without an importance matrix: they have only an imatrix row.
IMATRIX_ONLY = frozenset(llama_tools.NEEDS_IMATRIX) | {"IQ3_XXS", "IQ2_M"}


# make_pair(base_gguf, budget_bytes, out_stem) -> (adapter paths, details) or None when nothing fits
PairMaker = Callable[[Path, int, Path], "tuple[list[Path], dict] | None"]


class Meter:
    """KL divergence / perplexity / top-1 of (model, adapters) against the F16 reference, cached per input files."""

    def __init__(self, llama: llamacpp.LlamaCpp, f16: Path, text: Path, *, ctx: int, chunks: int | None,
                 threads: int | None, folder: Path, verbose: bool = False, cache_file: Path | None = None) -> None:
        self.llama, self.threads, self.verbose = llama, threads, verbose
        self.folder = folder
        # a second process measuring in the same folder (tools/refine_check.py) keeps its own file: both rewrite
        # theirs whole
        self.cache_file = cache_file or folder / "measurements.json"
        self.cache: dict[str, dict] = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        t0 = time.perf_counter()
        self.base, self.ref = llama_eval.kld_base(llama, f16, text, ctx=ctx, chunks=chunks, threads=threads,
                                                  cache=folder / "kld", verbose=verbose)
        self.ref_seconds = round(time.perf_counter() - t0, 2)
        self.chunks = chunks

    def __call__(self, model: Path, lora: Sequence[Path] = ()) -> dict:
        key = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in (model, *lora)])
        if key not in self.cache:
            t0 = time.perf_counter()
            r = llama_eval.text_eval(self.llama, model, base=self.base, lora=lora, chunks=self.chunks,
                                     threads=self.threads, verbose=self.verbose)
            self.cache[key] = {"kld": r.kld, "kld_stderr": r.kld_stderr, "ppl": r.ppl, "ppl_stderr": r.ppl_stderr,
                               "top1": r.top1, "seconds": round(time.perf_counter() - t0, 2)}
            with atomic_output(self.cache_file) as tmp:
                tmp.write_text(json.dumps(self.cache, indent=1))
        return self.cache[key]


def rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def budget_pair_maker(hf_dir: Path, stats_file: Path, *, adapter_type: str = "auto",
                      method: str = "eora") -> PairMaker:
    """Pairs whose adapter is allocated under the byte budget (budget.py): each base is solved once (its solution
    file is kept beside it and reused for every budget), then ranks and storage types are chosen per tensor to
    buy the most importance-weighted objective per byte."""

    def make(base: Path, budget: int, stem: Path) -> tuple[list[Path], dict] | None:
        out = stem.with_name(f"{stem.name}-{method}-budget.gguf")
        info = stem.with_name(f"{stem.name}-{method}-budget.json")
        if out.is_file() and info.is_file():
            return [out], json.loads(info.read_text())
        full = base.with_name(f"{base.stem}.{method}-solution.safetensors")  # every storage type: serves all
        sol = full if adapter_type == "auto" or full.is_file() else \
            base.with_name(f"{base.stem}.{method}-{adapter_type}-solution.safetensors")
        if not sol.is_file():
            log.info("solving %s against %s (once for every budget)", method, base.name)
            budgeted.solve(hf_dir, base, method=method, stats=stats_file,
                             adapter_types=budgeted.budget_types(adapter_type)).save(sol)
        try:
            rep = budgeted.adapt(sol, base, out, Budget("adapter", budget), adapter_type=adapter_type)
        except EoraError as e:
            log.info("no adapter of %s fits %d bytes: %s", base.name, budget, e)
            return None
        details = {"method": method, "adapter": "budget", "rank_mean": round(rep.meta["rank_mean"], 1),
                   "rank_max": rep.meta["rank_max"], "types": rep.meta["types"]}
        with atomic_output(info) as tmp:
            tmp.write_text(json.dumps(details))
        return [out], details

    return make


def run_ladder(hf_dir: Path, out_dir: Path, *, calib: str, samples: int, seqlen: int, text: Path,
               types: Sequence[str] = DEFAULT_TYPES, ctx: int = 512, chunks: int | None = 32,
               threads: int | None = None, bases_per_rung: int = 2, embedding_types: Sequence[str] = (),
               refine_iterations: int = 0, pairs_for: Sequence[str] | None = None, adapter_type: str = "auto",
               make_pair: PairMaker | None = None, imatrix_file: Path | None = None, verbose: bool = False) -> dict:
    """The whole ladder; returns the content of ladder.json (also written, with ladder.md and ladder.png).

    embedding_types: also offer bases whose token embedding is stored in these types (llama-quantize
    --token-embedding-type, e.g. q5_0): each such base is measured alone too (a stock llama-quantize product, not
    a rung of its own) so that the adapter's share of a pair's gain can be read off.
    pairs_for: search pairs only at these rungs' sizes (default: every rung); adapter_type: the adapters' storage
    types the budget chooses among ("auto": all of budget.AUTO_TYPES, or one type).
    refine_iterations: then alternate quantize ↔ solve (refine.py) that many times on each rung's best pair; every
    iterate is measured and becomes a row; per-iteration KLD and seconds go to result["refinement"].
    """

    types = [t.upper() for t in types]
    for t in types:
        if t not in llama_tools.QUANT_TYPES or t in ("F16", "BF16", "F32", "COPY"):
            raise EoraError(f"unknown or unquantized ladder type {t!r}: choose from {', '.join(DEFAULT_TYPES)} …")
    embedding_types = [e.lower() for e in embedding_types]
    for e in embedding_types:
        if e.upper() not in llama_tools.QUANT_TYPES:
            raise EoraError(f"unknown token-embedding type {e!r}: e.g. q5_0, q4_0, q8_0")
    if samples < 1 or seqlen < 8:
        raise EoraError("--samples must be >= 1 and --seqlen >= 8")
    calib_data.parse_spec(calib)
    if not (hf_dir / "config.json").is_file():
        raise EoraError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    # every invocation's step seconds, kept across resumes: a resumed ladder reuses finished files, so only the sum
    # over invocations is the wall time of the whole ladder
    timings_file = out_dir / "timings.json"
    earlier = json.loads(timings_file.read_text())["invocations"] if timings_file.is_file() else []
    this_run = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": seconds}
    llama = llamacpp.locate()

    def step(name: str):
        return _Timer(seconds, name)

    f16 = out_dir / "model-F16.gguf"
    with step("convert"):
        if not f16.is_file():
            log.info("converting %s -> %s", hf_dir.name, f16.name)
            llama_tools.convert(llama, hf_dir, f16, outtype="f16", verbose=verbose)
    stats_file = out_dir / "calibration.safetensors"
    with step("calibrate"):
        if not stats_file.is_file():
            log.info("calibrating on %s (%d x %d tokens)", calib, samples, seqlen)
            compensate.calibrate(hf_dir, calib, samples=samples, seqlen=seqlen).save(stats_file)
    with step("imatrix"):
        if imatrix_file is None:
            imatrix_file = out_dir / "imatrix.gguf"
            if not imatrix_file.is_file():

                names = NameMap.from_config(load_config(hf_dir))
                imatrix.write_imatrix(CalibrationStats.load(stats_file), names, imatrix_file, datasets=[calib])
    with step("reference"):
        meter = Meter(llama, f16, text, ctx=ctx, chunks=chunks, threads=threads, folder=out_dir, verbose=verbose)
    rows = [Row("F16", "f16", False, [rel(f16, out_dir)], f16.stat().st_size, 0.0, meter.ref.ppl, 1.0,
                {"type": "F16", "kld_stderr": 0.0, "ppl_stderr": meter.ref.ppl_stderr})]

    # (type, imatrix, token-embedding type or "") -> quantized file
    quants: dict[tuple[str, bool, str], Path] = {}
    with step("quantize"):
        for t in types:
            for im, emb in [(False, ""), (True, "")] + [(True, e) for e in embedding_types]:
                if not im and t in IMATRIX_ONLY:
                    continue
                q = out_dir / f"model-{t}{'-imatrix' if im else ''}{f'-embd-{emb}' if emb else ''}.gguf"
                if not q.is_file():
                    log.info("quantizing -> %s", q.name)
                    llama_tools.quantize(llama, f16, q, t, imatrix=imatrix_file if im else None, threads=threads,
                                      extra_args=["--token-embedding-type", emb] if emb else (), verbose=verbose)
                quants[(t, im, emb)] = q

    def label(t: str, im: bool, emb: str) -> str:
        return f"{t}{f' (token_embd {emb.upper()})' if emb else ''}{' +imatrix' if im else ''}"

    stock_kld: dict[Path, float] = {}
    with step("measure_stock"):
        for (t, im, emb), q in quants.items():
            m = meter(q)
            stock_kld[q] = m["kld"]
            rows.append(Row(label(t, im, emb), "stock", im, [rel(q, out_dir)], q.stat().st_size, m["kld"], m["ppl"],
                            m["top1"], {"type": t, "rung": not emb, "token_embd": emb or None,
                                        "kld_stderr": m["kld_stderr"], "ppl_stderr": m["ppl_stderr"],
                                        "eval_seconds": m["seconds"]}))
    stats_meta = CalibrationStats.load(stats_file).meta
    refinement: list[dict] = []

    def publish(*, complete: bool) -> dict:
        """Write ladder.json/md/png from the rows so far (after every pair, so an interrupted ladder still has
        its finished measurements on disk, marked complete=False)."""
        seconds["total"] = round(time.perf_counter() - t_all, 2)
        invocations = [*earlier, this_run]
        with atomic_output(timings_file) as tmp:
            tmp.write_text(json.dumps({"invocations": invocations}, indent=1))
        total = {k: round(sum(i["seconds"].get(k, 0.0) for i in invocations), 2)
                 for k in dict.fromkeys(k for i in invocations for k in i["seconds"])}
        result = {"model_name": hf_dir.name, "hf_dir": str(hf_dir), "text": str(text), "ctx": meter.ref.ctx,
                  "chunks": meter.ref.chunks, "tokens_scored": meter.ref.tokens, "calib": calib,
                  "calib_tokens": stats_meta.get("tokens"), "complete": complete,
                  "imatrix": rel(imatrix_file, out_dir) if imatrix_file.is_relative_to(out_dir) else str(imatrix_file),
                  "seconds": dict(seconds), "seconds_all_invocations": total, "invocations": invocations,
                  "reference_seconds": meter.ref_seconds, "refinement": refinement,
                  "rows": [r.as_dict() for r in rows]}
        result["verdicts"] = best_per_rung(rows)
        result["outputs"] = write_outputs(result, out_dir)
        return result

    make_pair = make_pair or budget_pair_maker(hf_dir, stats_file, adapter_type=adapter_type)
    targets = [t.upper() for t in pairs_for] if pairs_for else types
    unknown = sorted(set(targets) - set(types))
    if unknown:
        raise EoraError(f"--pairs-for {unknown[0]} is not one of the ladder's --types")
    # a rung's size: its smallest stock file (the imatrix version carries a few hundred bytes of metadata more);
    # rungs are searched in the order given (the ones a user cares most about first; a long ladder publishes
    # after every pair), sizes shared by several types once
    sizes = list(dict.fromkeys(min(q.stat().st_size for (t2, _, emb), q in quants.items() if t2 == t and not emb)
                               for t in targets))
    with step("pairs"):
        for size in sizes:
            for emb in ["", *embedding_types]:  # the stock bases first, then each token-embedding variant
                for t, q in pair_bases(quants, stock_kld, emb, size, bases_per_rung):
                    t0 = time.perf_counter()  # the solve is paid by a base's first budget; later ones reuse it
                    made = make_pair(q, size - q.stat().st_size, out_dir / f"adapter-{q.stem[6:]}-for-{size}")
                    adapter_seconds = round(time.perf_counter() - t0, 2)
                    if made is None:
                        continue
                    adapters, details = made
                    m = meter(q, adapters)
                    total = q.stat().st_size + sum(a.stat().st_size for a in adapters)
                    rows.append(Row(f"{label(t, True, emb)} + EoRA {_describe(details)}", "eora", True,
                                    [rel(q, out_dir)] + [rel(a, out_dir) for a in adapters], total, m["kld"],
                                    m["ppl"], m["top1"], {"type": t, "token_embd": emb or None, "budget": size,
                                                          **details, "kld_stderr": m["kld_stderr"],
                                                          "ppl_stderr": m["ppl_stderr"],
                                                          "adapter_seconds": adapter_seconds,
                                                          "eval_seconds": m["seconds"]}))
                    publish(complete=False)
    with step("refine"):
        for v in best_per_rung(rows) if refine_iterations > 0 else []:
            best = next((r for r in rows if r.name == v["best_pair"]), None)
            if best is None:
                continue
            base = out_dir / best.files[0]
            budget = v["bytes"] - base.stat().st_size

            def adapter_for(b: Path, stem: Path, budget: int = budget) -> list[Path]:
                made = make_pair(b, budget, stem)
                if made is None:
                    raise EoraError(f"no adapter fits {budget} bytes beside {b.name}")
                return made[0]

            hist = refine.refine(llama, f16, best.extra["type"], imatrix_file, out_dir, make_adapter=adapter_for,
                                 measure=lambda b, a: meter(b, a), iterations=refine_iterations, start=base,
                                 stem=f"{base.stem[6:]}-for-{v['bytes']}", threads=threads, verbose=verbose,
                                 extra_args=["--token-embedding-type", best.extra["token_embd"]]
                                 if best.extra.get("token_embd") else ())
            for it in hist["iterations"][1:]:
                m = meter(it["base"], it["adapters"])
                rows.append(Row(f"{best.name}, refined {it['iteration']}", "eora", True,
                                [rel(it["base"], out_dir)] + [rel(a, out_dir) for a in it["adapters"]], it["bytes"],
                                m["kld"], m["ppl"], m["top1"], {**best.extra, "refined": it["iteration"],
                                                                  "kld_stderr": m["kld_stderr"],
                                                                  "ppl_stderr": m["ppl_stderr"]}))
            refinement.append({"rung": v["rung"], "pair": best.name, "iterations": [
                {"iteration": it["iteration"], "kld": it["kld"], "ppl": it["ppl"], "bytes": it["bytes"],
                 "seconds": it["seconds"]} for it in hist["iterations"]]})
    return publish(complete=True)


# an adapter smaller than this share of the rung is not worth a solve (SmolLM2: about 0.45 MB, rank 1-2 on every
# tensor); the next smaller base is tried instead
MIN_ADAPTER_SHARE = 0.005


def pair_bases(quants: dict[tuple[str, bool, str], Path], kld: dict[Path, float], emb: str, size: int,
               n: int) -> list[tuple[str, Path]]:
    """The bases worth an adapter at a rung of `size` bytes: imatrix quantizations with token-embedding type `emb`
    ("" = as llama-quantize chose) that no other base of the same kind beats with no more bytes and a lower KLD
    (the measured front: Q4_0 loses to the smaller IQ4_XS, Q2_K to IQ3_S of equal size), leaving room for an
    adapter of at least MIN_ADAPTER_SHARE of the rung; the n largest, largest first.

    Bases are compared within one embedding kind only: an error in a tied token embedding is one no block adapter
    can undo, so a base's own KLD does not rank it against bases with another embedding (the Q5_K_M base with a
    Q5_0 embedding has a lower KLD than Q4_K_S, yet Q4_K_S + adapter is the better pair)."""
    group = sorted({(q.stat().st_size, kld[q], t, q) for (t, im, e), q in quants.items() if im and e == emb},
                   key=lambda b: (b[0], b[1], b[2]))
    front, seen = [], set()
    for sz, k, t, q in group:
        if (sz, k) in seen:  # identical files under two type names (Q2_K = Q3_K_S on SmolLM2): keep the first
            continue
        seen.add((sz, k))
        if not any(sz2 <= sz and k2 < k for sz2, k2, _, _ in group):
            front.append((sz, t, q))
    fit = [(t, q) for sz, t, q in front if size - sz >= MIN_ADAPTER_SHARE * size]
    return fit[::-1][:n]


def _describe(details: dict) -> str:
    if details.get("adapter") == "budget":
        return f"budget (mean rank {details['rank_mean']}, {'/'.join(details['types'])})"
    return f"r{details.get('rank')} {details.get('adapter_type')}"


class _Timer:
    def __init__(self, into: dict[str, float], name: str) -> None:
        self.into, self.name = into, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = round(self.into.get(self.name, 0.0) + time.perf_counter() - self.t0, 2)
