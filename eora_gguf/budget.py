"""Ranks and factor types under a byte budget: spend the adapter's bytes where they buy the most accuracy.

Inputs, per adapted tensor t (a decoder linear, or token_embd/output: nothing here is specific to linears):
the solver's factors at the largest rank R_t any budget may give it, B (n_out, R), A (R, n_in), and the
tensor's importance weight w_t. For every storage type q and rank r ≤ R_t we know, exactly,

    e_t(q, r) = tr(E C Eᵀ),  E = ΔW - B̃_r Ã_r,   B̃, Ã the factors as the file stores them (type q, or F16 where
                                                 a row of r is not whole blocks), truncated to rank r,

computed by `objectives` from one quantize-dequantize of the rank-R factors per type (gguf-py, the same code the
writer uses): a 32-element block of a row of A (n_in long) does not depend on r, and one of a row of B (r long)
does not either when r is a multiple of 32, so all ranks of one type come from prefix sums,

    e(r) = tr(ΔW C ΔWᵀ) - 2 Σ_{k<r} (Ã G B̃)_kk + Σ_{k,l<r} (Ã C Ãᵀ)_kl (B̃ᵀ B̃)_kl,   G = C ΔWᵀ (n_in, n_out),

at O(R·n_in·n_out) per type instead of O(R·n_in·n_out·n_in) per rank. With unquantized factors the drops are the
solver's own gains (`eora.component_gains`, σ_i² for EoRA).

The allocation over these objectives (a multiple-choice knapsack) is allocation.py.

The importance weight w_t converts a tensor's weighted objective into its effect on the model output: w_t is the
KL divergence of the final logits caused by injecting tensor t's quantization error alone into the original
model, per unit of e_t(·, 0) (see `importance.py`, which measures it with a Fisher estimate in one forward pass
and a few backward passes). w_t·(objective drop) then estimates the KL divergence the adapter removes, so bytes
flow to the tensors whose error the output feels most, not to the ones with the largest raw error. Without
measured weights (w_t = 1) the allocation maximises the summed objective, whose scale differs between layers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from . import adapter as adapter_io
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
AUTO_TYPES = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # what --adapter-type auto chooses among
MAX_RANK = 256  # default cap on any tensor's rank (also capped at min(n_out, n_in))
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SPEC = re.compile(r"^\s*(?:(adapter)\s*:\s*)?([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


# --------------------------------------------------------------------------------------------------------------
# the budget


@dataclass(frozen=True)
class Budget:
    """A byte budget: `total` bytes of model + adapter, `bpw` bits per model weight for model + adapter, or
    `adapter` bytes of the adapter file alone. Parse user text with `Budget.parse`."""

    kind: str  # "total" | "bpw" | "adapter"
    value: float  # bytes, or bits per weight for "bpw"
    spec: str = ""

    @classmethod
    def parse(cls, spec: str) -> Budget:
        """'95MB' / '95.5MiB' / '9.5e7' (total bytes), '5.8bpw' (model + adapter bits per weight), 'adapter:6MB'.
        MB, KB, GB are powers of 10; MiB, KiB, GiB of 2; a bare number is bytes."""
        m = _SPEC.match(str(spec))
        if not m:
            raise EoraError(f"budget {spec!r} is not understood: write e.g. 95MB, 5.8bpw or adapter:6MB")
        adapter_only, number, unit = m[1] is not None, float(m[2]), m[3].lower()
        if unit == "bpw":
            if adapter_only:
                raise EoraError(f"budget {spec!r}: bits per weight counts model + adapter; drop 'adapter:'")
            kind, value = "bpw", number
        elif unit in _UNITS:
            kind, value = ("adapter" if adapter_only else "total"), number * _UNITS[unit]
        else:
            raise EoraError(f"budget {spec!r}: unknown unit {m[3]!r}: use B, KB, MB, GB, KiB, MiB, GiB or bpw")
        if not value > 0 or not math.isfinite(value):
            raise EoraError(f"budget {spec!r} must be positive")
        return cls(kind, value, str(spec).strip())

    def adapter_bytes(self, model_bytes: int, n_weights: int) -> int:
        """Bytes left for the adapter file next to a model file of `model_bytes` with `n_weights` weights."""
        if self.kind == "adapter":
            return int(self.value)
        total = int(self.value * n_weights / 8) if self.kind == "bpw" else int(self.value)
        left = total - int(model_bytes)
        if left <= 0:
            raise EoraError(f"budget {self.spec or self.value} ({total} bytes) leaves no room for an adapter: the "
                            f"model file alone is {model_bytes} bytes; choose a larger budget or a smaller quant")
        return left


# --------------------------------------------------------------------------------------------------------------
# exact objectives of the stored factors


def quantized(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (rows, row_len) as the adapter file stores it as `dtype` (F16 where rows are not whole blocks), float64."""
    qtype = adapter_io.storage_type(adapter_io.ADAPTER_DTYPES[dtype], x.shape[1])
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x32.astype(np.float64)
    if qtype == Q.F16:
        return x32.astype(np.float16).astype(np.float64)
    return gguf.quants.dequantize(gguf.quants.quantize(x32, qtype), qtype).astype(np.float64)


def _quantized_rank_rows(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (rows, R) whose rows grow with the rank: as stored at every rank that is a whole number of blocks (the
    first ⌊R/block⌋ blocks quantized as `dtype`; the rest F16, only used where F16 is what the file holds)."""
    block = gguf.GGML_QUANT_SIZES[adapter_io.ADAPTER_DTYPES[dtype]][0]
    cut = x.shape[1] // block * block
    out = quantized(x, "f16") if dtype != "f32" else quantized(x, "f32")
    if cut:
        out[:, :cut] = quantized(x[:, :cut], dtype)
    return out


def objectives(delta_w: np.ndarray, cov: np.ndarray, b: np.ndarray, a: np.ndarray, dtypes: Iterable[str], *,
               embedding: bool = False) -> dict[str, np.ndarray]:
    """Exact weighted objective tr(E C Eᵀ) at every rank 0..R with the factors stored as each type (float64).

    delta_w (n_out, n_in), cov (n_in, n_in), b (n_out, R), a (R, n_in). embedding: the tensor is token_embd,
    whose lora_a (= B) and lora_b (= Aᵀ) are both stored with rows of r (`adapter.stored_shapes`).
    Returns {dtype: (R+1,) objectives}, index r = rank r (index 0 = no adapter = tr(ΔW C ΔWᵀ)).
    """
    dw = np.asarray(delta_w, dtype=np.float64)
    c = np.asarray(cov, dtype=np.float64)
    rank = a.shape[0]
    g = c @ dw.T  # (n_in, n_out)
    total = float(np.sum(dw * g.T))
    steps = np.arange(1, rank + 1)
    out: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def a_parts(kind: str) -> tuple[np.ndarray, np.ndarray]:  # (Ã G (R, n_out), Ã C Ãᵀ (R, R))
        if ("a", kind) not in parts:
            at = _quantized_rank_rows(a.T, kind).T if embedding else quantized(a, kind)
            parts[("a", kind)] = (at @ g, at @ c @ at.T)
        return parts[("a", kind)]

    def b_parts(kind: str) -> tuple[np.ndarray, np.ndarray]:  # (B̃ (n_out, R), B̃ᵀ B̃ (R, R))
        if ("b", kind) not in parts:
            bt = _quantized_rank_rows(b, kind)
            parts[("b", kind)] = (bt, bt.T @ bt)
        return parts[("b", kind)]

    def curve(akind: str, bkind: str) -> np.ndarray:
        ag, aca = a_parts(akind)
        bt, btb = b_parts(bkind)
        cross = np.cumsum(np.einsum("kj,jk->k", ag, bt))
        quad = np.diagonal(np.cumsum(np.cumsum(aca * btb, axis=0), axis=1))
        return np.concatenate([[total], total - 2.0 * cross + quad])

    for dtype in dtypes:
        qtype = adapter_io.ADAPTER_DTYPES[dtype]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        whole = steps % block == 0  # ranks whose rows of r are whole blocks
        fallback = "f16" if dtype != "f32" else "f32"
        a_is_q = (whole if embedding else np.full(rank, a.shape[1] % block == 0))
        res = np.empty(rank + 1)
        res[0] = total
        for akind_q in (True, False):
            for bkind_q in (True, False):
                sel = (a_is_q == akind_q) & (whole == bkind_q)
                if block == 1 and not (akind_q and bkind_q):
                    continue
                if sel.any():
                    res[1:][sel] = curve(dtype if akind_q else fallback, dtype if bkind_q else fallback)[1:][sel]
        out[dtype] = np.maximum(res, 0.0)
    return out


# --------------------------------------------------------------------------------------------------------------
# solutions: the rank-R factors and their tables, reusable for any budget


@dataclass
class TensorSolution:
    """One tensor's rank-R factors (float32, GGUF row order) and exact objective per stored type and rank."""

    b: np.ndarray  # (n_out, R)
    a: np.ndarray  # (R, n_in)
    gains: np.ndarray  # (R,) exact objective drop per component with unrounded factors
    objective: dict[str, np.ndarray]  # dtype -> (R+1,)
    weight: float = 1.0  # importance: output KL divergence per unit of objective

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    @property
    def before(self) -> float:
        return float(next(iter(self.objective.values()))[0])


@dataclass
class Solution:
    """Every tensor's TensorSolution, and what they were solved against (arch, base model, method...)."""

    arch: str
    tensors: dict[str, TensorSolution] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def set_weights(self, weights: Mapping[str, float]) -> None:
        for name, t in self.tensors.items():
            t.weight = float(weights.get(name, t.weight))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """safetensors: <name>.b, .a, .gains, .obj.<dtype>; arch/meta/weights as JSON metadata; atomic."""
        arrays: dict[str, np.ndarray] = {}
        for name, t in self.tensors.items():
            arrays[f"{name}.b"], arrays[f"{name}.a"] = np.ascontiguousarray(t.b), np.ascontiguousarray(t.a)
            arrays[f"{name}.gains"] = np.ascontiguousarray(t.gains, dtype=np.float64)
            for dtype, obj in t.objective.items():
                arrays[f"{name}.obj.{dtype}"] = np.ascontiguousarray(obj, dtype=np.float64)
        info = {"arch": self.arch, "meta": self.meta, "weights": {n: t.weight for n, t in self.tensors.items()}}
        path = Path(path)
        with atomic_output(path, suffix=".safetensors") as tmp:
            save_file(arrays, str(tmp), metadata={"eora_solution": json.dumps(info)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Solution:
        try:
            with safe_open(str(path), framework="numpy") as fh:
                raw = (fh.metadata() or {}).get("eora_solution")
                if raw is None:
                    raise EoraError(f"{path} is not an eora-gguf solution file (no eora_solution metadata)")
                info = json.loads(raw)
                arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        except (OSError, ValueError) as exc:
            raise EoraError(f"cannot read solution file {path}: {exc}") from None
        sol = cls(arch=info["arch"], meta=info.get("meta", {}))
        for name, w in info["weights"].items():
            objective = {k.rsplit(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}.obj.")}
            sol.tensors[name] = TensorSolution(arrays[f"{name}.b"], arrays[f"{name}.a"], arrays[f"{name}.gains"],
                                               objective, float(w))
        return sol
