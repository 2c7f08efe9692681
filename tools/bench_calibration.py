"""Benchmark layer-streaming calibration against one plain HF forward pass over the same tokens.

    python tools/bench_calibration.py --hf HF_DIR --samples 64 --seqlen 512 --json OUT.json

Each measurement runs in a fresh subprocess so its peak RSS is its own:
  forward   AutoModelForCausalLM.from_pretrained (fp32) + forward over all batches (logits included), and the
            same over the base model only (no lm_head); load time is reported apart.
  calib     eora_gguf.calibration.collect_stats (weights read included), float32 blocks into float64;
  calib64   (with --fp64) the same with float64 blocks: its time, and the largest relative difference of the
            covariances, max|C32 - C64| / max|C64| per site.
  compensate (with --gguf) `eora_gguf.compensate.compensate`: calibration streamed layer by layer with the EoRA
            solve of each layer as it completes (statistics not kept), adapter written — the number the
            acceptance target "calibrate + solve <= 2.5 x one plain forward" is about.
The one-layer memory bound printed beside the RSS: process baseline (torch imported) + one decoder layer +
non-layer weights + activations (samples*seqlen*hidden*4 bytes, two copies while a layer runs) + the
float64 statistics kept for all layers.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("bench_calibration")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(kind: str, hf: str, ids_path: str, batch: int, out_path: str | None, args=None) -> dict:
    ids = torch.load(ids_path)
    base_rss = _rss_mb()
    if kind == "compensate":
        from eora_gguf.compensate import compensate

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            rep = compensate(hf, args.gguf, Path(tmp) / "a.gguf", rank=args.rank, method="eora", calib=args.calib,
                             samples=ids.shape[0], seqlen=ids.shape[1], batch_size=batch)
            wall = time.perf_counter() - t0
        return {"wall_s": wall, "solve_s": rep.seconds["solve"], "peak_rss_mb": _rss_mb(),
                "baseline_rss_mb": base_rss, "rank": args.rank, "gguf": args.gguf}
    if kind == "forward":
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
        with torch.inference_mode():
            model(ids[:1, :8])  # warm-up
            t0 = time.perf_counter()
            for b in ids.split(batch):
                model(b)
            full_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for b in ids.split(batch):
                model.base_model(b)
            base_s = time.perf_counter() - t0
        return {"load_s": load_s, "forward_s": full_s, "forward_base_s": base_s,
                "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base_rss}
    from eora_gguf.calibration import collect_stats

    dtype = torch.float64 if kind == "calib64" else torch.float32
    t0 = time.perf_counter()
    stats = collect_stats(hf, ids, batch_size=batch, accumulate_dtype=dtype)
    wall = time.perf_counter() - t0
    if out_path:
        torch.save(stats.covariances, out_path)
    return {"wall_s": wall, "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base_rss,
            "sites": len(stats.covariances)}


def _spawn(kind: str, args, ids_path: str, out_path: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--hf", args.hf, "--ids", ids_path,
           "--batch", str(args.batch), "--calib", args.calib, "--rank", str(args.rank)]
    cmd += (["--cov-out", out_path] if out_path else []) + (["--gguf", args.gguf] if args.gguf else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _layer_bound_mb(hf: str, samples: int, seqlen: int, baseline_mb: float) -> dict:
    from eora_gguf.walker import SITE_OF_LEAF, StreamedModel

    sm = StreamedModel(hf)
    layer = sum(p.numel() for p in sm.layers[0].parameters()) * 4
    outer = sum(p.numel() for n, p in sm.model.named_parameters() if p.device.type != "meta") * 4
    hidden = sm.config.get_text_config().hidden_size
    acts = samples * seqlen * hidden * 4
    # the returned statistics (kept for all layers): Σ d_in² float64 over the sites of every layer
    sites = {}
    for name, mod in sm.layers[0].named_modules():
        if isinstance(mod, torch.nn.Linear):
            sites[SITE_OF_LEAF.get(name.rsplit(".", 1)[-1], name)] = mod.in_features
    stats = len(sm) * sum(d * d for d in sites.values()) * 8
    return {"layer_mb": layer / 2**20, "outer_weights_mb": outer / 2**20, "activations_mb": acts / 2**20,
            "stats_mb": stats / 2**20, "bound_mb": baseline_mb + (layer + outer + 2 * acts + stats) / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF model directory (safetensors)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib", default="demo", help="calibration spec; 'random' for random token ids")
    ap.add_argument("--fp64", action="store_true", help="also run with float64 blocks and compare")
    ap.add_argument("--gguf", help="a quantized GGUF of the model: also time compensate (calibrate + solve)")
    ap.add_argument("--rank", type=int, default=64, help="rank for --gguf (default 64)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--cov-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.hf, args.ids, args.batch, args.cov_out, args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoConfig, AutoTokenizer

    if args.calib == "random":
        vocab = AutoConfig.from_pretrained(args.hf).get_text_config().vocab_size
        ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    else:
        from eora_gguf.calib_data import build_calibration

        ids = build_calibration(args.calib, AutoTokenizer.from_pretrained(args.hf),
                                samples=args.samples, seqlen=args.seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = str(Path(tmp) / "ids.pt")
        torch.save(ids, ids_path)
        fwd = _spawn("forward", args, ids_path)
        log.info("forward: %s", fwd)
        c32_path = str(Path(tmp) / "c32.pt")
        cal = _spawn("calib", args, ids_path, c32_path if args.fp64 else None)
        log.info("calib: %s", cal)
        result = {
            "hf": args.hf, "samples": args.samples, "seqlen": args.seqlen, "batch": args.batch,
            "calib": args.calib, "threads": torch.get_num_threads(), "forward": fwd, "calibration": cal,
            "ratio_vs_forward": cal["wall_s"] / fwd["forward_s"],
            "ratio_vs_base_forward": cal["wall_s"] / fwd["forward_base_s"],
            "memory_bound": _layer_bound_mb(args.hf, args.samples, args.seqlen, cal["baseline_rss_mb"]),
        }
        if args.gguf:
            comp = _spawn("compensate", args, ids_path)
            log.info("compensate: %s", comp)
            result["compensate"] = comp
            result["compensate_ratio_vs_forward"] = comp["wall_s"] / fwd["forward_s"]
        if args.fp64:
            c64_path = str(Path(tmp) / "c64.pt")
            cal64 = _spawn("calib64", args, ids_path, c64_path)
            c32, c64 = torch.load(c32_path), torch.load(c64_path)
            rel = {k: float((c32[k] - c64[k]).abs().max() / c64[k].abs().max()) for k in c64}
            result["calibration_fp64"] = cal64
            result["fp32_block_max_rel_err"] = max(rel.values())
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
