"""Joint base + adapter refinement on one pair of a finished ladder: KL divergence and seconds per iteration.

    python tools/refine_check.py LADDER_DIR --rung Q3_K_M [--iterations 2] [--json docs/refine_check.json]

Takes the rung's best pair from LADDER_DIR/ladder.json (base GGUF + budget adapter), then alternates
llama-quantize of W − BA (same type mix, same imatrix, same --token-embedding-type) and a new budget adapter for
the new base (refine.py), measuring every iterate against the ladder's F16 reference (same text, same chunks).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eora_gguf import assets, llamacpp
from eora_gguf.errors import EoraError
from eora_gguf.ladder import Meter, budget_pair_maker
from eora_gguf.refine import refine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ladder_dir", type=Path)
    ap.add_argument("--rung", required=True)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d = args.ladder_dir
    lad = json.loads((d / "ladder.json").read_text())
    v = next((v for v in lad["verdicts"] if v["rung"] == args.rung), None)
    if v is None or not v["best_pair"]:
        raise SystemExit(f"no pair for rung {args.rung} in {d / 'ladder.json'}")
    best = next(r for r in lad["rows"] if r["name"] == v["best_pair"])
    llama = llamacpp.locate()
    text = Path(lad["text"]) if Path(lad["text"]).is_file() else assets.text_file("eval")
    meter = Meter(llama, d / "model-F16.gguf", text, ctx=lad["ctx"], chunks=lad["chunks"], threads=args.threads,
                  folder=d, cache_file=d / f"refine-{args.rung}-measurements.json")
    make = budget_pair_maker(Path(lad["hf_dir"]), d / "calibration.safetensors")
    base = d / best["files"][0]
    budget = v["bytes"] - base.stat().st_size

    def adapter_for(b: Path, stem: Path) -> list[Path]:
        made = make(b, budget, stem)
        if made is None:
            raise EoraError(f"no adapter fits {budget} bytes beside {b.name}")
        return made[0]

    t0 = time.perf_counter()
    hist = refine(llama, d / "model-F16.gguf", best["type"], d / lad["imatrix"], d, make_adapter=adapter_for,
                  measure=lambda b, a: meter(b, a), iterations=args.iterations, start=base,
                  stem=f"{base.stem[6:]}-refine-{v['bytes']}", threads=args.threads,
                  extra_args=["--token-embedding-type", best["token_embd"]] if best.get("token_embd") else ())
    out = {"rung": args.rung, "rung_bytes": v["bytes"], "pair": best["name"], "ladder_kld": best["kld"],
           "text": lad["text"], "chunks": lad["chunks"], "best_iteration": hist["best"],
           "seconds_total": round(time.perf_counter() - t0, 2),
           "iterations": [{"iteration": it["iteration"], "kld": it["kld"], "ppl": it["ppl"], "top1": it["top1"],
                           "bytes": it["bytes"], "seconds": it["seconds"],
                           "files": [str(Path(it["base"]).name)] + [Path(a).name for a in it["adapters"]]}
                          for it in hist["iterations"]]}
    for it in out["iterations"]:
        print(f"iteration {it['iteration']}: KLD {it['kld']:.5f}, perplexity {it['ppl']:.3f}, {it['bytes'] / 1e6:.2f} "
              f"MB, seconds {it['seconds']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
