"""One model + adapter under stock llama.cpp and the patched build: perplexity and whether every logit is the same.

    python tools/patched_vs_stock.py MODEL.gguf ADAPTER.gguf [--chunks 32] [--threads 2] [--batch 1] [--json OUT.json]

Both builds evaluate the text as llama-perplexity does (-c 512; eora_gguf.llama_eval.text_eval, our libllama
client) and save each evaluated token's log-probabilities with their fp32 row scale and minimum
(llama-perplexity's --kl-divergence-base layout); the patched build reproduces stock's arithmetic, so the
two files should be equal byte for byte (issue #6). By default each 512-token chunk is one batch (the patch's
"added" path); --batch 1 decodes it one token at a time, as generation does (its fused path). Needs
`eora-gguf setup-llama-cpp` and `eora-gguf setup-llama-cpp --patched`; text: the demo eval text unless --text.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from eora_gguf import assets, llama_eval, llamacpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("adapter")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="tokens per llama_decode (default: the whole chunk)")
    ap.add_argument("--text", default=None, help="perplexity text (default: the demo eval text)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    builds = {"stock": llamacpp.locate(progress=False), "patched": llamacpp.locate_patched(build=False)}
    text = Path(args.text) if args.text else assets.demo_dir() / "data" / "eval.txt"
    result = {"model": args.model, "adapter": args.adapter, "chunks": args.chunks, "threads": args.threads,
              "batch": args.batch or 512, "ppl": {}}
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, llama in builds.items():
            out = Path(tmp) / f"{name}.bin"
            res = llama_eval.text_eval(llama, args.model, text=text, lora=[args.adapter], ctx=512,
                                       chunks=args.chunks, threads=args.threads, batch=args.batch or 2048,
                                       save_base=out)
            result["ppl"][name] = res.ppl
            logits[name] = out.read_bytes()
            print(f"{name}: perplexity {res.ppl:.4f}")
    result["logits_identical"] = logits["stock"] == logits["patched"]
    result["logits_bytes"] = len(logits["stock"])
    print(f"logits identical: {'yes' if result['logits_identical'] else 'NO'} ({result['logits_bytes']} bytes each)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
