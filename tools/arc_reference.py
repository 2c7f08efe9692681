"""Independent check of `eora-gguf eval`'s multiple-choice numbers: the same items scored by the HF model in torch.

Shares nothing with the llama.cpp path but the data files and the metric definitions (lm-eval-harness's):
tokenization by the HF tokenizer, the forward pass by transformers (float32 unless --dtype), and
acc / acc_norm computed here from scratch. The F16 GGUF of the same model should agree within a fraction of a
point (F16 rounding of the weights flips a few near-ties).

    python tools/arc_reference.py --hf ~/.cache/eora-gguf/demo/SmolLM2-135M-Instruct \
        --tasks arc_easy,arc_challenge --json docs/arc_reference.json [--compare docs/report/sweep.json]
    python tools/arc_reference.py --reuse docs/arc_reference.json --compare SWEEP.json --json docs/arc_reference.json

Full ARC test sets (3548 questions) took 28 minutes on one thread of the 2-core development machine while it ran
other jobs (ARC-Easy 1314 s, ARC-Challenge 348 s).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def score_items(model, tok, items: list[dict]) -> list[list[float]]:
    """Summed log p(" choice" | "Question: ...\\nAnswer:") per choice, lm-eval's context/continuation split.

    The context runs once per question (its KV cache is then repeated for the choices), so a full ARC test set
    costs one forward over its distinct tokens rather than over every (context + choice) sequence.
    """
    out = []
    for it in items:
        ctx = tok(it["query"], add_special_tokens=False)["input_ids"]
        conts = []
        for ch in it["choices"]:
            whole = tok(it["query"] + " " + ch, add_special_tokens=False)["input_ids"]
            conts.append(whole[len(ctx):])
        with torch.no_grad():
            first = model(input_ids=torch.tensor([ctx]), use_cache=True)
            lp0 = torch.log_softmax(first.logits[0, -1].double(), -1)
            scores = [float(lp0[c[0]]) for c in conts]
            longest = max(len(c) for c in conts)
            if longest > 1:  # feed cont[:-1] of every choice side by side, right-padded
                k, n = len(conts), longest - 1
                ids = torch.zeros(k, n, dtype=torch.long)
                mask = torch.zeros(k, len(ctx) + n, dtype=torch.long)
                mask[:, :len(ctx)] = 1
                for j, c in enumerate(conts):
                    ids[j, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    mask[j, len(ctx):len(ctx) + len(c) - 1] = 1
                past = first.past_key_values
                past.batch_repeat_interleave(k)
                pos = torch.arange(len(ctx), len(ctx) + n).expand(k, n)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past).logits
                logp = torch.log_softmax(logits.double(), -1)
                for j, c in enumerate(conts):
                    scores[j] += float(sum(logp[j, p, c[p + 1]] for p in range(len(c) - 1)))
        out.append(scores)
    return out


def metrics(items: list[dict], lps: list[list[float]]) -> dict:
    acc = sum(max(range(len(lp)), key=lp.__getitem__) == it["gold"] for it, lp in zip(items, lps))
    norm = [[v / len((" " + c).encode("utf-8")) for v, c in zip(lp, it["choices"])] for it, lp in zip(items, lps)]
    acc_norm = sum(max(range(len(lp)), key=lp.__getitem__) == it["gold"] for it, lp in zip(items, norm))
    return {"n": len(items), "acc": 100.0 * acc / len(items), "acc_norm": 100.0 * acc_norm / len(items)}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eora_gguf import assets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", default=None, help="HF model folder (default: the demo SmolLM2)")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--compare", default=None, help="an `eora-gguf eval --json` or sweep JSON with the F16 row")
    ap.add_argument("--reuse", default=None, help="take the torch results from this earlier --json output "
                    "instead of scoring again (only compare)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {"arc_easy": "arc_easy_test", "arc_challenge": "arc_challenge_test",
             "arc_easy_val": "arc_easy", "arc_challenge_val": "arc_challenge"}
    if args.reuse:
        result = json.loads(Path(args.reuse).read_text())
        todo = []
    else:
        hf = Path(args.hf) if args.hf else assets.demo_model_dir()
        tok = AutoTokenizer.from_pretrained(hf)
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=getattr(torch, args.dtype)).eval()
        result = {"hf": str(hf), "dtype": args.dtype, "tasks": {}}
        todo = args.tasks.split(",")
    for name in todo:
        rows = [json.loads(ln) for ln in assets.data_file(files[name]).read_text().splitlines() if ln.strip()]
        rows = rows[:args.limit] if args.limit else rows
        t0 = time.perf_counter()
        m = metrics(rows, score_items(model, tok, rows))
        m["seconds"] = round(time.perf_counter() - t0, 1)
        result["tasks"][name] = m
        print(f"{name}: n={m['n']} acc {m['acc']:.2f} acc_norm {m['acc_norm']:.2f} ({m['seconds']} s)")
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        ours = (next(r["tasks"] for r in other["rows"] if r["quant"] == "F16") if "rows" in other  # a sweep
                else other["tasks"])  # an `eora-gguf eval --json` result
        result["compare"] = {}
        for name, m in result["tasks"].items():
            if name in ours:
                d = {k: round(ours[name][k] - m[k], 3) for k in ("acc", "acc_norm")}
                result["compare"][name] = {"llama_cpp": {k: ours[name][k] for k in ("n", "acc", "acc_norm")},
                                           "difference": d, "within_0.5": all(abs(v) <= 0.5 for v in d.values())}
                print(f"{name}: llama.cpp - torch = acc {d['acc']:+.2f}, acc_norm {d['acc_norm']:+.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
