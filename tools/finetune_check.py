"""Fine-tuning from EoRA vs the standard LoRA initialisation on a compressed SmolLM2, judged through llama.cpp.

1. The EoRA init: the rank-64 EoRA adapter tools/prune_check.py solved for the base GGUF (`--base`, default its
   2:4 Wanda + Q4_K_M model) against the dense demo model, calibrated on general text (demo,stories), not on
   the task (so the held-out questions cannot leak into the init).
2. `finetune` twice with everything equal but the init: from that adapter, and from PEFT's standard init
   (A Kaiming-uniform, B = 0), `--steps` steps of AdamW, the same seeded batches (ARC-Easy validation split,
   `--heldout` questions held out; answer tokens carry the loss). The loss of every step's batch and the held-out
   loss every `--eval-every` steps are logged.
3. llama.cpp (our libllama client, stock build): ARC-Easy test accuracy (`--limit` first questions) of the base,
   base + EoRA init, base + each fine-tuned adapter.

    nice -n 15 python tools/finetune_check.py [--workdir eora-out] [--steps 200] [--limit 500]

Writes docs/finetune_check.json (the logs, the accuracies, and per logged step whether EoRA's loss is below).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eora_gguf import assets, evaluate, finetune
from eora_gguf.errors import write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="eora-out")
    ap.add_argument("--base", help="base GGUF (default: the 2:4 Wanda + Q4_K_M model of tools/prune_check.py)")
    ap.add_argument("--init", help="the EoRA adapter to start from (default: prune_check's rank-64 EoRA adapter of "
                                   "the default base)")
    ap.add_argument("--data", default="arc_easy_val")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("-o", "--output", default="docs/finetune_check.json")
    args = ap.parse_args()
    hf = assets.demo_model_dir()
    work = Path(args.workdir) / hf.name
    base = Path(args.base) if args.base else work / "model-Q4_K_M-pruned-wanda-2of4-imatrix.gguf"
    out = work / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    init = Path(args.init) if args.init else work / f"adapter-Q4_K_M-pruned-wanda-2of4-eora-r{args.rank}-f16.gguf"
    result: dict = {"model": hf.name, "base": base.name, "data": args.data, "task": args.task, "rank": args.rank,
                    "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seqlen": args.seqlen,
                    "limit": args.limit, "torch_threads": torch.get_num_threads(), "runs": {}}
    adapters = {"EoRA init (no training)": init}
    for name, how in (("lora", "lora"), ("eora", str(init))):
        stem = f"ft-{name}-r{args.rank}-s{args.steps}"
        path, log = out / f"{stem}.gguf", out / f"{stem}.json"
        if not path.is_file() or not log.is_file():
            finetune.finetune(hf, base, path, init=how, data=args.data, rank=args.rank, steps=args.steps, lr=args.lr,
                              batch_size=args.batch_size, seqlen=args.seqlen, heldout=args.heldout,
                              eval_every=args.eval_every, log_path=log)
        result["runs"][name] = json.loads(log.read_text())
        adapters[f"fine-tuned from {name} init"] = path
    runs = result["runs"]
    below = {}
    for key in ("loss", "heldout_loss"):
        pairs = [(a["step"], a[key], b[key]) for a, b in zip(runs["eora"]["log"], runs["lora"]["log"]) if key in a]
        below[key] = {"logged": len(pairs), "eora_lower": sum(e < lo for _, e, lo in pairs),
                      "steps_not_lower": [s for s, e, lo in pairs if e >= lo]}
    result["eora_below_lora"] = below
    result["accuracy"] = {}
    for label, lora in [("base", None), *adapters.items()]:
        res = evaluate.evaluate(base, lora=[lora] if lora else [], task_names=[args.task], limit=args.limit)
        result["accuracy"][label] = {"adapter": lora.name if lora else None, **res["tasks"][args.task]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
