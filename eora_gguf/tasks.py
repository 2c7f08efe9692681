"""Zero-shot evaluation tasks: what is asked of the model and how the answers are scored.

Multiple choice (ARC-Easy, ARC-Challenge) follows lm-eval-harness: the context is "Question: …\\nAnswer:", each
choice is a continuation " <choice>", and a choice's score is its summed log-likelihood given the context.
  acc      = mean over questions of [argmax_j log p(choice_j) == gold]
  acc_norm = the same with log p(choice_j) / len(choice_j in UTF-8 bytes)   (lm-eval's byte length normalisation)
GSM8K: greedy generation after k worked examples, exact match of the final number in the generated answer.

Pure functions of (items, scores): the model side lives in `llama_eval` (through llama.cpp) and the independent
torch reference in tools/arc_reference.py.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import assets
from .errors import EoraError

# Task name -> (kind, data file name in assets, split shown in reports). The test splits are the full sets
# reported in papers; the validation splits are what `--calib arc_easy` etc. calibrate on, so they stay disjoint.
TASKS = {
    "arc_easy": ("mc", "arc_easy_test", "test"),
    "arc_challenge": ("mc", "arc_challenge_test", "test"),
    "arc_easy_val": ("mc", "arc_easy", "validation"),
    "arc_challenge_val": ("mc", "arc_challenge", "validation"),
    "gsm8k": ("gen", "gsm8k", "test"),
}
GSM8K_SHOTS = 4   # worked examples in each prompt: the first items of the file, never themselves evaluated
GSM8K_STOP = ("\n\nQuestion:", "Question:", "\n\n\n", "<|im_end|>", "</s>")


@dataclass(frozen=True)
class MCItem:
    id: str
    context: str
    choices: list[str]   # continuations, each with its leading space
    gold: int


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    for n in names:
        if n not in TASKS:
            raise EoraError(f"unknown task {n!r}: choose from {', '.join(TASKS)}")
    return names


def load_items(name: str, *, limit: int | None = None, path: str | Path | None = None) -> list:
    """The task's items (MCItem for multiple choice; dicts with question/short_answer for gsm8k), first `limit`."""
    kind, data, _ = TASKS[name]
    file = Path(path) if path else assets.data_file(data)
    rows = [json.loads(ln) for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if kind == "mc":
        items = [mc_item(r) for r in rows]
    else:
        items = rows[GSM8K_SHOTS:]
    return items[:limit] if limit else items


def mc_item(row: dict) -> MCItem:
    """An ARC row of our data files (id, question, query, choices, gold) as a scored item."""
    context = row.get("query") or f"Question: {row['question']}\nAnswer:"
    return MCItem(id=str(row["id"]), context=context, choices=[" " + c for c in row["choices"]], gold=int(row["gold"]))


def mc_metrics(items: Sequence[MCItem], logprobs: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm (percent) with their standard errors, from per-choice summed log-likelihoods."""
    if len(items) != len(logprobs) or not items:
        raise EoraError(f"{len(logprobs)} score rows for {len(items)} items")
    hit = hit_norm = 0
    for item, lps in zip(items, logprobs):
        if len(lps) != len(item.choices):
            raise EoraError(f"item {item.id}: {len(lps)} scores for {len(item.choices)} choices")
        hit += _argmax(lps) == item.gold
        hit_norm += _argmax([lp / len(c.encode("utf-8")) for lp, c in zip(lps, item.choices)]) == item.gold
    n = len(items)
    return {"n": n, "acc": 100.0 * hit / n, "acc_stderr": _stderr(hit, n),
            "acc_norm": 100.0 * hit_norm / n, "acc_norm_stderr": _stderr(hit_norm, n)}


def mc_gold_nll(items: Sequence[MCItem], gold_scores: Sequence[tuple[float, int]]) -> dict:
    """Negative log-likelihood per token of the gold continuations, from (summed log-likelihood, token count) per
    question: L = Σ nll_i / Σ n_i, token-weighted as a fine-tuning batch's loss, and its standard error as a ratio
    of means over questions, sqrt(Σ (nll_i − L n_i)² / (N (N − 1))) / mean(n)."""
    if len(items) != len(gold_scores) or not items:
        raise EoraError(f"{len(gold_scores)} gold scores for {len(items)} items")
    nll = [-lp for lp, _ in gold_scores]
    counts = [n for _, n in gold_scores]
    if min(counts) < 1:
        raise EoraError("a gold continuation scored over 0 tokens")
    n = len(items)
    loss = sum(nll) / sum(counts)
    spread = sum((x - loss * c) ** 2 for x, c in zip(nll, counts))
    stderr = math.sqrt(spread / (n * (n - 1))) / (sum(counts) / n) if n > 1 else float("nan")
    return {"n": n, "nll": loss, "nll_stderr": stderr, "tokens": sum(counts)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # first of ties, as numpy.argmax


def _stderr(hits: int, n: int) -> float:
    p = hits / n
    return 100.0 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


# ------------------------------------------------------------------------------------------------------------
# GSM8K

def gsm8k_prompt(shots: Sequence[dict], question: str) -> str:
    """k worked examples ("Question: …\\nAnswer: <reasoning> The answer is N.") then the question."""
    parts = [f"Question: {s['question']}\nAnswer: {_worked(s['answer'])}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def _worked(answer: str) -> str:
    """GSM8K's reference solution without its <<calculator>> annotations, ending in 'The answer is N.'"""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip().replace("\n", " ")
    return f"{body} The answer is {final.strip()}."


_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in `text`, normalised ('$1,200.00' -> '1200'); None if there is none."""
    found = _NUMBER.findall(text)
    return _normalise(found[-1]) if found else None


def _normalise(num: str) -> str:
    num = num.replace("$", "").replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num or "0"


def gsm8k_metrics(items: Sequence[dict], generations: Sequence[str]) -> dict:
    """Exact match (percent) of the final number of each generation with the reference answer."""
    if len(items) != len(generations) or not items:
        raise EoraError(f"{len(generations)} generations for {len(items)} items")
    hits = sum(final_number(g) == _normalise(str(it["short_answer"])) for it, g in zip(items, generations))
    return {"n": len(items), "exact_match": 100.0 * hits / len(items), "exact_match_stderr": _stderr(hits, len(items))}


def gsm8k_shots() -> list[dict]:
    rows = assets.data_file("gsm8k").read_text(encoding="utf-8").splitlines()
    return [json.loads(r) for r in rows[:GSM8K_SHOTS]]
