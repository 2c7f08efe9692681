"""Perplexity of one model + adapter under stock llama.cpp (repacked and `--no-repack` weights) and the patched
build (fused, and `EORA_LLAMA_FUSE=0 --no-repack`): how far the patched build is from stock, against stock's own
spread between its two weight layouts (issue #6).

    python tools/patched_vs_stock.py MODEL.gguf ADAPTER.gguf [--chunks 32] [--threads 1] [--json OUT.json]

Needs `eora-gguf setup-llama-cpp` and `eora-gguf setup-llama-cpp --patched`; text: the demo eval text.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eora_gguf import assets, llamacpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("adapter")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default=None, help="perplexity text (default: the demo eval text)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    stock, patched = llamacpp.locate(progress=False), llamacpp.locate_patched(build=False)
    text = Path(args.text) if args.text else assets.demo_dir() / "data" / "eval.txt"
    runs = {"stock": (stock, [], {}), "stock_no_repack": (stock, ["--no-repack"], {}),
            "patched": (patched, [], {}),
            "patched_fuse0_no_repack": (patched, ["--no-repack"], {"EORA_LLAMA_FUSE": "0"})}
    result = {"model": args.model, "adapter": args.adapter, "chunks": args.chunks, "threads": args.threads, "ppl": {}}
    for name, (llama, extra, env) in runs.items():
        res = llamacpp.perplexity(llama, args.model, text, lora=[args.adapter], ctx=512, chunks=args.chunks,
                                  threads=args.threads, extra_args=extra, env=env)
        result["ppl"][name] = res.ppl
        print(f"{name}: {res.ppl:.4f}")
    p = result["ppl"]
    for ref in ("stock", "stock_no_repack"):
        print(f"patched vs {ref}: {100 * (p['patched'] / p[ref] - 1):+.3f}%")
    print(f"stock's own spread (no-repack vs repacked): {100 * (p['stock_no_repack'] / p['stock'] - 1):+.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
