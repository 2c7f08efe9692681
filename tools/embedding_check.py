"""Does compensating token_embd / output pay on SmolLM2-135M? Mean KLD to F16 and bytes, written to JSON.

    python tools/embedding_check.py [--hf DIR] [--text eval.txt] [-w WORKDIR] [-o docs/embedding_check.json]

What it measures (calibration `demo,stories` 64 x 512 tokens; evaluation text disjoint, 16 chunks of 512):
1. which types llama-quantize gives token_embd / output in the stock Q2_K, Q3_K_M, Q4_K_M files, and their bytes;
2. the stock (tied) model: Q + EoRA r32 on the blk linears (a tied token_embd cannot carry a LoRA in llama.cpp);
3. an untied copy of the same model (lm_head = embed_tokens written out; the same function, so the same F16
   logits): Q alone, + blk r32, + blk r32 + token_embd/output at several ranks, and the token-count smoothing;
4. the tied embedding's type as a byte lever (llama-quantize --output-tensor-type), blk r32 on top.
KLD: `llama-perplexity --kl-divergence-base base.kld` on the F16 model once, then `--kl-divergence` per model,
reading its "Mean KLD" line. Every adapter is F16. Run under `nice`, it takes about an hour on 2 busy cores.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eora_gguf import adapter, assets, calib_data, calibration, embedding, hf_model, llama_tools, llamacpp  # noqa: E402
from eora_gguf import compensate as comp  # noqa: E402
from eora_gguf.gguf_io import open_gguf  # noqa: E402
from eora_gguf.stats import CalibrationStats  # noqa: E402

CTX, CHUNKS, THREADS = 512, 16, 2
_KLD = re.compile(r"Mean\s+KLD:\s+([-0-9.e+]+)\s+±\s+([-0-9.e+]+)")
_TOP = re.compile(r"Same top p:\s+([0-9.]+)\s+±")
_PPL = re.compile(r"Mean\s+PPL\(Q\)\s*:\s+([0-9.]+)")


def kld(llama, model: Path, text: Path, base: Path, lora: list[Path] = ()) -> dict:
    args = [llama.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(CTX), "--chunks", str(CHUNKS),
            "-t", str(THREADS), "--kl-divergence-base", base, "--kl-divergence", "--no-warmup"]
    for a in lora:
        args += ["--lora", a]
    for _ in range(3):  # the pinned llama.cpp sometimes loses its last log lines (see llamacpp.perplexity)
        res = llama_tools.run_tool(args, f"llama-perplexity --kl-divergence on {model.name}")
        text_out = res.stdout + res.stderr
        m = _KLD.search(text_out)
        if m:
            top, ppl = _TOP.search(text_out), _PPL.search(text_out)
            return {"kld": float(m[1]), "kld_err": float(m[2]), "top1": float(top[1]) / 100 if top else None,
                    "ppl": float(ppl[1]) if ppl else None}
    raise RuntimeError(f"no Mean KLD line from llama-perplexity on {model}")


def tensor_table(path: Path) -> dict:
    with open_gguf(path) as m:
        rows = {n: {"type": m.tensor(n).qtype.name, "bytes": m.tensor(n).n_bytes}
                for n in embedding.EMBEDDING_TENSORS if n in m}
    return {"file_bytes": path.stat().st_size, **rows}


def untied_copy(hf: Path, out: Path) -> Path:
    """The HF folder with tie_word_embeddings false and lm_head.weight = embed_tokens.weight written out."""
    from safetensors.torch import load_file, save_file

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in hf.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json",
                                                                                   "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def smoothing_study(hf: Path, text: Path, work: Path, quant: str, out_path: Path,
                    alphas: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0, 10.0), ranks: tuple[int, ...] = (8, 32, 128)
                    ) -> dict:
    """How well the token_embd correction carries to held-out text, per pseudo-count α: the relative error
    Σ_t u_t ‖ΔE_t − P_t‖² / Σ_t u_t ‖ΔE_t‖², u_t the token counts of the evaluation text (CTX x CHUNKS tokens),
    P solved with calibration counts + α. Needs the files the main run leaves in `work`."""
    tok = hf_model.load_tokenizer(hf)
    est = embedding.EmbeddingStats.load(work / "embd-stats.safetensors")
    eval_ids = torch.tensor(tok(text.read_text())["input_ids"][: CTX * CHUNKS])
    u = embedding.token_counts(eval_ids, est.counts.shape[0])
    u = u / u.sum()
    un_hf = work / "untied-hf"
    with open_gguf(work / f"untied-{quant}.gguf") as m:
        eq = torch.from_numpy(m.dequantize("token_embd.weight")).to(torch.float64)
        qtype = m.tensor("token_embd.weight").qtype.name
    de = embedding.hf_weight(hf_model.tensor_files(un_hf), "token_embd.weight")[: eq.shape[0]] - eq
    before = float(((de * de) * u[:, None]).sum())
    res: dict = {"quant": quant, "token_embd_type": qtype, "eval_tokens": int(eval_ids.numel()),
                 "eval_rel_error": {}, "calib_rel_error": {}}
    w0 = est.row_weights(0.0)
    calib_before = float(((de * de) * w0[:, None]).sum())
    for alpha in alphas:
        sol = embedding.solve_token_embd(de, est.row_weights(alpha), max(ranks))
        for r in ranks:
            b, a = sol.truncate(r)
            res["eval_rel_error"][f"alpha {alpha:g} r{r}"] = embedding.weighted_row_error(de, u, b, a) / before
            res["calib_rel_error"][f"alpha {alpha:g} r{r}"] = embedding.weighted_row_error(de, w0, b, a) / calib_before
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", type=Path, default=None)
    p.add_argument("--text", type=Path, default=None, help="evaluation text (default: the demo's eval.txt)")
    p.add_argument("-w", "--workdir", type=Path, default=Path.home() / ".cache/eora-gguf/embedding-check")
    p.add_argument("-o", "--output", type=Path, default=Path("docs/embedding_check.json"))
    p.add_argument("--quants", default="Q2_K,Q3_K_M")
    p.add_argument("--ranks", default="8,32,128")
    p.add_argument("--smoothing", default="0,1")
    p.add_argument("--lever-quants", default=None, help="quants for the tied-embedding type lever (default --quants)")
    p.add_argument("--brief", action="store_true", help="no single-tensor rows (token_embd or output alone)")
    p.add_argument("--resume", action="store_true", help="append to the rows of an existing output file")
    p.add_argument("--smoothing-study", type=Path, metavar="OUT.json",
                   help="only the held-out study of the token-count smoothing (after a main run)")
    args = p.parse_args(argv)
    torch.set_num_threads(THREADS)
    hf = args.hf or assets.demo_model_dir()
    text = args.text or assets.text_file("eval")
    work = args.workdir
    if args.smoothing_study:
        print(json.dumps(smoothing_study(hf, text, work, args.quants.split(",")[0], args.smoothing_study), indent=1))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    llama = llamacpp.locate(progress=False)
    out: dict = {"model": hf.name, "eval_text": str(text), "ctx": CTX, "chunks": CHUNKS,
                 "calibration": "demo,stories 64x512", "adapter_type": "f16", "rows": [], "types": {},
                 "seconds": {}}
    quants = args.quants.split(",")
    lever_quants = (args.lever_quants or args.quants).split(",")
    if args.resume and args.output.is_file():
        out = json.loads(args.output.read_text())
    ranks = [int(r) for r in args.ranks.split(",")]
    smoothing = [float(a) for a in args.smoothing.split(",")]

    def save() -> None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")

    def row(name: str, model: Path, lora: list[Path] = (), **extra) -> None:
        t0 = time.perf_counter()
        res = kld(llama, model, text, base_kld, list(lora))
        lora_bytes = sum(a.stat().st_size for a in lora)
        r = {"name": name, "model_bytes": model.stat().st_size, "adapter_bytes": lora_bytes,
             "total_bytes": model.stat().st_size + lora_bytes, **res, **extra}
        out["rows"].append(r)
        print(f"{name:55s} {r['total_bytes'] / 1e6:7.2f} MB  KLD {res['kld']:.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        save()

    # F16 reference (tied and untied copies compute the same function; the base logits serve both)
    f16 = work / "f16.gguf"
    if not f16.exists():
        llama_tools.convert(llama, hf, f16)
    base_kld = work / "f16.kld"
    if not base_kld.exists():
        llama_tools.run_tool([llama.tool("llama-perplexity"), "-m", f16, "-f", text, "-c", str(CTX), "--chunks",
                           str(CHUNKS), "-t", str(THREADS), "--kl-divergence-base", base_kld, "--no-warmup"],
                          "llama-perplexity F16 base")
    un_hf = untied_copy(hf, work / "untied-hf")
    un_f16 = work / "untied-f16.gguf"
    if not un_f16.exists():
        llama_tools.convert(llama, un_hf, un_f16)
    out["types"]["F16"] = tensor_table(f16)
    out["types"]["untied F16"] = tensor_table(un_f16)

    # calibration once: blk covariances, token counts, final normed hidden covariance
    t0 = time.perf_counter()
    stats_file, emb_file = work / "stats.safetensors", work / "embd-stats.safetensors"
    if not (stats_file.exists() and emb_file.exists()):
        tok = hf_model.load_tokenizer(hf)
        ids = calib_data.build_calibration("demo,stories", tok, samples=64, seqlen=512)
        st, hidden = calibration.stream(hf, ids, batch_size=8, calib_fingerprint=calib_data.calibration_fingerprint(
            "demo,stories", ids), return_hidden=True)
        st.meta["calib_spec"] = "demo,stories"
        st.save(stats_file)
        embedding.collect(hf, ids, hidden).save(emb_file)
        del hidden
        out["seconds"]["calibrate"] = round(time.perf_counter() - t0, 1)
    stats = CalibrationStats.load(stats_file)
    est = embedding.EmbeddingStats.load(emb_file)
    est_counts = est.counts
    out["calibration_vocab_coverage"] = float((est_counts > 0).double().mean())
    eval_ids = hf_model.load_tokenizer(hf)(text.read_text())["input_ids"][: CTX * CHUNKS]
    seen = set(int(i) for i in torch.nonzero(est_counts).flatten())
    out["eval_tokens_unseen_in_calibration"] = float(np.mean([i not in seen for i in eval_ids]))
    un_stats = CalibrationStats(stats.covariances, stats.n_tokens, stats.module_sites,
                                            {**stats.meta, "model": hf_model.model_identity(un_hf)})

    # the tied embedding's type as a byte lever (token_embd is quantized as the output tensor when tied)
    for q in lever_quants:
        for t in ("q5_0", "q4_0"):
            lf = work / f"{q}-embd-{t}.gguf"
            if not lf.exists():
                llama_tools.quantize(llama, f16, lf, q, extra_args=["--output-tensor-type", t])
            out["types"][f"{q} --output-tensor-type {t}"] = tensor_table(lf)
            row(f"{q} tied embd {t}", lf)
            blk = work / f"{q}-embd-{t}-blk-r32.gguf"
            comp.compensate(hf, lf, blk, rank=32, stats=stats)
            row(f"{q} tied embd {t} + blk r32", lf, [blk])
    for q in quants:
        # stock (tied)
        qf = work / f"{q}.gguf"
        if not qf.exists():
            llama_tools.quantize(llama, f16, qf, q)
        out["types"][q] = tensor_table(qf)
        row(f"{q}", qf)
        blk = work / f"{q}-blk-r32.gguf"
        t0 = time.perf_counter()
        comp.compensate(hf, qf, blk, rank=32, stats=stats)
        out["seconds"][f"{q} blk r32 solve"] = round(time.perf_counter() - t0, 1)
        row(f"{q} + blk r32", qf, [blk])

        # untied copy
        uq = work / f"untied-{q}.gguf"
        if not uq.exists():
            llama_tools.quantize(llama, un_f16, uq, q)
        out["types"][f"untied {q}"] = tensor_table(uq)
        row(f"untied {q}", uq, tied=False)
        ublk = work / f"untied-{q}-blk-r32.gguf"
        comp.compensate(un_hf, uq, ublk, rank=32, stats=un_stats)
        row(f"untied {q} + blk r32", uq, [ublk], tied=False)
        _, blk_factors = adapter.read_gguf_lora(ublk)
        with open_gguf(uq) as base:
            for alpha in smoothing:
                t0 = time.perf_counter()
                sols, rel = embedding.solve_gguf(un_hf, base, est, max(ranks), smoothing=alpha)
                out["seconds"][f"{q} embedding solve"] = round(time.perf_counter() - t0, 1)
                out.setdefault("embedding_solutions", {})[f"{q} alpha {alpha:g}"] = {
                    n: {**rel[n], "gains_first": [float(g) for g in s.gains[:8]], "objective": s.objective}
                    for n, s in sols.items()}
                for r in ranks:
                    if alpha != 0 and r != 32:
                        continue
                    for which in (("token_embd.weight", "output.weight"), ("token_embd.weight",),
                                  ("output.weight",)):
                        if len(which) == 1 and (r != 32 or alpha != 0 or args.brief):
                            continue
                        which = tuple(n for n in which if n in sols)  # a tensor stored without error is skipped
                        if not which or any(x["name"].endswith(f"+ {'+'.join(n.split('.')[0] for n in which)} r{r} "
                                                                f"(alpha {alpha:g})") and x["name"].startswith(
                                                                    f"untied {q} ") for x in out["rows"]):
                            continue
                        factors = dict(blk_factors)
                        factors.update({n: sols[n].truncate(r) for n in which})
                        tag = "+".join(n.split(".")[0] for n in which)
                        path = work / f"untied-{q}-blk32-{tag}-r{r}-a{alpha:g}.gguf"
                        adapter.write_gguf_lora(path, factors, arch="llama", dtype="f16")
                        adapter.check_gguf_lora(path, base)
                        row(f"untied {q} + blk r32 + {tag} r{r} (alpha {alpha:g})", uq, [path], tied=False,
                            embedding_rank=r, smoothing=alpha, tensors=list(which))

    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
