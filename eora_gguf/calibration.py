"""Layer-streaming calibration: input covariances of every linear layer of an HF causal LM.

`stream` walks the model (walker.py) with `Covariances`, the processor that sums per input *site*
C = Σ x xᵀ (float64) with forward hooks on the linear modules: q/k/v share `attn_in`, gate/up share `mlp_in`,
o_proj reads `o_in`, down_proj reads `down_in` (any other linear gets a site of its own). Each batch's block XᵀX
is one float32 matmul, added into float64. The result is a `stats.CalibrationStats`.

Propagation: "original" feeds each layer the outputs of the original previous layer. "compensated" (EoRA's
sequential mode) calls `compensate(layer_index, layer_stats)` after a layer's statistics are complete; the
weights it returns (HF module name -> (out, in) tensor) replace that layer's linear weights, and the layer's
outputs are recomputed with them to feed the next layer. Other processors (the EoRA solve) can consume the
statistics of each layer from `LayerContext.results["stats"]`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import EoraError
from .hf_model import model_identity
from .stats import CalibrationStats
from .walker import PROPAGATE_MODES, LayerContext, Processor, StreamedModel, capture, check_finite, walk

log = logging.getLogger(__name__)

Compensate = Callable[[int, CalibrationStats], "dict[str, torch.Tensor]"]


class Covariances(Processor):
    """Forward hooks summing XᵀX per site; the first module of a site sums, its siblings are checked once.
    Hands each layer's statistics to the next processors as ctx.results["stats"]; `stats` keeps them all
    (on the CPU) when `keep`, else only the module -> site map."""

    def __init__(self, dtype: torch.dtype, meta: dict[str, Any], *, keep: bool = True):
        self.dtype, self.keep = dtype, keep
        self.stats = CalibrationStats(meta=meta)

    def hook(self, ctx: LayerContext) -> None:
        self.covs: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self.seen: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.checking = True
        self.handles = []
        for name, (mod, site) in ctx.linears.items():
            self.owner.setdefault(site, name)
            self.handles.append(mod.register_forward_hook(self._hook(name, site)))

    def _hook(self, name: str, site: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if self.checking:
                self.seen.setdefault(site, []).append((name, x))
            if self.owner[site] != name:
                return
            x = x.reshape(-1, x.shape[-1])
            block = x.to(self.dtype)
            block = block.T @ block
            if site in self.covs:
                self.covs[site] += block
            else:
                self.covs[site] = block.to(torch.float64)
            self.counts[site] = self.counts.get(site, 0) + x.shape[0]
        return hook

    def first_batch_done(self, ctx: LayerContext) -> None:
        for entries in self.seen.values():
            ref_name, ref = entries[0]
            for name, x in entries[1:]:
                if x is not ref and not torch.equal(x, ref):
                    raise EoraError(f"{name} and {ref_name} were expected to share one input: "
                                    "this architecture is not supported")
        self.seen.clear()
        self.checking = False

    def unhook(self, ctx: LayerContext) -> None:
        for h in self.handles:
            h.remove()

    def process(self, ctx: LayerContext) -> None:
        distributed.all_reduce_sums(self.covs, self.counts)
        for site, cov in self.covs.items():
            check_finite(cov, f"the inputs of {site} (decoder layer {ctx.index})")
        layer_stats = CalibrationStats(self.covs, self.counts, {m: s for m, (_, s) in ctx.linears.items()},
                                       self.stats.meta)
        ctx.results["stats"] = layer_stats
        if self.keep:
            self.stats.update(CalibrationStats({k: v.cpu() for k, v in layer_stats.covariances.items()},
                                               layer_stats.n_tokens, layer_stats.module_sites))
        else:
            self.stats.module_sites.update(layer_stats.module_sites)


class _Callback(Processor):
    """compensate(layer_index, layer_stats) -> new weights, as a processor after `Covariances`."""

    def __init__(self, fn: Compensate):
        self.fn = fn

    def process(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        return self.fn(ctx.index, ctx.results["stats"]) or {}


@torch.no_grad()
def stream(model_dir: str | os.PathLike[str], input_ids: torch.Tensor, *, batch_size: int = 8,
           propagate: str = "original", compensate: Compensate | None = None, keep: bool = True,
           accumulate_dtype: torch.dtype = torch.float32, calib_fingerprint: str | None = None,
           attn_implementation: str | None = None, return_hidden: bool = True,
           device: str | torch.device | None = None, start_layer: int = 0,
           hidden_in: list[torch.Tensor] | None = None, forward_dtype: torch.dtype | None = None,
           on_layer_done: Callable[[int, list[torch.Tensor]], None] | None = None,
           processors: Sequence[Processor] = ()) -> tuple[CalibrationStats, torch.Tensor | None]:
    """Run the model layer by layer over `input_ids` (samples, seqlen); return the statistics and (when
    return_hidden) the last decoder layer's output (samples, seqlen, hidden) before the final norm.

    compensate(layer_index, layer_stats) -> {hf_module_name: weight (out, in)}: required for
    propagate="compensated" (unless `processors` return the weights); in "original" mode it is optional, called
    for every layer and its return value must be empty (use it to consume statistics as they arrive, with
    keep=False to not retain them). processors: more walker processors, run after the statistics (and the
    compensate callback) of each layer; they find the layer's statistics in ctx.results["stats"].
    accumulate_dtype: dtype of each batch's XᵀX block before it is added into the float64 sum.
    forward_dtype: what the layers run in (None: `walker.forward_dtype`, the checkpoint's dtype on a GPU, float32
    or native bf16 on the CPU); recorded in the statistics' metadata when it is not float32.
    device: where each decoder layer, the activations and the covariance sums live (default CPU); the layer
    statistics handed to `compensate` stay there, the kept ones are copied to the CPU.
    Under torchrun (`distributed`), each process runs its share of the samples and the sums are all-reduced;
    the returned hidden states are this process's share.
    start_layer, hidden_in: resume at decoder layer `start_layer` with `hidden_in`, the per-batch inputs of that
    layer saved by `on_layer_done(i, hidden)`, which is called after each layer with its outputs (the inputs of
    layer i + 1, compensated outputs in that mode).
    """
    if propagate not in PROPAGATE_MODES:
        raise EoraError(f"propagate must be one of {', '.join(PROPAGATE_MODES)}, not {propagate!r}")
    if propagate == "compensated" and compensate is None and not processors:
        raise EoraError("propagate='compensated' needs a compensate(layer_index, stats) callback")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1:
        raise EoraError(f"calibration input_ids must be (samples, seqlen), got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise EoraError(f"batch size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else None
    sm = StreamedModel(model_dir, attn_implementation=attn_implementation, dtype=forward_dtype, device=dev)
    vocab = sm.config.get_text_config().vocab_size
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise EoraError(f"calibration token ids fall outside the model vocabulary of {vocab}: "
                        "tokenize with this model's tokenizer")
    samples, seqlen = input_ids.shape
    covariances = Covariances(accumulate_dtype, {
        "model": model_identity(model_dir), "calibration": calib_fingerprint, "samples": int(samples),
        "seqlen": int(seqlen), "tokens": int(samples * seqlen), "propagate": propagate,
        **({"forward_dtype": str(sm.dtype)[6:]} if sm.dtype != torch.float32 else {}),
    }, keep=keep)
    hidden, calls = capture(sm, distributed.shard_samples(input_ids.long()).split(batch_size), dev)
    if hidden_in is not None:
        if [tuple(h.shape) for h in hidden_in] != [tuple(h.shape) for h in hidden]:
            raise EoraError("the saved activations do not match this calibration's batches: start again")
        hidden = [h.to(hidden[0].device) for h in hidden_in]  # where `capture` keeps activations (activation_home)
    steps = [covariances, *([_Callback(compensate)] if compensate is not None else []), *processors]
    hidden = walk(sm, hidden, calls, steps, propagate=propagate, device=dev, start_layer=start_layer,
                  on_layer_done=on_layer_done)
    log.info("calibrated %d layers on %d tokens (%s propagation)", len(sm), samples * seqlen, propagate)
    return covariances.stats, (torch.cat(hidden, dim=0).cpu() if return_hidden else None)


def collect_stats(model_dir: str | os.PathLike[str], input_ids: torch.Tensor, **kwargs: Any) -> CalibrationStats:
    """Input covariances of every decoder-layer linear of the HF model in `model_dir`; see `stream`."""
    return stream(model_dir, input_ids, return_hidden=False, **kwargs)[0]
