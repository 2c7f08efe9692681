"""Decode and prompt speed of llama.cpp with an adapter: stock against the patched (fused) build.

    python tools/bench_llama.py --json out/bench_llama.json [--markdown table.md] [--quick]

llama-bench at the pinned commit takes no --lora, so each cell is a timed llama-completion run: a prompt of
about --pp tokens (prompt tokens/s) then --tg generated tokens with --ignore-eos (decode tokens/s), both read
from llama.cpp's own perf lines, 2 threads by default. Per model (SmolLM2-135M Q2_K / Q4_K_M / Q8_0 from the
demo folder; Q8_0 is made with llama-quantize if missing): base only (stock build), stock + adapter and patched +
adapter per rank, every configuration --reps times in interleaved order; the table gives medians.

Adapters: `--lora-dir DIR` with `{quant}-r{rank}.gguf` files (e.g. made by `eora-gguf compensate`), else random
F16 adapters of the right shapes over every block weight (cost depends on shapes and types only; the JSON
says which was used).

Overheads (decode; the same for prompt): time per token t = 1 / tokens-per-second,
  overhead       = (t_adapter - t_base) / t_base
  time share     = (t_adapter - t_base) / t_adapter          the part of a token's time the adapter takes
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

from eora_gguf import llamacpp  # noqa: E402
from eora_gguf.errors import EoraError, atomic_output  # noqa: E402

log = logging.getLogger("bench_llama")

DEMO = Path("/tmp/demo-run/eora-out/SmolLM2-135M-Instruct")
QUANTS = ("Q2_K", "Q4_K_M", "Q8_0")
RANKS = (16, 64)
_PERF = re.compile(r"(prompt eval|\beval) time =\s*([0-9.]+) ms /\s*(\d+) (?:tokens|runs)")


def model_path(model_dir: Path, quant: str, llama: llamacpp.LlamaCpp) -> Path:
    path = model_dir / f"model-{quant}.gguf"
    if not path.is_file():
        f16 = model_dir / "model-F16.gguf"
        if not f16.is_file():
            raise EoraError(f"{path} not found, and no {f16} to quantize it from: run `eora-gguf run` first")
        log.info("making %s with llama-quantize", path.name)
        llamacpp.quantize(llama, f16, path, quant)
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


def tensor_bytes(path: Path) -> int:
    import gguf

    return int(sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors))


def prompt_file(out: Path, n_tokens: int) -> Path:
    """About n_tokens tokens of English text (the demo eval text if present; ~4 characters per token)."""
    src = Path(os.environ.get("EORA_GGUF_CACHE", Path.home() / ".cache" / "eora-gguf")) / "demo" / "data" / "eval.txt"
    text = src.read_text() if src.is_file() else "The quick brown fox jumps over the lazy dog. " * 4000
    out.write_text(text[: 4 * n_tokens])
    return out


def timed_run(llama: llamacpp.LlamaCpp, model: Path, lora: Path | None, prompt: Path, args: argparse.Namespace
              ) -> dict[str, float]:
    cmd = [str(llama.tool("llama-completion")), "-m", str(model), "-f", str(prompt), "-n", str(args.tg),
           "--ignore-eos", "--temp", "0", "--top-k", "1", "-t", str(args.threads), "-c", str(args.pp * 2 + args.tg),
           "-b", "512", "-ub", "512", "-no-cnv", "--no-display-prompt"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    env = {**os.environ, "EORA_LLAMA_STATS": "1"}
    for _ in range(3):  # the pinned llama.cpp sometimes loses its last log lines
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, errors="replace")
        if res.returncode != 0:
            raise EoraError(f"llama-completion failed: {llamacpp._last_error_line(res.stderr)}")
        found = {m[1].strip(): (float(m[2]), int(m[3])) for m in _PERF.finditer(res.stderr)}
        if "prompt eval" in found and "eval" in found:
            (p_ms, p_n), (e_ms, e_n) = found["prompt eval"], found["eval"]
            fused = re.search(r"eora: LoRA matmuls built: fused (\d+), added (\d+), stock (\d+)", res.stderr)
            return {"pp_tps": 1000 * p_n / p_ms, "tg_tps": 1000 * e_n / e_ms, "pp_tokens": p_n, "tg_tokens": e_n,
                    **({"fused": int(fused[1]), "added": int(fused[2]), "stock": int(fused[3])} if fused else {})}
    raise EoraError("llama-completion printed no perf lines three times in a row")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--markdown")
    p.add_argument("--model-dir", type=Path, default=DEMO, help="folder with model-{QUANT}.gguf (and model-F16.gguf)")
    p.add_argument("--quants", nargs="+", default=list(QUANTS))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    p.add_argument("--lora-dir", type=Path, help="adapters named {quant}-r{rank}.gguf (default: random F16 ones)")
    p.add_argument("--work", type=Path, default=Path("out/bench_llama"), help="random adapters and the prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="Q4_K_M, rank 64, pp 128, tg 32, 1 rep (a smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.quants, args.ranks, args.pp, args.tg, args.reps = ["Q4_K_M"], [64], 128, 32, 1
    try:
        stock = llamacpp.locate(tools=("llama-completion", "llama-quantize"))
        patched = llamacpp.locate(patched=True, build=False)
        args.work.mkdir(parents=True, exist_ok=True)
        prompt = prompt_file(args.work / "prompt.txt", args.pp)
        rows = []
        for quant in args.quants:
            model = model_path(args.model_dir, quant, stock)
            configs: list[tuple[str, llamacpp.LlamaCpp, int, Path | None]] = [("base", stock, 0, None)]
            adapters = {}
            for rank in args.ranks:
                given = args.lora_dir / f"{quant}-r{rank}.gguf" if args.lora_dir else None
                adapters[rank] = given if given and given.is_file() else random_adapter(
                    model, args.work / f"random-{quant}-r{rank}.gguf", rank)
                configs += [("stock", stock, rank, adapters[rank]), ("patched", patched, rank, adapters[rank])]
            runs: dict[tuple[str, int], list[dict]] = {(b, r): [] for b, _, r, _ in configs}
            for rep in range(args.reps):  # interleaved, so slow drifts of the machine hit every configuration
                for build, llama, rank, lora in configs:
                    res = timed_run(llama, model, lora, prompt, args)
                    log.info("%s %s r%d rep %d: pp %.1f t/s, tg %.1f t/s %s", quant, build, rank, rep,
                             res["pp_tps"], res["tg_tps"],
                             {k: res[k] for k in ("fused", "added", "stock") if k in res})
                    runs[(build, rank)].append(res)
            m_bytes = tensor_bytes(model)
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("pp_tps", "tg_tps")} for k, v in runs.items()}
            base = med[("base", 0)]
            for (build, rank), v in med.items():
                row = {"model": quant, "build": build, "rank": rank, "threads": args.threads, **v,
                       "pp_tps_all": [r["pp_tps"] for r in runs[(build, rank)]],
                       "tg_tps_all": [r["tg_tps"] for r in runs[(build, rank)]],
                       "pp_tokens": runs[(build, rank)][0]["pp_tokens"],
                       "paths": {k: runs[(build, rank)][0][k] for k in ("fused", "added", "stock")
                                 if k in runs[(build, rank)][0]},
                       "model_bytes": m_bytes}
                if rank:
                    a_bytes = tensor_bytes(adapters[rank])
                    row["adapter"] = "given" if args.lora_dir and adapters[rank].parent == args.lora_dir else "random"
                    row["adapter_bytes"] = a_bytes
                    row["byte_share"] = a_bytes / (a_bytes + m_bytes)
                    for ph in ("tg", "pp"):
                        t, t0 = 1 / v[f"{ph}_tps"], 1 / base[f"{ph}_tps"]
                        row[f"{ph}_overhead"] = t / t0 - 1
                        row[f"{ph}_time_share"] = (t - t0) / t
                rows.append(row)
        checks = acceptance(rows)
        out = {"threads": args.threads, "pp": args.pp, "tg": args.tg, "reps": args.reps,
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
    out = []
    by = {(r["model"], r["build"], r["rank"]): r for r in rows}
    for (model, build, rank), r in by.items():
        if build != "patched" or (model, rank) != ("Q4_K_M", 64) or ("Q4_K_M", "stock", 64) not in by:
            continue
        s = by[("Q4_K_M", "stock", 64)]
        share_ok = r["tg_time_share"] <= 1.2 * r["byte_share"]
        half_ok = r["tg_overhead"] <= 0.5 * s["tg_overhead"]
        out.append({"share_ok": share_ok, "half_ok": half_ok, "text": (
            f"acceptance (r64 Q4_K_M decode): patched adapter time share {r['tg_time_share']:.1%} vs 1.2 x byte share "
            f"{1.2 * r['byte_share']:.1%}: {'PASS' if share_ok else 'FAIL'}; patched overhead {r['tg_overhead']:+.1%} "
            f"vs half of stock's {0.5 * s['tg_overhead']:+.1%}: {'PASS' if half_ok else 'FAIL'}")})
    return out


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.threads} threads, prompt ~{args.pp} tokens, {args.tg} generated, median of {args.reps}; "
             f"load average at the end {os.getloadavg()[0]:.1f}", "",
             "| model | build | rank | pp t/s | tg t/s | tg overhead | tg time share | byte share | pp overhead | paths |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        pct = (lambda k: f"{r[k]:+.1%}" if k in r else "")
        share = (lambda k: f"{r[k]:.1%}" if k in r else "")
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items()) if r["paths"] else ""
        lines.append(f"| {r['model']} | {r['build']} | {r['rank'] or ''} | {r['pp_tps']:.1f} | {r['tg_tps']:.1f} | "
                     f"{pct('tg_overhead')} | {share('tg_time_share')} | {share('byte_share')} | {pct('pp_overhead')} | "
                     f"{paths} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
