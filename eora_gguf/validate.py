"""Does this adapter do what it claims? Real activations through the native fused kernel, layer by layer.

The HF model streams calibration text one decoder layer at a time (as in calibration). For each linear layer,
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
from torch import nn

from . import adapter as adapter_io
from . import calibration, kernels
from .compensate import calibration_ids, load_config
from .errors import EoraError
from .gguf_io import check_matches, open_gguf
from .naming import NameMap

log = logging.getLogger(__name__)


def _finite(v: np.ndarray, what: str) -> None:
    if not np.isfinite(v).all():
        raise EoraError(f"NaN/Inf in {what}: the file is broken, make it again")


def _rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((y - ref) ** 2) / max(np.sum(ref**2), 1e-300))


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
    rows: dict[str, dict] = {}
    with open_gguf(gguf_path) as base:
        check_matches(config, base)
        adapter_io.check_gguf_lora(lora, base)
        _, factors = adapter_io.read_gguf_lora(lora)
        sm = calibration.StreamedModel(hf)
        hidden, calls = sm.capture(ids)
        for i in range(len(sm)):
            layer = sm.load_layer(i)
            inputs: dict[str, torch.Tensor] = {}
            hooks = []
            for rel, mod in layer.named_modules():
                if isinstance(mod, nn.Linear):
                    key = f"{sm.layer_name(i)}.{rel}"
                    hooks.append(mod.register_forward_hook(
                        lambda m, args, out, key=key: inputs.__setitem__(key, args[0].reshape(-1, args[0].shape[-1]))))
            try:
                hidden = calibration._run_layer(layer, hidden, calls[i])
            finally:
                for h in hooks:
                    h.remove()
            for module, x_all in inputs.items():
                gname = names.to_gguf(module)
                pick = np.linspace(0, x_all.shape[0] - 1, min(max_rows, x_all.shape[0])).round().astype(int)
                x = x_all[pick].to(torch.float32).numpy()
                w = names.hf_to_gguf_rows(module, layer.get_submodule(module[len(sm.layer_name(i)) + 1:]).weight)
                ref = x.astype(np.float64) @ w.to(torch.float64).numpy().T
                info = base.tensor(gname)
                raw = np.ascontiguousarray(base.raw(gname)).view(np.uint8)
                if not np.isfinite(ref).all():
                    raise EoraError(f"{module}: NaN/Inf in the HF model's weights or activations: the model is "
                                    "broken, download or save it again")
                y_q = kernels.fused_matmul(raw, info.qtype, info.shape, x, threads=threads)
                _finite(y_q, f"{gname} of {Path(gguf_path).name} (NaN/Inf weights)")
                row = {"qtype": info.qtype.name, "rows": int(len(pick)), "rel_err_quant": _rel_err(y_q, ref)}
                if gname in factors:
                    b, a = factors[gname]
                    _finite(a, f"{gname}.lora_a of {Path(lora).name}")
                    _finite(b, f"{gname}.lora_b of {Path(lora).name}")
                    y_qa = kernels.fused_matmul(raw, info.qtype, info.shape, x, a, b, threads=threads)
                    _finite(y_qa, f"{gname} with the adapter {Path(lora).name}")
                    row["rel_err_adapter"] = _rel_err(y_qa, ref)
                    row["rank"] = int(a.shape[0])
                rows[gname] = row
            sm.free_layer(i)
            log.info("validated layer %d/%d", i + 1, len(sm))
    adapted = [r for r in rows.values() if "rel_err_adapter" in r]
    summary = {
        "tensors": len(rows), "adapted": len(adapted),
        "improved": sum(r["rel_err_adapter"] < r["rel_err_quant"] for r in adapted),
        "mean_rel_err_quant": float(np.mean([r["rel_err_quant"] for r in rows.values()])) if rows else None,
        "mean_rel_err_adapter": float(np.mean([r["rel_err_adapter"] for r in adapted])) if adapted else None,
        "calibration_tokens": int(ids.numel()),
    }
    return {"tensors": rows, "summary": summary}
