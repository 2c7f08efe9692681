"""Pruning an HF model (Wanda or SparseGPT, unstructured or N:M) into an HF folder the pipeline takes as it is.

Both methods work on one linear layer W (d_out, d_in) at a time from the input statistics calibration already
collects, C = Σ x xᵀ over the calibration tokens (d_in, d_in):

- **Wanda** (Sun et al. 2023, arXiv 2306.11695): score S_ij = |W_ij|·‖X_j‖₂ with ‖X_j‖₂² = C_jj; weights are
  compared within each output row (per-output comparison groups): unstructured, the lowest-scoring fraction p of
  every row is zeroed; N:M, within every group of M consecutive inputs of a row the M-N lowest are zeroed. The
  kept weights are unchanged.
- **SparseGPT** (Frantar & Alistarh 2023, arXiv 2301.00774): the layer-output error ‖(W − Ŵ)X‖² has Hessian
  H = 2 X Xᵀ (we use C; the factor cancels), dampened by λ = 1% of its mean diagonal. With U the upper Cholesky
  factor of H⁻¹ (H⁻¹ = Uᵀ U), columns are processed left to right: the mask of a column group is chosen by
  w²/U_jj² (the OBS saliency), then each pruned column j's error e = w_j / U_jj is pushed onto the not-yet
  processed columns, W[:, k] −= e·U[j, k] (the OBS update restricted to the remaining columns), in blocks of
  `block` columns with a lazy update of the columns after the block. Unstructured masks are chosen per block
  (adaptive mask selection), N:M masks every M columns.

Layers are pruned sequentially, as both papers do: `calibration.stream` in "compensated" mode runs each decoder
layer on the outputs of the already pruned layers before it, hands us the layer's statistics, and recomputes the
layer's outputs with the pruned weights to feed the next one. Within a layer all linears are pruned from inputs
produced by the dense layer (one pass), as the reference implementations do. Embeddings and the output head are
kept dense.

The output folder holds the source folder's files (config, tokenizer, …) unchanged and the safetensors with the
same names and dtypes, the pruned weights holding zeros; plus `pruning.json` (method, sparsity, calibration).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import calib_data, calibration
from .errors import EoraError, staged_outputs
from .hf_model import calibration_ids, check_model_folder, read_tensors, tensor_files
from .stats import CalibrationStats

log = logging.getLogger(__name__)

METHODS = ("wanda", "sparsegpt")
RECORD = "pruning.json"


@dataclass(frozen=True)
class Sparsity:
    """`n:m` (at most n non-zeros in every m consecutive inputs of a row) or an unstructured `fraction`."""

    fraction: float
    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"

    @classmethod
    def parse(cls, text: str) -> Sparsity:
        text = str(text).strip()
        if ":" in text:
            match = re.fullmatch(r"(\d+):(\d+)", text)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise EoraError(f"--sparsity {text!r}: N:M needs integers 0 < N < M, like 2:4 or 4:8")
            n, m = int(match[1]), int(match[2])
            return cls(1.0 - n / m, n, m)
        try:
            p = float(text)
        except ValueError:
            raise EoraError(f"--sparsity {text!r} is neither N:M (2:4, 4:8) nor a fraction (0.5)") from None
        if not 0.0 < p < 1.0:
            raise EoraError(f"--sparsity {text!r}: a fraction of pruned weights lies in (0, 1), like 0.5")
        return cls(p)


def check_shape(sparsity: Sparsity, d_in: int, name: str = "the layer") -> None:
    if sparsity.structured and d_in % sparsity.m:  # type: ignore[operator]
        raise EoraError(f"{name} has {d_in} inputs, not a multiple of M = {sparsity.m}: choose another N:M")


# ------------------------------------------------------------------------------------------------- the math

def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries of each row of `scores` (..., n)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, torch.topk(scores, k, dim=-1, largest=False).indices, True)
    return mask


def select_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """True where a weight is pruned: per row, the lowest scores (N:M within each group of M columns)."""
    rows, cols = scores.shape
    if sparsity.structured:
        m = sparsity.m
        groups = scores.reshape(rows, cols // m, m)  # type: ignore[operator]
        return _lowest(groups, m - sparsity.n).reshape(rows, cols)  # type: ignore[operator]
    return _lowest(scores, int(cols * sparsity.fraction))


def wanda(w: torch.Tensor, cov: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Wanda-pruned copy of w (d_out, d_in): scores |W_ij|·sqrt(C_jj), C (d_in, d_in) (any positive scale)."""
    check_shape(sparsity, w.shape[1])
    norms = torch.diagonal(cov).clamp_min(0).sqrt().to(w.dtype)  # (d_in,)
    mask = select_mask(w.abs() * norms, sparsity)
    return w.masked_fill(mask, 0)


def sparsegpt(w: torch.Tensor, cov: torch.Tensor, sparsity: Sparsity, *, damp: float = 0.01,
              block: int = 128) -> torch.Tensor:
    """SparseGPT-pruned copy of w (d_out, d_in) with the OBS update, from C = Σ x xᵀ (d_in, d_in); float64 math.

    Inputs that never fire (C_jj = 0) carry no information: their weights are pruned first (they cannot change
    the output) and their diagonal set to 1 so H stays invertible. damp: λ = damp · mean(diag H) on the diagonal.
    """
    d_out, d_in = w.shape
    check_shape(sparsity, d_in)
    if sparsity.structured and block % sparsity.m:  # type: ignore[operator]
        block = sparsity.m * max(1, block // sparsity.m)  # type: ignore[operator]
    W = w.to(torch.float64).clone()
    H = cov.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(d_in, dtype=H.dtype)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU
    except RuntimeError:
        raise EoraError("the input covariance is not positive definite even after dampening: calibrate on more "
                        "tokens") from None
    mask = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, d_in, block):
        end = min(start + block, d_in)
        Wb, Ub = W[:, start:end].clone(), U[start:end, start:end]
        err = torch.zeros_like(Wb)
        d = torch.diagonal(Ub)
        if not sparsity.structured:
            mask[:, start:end] = _lowest(Wb ** 2 / d ** 2, int((end - start) * sparsity.fraction))
        for j in range(end - start):
            if sparsity.structured and j % sparsity.m == 0:  # type: ignore[operator]
                cols = slice(j, j + sparsity.m)  # type: ignore[operator]
                mask[:, start + j: start + j + sparsity.m] = _lowest(  # type: ignore[operator]
                    Wb[:, cols] ** 2 / d[cols] ** 2, sparsity.m - sparsity.n)  # type: ignore[operator]
            col = Wb[:, j]
            kept = col.masked_fill(mask[:, start + j], 0.0)
            e = (col - kept) / d[j]  # (d_out,)
            Wb[:, j:] -= torch.outer(e, Ub[j, j:])
            Wb[:, j] = kept
            err[:, j] = e
        W[:, start:end] = Wb
        W[:, end:] -= err @ U[start:end, end:]
    W[mask] = 0.0
    return W.to(w.dtype)


PRUNERS = {"wanda": wanda, "sparsegpt": sparsegpt}


def prune_weight(method: str, w: torch.Tensor, cov: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    if method not in PRUNERS:
        raise EoraError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    return PRUNERS[method](w, cov, sparsity)


# ------------------------------------------------------------------------------------------ the whole model

def prune_model(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, sparsity: Sparsity | str,
                method: str = "wanda", calib: str = "demo,stories", samples: int = 64, seqlen: int = 512,
                batch_size: int = 8, tokenizer=None) -> dict[str, Any]:
    """Prune every decoder-layer linear of the HF model in `hf_dir` and write the pruned HF folder `out_dir`.

    Layer-streamed and sequential (see the module docstring); returns what was done (layers, weights zeroed,
    the mean relative layer-output error ‖(W − Ŵ)X‖/‖WX‖ over the calibration inputs)."""

    if method not in METHODS:
        raise EoraError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    sp = Sparsity.parse(sparsity) if isinstance(sparsity, str) else sparsity
    src = Path(hf_dir)
    check_model_folder(src)
    files = tensor_files(src)
    shards = sorted({p.name for p in files.values()})
    extra = [p for p in src.iterdir() if p.name not in shards and p.name != RECORD]
    with staged_outputs() as staging:
        out_tmp = staging.folder(out_dir, may_hold=[*shards, *(p.name for p in extra), RECORD], inputs=[src])
        ids = calibration_ids(src, calib, samples=samples, seqlen=seqlen, tokenizer=tokenizer)
        pruned: dict[str, torch.Tensor] = {}
        errors: list[float] = []

        def on_layer(i: int, stats: CalibrationStats) -> dict[str, torch.Tensor]:
            out = {}
            for module in stats.modules(i):
                key = f"{module}.weight"
                w = read_tensors(files, [key])[key].to(torch.float32)
                cov = stats.covariance(module)
                check_shape(sp, w.shape[1], module)
                wp = prune_weight(method, w, cov, sp)
                dw = (w - wp).double()
                errors.append(float(((dw @ cov) * dw).sum() / ((w.double() @ cov) * w.double()).sum()) ** 0.5)
                out[module] = pruned[key] = wp
            return out

        calibration.stream(src, ids, batch_size=batch_size, propagate="compensated", compensate=on_layer,
                           keep=False, calib_fingerprint=calib_data.calibration_fingerprint(calib, ids),
                           return_hidden=False)
        _write_folder(src, out_tmp, files, pruned, extra)
        record = {"method": method, "sparsity": str(sp), "fraction": sp.fraction, "calib": calib,
                  "samples": samples, "seqlen": seqlen, "source": str(src.resolve()),
                  "pruned_weights": len(pruned),
                  "mean_rel_output_error": sum(errors) / max(len(errors), 1)}
        (out_tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s: %d weights pruned to %s by %s (mean relative layer-output error %.3f)", out_dir,
             len(pruned), sp, method, record["mean_rel_output_error"])
    return {"output": str(out_dir), **record}


def _write_folder(src: Path, out: Path, files: dict[str, Path], pruned: dict[str, torch.Tensor],
                  extra: list[Path]) -> None:
    """The source folder's other files as they are, and every shard with the pruned tensors replaced."""
    for p in extra:
        if p.is_dir():
            shutil.copytree(p, out / p.name)
        else:
            shutil.copy2(p, out / p.name)
    for shard in sorted(set(files.values())):
        with safe_open(str(shard), framework="pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
            tensors = {}
            for name in fh.keys():
                t = fh.get_tensor(name)
                tensors[name] = pruned[name].to(t.dtype).contiguous() if name in pruned else t
        save_file(tensors, str(out / shard.name), metadata=metadata)


def nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Groups of m consecutive inputs (per row) of w holding more than n non-zeros."""
    rows, cols = w.shape
    if cols % m:
        raise EoraError(f"a weight with {cols} inputs cannot follow a {n}:{m} pattern")
    return int(((w.reshape(rows, cols // m, m) != 0).sum(-1) > n).sum())


__all__ = ["METHODS", "Sparsity", "nm_violations", "prune_model", "prune_weight", "select_mask", "sparsegpt",
           "wanda"]
