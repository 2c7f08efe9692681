#!/usr/bin/env python3
"""Acceptance check: llama.cpp's log-probs (base GGUF, and base + GGUF LoRA adapter) against the project's own
torch reconstruction (the HF architecture running the dequantized GGUF weights + B·A), on exactly the tokens
llama-perplexity evaluated. See eora_gguf/reconstruct.py for what is compared and why it cannot be exact.

    python tools/check_logits.py --hf HF_DIR --gguf BASE.gguf [--lora ADAPTER.gguf] [--text FILE|eval|demo]
                                 [--ctx 128] [--chunks 3] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eora_gguf/cli.py

from eora_gguf import assets, llamacpp, reconstruct  # noqa: E402
from eora_gguf.errors import EoraError, atomic_output  # noqa: E402

log = logging.getLogger("check_logits")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="the HF model folder (its config.json is used)")
    p.add_argument("--gguf", required=True, metavar="BASE.gguf", help="the (quantized) GGUF llama.cpp runs")
    p.add_argument("--lora", metavar="ADAPTER.gguf", help="a GGUF LoRA adapter for it")
    p.add_argument("--text", default="eval", help="text file, or built-in 'eval' (default) / 'demo'")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--chunks", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"), help="torch compute type")
    p.add_argument("--json", metavar="OUT.json", help="also write the figures as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    import torch

    t0 = time.perf_counter()
    try:
        llama = llamacpp.locate(progress=False)
        text = assets.text_file(args.text)
        with tempfile.TemporaryDirectory(prefix="check-logits-") as work:
            result = reconstruct.check_logits(llama, args.hf, args.gguf, text, work, adapter=args.lora,
                                              ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                                              dtype=getattr(torch, args.dtype))
        result.update(hf=str(args.hf), text=str(text), seconds=round(time.perf_counter() - t0, 1))
        if args.json:
            with atomic_output(args.json) as tmp:
                tmp.write_text(json.dumps(result, indent=1) + "\n")
    except EoraError as e:
        print(f"check_logits: error: {e}", file=sys.stderr)
        return 2
    print(reconstruct.summarize(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
