"""Pruned + quantized SmolLM2, compensated against the dense model: the EoRA paper's 2:4 setting through llama.cpp.

For each pruning method (`--methods`, default wanda): `eora-gguf run --prune 2:4 --prune-method M --quant Q4_K_M
--rank 64 --method eora,svd` — the demo model pruned to 2:4 on the calibration text (demo,stories), its F16 GGUF
quantized to Q4_K_M (with the importance matrix of the dense model's calibration statistics, as `run` does),
rank-64 EoRA and plain-SVD adapters solved against the *dense* HF model, every configuration measured by
llama-perplexity: mean KL divergence to the dense F16 model, top-1 agreement and perplexity on LAMBADA
(`--chunks` x 512 tokens; calibration and pruning on `--samples` x 512 tokens). With --dense, the same `run`
without --prune gives the dense Q4_K_M rows for context. All steps reuse the files in --workdir (one conversion,
one calibration, one pruning per method).

The pruned HF folders are checked for the N:M pattern on every decoder-layer linear (`prune.nm_violations`), and
their `pruning.json` is copied into the output.

    nice -n 15 python tools/prune_check.py [--workdir eora-out] [--methods wanda,sparsegpt] [--chunks 16] \
        [--samples 16] [--dense]

Writes docs/prune_check.json (rows as `run` writes them, with the commands that made them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from eora_gguf import assets, hf_model
from eora_gguf.errors import write_json
from eora_gguf.prune import Sparsity, nm_violations


def _run(cmd: list[str], summary: Path) -> dict:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "eora_gguf", *cmd], check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def _pattern(folder: Path, sparsity: Sparsity) -> dict:
    files = hf_model.tensor_files(folder)
    linears = [n for n in files if ".layers." in n and n.endswith("proj.weight")]
    out = {"weights": len(linears), "violating_groups": 0, "zero_fraction": 0.0}
    total = zeros = 0
    for name in linears:
        w = hf_model.read_tensors(files, [name])[name]
        out["violating_groups"] += nm_violations(w, sparsity.n, sparsity.m) if sparsity.structured else 0
        total, zeros = total + w.numel(), zeros + int((w == 0).sum())
    out["zero_fraction"] = zeros / total
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="eora-out")
    ap.add_argument("--methods", default="wanda")
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--rank", default="64")
    ap.add_argument("--chunks", default="16", help="evaluation chunks of 512 tokens (default 16)")
    ap.add_argument("--samples", default="16", help="calibration (and pruning) samples of 512 tokens (default 16)")
    ap.add_argument("--dense", action="store_true", help="also the dense Q4_K_M (+ adapters) for context")
    ap.add_argument("-o", "--output", default="docs/prune_check.json")
    args = ap.parse_args()
    hf = assets.demo_model_dir()
    summary = Path(args.workdir) / hf.name / "summary.json"
    common = ["--quant", args.quant, "--rank", args.rank, "--method", "eora,svd", "--chunks", args.chunks,
              "--samples", args.samples, "--workdir", args.workdir, "--json"]
    t0 = time.perf_counter()
    result: dict = {"model": hf.name, "sparsity": args.sparsity, "quant": args.quant, "rank": int(args.rank),
                    "calib_samples": int(args.samples), "chunks": int(args.chunks), "runs": {}}
    sp = Sparsity.parse(args.sparsity)
    for method in args.methods.split(","):
        cmd = ["run", "--prune", args.sparsity, "--prune-method", method, *common]
        res = _run(cmd, summary)
        folder = next(Path(args.workdir, hf.name).glob(f"hf-pruned-{method}-{str(sp).replace(':', 'of')}-*"))
        result["runs"][method] = {"command": "eora-gguf " + " ".join(cmd), "summary": res,
                                  "pattern": _pattern(folder, sp),
                                  "pruning": json.loads((folder / "pruning.json").read_text())}
    if args.dense:
        cmd = ["run", *common]
        result["runs"]["dense"] = {"command": "eora-gguf " + " ".join(cmd), "summary": _run(cmd, summary)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["torch_threads"] = torch.get_num_threads()
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
