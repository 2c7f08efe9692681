"""SmolLM2: the fast solver against the exact one, end to end through llama.cpp (issue #18's quality check).

`eora-gguf run --quant Q4_K_M --rank 0` makes the F16 and Q4_K_M (+imatrix) GGUFs and the calibration statistics
in --workdir; then the same `compensate` runs twice on those statistics, `--solver exact` and `--solver fast`
(`--device cpu`; SmolLM2's weights are 576 and 1536 wide, below the size at which `auto` takes the fast path, so it
is forced here), and `eora-gguf eval` measures both adapters, and the bare base, on the same LAMBADA chunks:
perplexity and mean KL divergence to the F16 model. The acceptance: the fast adapter's perplexity within 0.5% of
the exact one's.

    nice -n 10 python tools/fast_solver_check.py --workdir /tmp/fsc --json docs/fast_solver_check.json

Reads every figure from the JSON files the commands write; the solve seconds come from `compensate --json`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from eora_gguf.errors import atomic_output


def _cli(args: list[str], json_out: bool = True) -> dict:
    print("+ eora-gguf", " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "eora_gguf", *args, *(["--json"] if json_out else [])],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout) if json_out else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="eora-out")
    ap.add_argument("--json", required=True)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = _cli(["run", "--quant", args.quant, "--rank", "0", "--samples", str(args.samples), "--chunks", "1",
                "--workdir", args.workdir, "--threads", str(args.threads)])
    base_row = next(r for r in run["rows"] if r["quant"] == args.quant)
    work = Path(run["summary_file"]).parent
    base, f16 = Path(base_row["model"]), work / "model-F16.gguf"
    stats = sorted(work.glob("calib-*.safetensors"), key=lambda p: p.stat().st_mtime)[-1]

    def measure(lora: Path | None, name: str) -> dict:
        out = work / f"fsc-eval-{name}.json"
        _cli(["eval", "--model", str(base), *(["--lora", str(lora)] if lora else []), "--reference", str(f16),
              "--chunks", str(args.chunks), "--threads", str(args.threads), "-o", str(out)], json_out=False)
        res = json.loads(out.read_text())
        return {"ppl": res["perplexity"]["ppl"], "ppl_stderr": res["perplexity"]["stderr"],
                "kld": res["divergence"]["kld"], "kld_stderr": res["divergence"]["kld_stderr"],
                "scored_tokens": res["perplexity"]["scored_tokens"], "ppl_f16": res["divergence"]["ppl_reference"]}

    rows = {"base": measure(None, "base")}
    for solver in ("exact", "fast"):
        adapter = work / f"fsc-{args.quant}-r{args.rank}-{solver}.gguf"
        res = _cli(["compensate", "--hf", run["hf_dir"], "--gguf", str(base), "--stats", str(stats), "--rank",
                    str(args.rank), "--solver", solver, "--device", "cpu", "-o", str(adapter)])
        rows[solver] = {**measure(adapter, solver), "compensate_seconds": res.get("seconds")}
    rel = rows["fast"]["ppl"] / rows["exact"]["ppl"] - 1.0
    out = {"tool": "tools/fast_solver_check.py", "command": " ".join(sys.argv), "model": run["model_name"],
           "quant": base_row["quant"], "base": str(base), "rank": args.rank, "calib_samples": args.samples,
           "calib": run["calib"], "eval_text": run["text"], "chunks": args.chunks, "ppl_f16": rows["base"]["ppl_f16"],
           "rows": rows, "fast_vs_exact_ppl": rel, "within_half_percent": abs(rel) <= 0.005,
           "wall_s": round(time.perf_counter() - t0, 1)}
    with atomic_output(Path(args.json)) as tmp:
        tmp.write_text(json.dumps(out, indent=1) + "\n")
    print(f"perplexity: base {rows['base']['ppl']:.3f}, exact {rows['exact']['ppl']:.3f}, "
          f"fast {rows['fast']['ppl']:.3f} ({100 * rel:+.3f}%); "
          f"KLD exact {rows['exact']['kld']:.4f}, fast {rows['fast']['kld']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
