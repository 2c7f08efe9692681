"""Solving against a GGUF, one decoder layer at a time: the EoRA solve as a walker processor.

For every decoder-layer linear: W from the HF safetensors (rows put into GGUF order), Wq dequantized from the
GGUF, ΔW = W - Wq, C the calibration input covariance; the solver (fast_solve / eora) gives (B, A) with
W ≈ Wq + B A. `solve_layers` runs `SolveLayer` after `calibration.Covariances` in the layer walk, so statistics
never pile up in memory, and so the paper's sequential mode (`propagate="compensated"`: each layer feeds
Wq + B A outputs forward) falls out naturally; with saved statistics it solves layer by layer without a walk.
`check_rank` and `check_same_model` refuse a rank or a GGUF the solve cannot use, before any work.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from . import budget as budget_mod
from . import calib_data, calibration, checkpoint, distributed, eora, fast_solve
from .errors import EoraError
from .gguf_io import GGUFModel
from .hf_model import calibration_ids, tensor_files
from .naming import LINEAR_MODULES, NameMap
from .stats import CalibrationStats
from .walker import LayerContext, Processor

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a compensation did, per tensor and in total."""

    adapter: str
    method: str
    rank: int
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        errs = [t["rel_err_after"] for t in self.tensors.values()]
        return {"adapter": self.adapter, "method": self.method, "rank": self.rank, "tensors": len(self.tensors),
                "mean_rel_output_error_before": float(np.mean([t["rel_err_before"] for t in self.tensors.values()])),
                "mean_rel_output_error_after": float(np.mean(errs)), "seconds": self.seconds, **self.meta}


def check_rank(names: NameMap, rank: int) -> None:
    """Refuse a rank that some adapted weight cannot take; the message names the largest rank every one takes."""
    if rank < 1:
        raise EoraError(f"--rank must be a positive integer, got {rank}")
    limit, module = min((min(names.dims.linear_shape(m)), m) for m in LINEAR_MODULES)
    if rank > limit:
        d_out, d_in = names.dims.linear_shape(module)
        raise EoraError(f"--rank {rank} exceeds min(d_in, d_out) = {limit} of {module} ({d_out}x{d_in}), the "
                        f"smallest adapted weight: choose a rank of at most {limit}")


# Relative Frobenius error ‖W - Wq‖ / ‖W‖ above which a GGUF is not a quantization of the HF model: even 2-bit
# types stay far below it (Q2_K ~ 0.3 on random weights), while two different models of one shape give ~ 1.4.
MISMATCH_REL_ERR = 1.0


def check_same_model(hf_dir: str | os.PathLike[str], base: GGUFModel, names: NameMap, *, rows: int = 16) -> float:
    """Refuse (EoraError) a GGUF that is not a quantization of the HF model, by measuring it: the relative error of
    the first `rows` dequantized rows of a few weights against the HF weights. NaN/Inf in either is refused too.
    Returns the largest relative error seen.
    """
    files = tensor_files(hf_dir)
    n_layers = names.dims.n_layers
    worst = 0.0
    # modules whose rows are not permuted between HF and GGUF, in the first and the last layer
    for bid in sorted({0, n_layers - 1}):
        for module in ("self_attn.v_proj", "mlp.down_proj"):
            hf_name = f"model.layers.{bid}.{module}"
            key, gname = f"{hf_name}.weight", names.to_gguf(hf_name)
            if key not in files or gname not in base:
                continue
            with safe_open(str(files[key]), framework="pt") as fh:
                w = fh.get_slice(key)[:rows].to(torch.float64).numpy()
            info = base.tensor(gname)
            raw = base.raw(gname)[: len(w)]
            wq = np.asarray(gguf_quants_dequantize(raw, info.qtype), dtype=np.float64).reshape(len(w), -1)
            if not (np.isfinite(w).all() and np.isfinite(wq).all()):
                where = "the HF weights" if not np.isfinite(w).all() else Path(base.path).name
                raise EoraError(f"{gname}: NaN/Inf in {where}: the model file is broken, convert or download it again")
            if wq.shape != w.shape:
                raise EoraError(f"{Path(base.path).name}: {gname} has rows of {wq.shape[1]}, the HF weight "
                                f"{w.shape[1]}: pass the GGUF of this same model")
            rel = float(np.linalg.norm(w - wq) / max(np.linalg.norm(w), 1e-30))
            log.debug("%s: relative weight error of the first %d rows %.3f", gname, len(w), rel)
            if rel > MISMATCH_REL_ERR:
                raise EoraError(f"{Path(base.path).name} is not a quantization of {hf_dir}: its {gname} differs "
                                f"from the HF weight by {rel:.0%} (quantization gives a few %): pass the GGUF made "
                                "from this model, or --allow-mismatch to compensate it anyway")
            worst = max(worst, rel)
    return worst


def gguf_quants_dequantize(raw: np.ndarray, qtype: Any) -> np.ndarray:
    try:
        return gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise EoraError(f"{qtype.name} cannot be dequantized by gguf-py: requantize the model with another "
                        "type") from None


class LayerSolver:
    """Solves one decoder layer at a time against the GGUF; collects factors in GGUF names/row order."""

    def __init__(self, hf_dir: Path, base: GGUFModel, names: NameMap, *, method: str, rank: int,
                 eig_floor: float, budget_types: tuple[str, ...] | None = None, solver: str = "auto",
                 device: str | None = None) -> None:
        """budget_types: solve every tensor at min(rank, its dimensions) and keep, per tensor, the gains and the
        exact objective of every rank stored as each of these types (a budget.Solution in `self.solution`)."""
        self.hf_dir, self.base, self.names = hf_dir, base, names
        self.method, self.rank, self.eig_floor, self.solver = method, rank, eig_floor, solver
        self.budget_types = budget_types
        self.solution = budget_mod.Solution(arch=str(base.meta.arch))
        self.files = tensor_files(hf_dir)
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.tensors: dict[str, dict[str, float]] = {}
        self.solve_seconds = 0.0
        self.device = torch.device(device or "cpu")
        self.want_weights = True  # the compensated weights `layer` returns (only the sequential mode uses them)

    def _hf_weight(self, module: str) -> torch.Tensor:
        key = f"{module}.weight"
        path = self.files.get(key)
        if path is None:
            raise EoraError(f"{self.hf_dir} has no tensor {key}")
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float64)

    def layer(self, stats: CalibrationStats, modules: list[str]) -> dict[str, torch.Tensor]:
        """Solve `modules` (HF names) with `stats`; returns the compensated weights Wq + BA in HF layout (when
        `want_weights`). Under torchrun each process solves its share of the modules and all get every result."""
        t0 = time.perf_counter()
        done: dict[str, tuple] = {}
        for i, module in enumerate(modules):
            if distributed.mine(i):
                done[self.names.to_gguf(module)] = self._solve_one(stats, module)
        done = distributed.gather(done)
        out: dict[str, torch.Tensor] = {}
        for module in modules:
            gname = self.names.to_gguf(module)
            b, a, row, tsol = done[gname]
            self.factors[gname] = (b.to(torch.float32).numpy(), a.to(torch.float32).numpy())
            self.tensors[gname] = row
            if tsol is not None:
                self.solution.tensors[gname] = tsol
            if self.want_weights:
                wq = torch.from_numpy(self.base.dequantize(gname)).to(torch.float64).reshape(b.shape[0], -1)
                out[module] = self.names.gguf_to_hf_rows(module, wq + b @ a).to(torch.float32)
        self.solve_seconds += time.perf_counter() - t0
        return out

    def _solve_one(self, stats: CalibrationStats, module: str) -> tuple:
        """(B, A) on the CPU (float64), the report row, and the budget.TensorSolution (or None) of one module."""
        gname = self.names.to_gguf(module)
        w = self.names.hf_to_gguf_rows(module, self._hf_weight(module))
        wq = torch.from_numpy(self.base.dequantize(gname)).to(torch.float64).reshape(w.shape)
        dw = (w - wq).to(self.device)
        if not torch.isfinite(dw).all():
            raise EoraError(f"{gname}: the HF or GGUF weight holds NaN/Inf: check both model files")
        cov = stats.covariance(module).to(self.device) if self.method != "svd" else None
        rank = self.rank if self.budget_types is None else min(self.rank, *dw.shape)
        b, a, gains = fast_solve.solve_with_gains(self.method, dw, cov, rank, name=gname, eig_floor=self.eig_floor,
                                                  solver=self.solver)
        c = cov if cov is not None else stats.covariance(module).to(self.device)
        w = w.to(self.device)
        tsol = None
        if self.budget_types is None and fast_solve.use_fast(self.solver, tuple(dw.shape), rank):
            # a weight the fast path solves: the exact traces would cost a full product each, more than the solve;
            # Hutch++ estimates them (within ~1% here), and e(BA) = tr(G) - Σ gains holds exactly for these factors
            before = fast_solve.trace_estimate(dw, c)[0]
            after = before - float((eora.component_gains(a, c) if gains is None else gains).sum())
            ref = fast_solve.trace_estimate(w, c)[0]
        else:
            before = float(((dw @ c) * dw).sum())
            if self.budget_types is not None:
                b32, a32 = b.to(torch.float32).cpu().numpy(), a.to(torch.float32).cpu().numpy()
                dw_, c_, b_, a_ = (t.cpu() for t in (dw, c, b, a))
                tsol = budget_mod.TensorSolution(b32, a32, eora.component_gains(a_, c_).numpy(),
                                                 budget_mod.objectives(dw_.numpy(), c_.numpy(), b_.numpy(),
                                                                       a_.numpy(), self.budget_types))
            after = eora.weighted_error(dw, c, b, a)
            ref = float(((w @ c) * w).sum())
        row = {"rel_err_before": before / ref, "rel_err_after": after / ref, "qtype": self.base.tensor(gname).qtype}
        return b.cpu(), a.cpu(), row, tsol


class SolveLayer(Processor):
    """The walker step that solves each layer on the statistics `calibration.Covariances` hands it; returns the
    compensated weights in the sequential mode."""

    def __init__(self, solver: LayerSolver, propagate: str):
        self.solver, self.propagate = solver, propagate

    def process(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        stats = ctx.results["stats"]
        weights = self.solver.layer(stats, stats.modules(ctx.index))
        return weights if self.propagate == "compensated" else {}


def solve_layers(solver: LayerSolver, hf: Path, names: NameMap, *, calib: str | None,
                 stats: CalibrationStats | str | os.PathLike[str] | None, samples: int, seqlen: int,
                 propagate: str, batch_size: int, tokenizer, return_hidden: bool = False,
                 device: str | None = None, resume: Callable[[dict[str, Any]], checkpoint.Checkpoint] | None = None
                 ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Stream calibration through the model (or reuse statistics), solving each layer; (calibration info, ids,
    the last decoder layer's outputs when return_hidden). resume(fingerprint of the calibration) opens the run's
    checkpoint: finished layers are loaded instead of solved, and every solved layer is recorded."""
    solver.want_weights = propagate == "compensated"
    if stats is not None:
        if propagate == "compensated":
            raise EoraError("--propagate compensated calibrates as it solves: give --calib, not --stats")
        st = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
        st.check_model(hf)
        done = {"stats": st.meta.get("calibration"), "tokens": st.meta.get("tokens")}
        ckpt = checkpoint.restore(solver, resume, done)
        for bid in range(ckpt.done if ckpt else 0, names.dims.n_layers):
            solver.layer(st, st.modules(bid))
            if ckpt is not None:
                ckpt.record(solver, bid, None)
        return {"calibration": st.meta.get("calib_spec"), "calib_tokens": st.meta.get("tokens")}, None, None
    if calib is None:
        raise EoraError("give calibration data (--calib) or statistics (--stats)")
    ids = calibration_ids(hf, calib, samples=samples, seqlen=seqlen, tokenizer=tokenizer)
    fingerprint = calib_data.calibration_fingerprint(calib, ids)
    ckpt = checkpoint.restore(solver, resume, {"calibration": fingerprint, "batch_size": batch_size})

    def on_layer_done(i: int, hidden: list[torch.Tensor]) -> None:
        if ckpt is not None:
            ckpt.record(solver, i, hidden)

    _, hidden = calibration.stream(hf, ids, batch_size=batch_size, propagate=propagate, keep=False,
                                   calib_fingerprint=fingerprint, return_hidden=return_hidden, device=device,
                                   start_layer=ckpt.done if ckpt else 0,
                                   hidden_in=ckpt.load_hidden() if ckpt else None, on_layer_done=on_layer_done,
                                   processors=[SolveLayer(solver, propagate)])
    return {"calibration": calib, "calib_tokens": int(ids.numel())}, ids, hidden
