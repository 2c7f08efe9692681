"""A torch reference for what llama.cpp computes: the HF model rebuilt from a GGUF's own (dequantized) weights,
plus B·A from a GGUF LoRA, scored on exactly the tokens llama-perplexity evaluated.

This is the acceptance check "llama.cpp logits (base + adapter) agree with our own reconstruction": if the adapter
were read with another scale, another row order or on another tensor, the two would disagree by about as much as
the adapter changes the output. They cannot agree exactly: llama.cpp's CPU matmul quantizes activations to 8 bits
(Q8_0/Q8_K) before the dot products, and stores its log-probs as 16-bit codes.

Every weight comes from the GGUF, none from the HF checkpoint (only config.json is read): embeddings, norms,
output head included. Inverse converter transforms: llama Q/K rows are un-permuted (`naming.NameMap`), Gemma norms
(stored as w + 1) get 1 subtracted, and a vocabulary the converter trimmed is compared on its kept entries.

Positions (tools/perplexity/perplexity.cpp at the pinned commit): the text is tokenized once, cut into chunks of
n_ctx tokens; each chunk is decoded alone from position 0, its first token replaced by BOS when the vocabulary
adds BOS; the logits at positions n_ctx/2 .. n_ctx-2 (each predicting the next token) are scored.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from .adapter import read_gguf_lora
from .embedding import EMBEDDING_TENSORS, hf_module
from .errors import EoraError
from .gguf_io import GGUFModel, check_matches, open_gguf
from .hf_model import load_config
from .llama_tools import token_logprobs
from .naming import NameMap, arch_enum

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
NORM_SHIFT_ARCHS = frozenset({"gemma3"})  # the converter stores these archs' RMSNorm weights as w + 1
LOGPROB_RANGE = 16.0  # llama-perplexity clamps stored log-probs below (row max - 16)


# ------------------------------------------------------------------------------------------------ the model

def build_model(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                adapter: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The HF causal LM of `hf_dir`'s config.json with every parameter taken from `gguf_path` (dequantized),
    and W + scale·B A on each linear the GGUF LoRA `adapter` covers. Eager attention, eval mode, `dtype`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = load_config(hf_dir)
    names = NameMap.from_config(config)
    arch = names.dims.arch
    if arch not in SUPPORTED_ARCHS:
        raise EoraError(f"the torch reconstruction supports {', '.join(SUPPORTED_ARCHS)}, not {arch}: "
                        "compare another architecture through llama.cpp only")
    with open_gguf(gguf_path) as base:
        check_matches(config, base)
        config = AutoConfig.from_pretrained(hf_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        tmap = gguf.get_tensor_name_map(arch_enum(arch), names.dims.n_layers)
        values = _gguf_parameters(model, base, names, tmap, dtype)
    if adapter is not None:
        _add_adapter(values, adapter, names, base_arch=arch)
    for name, value in values.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    return model.eval()


def _gguf_parameters(model: nn.Module, base: GGUFModel, names: NameMap, tmap: gguf.TensorNameMap,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF parameter name -> its tensor from the GGUF in HF layout (tied names each get their own entry)."""
    arch = names.dims.arch
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, np.ndarray] = {}

    def read(gname: str) -> np.ndarray:
        if gname not in cache:
            cache[gname] = base.dequantize(gname)
        return cache[gname]

    for hf_name, p in model.named_parameters(remove_duplicate=False):
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname == "output.weight" and gname not in base:
            gname = "token_embd.weight"  # tied head: llama.cpp reuses the embeddings
        if gname is None or gname not in base:
            raise EoraError(f"{base.path.name} has no tensor for HF parameter {hf_name} "
                            f"(GGUF name {gname}): is it the GGUF of this model?")
        w = torch.from_numpy(read(gname).astype(np.float64))
        if gname.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            module = hf_name.rsplit(".", 1)[0]
            w = names.gguf_to_hf_rows(module, w)
        if arch in NORM_SHIFT_ARCHS and gname.endswith("norm.weight"):
            w = w - 1.0
        if gname in ("token_embd.weight", "output.weight") and w.shape[0] < p.shape[0]:
            # the converter dropped vocabulary rows the tokenizer lacks; pad (compared on kept entries only)
            w = torch.cat([w, torch.zeros(p.shape[0] - w.shape[0], *w.shape[1:], dtype=w.dtype)])
        if tuple(w.shape) != tuple(p.shape):
            raise EoraError(f"{gname} is {tuple(w.shape)} in {base.path.name}, {hf_name} expects "
                            f"{tuple(p.shape)}: is it the GGUF of this model?")
        out[hf_name] = w.to(dtype)
    return out


def _add_adapter(values: dict[str, torch.Tensor], adapter: str | os.PathLike[str], names: NameMap, *,
                 base_arch: str) -> None:
    info, factors = read_gguf_lora(adapter)
    if info.arch != base_arch:
        raise EoraError(f"{Path(adapter).name} is a {info.arch} adapter, the base is {base_arch}")
    for gname, (b, a) in factors.items():
        if gname in EMBEDDING_TENSORS:  # (V, d) in both files; a trimmed vocabulary keeps the first V rows
            key = hf_module(gname, names.hf_prefix) + ".weight"
            if key not in values:
                raise EoraError(f"{Path(adapter).name} adapts {gname}, which this model lacks ({key})")
            w = values[key]
            delta = info.scale(gname) * (torch.from_numpy(b).double() @ torch.from_numpy(a).double())
            values[key] = w.double().clone()
            values[key][:delta.shape[0]] += delta
            values[key] = values[key].to(w.dtype)
            continue
        module = names.to_hf(gname)  # EoraError for a LoRA on anything but the adapted linears
        key = module + ".weight"
        w = values[key]
        delta = info.scale(gname) * (names.gguf_to_hf_rows(module, torch.from_numpy(b).double())
                                     @ torch.from_numpy(a).double())
        values[key] = (w.double() + delta).to(w.dtype)


# ------------------------------------------------------------------------------------------------ scoring

def gguf_bos(gguf_path: str | os.PathLike[str], tokens: np.ndarray) -> tuple[bool, int | None, int]:
    """(add_bos, bos id, vocabulary size) as llama.cpp uses them for this GGUF.

    add_bos: tokenizer.ggml.add_bos_token when stored; otherwise whether the text's first token is the BOS
    (llama-perplexity tokenizes with special tokens, so it starts with BOS exactly when the vocab adds it).
    """
    with open_gguf(gguf_path) as m:
        bos = m.field(gguf.Keys.Tokenizer.BOS_ID)
        add = m.field(gguf.Keys.Tokenizer.ADD_BOS)
        vocab = m.field(gguf.Keys.Tokenizer.LIST)
        n_vocab = len(vocab) if vocab is not None else m.tensor("token_embd.weight").shape[0]
    bos = int(bos) if bos is not None else None
    if add is None:
        add = bos is not None and tokens.size > 0 and int(tokens.flat[0]) == bos
    return bool(add) and bos is not None, bos, int(n_vocab)


@torch.no_grad()
def reference_logprobs(model: nn.Module, tokens: np.ndarray, *, add_bos: bool, bos: int | None,
                       n_vocab: int) -> np.ndarray:
    """Log-probs (float64) at the positions llama-perplexity scores: tokens (n_chunk, n_ctx) ->
    (n_chunk*(n_ctx-1-n_ctx//2), n_vocab), over the first n_vocab logits (the GGUF's vocabulary)."""
    n_chunk, n_ctx = tokens.shape
    first = n_ctx // 2
    out = []
    for c in range(n_chunk):
        ids = torch.as_tensor(tokens[c], dtype=torch.long).clone()
        if add_bos:
            ids[0] = bos
        logits = model(input_ids=ids[None], use_cache=False).logits[0, first:n_ctx - 1, :n_vocab]
        out.append(torch.log_softmax(logits.to(torch.float64), dim=-1))
    return torch.cat(out).numpy()


def clamp_like_llama(lp: np.ndarray) -> np.ndarray:
    """Apply llama-perplexity's storage floor: log-probs below (row max - 16) are stored as that floor."""
    return np.maximum(lp, lp.max(axis=1, keepdims=True) - LOGPROB_RANGE)


def compare(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Agreement of two (n, vocab) log-prob arrays, `ref` taken as truth (both clamped like llama's file).

    nmse_logprobs Σ(o-r)²/Σr²; nmse_centered the same after removing each row's mean (error relative to the
    spread of the logits, independent of log V); kl mean KL(p_ref ‖ p_other) per token; top1 agreement of the
    argmax; max_abs the largest |Δ log p|.
    """
    r, o = clamp_like_llama(ref), clamp_like_llama(other)
    rc, oc = r - r.mean(1, keepdims=True), o - o.mean(1, keepdims=True)
    p = np.exp(r)
    return {"nmse_logprobs": float(np.sum((o - r) ** 2) / np.sum(r ** 2)),
            "nmse_centered": float(np.sum((oc - rc) ** 2) / np.sum(rc ** 2)),
            "kl": float(np.mean(np.sum(p * (r - o), axis=1))),
            "top1": float(np.mean(r.argmax(1) == o.argmax(1))),
            "max_abs": float(np.abs(o - r).max())}


# ------------------------------------------------------------------------------------------------ the check

def check_logits(llama: Any, hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                 text_file: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 adapter: str | os.PathLike[str] | None = None, ctx: int = 128, chunks: int = 3,
                 threads: int | None = None, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """llama.cpp vs torch reconstruction, for the base alone and (given `adapter`) base + adapter.

    Returns {"tokens": scored tokens, "base": compare(llama, torch), "adapter": compare(llama+A, torch+A),
    "adapter_effect": compare(llama, llama+A) — how far the adapter moves llama.cpp's output, the scale the
    agreement error must be far below — and "adapter_vs_torch_base": compare(llama+A, torch base)}.
    """
    work = Path(workdir)
    result: dict[str, Any] = {"gguf": str(gguf_path), "adapter_file": str(adapter) if adapter else None,
                              "ctx": ctx, "chunks": chunks, "dtype": str(dtype).replace("torch.", "")}
    tokens, lp_base = token_logprobs(llama, gguf_path, text_file, work / "llama-base.bin", ctx=ctx, chunks=chunks,
                                     threads=threads)
    add_bos, bos, n_vocab = gguf_bos(gguf_path, tokens)
    if lp_base.shape[1] != n_vocab:
        raise EoraError(f"llama-perplexity wrote {lp_base.shape[1]} log-probs per token, the GGUF vocabulary "
                        f"has {n_vocab}")
    result.update(tokens=int(lp_base.shape[0]), add_bos=add_bos)
    model = build_model(hf_dir, gguf_path, dtype=dtype)
    t_base = reference_logprobs(model, tokens, add_bos=add_bos, bos=bos, n_vocab=n_vocab)
    del model
    result["base"] = compare(lp_base, t_base)
    if adapter is not None:
        tok2, lp_ad = token_logprobs(llama, gguf_path, text_file, work / "llama-adapter.bin", lora=[adapter],
                                     ctx=ctx, chunks=chunks, threads=threads)
        if not np.array_equal(tok2, tokens):
            raise EoraError("llama-perplexity evaluated different tokens with the adapter")
        model = build_model(hf_dir, gguf_path, adapter, dtype=dtype)
        t_ad = reference_logprobs(model, tokens, add_bos=add_bos, bos=bos, n_vocab=n_vocab)
        del model
        result["adapter"] = compare(lp_ad, t_ad)
        result["adapter_effect"] = compare(lp_base, lp_ad)
        result["adapter_vs_torch_base"] = compare(lp_ad, t_base)
    return result


def summarize(result: Mapping[str, Any]) -> str:
    """A few human-readable lines of `check_logits`' result."""
    lines = [f"{result['tokens']} scored tokens ({result['chunks']} chunks of {result['ctx']}), "
             f"torch {result['dtype']}"]
    for key, label in (("base", "llama.cpp vs torch, base"), ("adapter", "llama.cpp vs torch, base + adapter"),
                       ("adapter_effect", "llama.cpp base vs base + adapter (adapter effect)"),
                       ("adapter_vs_torch_base", "llama.cpp base + adapter vs torch base")):
        if key in result:
            m = result[key]
            lines.append(f"{label}: nmse(log p) {m['nmse_logprobs']:.3g}, nmse centered {m['nmse_centered']:.3g}, "
                         f"KL {m['kl']:.3g}, top-1 {100 * m['top1']:.1f}%, max |Δ log p| {m['max_abs']:.3g}")
    return "\n".join(lines)


__all__ = ["build_model", "check_logits", "clamp_like_llama", "compare", "gguf_bos", "reference_logprobs",
           "summarize"]
