"""Benchmark the fused EoRA kernel against stock ggml and torch, per type, shape, rank, batch and thread count.

    python tools/bench_fused.py --quick --json out/bench_fused.json [--markdown docs/table.md]

Compared in one run, on the same bytes:
  eora      eora_fused_matmul (int8 activations), timed inside C by tools/ggml_bench.c (no Python overhead)
  ggml      stock mul_mat of the pinned llama.cpp's libggml, weights in the CPU_REPACK buffer when ggml
            repacks that type (what llama.cpp runs by default), else the plain CPU buffer -- "weight_buffer"
            in the JSON says which
  ggml_lora the 4-op LoRA sequence llama.cpp runs: mul_mat(W), mul_mat(A), mul_mat(B), scale, add
  torch     dequantize (eora_native, all cores) then torch.matmul, per call
bound = ggml base time x (1 + adapter bytes / weight bytes): the time a byte-proportional kernel would take.
The harness is compiled into the cache (~/.cache/eora-gguf/bench) against the headers and libraries of the
llama.cpp that eora_gguf.llamacpp.locate() returns (LLAMA_CPP_DIR to use another).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eora_gguf import _native, kernels  # noqa: E402
from eora_gguf.cache import cache_dir  # noqa: E402
from eora_gguf.errors import EoraError, atomic_output  # noqa: E402

log = logging.getLogger("bench_fused")

TYPES = ("Q4_K", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")
SHAPES = {"4096x4096": (4096, 4096), "1024x4096": (1024, 4096), "14336x4096": (14336, 4096),
          "4096x14336": (4096, 14336)}  # (d_out, d_in), Llama-3-8B
RANKS, BATCHES, THREADS = (0, 16, 64, 128), (1, 8, 32), (1, 2)
F16 = 1


def build_harness(src_dir: Path, lib_dir: Path) -> Path:
    out = cache_dir() / "bench" / "ggml_bench"
    out.parent.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent / "ggml_bench.c"
    eora_lib = _native.library_path()
    inc = [src_dir / "ggml" / "include", Path(__file__).resolve().parent.parent / "native" / "include"]
    cmd = ["cc", "-O2", "-o", str(out), str(here), *[f"-I{p}" for p in inc], f"-L{lib_dir}", f"-L{eora_lib.parent}",
           "-lggml", "-lggml-base", "-lggml-cpu", "-leora_native", f"-Wl,-rpath,{lib_dir}:{eora_lib.parent}"]
    log.info("compiling %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def run_harness(exe: Path, qtype: str, shape: tuple[int, int], n: int, rank: int, threads: int, iters: int,
                repack: int, mode: int) -> dict:
    t = int(kernels._qtype(qtype))
    cmd = [str(exe), str(t), str(shape[0]), str(shape[1]), str(n), str(rank), str(threads), str(iters), str(repack),
           str(mode), str(F16)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def time_torch(qtype: str, shape: tuple[int, int], n: int, rank: int, threads: int, iters: int) -> dict:
    import gguf
    import torch

    rng = np.random.default_rng(0)
    elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (shape[0], shape[1] // elems * nbytes), dtype=np.uint8)
    x = torch.randn(n, shape[1])
    a = torch.randn(rank, shape[1]).half() if rank else None
    b = torch.randn(shape[0], rank).half() if rank else None
    torch.set_num_threads(threads)
    ts = []
    with np.errstate(all="ignore"):
        for i in range(iters + 2):
            t0 = time.perf_counter()
            w = torch.from_numpy(kernels.dequantize(raw, qtype, shape))
            y = x @ w.T
            if rank:
                y += (x @ a.float().T) @ b.float().T
            if i >= 2:
                ts.append(time.perf_counter() - t0)
    return {"median_s": float(np.median(ts)), "min_s": float(np.min(ts))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--markdown", help="also write the results table (markdown) here")
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    p.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3,
                   help="measure eora and ggml alternately this many times per row (median of the medians)")
    p.add_argument("--quick", action="store_true", help="4096x4096, ranks 0/64, batch 1, 200 iterations")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.quick:
        args.shapes, args.ranks, args.batches, args.iters = ["4096x4096"], [0, 64], [1], 200
    try:
        from eora_gguf import llamacpp

        llama = llamacpp.locate(tools=("llama-quantize",))
        exe = build_harness(llama.source_dir, llama.bin_dir)
    except (EoraError, subprocess.CalledProcessError) as exc:
        log.error("cannot build the ggml harness: %s", exc)
        return 2
    rows = []
    for qtype, shape_name, rank, n, threads in itertools.product(args.types, args.shapes, args.ranks, args.batches,
                                                                  args.threads):
        shape = SHAPES[shape_name]
        elems, nbytes = kernels.block_info(qtype)
        w_bytes = shape[0] * shape[1] // elems * nbytes
        a_bytes = 2 * rank * (shape[0] + shape[1])
        row = {"type": qtype, "shape": shape_name, "rank": rank, "batch": n, "threads": threads,
               "weight_bytes": w_bytes, "adapter_bytes": a_bytes}
        # (repack, mode) per measurement; ggml falls back to the plain buffer where it does not repack the type
        # (what llama.cpp then runs). Rounds alternate ours and ggml's so load from other jobs hits both.
        runs: dict[str, list[dict]] = {"eora": [], "ggml": [], "ggml_plain": [], "ggml_lora": []}
        for _ in range(max(1, args.rounds)):
            runs["eora"].append(run_harness(exe, qtype, shape, n, rank, threads, args.iters, 0, 2))
            g = run_harness(exe, qtype, shape, n, 0, threads, args.iters, 1, 0)
            runs["ggml_plain"].append(run_harness(exe, qtype, shape, n, 0, threads, args.iters, 0, 0))
            runs["ggml"].append(runs["ggml_plain"][-1] if "error" in g else g)
            if rank:
                lo = run_harness(exe, qtype, shape, n, rank, threads, args.iters, 1, 1)
                if "error" in lo:
                    lo = run_harness(exe, qtype, shape, n, rank, threads, args.iters, 0, 1)
                runs["ggml_lora"].append(lo)
        for key, results in runs.items():
            if results:
                row[key] = combine(results)
        if not args.no_torch:
            row["torch"] = time_torch(qtype, shape, n, rank, threads, max(3, args.iters // 5))
        e, g = row["eora"].get("median_s"), row["ggml"].get("median_s")
        if e and g:
            row["eora_gbps"] = (w_bytes + a_bytes) / e / 1e9
            row["bound_s"] = g * (1 + a_bytes / w_bytes)
            row["ratio_to_bound"] = e / row["bound_s"]
        rows.append(row)
        log.info("%s %s r%d n%d t%d: eora %.3f ms, ggml %.3f ms (%s), lora %s, ratio %s", qtype, shape_name, rank, n,
                 threads, 1e3 * (e or float("nan")), 1e3 * (g or float("nan")), row["ggml"].get("weight_buffer"),
                 f"{1e3 * row['ggml_lora']['median_s']:.3f} ms" if rank and "median_s" in row.get("ggml_lora", {}) else "-",
                 f"{row['ratio_to_bound']:.2f}" if "ratio_to_bound" in row else "-")
    meta = {"cpu_path": _native.cpu_path(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
            "llama_cpp": str(llama.bin_dir)}
    with atomic_output(args.json) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        with atomic_output(args.markdown) as tmp:
            tmp.write_text(markdown(rows, meta))
    return 0


def combine(results: list[dict]) -> dict:
    """Median of the per-round medians, minimum of the minima (an error if every round failed)."""
    ok = [r for r in results if "median_s" in r]
    if not ok:
        return results[-1]
    return {"median_s": float(np.median([r["median_s"] for r in ok])), "min_s": min(r["min_s"] for r in ok),
            "round_medians_s": [r["median_s"] for r in ok], "weight_buffer": ok[-1].get("weight_buffer")}


def lora_ratio(r: dict) -> str:
    e, lo = r["eora"].get("median_s"), (r.get("ggml_lora") or {}).get("median_s")
    return f"{e / lo:.2f}" if e and lo else "-"


def markdown(rows: list[dict], meta: dict) -> str:
    def ms(d: dict | None, key: str = "median_s") -> str:
        return f"{1e3 * d[key]:.3f}" if d and key in d else "-"

    lines = [f"CPU path `{meta['cpu_path']}`, {meta['cpus']} cores, load average {meta['load_avg'][0]:.1f} at the end.",
             "", "| type | shape | rank | batch | threads | eora ms (min) | ggml ms (min) [buffer] | ggml 4-op LoRA ms (min) "
             "| torch ms | eora GB/s | eora / bound | eora / LoRA |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['shape']} | {r['rank']} | {r['batch']} | {r['threads']} | "
                     f"{ms(r['eora'])} ({ms(r['eora'], 'min_s')}) | {ms(r['ggml'])} ({ms(r['ggml'], 'min_s')}) "
                     f"[{r['ggml'].get('weight_buffer', r['ggml'].get('error', '?'))}] | "
                     f"{ms(r.get('ggml_lora'))} ({ms(r.get('ggml_lora'), 'min_s')}) | "
                     f"{ms(r.get('torch'))} | {r.get('eora_gbps', float('nan')):.1f} | "
                     f"{r.get('ratio_to_bound', float('nan')):.2f} | {lora_ratio(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
