"""Decode and prompt speed of llama.cpp with an adapter: stock against the patched (fused) build.

    python tools/bench_llama.py --model-dir eora-out/SmolLM2-135M-Instruct --json out/bench_llama.json \\
        [--markdown table.md] [--quick]

llama-bench at the pinned commit takes no --lora, so the measurement is `tools/lora_speed.cpp`, compiled once
against each build's libllama: one model, two contexts (without and with the adapter), their work interleaved
token by token, so a slow phase of a shared machine hits both alike. Per round it measures what llama-bench's
tests do: pp (a --pp-token prompt as one batch, from an empty cache) and tg (--tg tokens one at a time from an
empty cache), 2 threads by default. Per model (SmolLM2-135M Q2_K / Q4_K_M / Q8_0 from the model folder; made
with llama-quantize from model-F16.gguf if missing) and rank, three builds are run --reps times in turn, --rounds
rounds each: stock, patched, and patched with EORA_LLAMA_FUSE=adapter (W x left to ggml's node even at one
token: the adapter ops alone). Every figure is a median over all rounds of a build.

Adapters: the folder's EoRA adapters where present (`adapter-{quant}-eora-r{rank}-f16-{key}.gguf`, as `eora-gguf run`
writes them, or `{quant}-r{rank}.gguf`, also looked for in --lora-dir), else random F16 adapters of the right
shapes over every block weight (cost depends on shapes and types only; the JSON says which was used).

Overheads (decode; the same for prompt), per round from the two contexts' times per token t0 (base) and t:
  overhead       = (t - t0) / t0                             (and t - t0 in ms)
  time share     = (t - t0) / t                              the part of a token's time the adapter takes
  byte share     = adapter bytes / (adapter bytes + model bytes)   what it adds to the bytes moved per token
(model bytes: every tensor of the GGUF; the tied embedding is read whole by the output product each token).
Acceptance (issue #6, r64 Q4_K_M decode): patched time share <= 1.2 x byte share, and patched overhead <= half
of stock's.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eora_gguf import _native, llama_tools, llamacpp  # noqa: E402
from eora_gguf.cache import cache_dir  # noqa: E402
from eora_gguf.errors import EoraError, atomic_output  # noqa: E402

log = logging.getLogger("bench_llama")

DEMO = Path("eora-out/SmolLM2-135M-Instruct")  # where `eora-gguf run` (default --workdir) puts the demo model
QUANTS = ("Q2_K", "Q4_K_M", "Q8_0")
RANKS = (16, 64)
BUILDS = ("stock", "patched", "patched-adapter-ops")
_STATS = re.compile(r"eora: LoRA adapters built: fused (\d+), added (\d+) \(t in op \d+\), stock (\d+)")


def model_path(model_dir: Path, quant: str, llama: llamacpp.LlamaCpp) -> Path:
    path = model_dir / f"model-{quant}.gguf"
    if not path.is_file():
        f16 = model_dir / "model-F16.gguf"
        if not f16.is_file():
            raise EoraError(f"{path} not found, and no {f16} to quantize it from: run `eora-gguf run` first")
        log.info("making %s with llama-quantize", path.name)
        llama_tools.quantize(llama, f16, path, quant)
    return path


def random_adapter(base: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """Random F16 LoRA factors for every 2-D block weight of `base` (the shapes an EoRA adapter has)."""
    import gguf

    from eora_gguf.adapter import write_gguf_lora

    reader = gguf.GGUFReader(base)
    rng = np.random.default_rng(seed)
    factors = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and "norm" not in t.name:
            n_in, n_out = (int(s) for s in t.shape)
            factors[t.name] = (rng.normal(0, 0.02, (n_out, rank)).astype(np.float32),
                               rng.normal(0, 0.02, (rank, n_in)).astype(np.float32))
    return write_gguf_lora(out, factors, arch=reader.get_field("general.architecture").contents(), dtype="f16")


def find_adapter(dirs: list[Path], quant: str, rank: int) -> Path | None:
    for d in dirs:
        # `run` names its adapters adapter-QUANT-eora-rRANK-f16-CALIBKEY[-SOLVER].gguf: the newest of those
        found = sorted(d.glob(f"adapter-{quant}-eora-r{rank}-f16-*.gguf"), key=lambda p: p.stat().st_mtime)
        for path in (*found[-1:], d / f"{quant}-r{rank}.gguf"):
            if path.is_file():
                return path
    return None


def tensor_bytes(path: Path) -> int:
    import gguf

    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors))


def speed_tool(llama: llamacpp.LlamaCpp) -> Path:
    """tools/lora_speed.cpp (the CMake target lora_speed) against this build's libllama, one build folder per build."""
    return _native.build_helper("lora_speed", cache_dir() / "tools" / f"lora_speed-{llama.bin_dir.parent.parent.name}",
                                llama_source=llama.source_dir, llama_lib=llama.bin_dir)


def text_file(out: Path) -> Path:
    """English text with enough tokens for the prompt (the demo eval text if present)."""
    src = Path(os.environ.get("EORA_GGUF_CACHE", Path.home() / ".cache" / "eora-gguf")) / "demo" / "data" / "eval.txt"
    out.write_text(src.read_text() if src.is_file() else "The quick brown fox jumps over the lazy dog. " * 4000)
    return out


def run_rounds(exe: Path, model: Path, lora: Path, text: Path, args: argparse.Namespace,
               env: dict[str, str] | None) -> tuple[list[dict], dict[str, int]]:
    cmd = [str(exe), str(model), str(lora), str(args.threads), str(args.rounds), str(args.pp), str(args.tg), str(text)]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "EORA_LLAMA_STATS": "1", **(env or {})},
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise EoraError(f"lora_speed failed: {llamacpp.last_error_line(res.stderr)}")
    rounds = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    m = _STATS.search(res.stderr)
    return rounds, ({"fused": int(m[1]), "added": int(m[2]), "stock": int(m[3])} if m else {})


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds: base and adapter ms/token, overhead, added ms, time share (pp and tg)."""
    out = {}
    for ph in ("pp", "tg"):
        t0 = [r[f"{ph}_ms"][0] / r[f"{ph}_tokens"] for r in rounds]
        t1 = [r[f"{ph}_ms"][1] / r[f"{ph}_tokens"] for r in rounds]
        out[f"{ph}_base_ms"] = statistics.median(t0)
        out[f"{ph}_ms"] = statistics.median(t1)
        out[f"{ph}_tps"] = 1000 / out[f"{ph}_ms"]
        out[f"{ph}_overhead"] = statistics.median(b / a - 1 for a, b in zip(t0, t1))
        out[f"{ph}_overhead_ms"] = statistics.median(b - a for a, b in zip(t0, t1))
        out[f"{ph}_time_share"] = statistics.median((b - a) / b for a, b in zip(t0, t1))
        out[f"{ph}_overhead_all"] = [round(b / a - 1, 4) for a, b in zip(t0, t1)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--markdown")
    p.add_argument("--model-dir", type=Path, default=DEMO, help="folder with model-{QUANT}.gguf (and model-F16.gguf)")
    p.add_argument("--quants", nargs="+", default=list(QUANTS))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    p.add_argument("--lora-dir", type=Path, help="another folder to look for the adapters in (default: --model-dir)")
    p.add_argument("--work", type=Path, default=Path("out/bench_llama"), help="random adapters and the text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="rounds per run of a build")
    p.add_argument("--reps", type=int, default=3, help="runs of each build, in turn")
    p.add_argument("--quick", action="store_true", help="Q4_K_M, rank 64, pp 128, tg 32, 1 rep of 2 rounds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.quants, args.ranks, args.pp, args.tg, args.reps, args.rounds = ["Q4_K_M"], [64], 128, 32, 1, 2
    try:
        stock = llamacpp.locate(tools=("llama-completion", "llama-quantize"))
        patched = llamacpp.locate(patched=True, build=False)
        exes = {"stock": speed_tool(stock), "patched": speed_tool(patched)}
        exes["patched-adapter-ops"] = exes["patched"]
        envs = {"stock": None, "patched": None, "patched-adapter-ops": {"EORA_LLAMA_FUSE": "adapter"}}
        args.work.mkdir(parents=True, exist_ok=True)
        text = text_file(args.work / "text.txt")
        rows = []
        for quant in args.quants:
            model = model_path(args.model_dir, quant, stock)
            m_bytes = tensor_bytes(model)
            for rank in args.ranks:
                found = find_adapter([args.model_dir, *([args.lora_dir] if args.lora_dir else [])], quant, rank)
                lora = found or random_adapter(model, args.work / f"random-{quant}-r{rank}.gguf", rank)
                a_bytes = tensor_bytes(lora)
                rounds: dict[str, list[dict]] = {b: [] for b in BUILDS}
                paths: dict[str, dict] = {}
                for rep in range(args.reps):  # in turn, so slow drifts of the machine hit every build
                    for build in BUILDS:
                        got, paths[build] = run_rounds(exes[build], model, lora, text, args, envs[build])
                        rounds[build] += got
                        s = summarize(got)
                        log.info("%s r%d %s rep %d: tg %+.1f%% (%+.2f ms), pp %+.1f%%", quant, rank, build, rep,
                                 100 * s["tg_overhead"], s["tg_overhead_ms"], 100 * s["pp_overhead"])
                for build in BUILDS:
                    rows.append({"model": quant, "build": build, "rank": rank, "threads": args.threads,
                                 "adapter": str(lora) if found else "random", "adapter_bytes": a_bytes,
                                 "model_bytes": m_bytes, "byte_share": a_bytes / (a_bytes + m_bytes),
                                 "paths": paths[build], "rounds": len(rounds[build]), **summarize(rounds[build])})
        checks = acceptance(rows)
        out = {"threads": args.threads, "pp": args.pp, "tg": args.tg, "reps": args.reps, "rounds": args.rounds,
               "load_average_end": os.getloadavg(), "rows": rows, "acceptance": checks}
        with atomic_output(args.json, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(out, indent=1))
        table = markdown(rows, args)
        print(table)
        for c in checks:
            print(c["text"])
        if args.markdown:
            with atomic_output(args.markdown, suffix=".md") as tmp:
                Path(tmp).write_text(table + "\n" + "\n".join(c["text"] for c in checks) + "\n")
    except EoraError as exc:
        print(f"bench_llama: error: {exc}", file=sys.stderr)
        return 2
    return 0


def acceptance(rows: list[dict]) -> list[dict]:
    """Issue #6: r64 Q4_K_M decode, patched time share <= 1.2 x byte share and overhead <= half of stock's."""
    by = {(r["model"], r["build"], r["rank"]): r for r in rows}
    r, s = by.get(("Q4_K_M", "patched", 64)), by.get(("Q4_K_M", "stock", 64))
    if r is None or s is None:
        return []
    share_ok = r["tg_time_share"] <= 1.2 * r["byte_share"]
    half_ok = r["tg_overhead"] <= 0.5 * s["tg_overhead"]
    return [{"share_ok": share_ok, "half_ok": half_ok, "text": (
        f"acceptance (r64 Q4_K_M decode): patched adapter time share {r['tg_time_share']:.1%} vs 1.2 x byte share "
        f"{1.2 * r['byte_share']:.1%}: {'PASS' if share_ok else 'FAIL'}; patched overhead {r['tg_overhead']:+.1%} "
        f"({r['tg_overhead_ms']:+.2f} ms) vs half of stock's {0.5 * s['tg_overhead']:+.1%} "
        f"({0.5 * s['tg_overhead_ms']:+.2f} ms): {'PASS' if half_ok else 'FAIL'}")}]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.threads} threads, pp{args.pp} / tg{args.tg} from an empty cache, adapter on and off side by side "
             f"in one process; medians of {args.reps} x {args.rounds} rounds; load average at the end "
             f"{os.getloadavg()[0]:.1f}", "",
             "| model | rank | build | pp t/s (base) | pp overhead | tg t/s (base) | tg overhead | tg ms/token added "
             "| tg time share | byte share | paths |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
        lines.append(f"| {r['model']} | {r['rank']} | {r['build']} | "
                     f"{r['pp_tps']:.1f} ({1000 / r['pp_base_ms']:.1f}) | "
                     f"{r['pp_overhead']:+.1%} | {r['tg_tps']:.1f} ({1000 / r['tg_base_ms']:.1f}) | "
                     f"{r['tg_overhead']:+.1%} | {r['tg_overhead_ms']:+.2f} | {r['tg_time_share']:.1%} | "
                     f"{r['byte_share']:.1%} | {paths} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
