"""`eora-gguf eval`: KL divergence to the F16 model, perplexity and task accuracy of a GGUF model (+ adapters),
all through llama.cpp.

KL divergence is how llama.cpp people judge a quantization: the reference (F16) model's next-token distributions
over a text are stored once (`llama_eval.kld_base`, cached), and each quantized model (+ adapters) is compared
with them token by token (mean KLD, top-1 agreement), with its perplexity over the same tokens.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from . import llama_eval, llama_tools, llamacpp, tasks
from .errors import EoraError

log = logging.getLogger(__name__)


def evaluate(model: str | os.PathLike[str], *, lora: Sequence[str | os.PathLike[str]] = (),
             ppl_text: str | os.PathLike[str] | None = None, ctx: int = 512, chunks: int | None = 32,
             reference: str | os.PathLike[str] | None = None, kld_cache: str | os.PathLike[str] | None = None,
             task_names: Sequence[str] = (), limit: int | None = None, threads: int | None = None,
             gsm8k_max_new: int = 256, llama: llamacpp.LlamaCpp | None = None, verbose: bool = False) -> dict:
    """Perplexity over `ppl_text` (if given) — and with `reference` (the F16 GGUF), the KL divergence to it over
    the same tokens — and each task's metrics, with the seconds each took.

    kld_cache: folder for the reference's log-probabilities (default: the eora-gguf cache).
    """
    llama_tools.require_gguf(model)
    for a in lora:
        llama_tools.require_gguf(a)
    if ppl_text is None and not task_names:
        raise EoraError("nothing to evaluate: give --ppl and/or --tasks")
    if limit is not None and limit < 1:
        raise EoraError(f"--limit must be >= 1, got {limit}")
    if reference is not None and ppl_text is None:
        raise EoraError("KL divergence needs a text (--ppl) to compare the models on")
    if reference is not None:
        llama_tools.require_gguf(reference)
    llama = llama or llamacpp.locate()
    result: dict = {"model": str(model), "lora": [str(a) for a in lora], "tasks": {}}
    if ppl_text is not None:
        t0 = time.perf_counter()
        if reference is None:
            p = llama_eval.text_eval(llama, model, text=ppl_text, lora=lora, ctx=ctx, chunks=chunks, threads=threads,
                                     verbose=verbose)
        else:
            base, ref = llama_eval.kld_base(llama, reference, ppl_text, ctx=ctx, chunks=chunks, threads=threads,
                                            cache=kld_cache, verbose=verbose)
            if Path(model).resolve() == Path(reference).resolve() and not lora:
                # the reference against itself: KLD 0 by definition, no second run
                p = llama_eval.TextEval(**{**ref.as_dict(), "kld": 0.0, "kld_stderr": 0.0, "kld_median": 0.0,
                                           "kld_p99": 0.0, "top1": 1.0, "top1_stderr": 0.0, "ppl_base": ref.ppl,
                                           "rms_dp": 0.0})
            else:
                p = llama_eval.text_eval(llama, model, base=base, lora=lora, chunks=chunks, threads=threads,
                                         verbose=verbose)
            result["divergence"] = {"kld": p.kld, "kld_stderr": p.kld_stderr, "kld_median": p.kld_median,
                                    "kld_p99": p.kld_p99, "top1": p.top1, "top1_stderr": p.top1_stderr,
                                    "rms_dp": p.rms_dp, "reference": str(reference), "ppl_reference": ref.ppl}
            log.info("KL divergence to %s: %.5f (top-1 agreement %.2f%%)", Path(reference).name, p.kld,
                     100 * p.top1)
        result["perplexity"] = {"ppl": p.ppl, "stderr": p.ppl_stderr, "ctx": p.ctx, "chunks": p.chunks,
                                "tokens": p.chunks * p.ctx, "scored_tokens": p.tokens, "text": str(ppl_text),
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
    if "divergence" in result:
        d = result["divergence"]
        lines.append(f"KL divergence to {Path(d['reference']).name}: {d['kld']:.5f} ± {d['kld_stderr']:.5f}, "
                     f"top-1 agreement {100 * d['top1']:.2f}% (reference perplexity {d['ppl_reference']:.4f})")
    if "perplexity" in result:
        p = result["perplexity"]
        lines.append(f"perplexity: {p['ppl']:.4f} ± {p['stderr']:.4f} ({p['chunks']} × {p['ctx']} tokens "
                     f"of which {p['scored_tokens']} scored, {p['seconds']:.0f} s)")
    for name, m in result["tasks"].items():
        if "acc" in m:
            lines.append(f"{name} ({m['split']}, n={m['n']}): acc {m['acc']:.2f} ± {m['acc_stderr']:.2f}, "
                         f"acc_norm {m['acc_norm']:.2f} ± {m['acc_norm_stderr']:.2f} ({m['seconds']:.0f} s)")
        else:
            lines.append(f"{name} ({m['split']}, n={m['n']}, {m['shots']}-shot): exact match "
                         f"{m['exact_match']:.2f} ± {m['exact_match_stderr']:.2f} ({m['seconds']:.0f} s)")
    return "\n".join(lines)
