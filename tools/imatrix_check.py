"""eora-gguf's imatrix against llama-imatrix's on the demo model, and what each does to llama-quantize.

1. Two disjoint calibration texts, each `--chunks` x `--ctx` tokens, half SQuAD (`demo`) and half CoQA (`stories`):
   the `demo,stories` calibration sources.
2. llama-imatrix on the F16 GGUF over each text (file "theirs"). Ours over text 1 from exactly the same token
   windows (`imatrix.llama_imatrix_windows`, read from llama.cpp's own tokenizer and chunking), through our
   calibration (`calibration.collect_stats` on the HF model) and `imatrix.write_imatrix`.
3. Per weight: cosine similarity of the importance vectors (in_sum2 / counts), min/mean per tensor kind; counts.
   llama-imatrix's own loader reads our file (`--in-file ours --show-statistics`).
4. llama-quantize to each `--types` with no imatrix, ours, theirs (text 1, two thread counts) and theirs (text 2):
   the imatrix line it prints, how many weights differ from the plain quantization, then mean KLD / top-1
   agreement / PPL to the F16 model on held-out text (`llama-perplexity --kl-divergence`, `--eval-chunks` x 512
   tokens of LAMBADA).
5. Noise. llama.cpp's CPU path repeats itself bit for bit (checked: llama-imatrix twice, and at another thread
   count; the same quantization twice), so run-to-run noise is zero and two other noises are measured instead:
   perturbation noise, the KLD spread of quantizations made with llama-imatrix's file multiplied element-wise by
   exp(eps * N(0, 1)) with eps the measured spread of log(ours / theirs) (`--perturb` seeds): how much KLD moves
   for an imatrix change as small as the one between ours and theirs; and data noise,
   |KLD(theirs, text 1) - KLD(theirs, text 2)| (same size, disjoint text). The KLD standard errors
   llama-perplexity prints are recorded too. Outputs are cached in --workdir; a rerun redoes only what is missing.

    nice -n 10 python tools/imatrix_check.py [--workdir DIR] [--chunks 64] [--eval-chunks 16] [--threads 2]

Writes docs/imatrix_check.json (every figure read from the runs; figures with their commands).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from eora_gguf import assets, calib_data, calibration, hf_model, llama_tools, llamacpp
from eora_gguf import imatrix as im
from eora_gguf.errors import atomic_output
from eora_gguf.naming import NameMap

log = logging.getLogger("imatrix_check")

_KLD = re.compile(r"Mean\s+KLD:\s+([0-9.eE+-]+)\s+±\s+([0-9.eE+-]+)")
_TOP = re.compile(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)")
_PPL = re.compile(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)\s+±\s+([0-9.]+)")
_LOADED = re.compile(r"loaded (\d+) importance matrix entries from .* computed on (\d+) chunks")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_texts(tok, work: Path, *, chunks: int, ctx: int) -> list[Path]:
    """Two disjoint texts of at least chunks*ctx tokens, each half `demo`, half `stories` (paragraph order)."""
    need = chunks * ctx // 2 + ctx  # per source and text, with a margin for the tokenizer's seams
    parts: list[list[str]] = [[], []]
    for source in calib_data.resolve_sources("demo,stories"):
        paras = [t for t in calib_data.read_texts(source.path) for t in t.split("\n\n") if t.strip()]
        i = 0
        for part in parts:
            n = 0
            while n < need:
                if i >= len(paras):
                    raise SystemExit(f"{source.name} has too little text for {chunks} chunks of {ctx} x 2")
                part.append(paras[i])
                n += len(tok(paras[i], add_special_tokens=False)["input_ids"]) + 1
                i += 1
    out = []
    for k, part in enumerate(parts, 1):
        path = work / f"calib{k}.txt"
        path.write_text("\n\n".join(part) + "\n", encoding="utf-8")
        out.append(path)
    return out


def llama_imatrix(llama, f16: Path, text: Path, out: Path, *, ctx: int, chunks: int, threads: int) -> dict:
    if not out.exists():
        t0 = time.perf_counter()
        with atomic_output(out, suffix=".gguf") as tmp:
            llama_tools.run_tool([llama.tool("llama-imatrix"), "-m", f16, "-f", text, "-c", str(ctx), "--chunks",
                               str(chunks), "--no-ppl", "-t", str(threads), "-o", tmp], "llama-imatrix")
        log.info("llama-imatrix %s: %.0f s", out.name, time.perf_counter() - t0)
    return {"file": out.name, "sha256": sha256(out),
            "command": f"llama-imatrix -m {f16.name} -f {text.name} -c {ctx} --chunks {chunks} --no-ppl -o {out.name}"}


def kind_of(name: str) -> str:
    return name.split(".")[2]  # blk.N.<kind>.weight


def summarize(cmp: dict[str, dict[str, float]]) -> dict:
    kinds: dict[str, list[float]] = {}
    for name, r in cmp.items():
        kinds.setdefault(kind_of(name), []).append(r["cosine"])
    cos = [r["cosine"] for r in cmp.values()]
    return {"tensors": len(cmp), "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
            "worst": min(cmp, key=lambda n: cmp[n]["cosine"]),
            "per_kind": {k: {"n": len(v), "min": float(np.min(v)), "mean": float(np.mean(v))}
                         for k, v in sorted(kinds.items())},
            "counts_equal": all(r["count_a"] == r["count_b"] for r in cmp.values()),
            "counts": sorted({(r["count_a"], r["count_b"]) for r in cmp.values()})}


def quantize(llama, f16: Path, out: Path, qtype: str, imatrix: Path | None, threads: int) -> dict:
    args = [llama.tool("llama-quantize")] + (["--imatrix", imatrix] if imatrix else [])
    t0 = time.perf_counter()
    with atomic_output(out, suffix=".gguf") as tmp:
        res = llama_tools.run_tool([*args, f16, tmp, qtype, str(threads)], f"llama-quantize {qtype}")
    text = res.stdout + res.stderr
    m = _LOADED.search(text)
    return {"file": out.name, "bytes": out.stat().st_size, "sha256": sha256(out),
            "seconds": round(time.perf_counter() - t0, 1),
            "imatrix_loaded": {"entries": int(m[1]), "chunks": int(m[2])} if m else None}


def tensors_differing(plain: Path, q: Path, covered: set[str]) -> dict:
    """How many weights with an imatrix entry are quantized differently than without one; which are not (type)."""
    ra, rb = gguf.GGUFReader(plain), gguf.GGUFReader(q)
    tb = {t.name: t for t in rb.tensors}
    same = {t.name: t.tensor_type.name for t in ra.tensors
            if t.name in covered and t.tensor_type == tb[t.name].tensor_type
            and np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data))}
    others_same = all(np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data))
                      for t in ra.tensors if t.name not in covered)
    types: dict[str, int] = {}
    for t in same.values():
        types[t] = types.get(t, 0) + 1
    return {"covered": len(covered), "changed": len(covered) - len(same), "unchanged_by_type": types,
            "uncovered_tensors_identical": others_same}


def kld(llama, model: Path, text: Path, base: Path, *, chunks: int, threads: int) -> dict:
    args = llama_tools._perplexity_args(llama, model, text, lora=(), ctx=512, chunks=chunks, threads=threads)
    for _ in range(3):  # the pinned llama.cpp sometimes loses its last log lines (see llamacpp.perplexity)
        res = llama_tools.run_tool([*args, "--kl-divergence-base", base, "--kl-divergence"], "llama-perplexity --kld")
        text_out = res.stdout + res.stderr
        k, t, p = _KLD.search(text_out), _TOP.search(text_out), _PPL.search(text_out)
        if k and t and p:
            return {"kld": float(k[1]), "kld_se": float(k[2]), "top1": float(t[1]) / 100,
                    "top1_se": float(t[2]) / 100, "ppl": float(p[1]), "ppl_se": float(p[2])}
    raise SystemExit(f"llama-perplexity printed no KLD summary for {model}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", help="HF model folder (default: the demo SmolLM2-135M-Instruct)")
    ap.add_argument("--workdir", default="imatrix-check")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=64, help="imatrix chunks of --ctx tokens (default 64)")
    ap.add_argument("--eval-chunks", type=int, default=16, help="KLD chunks of 512 tokens (default 16)")
    ap.add_argument("--types", default="Q2_K,Q3_K_M,Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perturb", type=int, default=2, help="perturbed copies of llama-imatrix's file (default 2)")
    ap.add_argument("-o", "--output", default="docs/imatrix_check.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    llama = llamacpp.locate()
    hf = Path(args.hf) if args.hf else assets.demo_model_dir()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    f16 = work / "f16.gguf"
    if not f16.exists():
        llama_tools.convert(llama, hf, f16)
    tok = hf_model.load_tokenizer(hf)
    texts = write_texts(tok, work, chunks=args.chunks, ctx=args.ctx)
    eval_text = assets.text_file("eval")
    seconds["setup"] = time.perf_counter() - t0

    # llama-imatrix on both texts, and once more on a short run to see whether reruns are bit-identical
    t = time.perf_counter()
    theirs = [work / f"theirs{k}.gguf" for k in (1, 2)]
    runs = {f"theirs{k}": llama_imatrix(llama, f16, texts[k - 1], theirs[k - 1], ctx=args.ctx, chunks=args.chunks,
                                        threads=args.threads) for k in (1, 2)}
    seconds["llama_imatrix_both"] = time.perf_counter() - t
    short = [llama_imatrix(llama, f16, texts[0], work / f"rerun{k}.gguf", ctx=args.ctx, chunks=2,
                           threads=args.threads) for k in (1, 2)]
    rerun_identical = short[0]["sha256"] == short[1]["sha256"]
    # does llama-imatrix's result depend on the thread count (float rounding)?
    alt = 1 if args.threads != 1 else 2
    theirs_alt = work / f"theirs1-t{alt}.gguf"
    runs["theirs1_alt_threads"] = llama_imatrix(llama, f16, texts[0], theirs_alt, ctx=args.ctx, chunks=args.chunks,
                                                threads=alt)

    # ours on exactly llama-imatrix's token windows of text 1
    ours, ours_meta = work / "ours1.gguf", work / "ours1.json"
    if not (ours.exists() and ours_meta.exists()):
        t = time.perf_counter()
        ids = im.llama_imatrix_windows(llama, f16, texts[0], ctx=args.ctx, chunks=args.chunks,
                                       threads=args.threads)
        t_tokens = time.perf_counter() - t
        t = time.perf_counter()
        stats = calibration.collect_stats(hf, torch.from_numpy(ids), batch_size=8)
        t_calib = time.perf_counter() - t
        names = NameMap.from_config(hf_model.load_config(hf))
        im.write_imatrix(stats, names, ours, datasets=[texts[0].name])
        ours_meta.write_text(json.dumps({"tokens": t_tokens, "our_calibration": t_calib,
                                         "windows_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
                                         "windows_shape": list(ids.shape)}))
    cached = json.loads(ours_meta.read_text())
    seconds["tokens"], seconds["our_calibration"] = cached["tokens"], cached["our_calibration"]
    a, b, b2 = im.read_imatrix(ours), im.read_imatrix(theirs[0]), im.read_imatrix(theirs[1])
    match = {"ours_vs_theirs_same_tokens": summarize(im.compare(a, b)),
             "theirs_text1_vs_theirs_text2": summarize(im.compare(b, b2)),
             "theirs_vs_theirs_other_thread_count": summarize(im.compare(b, im.read_imatrix(theirs_alt))),
             "weights_only_in_ours": sorted(set(a.sums) - set(b.sums)),
             "weights_only_in_theirs": sorted(set(b.sums) - set(a.sums)),
             "metadata": {"ours": [a.chunk_count, a.chunk_size], "theirs": [b.chunk_count, b.chunk_size]}}
    for _ in range(3):  # the pinned llama.cpp sometimes loses its last log lines (see llamacpp.perplexity)
        show = llama_tools.run_tool([llama.tool("llama-imatrix"), "-m", f16, "--in-file", ours, "--show-statistics"],
                                 "llama-imatrix --show-statistics")
        m = re.search(r"Computing statistics for .* \((\d+) tensors\)", show.stdout + show.stderr)
        if m:
            break
    match["llama_imatrix_loader_reads_ours"] = {"tensors": int(m[1]) if m else None}

    # quantizations and their KLD on held-out text
    t = time.perf_counter()
    base = work / "f16.kld"
    if not base.exists():
        llama_tools.run_tool([*llama_tools._perplexity_args(llama, f16, eval_text, lora=(), ctx=512,
                                                      chunks=args.eval_chunks, threads=args.threads),
                           "--kl-divergence-base", base], "llama-perplexity --kl-divergence-base")
    seconds["kld_base"] = time.perf_counter() - t
    logs = np.concatenate([np.log(a.importance(n).ravel() / b.importance(n).ravel()) for n in a.sums
                           if np.all(a.importance(n) > 0) and np.all(b.importance(n) > 0)])
    eps = float(logs.std())
    match["log_ratio_ours_theirs"] = {"std": eps, "mean": float(logs.mean()), "max_abs": float(np.abs(logs).max())}
    imatrices = {"none": None, "ours": ours, "theirs": theirs[0], "theirs_alt_threads": theirs_alt,
                 "theirs_text2": theirs[1]}
    for k in range(1, args.perturb + 1):
        rng = np.random.default_rng(k)
        pert = im.Imatrix(datasets=b.datasets, chunk_count=b.chunk_count, chunk_size=b.chunk_size, counts=b.counts,
                          sums={n: (v * np.exp(eps * rng.standard_normal(v.shape))).astype(np.float32)
                                for n, v in sorted(b.sums.items())})
        imatrices[f"theirs_perturbed{k}"] = pert.save(work / f"theirs1-perturbed{k}.gguf")
    quants: dict[str, dict] = {}
    t = time.perf_counter()
    for qtype in args.types.split(","):
        row: dict[str, dict] = {}
        for label, imx in imatrices.items():
            q, cache = work / f"{qtype}-{label}.gguf", work / f"{qtype}-{label}.json"
            key = sha256(imx) if imx else None
            if cache.exists() and json.loads(cache.read_text()).get("imatrix_sha256", "-") == key:
                row[label] = json.loads(cache.read_text())
                continue
            row[label] = quantize(llama, f16, q, qtype, imx, args.threads)
            row[label]["imatrix_sha256"] = key
            if label != "none":
                row[label]["vs_none"] = tensors_differing(work / f"{qtype}-none.gguf", q, set(a.sums))
            row[label].update(kld(llama, q, eval_text, base, chunks=args.eval_chunks, threads=args.threads))
            cache.write_text(json.dumps(row[label]))
            log.info("%s %s: KLD %.4f", qtype, label, row[label]["kld"])
        again = quantize(llama, f16, work / f"{qtype}-ours-again.gguf", qtype, ours, args.threads)
        row["ours"]["requantize_identical"] = again["sha256"] == row["ours"]["sha256"]
        (work / f"{qtype}-ours-again.gguf").unlink()
        d_impl = abs(row["ours"]["kld"] - row["theirs"]["kld"])
        d_run = abs(row["theirs"]["kld"] - row["theirs_alt_threads"]["kld"])
        d_data = abs(row["theirs"]["kld"] - row["theirs_text2"]["kld"])
        d_pert = [abs(row["theirs"]["kld"] - row[f"theirs_perturbed{k}"]["kld"]) for k in range(1, args.perturb + 1)]
        row["verdict"] = {"abs_kld_ours_minus_theirs": d_impl, "abs_kld_llama_imatrix_thread_counts": d_run,
                          "abs_kld_theirs_minus_perturbed": d_pert, "abs_kld_text1_minus_text2": d_data,
                          "kld_standard_error_theirs": row["theirs"]["kld_se"],
                          "within_perturbation_noise": bool(d_pert) and d_impl <= max(d_pert),
                          "within_data_noise": d_impl <= d_data,
                          "within_standard_error": d_impl <= row["theirs"]["kld_se"]}
        quants[qtype] = row
    seconds["quantize_and_kld"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    result = {
        "what": "eora-gguf imatrix (from our calibration statistics) vs llama-imatrix on the same tokens; "
                "quantizations with either vs without, mean KLD to F16 on held-out LAMBADA text",
        "model": hf.name, "llama_cpp": llamacpp.COMMIT, "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "calibration_texts": {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p),
                                       "sources": "demo (SQuAD) then stories (CoQA), disjoint paragraphs"}
                              for p in texts},
        "eval_text": {"name": "eval (LAMBADA)", "chunks": args.eval_chunks, "ctx": 512},
        "imatrix_chunks": args.chunks, "ctx": args.ctx,
        "token_windows": {"sha256": cached["windows_sha256"], "shape": cached["windows_shape"]},
        "llama_imatrix_runs": runs, "llama_imatrix_rerun_identical": rerun_identical,
        "llama_imatrix_thread_count_identical": runs["theirs1"]["sha256"] == runs["theirs1_alt_threads"]["sha256"],
        "match": match, "quants": quants, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "seconds_note": "wall seconds of this invocation on a shared machine; a step whose output was cached in "
                        "--workdir by an earlier invocation counts 0 here (tokens/our_calibration are the cached "
                        "step's own)",
        "commands": {
            "ours": "imatrix.llama_imatrix_windows(f16, calib1.txt, ctx, chunks) -> calibration.collect_stats(hf, "
                    "ids) -> imatrix.write_imatrix(stats, names, ours1.gguf)",
            "quantize": "llama-quantize [--imatrix F] f16.gguf Q.gguf TYPE",
            "kld_base": f"llama-perplexity -m f16.gguf -f eval.txt -c 512 --chunks {args.eval_chunks} "
                        "--kl-divergence-base f16.kld",
            "kld": f"llama-perplexity -m Q.gguf -f eval.txt -c 512 --chunks {args.eval_chunks} "
                   "--kl-divergence-base f16.kld --kl-divergence",
        },
    }
    out = Path(args.output)
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"match": match["ours_vs_theirs_same_tokens"],
                      "verdicts": {q: r["verdict"] for q, r in quants.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
