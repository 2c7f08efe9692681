"""Does this adapter do what it claims? Real activations through the native fused kernel, layer by layer.

The HF model streams calibration text one decoder layer at a time (walker.py, this module's processor beside
calibration's). For each linear layer,
a sample of its real input rows X goes through the native kernel twice — dequant(Wq)·x, then
dequant(Wq)·x + B·(A·x) with the adapter's factors — straight from the GGUF blocks, and both are compared with
the original W·x in float64. The relative output error ‖Y - Y_ref‖² / ‖Y_ref‖² is reported per tensor without
and with the adapter.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from . import adapter as adapter_io
from . import kernels
from .errors import EoraError
from .gguf_io import GGUFModel, check_matches, open_gguf
from .hf_model import calibration_ids, load_config
from .naming import NameMap
from .walker import LayerContext, Processor, StreamedModel, capture, walk

log = logging.getLogger(__name__)


def _finite(v: np.ndarray, what: str) -> None:
    if not np.isfinite(v).all():
        raise EoraError(f"NaN/Inf in {what}: the file is broken, make it again")


def _rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((y - ref) ** 2) / max(np.sum(ref**2), 1e-300))


class _Validate(Processor):
    """The walker step: hooks keep each linear's inputs; process runs a sample of their rows through the fused
    kernel with and without the adapter and compares with the layer's original weights."""

    def __init__(self, base: GGUFModel, names: NameMap, factors: dict, *, gguf_name: str, lora_name: str,
                 max_rows: int, threads: int | None, n_layers: int):
        self.base, self.names, self.factors = base, names, factors
        self.gguf_name, self.lora_name, self.max_rows, self.threads = gguf_name, lora_name, max_rows, threads
        self.n_layers = n_layers
        self.rows: dict[str, dict] = {}

    def hook(self, ctx: LayerContext) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [mod.register_forward_hook(
            lambda m, args, out, key=key: self.inputs.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))
            for key, (mod, _) in ctx.linears.items()]

    def unhook(self, ctx: LayerContext) -> None:
        for h in self.handles:
            h.remove()

    def process(self, ctx: LayerContext) -> None:
        for module, x_all in self.inputs.items():
            self.rows[self.names.to_gguf(module)] = self._row(module, x_all, ctx.weight(module))
        log.info("validated layer %d/%d", ctx.index + 1, self.n_layers)

    def _row(self, module: str, x_all: torch.Tensor, weight: torch.Tensor) -> dict:
        gname = self.names.to_gguf(module)
        pick = np.linspace(0, x_all.shape[0] - 1, min(self.max_rows, x_all.shape[0])).round().astype(int)
        x = x_all[pick].to(torch.float32).numpy()
        w = self.names.hf_to_gguf_rows(module, weight)
        ref = x.astype(np.float64) @ w.to(torch.float64).numpy().T
        info = self.base.tensor(gname)
        raw = np.ascontiguousarray(self.base.raw(gname)).view(np.uint8)
        if not np.isfinite(ref).all():
            raise EoraError(f"{module}: NaN/Inf in the HF model's weights or activations: the model is "
                            "broken, download or save it again")
        y_q = kernels.fused_matmul(raw, info.qtype, info.shape, x, threads=self.threads)
        _finite(y_q, f"{gname} of {self.gguf_name} (NaN/Inf weights)")
        row = {"qtype": info.qtype.name, "rows": int(len(pick)), "rel_err_quant": _rel_err(y_q, ref)}
        if gname in self.factors:
            b, a = self.factors[gname]
            _finite(a, f"{gname}.lora_a of {self.lora_name}")
            _finite(b, f"{gname}.lora_b of {self.lora_name}")
            y_qa = kernels.fused_matmul(raw, info.qtype, info.shape, x, a, b, threads=self.threads)
            _finite(y_qa, f"{gname} with the adapter {self.lora_name}")
            row["rel_err_adapter"] = _rel_err(y_qa, ref)
            row["rank"] = int(a.shape[0])
        return row


@torch.no_grad()
def validate(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], lora: str | os.PathLike[str], *,
             calib: str = "demo", samples: int = 4, seqlen: int = 256, max_rows: int = 256,
             threads: int | None = None) -> dict:
    """Per-tensor output error of the GGUF weight alone and with the adapter, on real activations.

    max_rows: input rows sampled per linear (evenly spaced over all calibration tokens).
    Returns {"tensors": {gguf name: {...}}, "summary": {...}}.
    """
    hf = Path(hf_dir)
    config = load_config(hf)
    names = NameMap.from_config(config)
    ids = calibration_ids(hf, calib, samples=samples, seqlen=seqlen)
    with open_gguf(gguf_path) as base:
        check_matches(config, base)
        adapter_io.check_gguf_lora(lora, base)
        _, factors = adapter_io.read_gguf_lora(lora)
        sm = StreamedModel(hf)
        hidden, calls = capture(sm, [ids])  # one batch: every sampled row comes from all the tokens
        step = _Validate(base, names, factors, gguf_name=Path(gguf_path).name, lora_name=Path(lora).name,
                         max_rows=max_rows, threads=threads, n_layers=len(sm))
        walk(sm, hidden, calls, [step], desc="validate")
    rows = step.rows
    adapted = [r for r in rows.values() if "rel_err_adapter" in r]
    summary = {
        "tensors": len(rows), "adapted": len(adapted),
        "improved": sum(r["rel_err_adapter"] < r["rel_err_quant"] for r in adapted),
        "mean_rel_err_quant": float(np.mean([r["rel_err_quant"] for r in rows.values()])) if rows else None,
        "mean_rel_err_adapter": float(np.mean([r["rel_err_adapter"] for r in adapted])) if adapted else None,
        "calibration_tokens": int(ids.numel()),
    }
    return {"tensors": rows, "summary": summary}
