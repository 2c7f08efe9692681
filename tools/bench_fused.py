"""Benchmark the fused EoRA kernel against stock ggml and torch, per type, shape, rank, batch and thread count.

    python tools/bench_fused.py --quick --json out/bench_fused.json [--markdown docs/table.md]
    python tools/bench_fused.py --cuda --json out/bench_cuda.json [--markdown out/cuda.md]   (GPU; see below)

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

--cuda times the CUDA kernels on torch CUDA tensors instead: fused against our quantized
GEMV + cuBLAS B.(A.x) + add, replayed from CUDA graphs and timed with CUDA events, with achieved GB/s.
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
    """tools/ggml_bench.c (the CMake target ggml_bench) against this llama.cpp's ggml and our library."""
    return _native.build_helper("ggml_bench", cache_dir() / "bench" / "tools", llama_source=src_dir, llama_lib=lib_dir)


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
    p.add_argument("--cuda", action="store_true",
                   help="benchmark the CUDA kernels (Llama-3-8B shapes, batch 1/4/16, rank 32/64/128 unless given)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.cuda:
        words = sys.argv[1:] if argv is None else argv
        given = {a[2:].split("=")[0].replace("-", "_") for a in words if a.startswith("--")}
        return cuda_main(args, given)
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
                 f"{1e3 * row['ggml_lora']['median_s']:.3f} ms"
                 if rank and "median_s" in row.get("ggml_lora", {}) else "-",
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
             "", "| type | shape | rank | batch | threads | eora ms (min) | ggml ms (min) [buffer] "
             "| ggml 4-op LoRA ms (min) | torch ms | eora GB/s | eora / bound | eora / LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['shape']} | {r['rank']} | {r['batch']} | {r['threads']} | "
                     f"{ms(r['eora'])} ({ms(r['eora'], 'min_s')}) | {ms(r['ggml'])} ({ms(r['ggml'], 'min_s')}) "
                     f"[{r['ggml'].get('weight_buffer', r['ggml'].get('error', '?'))}] | "
                     f"{ms(r.get('ggml_lora'))} ({ms(r.get('ggml_lora'), 'min_s')}) | "
                     f"{ms(r.get('torch'))} | {r.get('eora_gbps', float('nan')):.1f} | "
                     f"{r.get('ratio_to_bound', float('nan')):.2f} | {lora_ratio(r)} |")
    return "\n".join(lines) + "\n"


# ---- CUDA (--cuda) ----

CUDA_TYPES = ("Q4_K", "Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q5_K", "Q6_K", "IQ4_XS")
CUDA_RANKS, CUDA_BATCHES = (32, 64, 128), (1, 4, 16)
ACCEPT_SPEEDUP, ACCEPT_BW = 1.4, 0.70  # batch 1: fused >= 1.4x unfused; Q4_K 4096x14336 r64 >= 70% of peak


def graph_time(fn, iters: int, reps: int) -> dict:
    """Seconds per call of fn(): `iters` calls captured in one CUDA graph, replayed `reps` times between CUDA
    events (median and minimum over the replays). Graph replay removes Python and launch overhead, which would
    otherwise dominate kernels of a few microseconds."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return {"median_s": float(np.median(times)), "min_s": float(np.min(times))}


def copy_bandwidth() -> float:
    """Achievable device memory bandwidth, GB/s: a 1 GiB device-to-device copy (read + write bytes)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = graph_time(lambda: dst.copy_(src), 2, 5)
    return 2 * (1 << 30) / t["min_s"] / 1e9


def cuda_row(qtype: str, shape: tuple[int, int], n: int, rank: int, iters: int, reps: int) -> dict:
    import torch

    d_out, d_in = shape
    elems, nbytes = kernels.block_info(qtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randint(0, 256, (d_out, d_in // elems * nbytes), dtype=torch.uint8, device="cuda", generator=gen)
    x = torch.randn(n, d_in, device="cuda", generator=gen)
    a16 = (torch.randn(rank, d_in, device="cuda", generator=gen) * 0.02).half()
    b16 = (torch.randn(d_out, rank, device="cuda", generator=gen) * 0.02).half()
    a32, b32 = a16.float(), b16.float()
    w_bytes, ab_bytes, io_bytes = w.numel(), 2 * rank * (d_in + d_out), 4 * n * (d_in + d_out)
    row = {"type": qtype, "shape": f"{d_out}x{d_in}", "rank": rank, "batch": n, "weight_bytes": w_bytes,
           "adapter_bytes": ab_bytes, "io_bytes": io_bytes}

    def base():
        return kernels.fused_matmul(w, qtype, shape, x)

    def unfused():  # what llama.cpp's LoRA path does with F16 adapters: 4 more kernels after the GEMV
        y = base()
        y += torch.mm(torch.mm(x.half(), a16.t()), b16.t())
        return y

    def unfused_f32():  # the leanest torch form: GEMV + two cuBLAS GEMMs (fp32 adapters, twice the bytes)
        return base().addmm_(torch.mm(x, a32.t()), b32.t())

    def fused():
        return kernels.fused_matmul(w, qtype, shape, x, a16, b16)

    variants = {"fused": (fused, "1"), "fused_no_pdl": (fused, "0"), "base": (base, "1"), "unfused": (unfused, "1"),
                "unfused_f32": (unfused_f32, "1")}
    for name, (fn, pdl) in variants.items():
        os.environ["EORA_CUDA_PDL"] = pdl  # read by the library at each launch (captured into the graph)
        try:
            row[name] = graph_time(fn, iters, reps)
        except (RuntimeError, EoraError) as exc:
            row[name] = {"error": str(exc).splitlines()[0]}
        finally:
            os.environ.pop("EORA_CUDA_PDL", None)
    f, u = row["fused"].get("median_s"), row["unfused"].get("median_s")
    if f:
        row["fused_gbps"] = (w_bytes + ab_bytes + io_bytes) / f / 1e9
        row["base_gbps"] = (w_bytes + io_bytes) / row["base"]["median_s"] / 1e9 if "median_s" in row["base"] else None
    if f and u:
        row["speedup_vs_unfused"] = u / f
    if f and "median_s" in row["unfused_f32"]:
        row["speedup_vs_unfused_f32"] = row["unfused_f32"]["median_s"] / f
    return row


def cuda_acceptance(rows: list[dict], peak_gbps: float) -> dict:
    b1 = [r for r in rows if r["batch"] == 1 and "speedup_vs_unfused" in r]
    worst = min(b1, key=lambda r: r["speedup_vs_unfused"], default=None)
    target = next((r for r in rows if r["type"] == "Q4_K" and r["shape"] == "4096x14336" and r["rank"] == 64
                   and r["batch"] == 1 and "fused_gbps" in r), None)
    out = {"speedup_target": ACCEPT_SPEEDUP, "bandwidth_target": ACCEPT_BW, "peak_gbps": peak_gbps}
    if worst:
        out["batch1_min_speedup"] = worst["speedup_vs_unfused"]
        out["batch1_min_speedup_row"] = f"{worst['type']} {worst['shape']} r{worst['rank']}"
        out["speedup_ok"] = worst["speedup_vs_unfused"] >= ACCEPT_SPEEDUP
    if target and peak_gbps:
        out["q4k_4096x14336_r64_gbps"] = target["fused_gbps"]
        out["q4k_bandwidth_fraction"] = target["fused_gbps"] / peak_gbps
        out["bandwidth_ok"] = target["fused_gbps"] / peak_gbps >= ACCEPT_BW
    return out


def cuda_markdown(rows: list[dict], meta: dict) -> str:
    def us(d: dict | None) -> str:
        return f"{1e6 * d['median_s']:.1f}" if d and "median_s" in d else "-"

    lines = [f"{meta['describe']}; peak {meta['peak_gbps']:.0f} GB/s (theoretical), {meta['copy_gbps']:.0f} GB/s "
             "(1 GiB device copy)", "",
             "| type | shape | rank | batch | fused µs | fused µs, no PDL | base µs | unfused µs | unfused fp32 µs | "
             "fused GB/s | % of peak | fused speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbps = r.get("fused_gbps")
        lines.append(f"| {r['type']} | {r['shape']} | {r['rank']} | {r['batch']} | {us(r['fused'])} | "
                     f"{us(r.get('fused_no_pdl'))} | {us(r['base'])} | "
                     f"{us(r['unfused'])} | {us(r['unfused_f32'])} | {gbps or float('nan'):.0f} | "
                     f"{100 * (gbps or 0) / meta['peak_gbps'] if meta['peak_gbps'] else float('nan'):.0f}% | "
                     f"{r.get('speedup_vs_unfused', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def cuda_main(args: argparse.Namespace, given: set[str]) -> int:
    try:
        import torch
    except ImportError:
        log.error("--cuda needs torch with CUDA")
        return 2
    if not torch.cuda.is_available() or not kernels.cuda_available():
        log.error("--cuda needs a CUDA GPU usable by torch and by eora_native (%s; torch.cuda.is_available() = %s)",
                  kernels.cuda_describe() if kernels.available() else "library not built", torch.cuda.is_available())
        return 2
    types = args.types if "types" in given else list(CUDA_TYPES)
    shapes = args.shapes
    ranks = args.ranks if "ranks" in given else list(CUDA_RANKS)
    batches = args.batches if "batches" in given else list(CUDA_BATCHES)
    iters = args.iters if "iters" in given else 100
    if args.quick:
        types, shapes, ranks, batches = ["Q4_K"], ["4096x14336"], [64], [1]
    ffi, lib = _native.ffi_lib()
    cc_major, cc_minor, sms, peak = ffi.new("int *"), ffi.new("int *"), ffi.new("int *"), ffi.new("double *")
    _native.check(lib.eora_cuda_device_props(cc_major, cc_minor, sms, peak), "cuda_device_props")
    meta = {"describe": kernels.cuda_describe(), "device": torch.cuda.get_device_name(),
            "compute_capability": f"{cc_major[0]}.{cc_minor[0]}", "sm_count": sms[0], "peak_gbps": peak[0],
            "copy_gbps": copy_bandwidth(), "torch": torch.__version__, "iters_per_graph": iters,
            "replays": max(3, args.rounds * 3)}
    log.info("%s; peak %.0f GB/s, copy %.0f GB/s", meta["describe"], meta["peak_gbps"], meta["copy_gbps"])
    rows = []
    for qtype, shape_name, rank, n in itertools.product(types, shapes, ranks, batches):
        row = cuda_row(qtype, SHAPES[shape_name], n, rank, iters, meta["replays"])
        rows.append(row)
        log.info("%s %s r%d n%d: fused %s us, base %s us, unfused %s us, %.0f GB/s, speed-up %.2f", qtype, shape_name,
                 rank, n, *(f"{1e6 * row[k]['median_s']:.1f}" if "median_s" in row[k] else "-"
                            for k in ("fused", "base", "unfused")),
                 row.get("fused_gbps") or float("nan"), row.get("speedup_vs_unfused", float("nan")))
    acceptance = cuda_acceptance(rows, meta["peak_gbps"])
    with atomic_output(args.json) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "acceptance": acceptance}, indent=1))
    if args.markdown:
        with atomic_output(args.markdown) as tmp:
            tmp.write_text(cuda_markdown(rows, meta))
    for key, value in acceptance.items():
        log.info("acceptance %s: %s", key, f"{value:.3f}" if isinstance(value, float) else value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
