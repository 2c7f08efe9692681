"""`eora-gguf eval`: perplexity and task accuracy of a GGUF model (+ adapters), all through llama.cpp."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from . import llama_eval, llamacpp, tasks
from .errors import EoraError

log = logging.getLogger(__name__)


def evaluate(model: str | os.PathLike[str], *, lora: Sequence[str | os.PathLike[str]] = (),
             ppl_text: str | os.PathLike[str] | None = None, ctx: int = 512, chunks: int | None = 32,
             task_names: Sequence[str] = (), limit: int | None = None, threads: int | None = None,
             gsm8k_max_new: int = 256, llama: llamacpp.LlamaCpp | None = None, verbose: bool = False) -> dict:
    """Perplexity over `ppl_text` (if given) and each task's metrics, with the seconds each took."""
    llamacpp.require_gguf(model)
    for a in lora:
        llamacpp.require_gguf(a)
    if ppl_text is None and not task_names:
        raise EoraError("nothing to evaluate: give --ppl and/or --tasks")
    if limit is not None and limit < 1:
        raise EoraError(f"--limit must be >= 1, got {limit}")
    llama = llama or llamacpp.locate()
    result: dict = {"model": str(model), "lora": [str(a) for a in lora], "tasks": {}}
    if ppl_text is not None:
        t0 = time.perf_counter()
        p = llamacpp.perplexity(llama, model, ppl_text, lora=lora, ctx=ctx, chunks=chunks, threads=threads,
                                verbose=verbose)
        result["perplexity"] = {"ppl": p.ppl, "stderr": p.stderr, "ctx": ctx, "chunks": len(p.chunks),
                                "tokens": p.tokens, "text": str(ppl_text),
                                "seconds": round(time.perf_counter() - t0, 2)}
        log.info("perplexity %.4f", p.ppl)
    for name in task_names:
        t0 = time.perf_counter()
        kind, _, split = tasks.TASKS[name]
        items = tasks.load_items(name, limit=limit)
        if kind == "mc":
            scores = llama_eval.score(llama, model, [(it.context, it.choices) for it in items], lora=lora,
                                      threads=threads, verbose=verbose)
            metrics = tasks.mc_metrics(items, [[s.logprob for s in row] for row in scores])
        else:
            shots = tasks.gsm8k_shots()
            gens = llama_eval.generate(llama, model, [tasks.gsm8k_prompt(shots, it["question"]) for it in items],
                                       stop=tasks.GSM8K_STOP, max_new=gsm8k_max_new, lora=lora, threads=threads,
                                       verbose=verbose)
            metrics = tasks.gsm8k_metrics(items, [g.text for g in gens])
            metrics["shots"] = tasks.GSM8K_SHOTS
        metrics.update(split=split, seconds=round(time.perf_counter() - t0, 2))
        result["tasks"][name] = metrics
        log.info("%s: %s", name, {k: v for k, v in metrics.items() if not k.endswith("stderr")})
    return result


def format_result(result: dict) -> str:
    """A short human-readable summary of `evaluate`'s result."""
    lines = [f"model: {Path(result['model']).name}" + "".join(f" + {Path(a).name}" for a in result["lora"])]
    if "perplexity" in result:
        p = result["perplexity"]
        lines.append(f"perplexity: {p['ppl']:.4f} ± {p['stderr']:.4f} ({p['chunks']} × {p['ctx']} tokens, "
                     f"{p['seconds']:.0f} s)")
    for name, m in result["tasks"].items():
        if "acc" in m:
            lines.append(f"{name} ({m['split']}, n={m['n']}): acc {m['acc']:.2f} ± {m['acc_stderr']:.2f}, "
                         f"acc_norm {m['acc_norm']:.2f} ± {m['acc_norm_stderr']:.2f} ({m['seconds']:.0f} s)")
        else:
            lines.append(f"{name} ({m['split']}, n={m['n']}, {m['shots']}-shot): exact match "
                         f"{m['exact_match']:.2f} ± {m['exact_match_stderr']:.2f} ({m['seconds']:.0f} s)")
    return "\n".join(lines)
