"""How much each tensor's quantization error costs the model output: a Fisher estimate of its KL divergence.

For a tensor t with error ΔW_t injected alone into the original model, the mean KL divergence of the next-token
distributions from the original ones is, to second order, ½ ΔWᵀ F ΔW with F the Fisher information of the model's
own predictive distribution. F = E_{y ~ p}[s sᵀ] (s the score ∇ log p(y)), so with labels y sampled from the
model itself and the scalar

    s_t(y, seq) = Σ_positions g_posᵀ ΔW_t x_pos,   g_pos = ∂ Σ log p(y) / ∂(output of t at pos),  x_pos its input,

KL_t ≈ E[s_t²] / (2·tokens). Sequences are independent, so one forward pass and a few backward passes (one per label
draw) give one sample of s_t per (sequence, draw) for *every* tensor at once; nothing is re-run per tensor. The
per-position labels are sampled independently, so their cross terms vanish in expectation, and E[s²] is the sum
of the per-position Fisher terms. With n sequences × k draws the relative standard error is about √(2/(n·k))
(25% at 32 samples): enough to rank tensors whose sensitivities span orders of magnitude.

Why this and not injecting each error and measuring the KL directly: that needs two forward passes per tensor (210
tensors for SmolLM2), this one forward and `draws` backward passes per batch for all tensors together, and it
measures the same quantity to second order (tests/test_importance.py: within 5% on a tiny model with 16 draws;
tools/budget_check.py compares the two on SmolLM2 tensors). Cost: about (1 + draws) forward passes over the tokens;
SmolLM2-135M, 16 x 128 tokens, 8 draws: 545 s on 2 cores shared with ~6 other busy processes (load 12).

The budget (`budget.py`) uses w_t = KL_t / e_t(0), the KL per unit of the tensor's weighted objective
e_t(0) = tr(ΔW C ΔWᵀ), so that w_t·(objective drop) estimates the KL the adapter removes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch import nn

from .errors import EoraError

log = logging.getLogger(__name__)


def fisher_kl(model: nn.Module, deltas: Mapping[str, torch.Tensor], input_ids: torch.Tensor, *, draws: int = 4,
              batch_size: int = 4, seed: int = 0) -> dict[str, float]:
    """Estimated mean KL divergence per token caused by each error alone (see the module docstring).

    model: an HF causal LM (float32, eval mode). deltas: {module name: ΔW (out, in) for an nn.Linear, or ΔE
    (vocab, dim) for an nn.Embedding}, in the model's own layout. input_ids (n_seq, seqlen).
    Returns {module name: KL estimate (nats per token)}.
    """
    if draws < 1:
        raise EoraError(f"draws must be at least 1, got {draws}")
    mods = dict(model.named_modules())
    for name, d in deltas.items():
        m = mods.get(name)
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            raise EoraError(f"{name} is not a linear or embedding module of the model")
        if tuple(d.shape) != tuple(m.weight.shape):
            raise EoraError(f"{name}: error of shape {tuple(d.shape)} for a weight of {tuple(m.weight.shape)}")
    gen = torch.Generator().manual_seed(seed)
    sq = {name: 0.0 for name in deltas}
    n_tokens = 0
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        n_seq, seqlen = ids.shape
        inputs: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor] = {}
        handles = []

        def forward_hook(name: str, inputs: dict = inputs, scores: dict = scores):
            def hook(module, args, output):
                x = args[0]
                inputs[name] = x.detach()

                def on_grad(g: torch.Tensor) -> None:
                    d = deltas[name].to(g.dtype)
                    if isinstance(module, nn.Embedding):
                        s = (g * nn.functional.embedding(inputs[name], d)).sum(dim=(1, 2))
                    else:
                        s = ((g @ d) * inputs[name]).sum(dim=(1, 2))  # Σ_pos gᵀ ΔW x per sequence
                    scores[name] = s.detach().double()

                if output.requires_grad:
                    output.register_hook(on_grad)
            return hook

        def make_leaf(module, args, output):  # let gradients flow from the embeddings on, with no weight grads
            return output.requires_grad_(True) if not output.requires_grad else output

        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(make_leaf))
        for name in deltas:
            handles.append(mods[name].register_forward_hook(forward_hook(name)))
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.float()  # (n_seq, seqlen, vocab)
                logp = torch.log_softmax(logits, dim=-1)
                probs = logp.detach().exp().reshape(-1, logp.shape[-1])
                for k in range(draws):
                    labels = torch.multinomial(probs, 1, generator=gen).reshape(n_seq, seqlen, 1)
                    total = logp.gather(-1, labels).sum()
                    scores.clear()
                    total.backward(retain_graph=k < draws - 1)
                    for name in deltas:
                        if name not in scores:
                            raise EoraError(f"{name}: no gradient reached it (is it used by the model?)")
                        sq[name] += float((scores[name] ** 2).sum())
        finally:
            for h in handles:
                h.remove()
        n_tokens += n_seq * seqlen
    log.info("Fisher KL estimate of %d tensors on %d tokens x %d draws: %.1f s", len(deltas), n_tokens, draws,
             time.perf_counter() - t0)
    return {name: v / (2.0 * draws * n_tokens) for name, v in sq.items()}


@torch.no_grad()
def injected_kl(model: nn.Module, name: str, delta: torch.Tensor, input_ids: torch.Tensor, *,
                batch_size: int = 4) -> float:
    """The mean KL divergence per token of the model with `delta` added to module `name`'s weight from the model
    without it, measured directly (one forward pass per batch with and without): the reference for `fisher_kl`."""
    module = dict(model.named_modules())[name]
    total, n = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start:start + batch_size]
        ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), dim=-1)
        saved = module.weight.detach().clone()
        module.weight.add_(delta.to(module.weight.dtype))
        try:
            out = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), dim=-1)
        finally:
            module.weight.copy_(saved)
        total += float((ref.exp() * (ref - out)).sum())
        n += ids.numel()
    return total / n


def weights(kl: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Importance weights for `budget`: KL per unit of weighted objective, w_t = KL_t / e_t(0)."""
    out = {}
    for name, k in kl.items():
        e = before.get(name)
        if e is None:
            raise EoraError(f"{name}: no weighted objective to normalise its KL by")
        out[name] = k / e if e > 0 else 0.0
    return out


__all__ = ["fisher_kl", "injected_kl", "weights"]
