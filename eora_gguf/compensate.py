"""Compensation end to end: HF model + its quantized GGUF + calibration -> GGUF LoRA (and PEFT) adapter.

For every decoder-layer linear: W from the HF safetensors (rows put into GGUF order), Wq dequantized from the
GGUF, ΔW = W - Wq, C the calibration input covariance; the solver gives (B, A) with W ≈ Wq + B A. Layers are
solved as calibration streams through them, so statistics never pile up in memory, and so the paper's
sequential mode (`propagate="compensated"`: each layer feeds Wq + B A outputs forward) falls out naturally.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import adapter as adapter_io
from . import budget as budget_mod
from . import calib_data, calibration, checkpoint, devices, distributed, embedding, eora, fast_solve
from . import importance, info
from .errors import EoraError, check_writable, staged_outputs
from .gguf_io import GGUFModel, check_matches, open_gguf
from .naming import LINEAR_MODULES, NameMap, model_dims

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


def load_config(hf_dir: str | os.PathLike[str]):
    from transformers import AutoConfig

    hf = Path(hf_dir)
    if not (hf / "config.json").is_file():
        raise EoraError(f"{hf} is not a Hugging Face model folder (no config.json)")
    calibration._read_config_json(hf)  # one-line errors for a broken file
    try:
        return AutoConfig.from_pretrained(hf)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ... for configs it cannot use
        raise EoraError(f"transformers cannot use {hf / 'config.json'}: {str(exc).splitlines()[0][:300]}") from None


def load_tokenizer(hf_dir: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # transformers raises many kinds here
        raise EoraError(f"cannot load the tokenizer of {hf_dir}: {str(exc).splitlines()[0]}") from None


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
    from safetensors import safe_open

    files = calibration.tensor_files(hf_dir)
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
    import gguf

    try:
        return gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise EoraError(f"{qtype.name} cannot be dequantized by gguf-py: requantize the model with another "
                        "type") from None


def calibration_ids(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int,
                    tokenizer=None, seed: int = 0, draw: int = 0) -> torch.Tensor:
    tok = tokenizer if tokenizer is not None else load_tokenizer(hf_dir)
    return calib_data.build_calibration(spec, tok, samples=samples, seqlen=seqlen, seed=seed, draw=draw)


def calibrate(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int, batch_size: int = 8,
              tokenizer=None, seed: int = 0, draw: int = 0,
              device: str | None = None) -> calibration.CalibrationStats:
    """Input covariances of every linear layer with original propagation: reusable across quants and ranks.
    seed, draw: which windows of the calibration text are drawn (calib_data.build_calibration; draws of one seed
    share no window).
    device: where the layers run and the sums accumulate (devices.resolve); under torchrun the samples are
    split across processes and every process gets the summed statistics."""
    ids = calibration_ids(hf_dir, spec, samples=samples, seqlen=seqlen, tokenizer=tokenizer, seed=seed, draw=draw)
    stats, _ = calibration.stream(hf_dir, ids, batch_size=batch_size, propagate="original",
                                  calib_fingerprint=calib_data.calibration_fingerprint(spec, ids),
                                  return_hidden=False, device=devices.resolve(device))
    stats.meta["calib_spec"] = spec
    return stats


class _Solver:
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
        self.files = calibration.tensor_files(hf_dir)
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.tensors: dict[str, dict[str, float]] = {}
        self.solve_seconds = 0.0
        self.device = torch.device(device or "cpu")
        self.want_weights = True  # the compensated weights `layer` returns (only the sequential mode uses them)

    def _hf_weight(self, module: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{module}.weight"
        path = self.files.get(key)
        if path is None:
            raise EoraError(f"{self.hf_dir} has no tensor {key}")
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float64)

    def layer(self, stats: calibration.CalibrationStats, modules: list[str]) -> dict[str, torch.Tensor]:
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

    def _solve_one(self, stats: calibration.CalibrationStats, module: str) -> tuple:
        """(B, A) on the CPU (float64), the report row, and the budget.TensorSolution (or None) of one module."""
        gname = self.names.to_gguf(module)
        w = self.names.hf_to_gguf_rows(module, self._hf_weight(module))
        wq = torch.from_numpy(self.base.dequantize(gname)).to(torch.float64).reshape(w.shape)
        dw = (w - wq).to(self.device)
        if not torch.isfinite(dw).all():
            raise EoraError(f"{gname}: the HF or GGUF weight holds NaN/Inf: check both model files")
        cov = stats.covariance(module).to(self.device) if self.method != "svd" else None
        rank = self.rank if self.budget_types is None else min(self.rank, *dw.shape)
        b, a = fast_solve.solve(self.method, dw, cov, rank, name=gname, eig_floor=self.eig_floor,
                                solver=self.solver)
        c = cov if cov is not None else stats.covariance(module).to(self.device)
        before = float(((dw @ c) * dw).sum())
        tsol = None
        if self.budget_types is not None:
            b32, a32 = b.to(torch.float32).cpu().numpy(), a.to(torch.float32).cpu().numpy()
            dw_, c_, b_, a_ = (t.cpu() for t in (dw, c, b, a))
            tsol = budget_mod.TensorSolution(b32, a32, eora.component_gains(a_, c_).numpy(),
                                             budget_mod.objectives(dw_.numpy(), c_.numpy(), b_.numpy(), a_.numpy(),
                                                                   self.budget_types))
        after = eora.weighted_error(dw, c, b, a)
        w = w.to(self.device)
        ref = float(((w @ c) * w).sum())
        row = {"rel_err_before": before / ref, "rel_err_after": after / ref, "qtype": self.base.tensor(gname).qtype}
        return b.cpu(), a.cpu(), row, tsol


def compensate(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
               rank: int | None = None, method: str = "eora", calib: str | None = "demo,stories",
               stats: calibration.CalibrationStats | str | os.PathLike[str] | None = None,
               samples: int = 64, seqlen: int = 512, propagate: str = "original", adapter_type: str | None = None,
               peft_dir: str | os.PathLike[str] | None = None, eig_floor: float = 1e-6,
               batch_size: int = 8, also: dict[int, str | os.PathLike[str]] | None = None,
               tokenizer=None, budget: budget_mod.Budget | str | None = None,
               solution_out: str | os.PathLike[str] | None = None, importance_weights: bool = True,
               allow_mismatch: bool = False, embeddings: bool = False, embedding_smoothing: float = 0.0,
               embedding_stats: embedding.EmbeddingStats | str | os.PathLike[str] | None = None,
               name: str | None = None, solver: str = "auto", device: str | None = None,
               resume: bool = False) -> Report:
    """Write a GGUF LoRA adapter for `gguf_path` that brings it back toward the HF model in `hf_dir`.

    stats: reuse calibration statistics (a CalibrationStats or a file from `calibrate`) instead of `calib`.
    tokenizer: tokenizes `calib` (default: the HF folder's AutoTokenizer).
    propagate="compensated" calibrates each layer on the outputs of the already compensated layers before it
    (it cannot reuse statistics, which depend on the quantization and the rank).
    also: {lower rank: path} — also write those ranks' adapters. Every method's rank-r solution is the first r
    components of its rank-R one (B's columns are the top eigenvectors of one Gram matrix, in descending
    order), so one solve serves all ranks (with propagate="original"; compensated mode depends on the rank).
    budget: a byte budget (`budget.Budget` or its text, e.g. "95MB", "5.8bpw", "adapter:6MB"): every tensor is
    solved once at min(rank or budget.MAX_RANK, its dimensions), its output effect measured (`importance`, unless
    importance_weights is False), and per-tensor ranks and types chosen to fit (`adapter_type` "auto" chooses
    among budget.AUTO_TYPES; the default with a budget, F16 without); solution_out keeps that solve for `adapt` with
    other budgets.
    allow_mismatch: skip `check_same_model` (a GGUF whose weights are far from the HF model's).
    embeddings: also compensate token_embd.weight and output.weight where llama.cpp can apply a LoRA to them
    (embedding.py; a tied token_embd cannot be), at `rank` (capped at the hidden size), with token counts
    smoothed by `embedding_smoothing` pseudo-counts; `embedding_stats` (an EmbeddingStats or its file) reuses
    statistics, otherwise they come from this run's calibration (not from `stats`). One rank for all (no budget).
    name: the adapter's name, recorded in the file (`eora.name`, llama.cpp's `adapter.lora.task_name`); every
    adapter also records its version, calibration and base identity (`info.provenance`).
    solver: "exact", "fast" (fast_solve.py: certified block Krylov) or "auto" (fast for large weights only).
    device: where layers run and solves happen (None: CPU); see `devices.resolve`.
    resume (one rank for all, not --budget): keep per-layer checkpoints beside `out` (checkpoint.py) and resume an
    interrupted run from them; removed once the adapter is written.
    """
    fast_solve.check_solver(solver)
    device = devices.resolve(device)
    if adapter_type is None:
        adapter_type = "f16" if budget is None and solution_out is None else "auto"
    if budget is None and solution_out is None:
        if rank is None:
            raise EoraError("give --rank or --budget")
        return _compensate_rank(hf_dir, gguf_path, out, rank=rank, method=method, calib=calib, stats=stats,
                                samples=samples, seqlen=seqlen, propagate=propagate, adapter_type=adapter_type,
                                peft_dir=peft_dir, eig_floor=eig_floor, batch_size=batch_size, also=also,
                                tokenizer=tokenizer, allow_mismatch=allow_mismatch, embeddings=embeddings,
                                embedding_smoothing=embedding_smoothing, embedding_stats=embedding_stats,
                                name=name, solver=solver, device=device, resume=resume)
    if embeddings:
        raise EoraError("--embeddings goes with --rank (one rank for every tensor), not with --budget")
    if distributed.active():
        raise EoraError("--budget runs in one process: run it without torchrun, or give --rank")
    if also:
        raise EoraError("--budget chooses the ranks itself: extra ranks (also) do not apply")
    spec = budget_mod.Budget.parse(budget) if isinstance(budget, str) else budget
    dtypes = _budget_types(adapter_type)
    check_writable(out)
    if solution_out is not None:
        check_writable(solution_out)
    t0 = time.perf_counter()
    sol = solve(hf_dir, gguf_path, max_rank=rank or budget_mod.MAX_RANK, method=method, calib=calib, stats=stats,
                allow_mismatch=allow_mismatch,
                samples=samples, seqlen=seqlen, adapter_types=dtypes, eig_floor=eig_floor, batch_size=batch_size,
                tokenizer=tokenizer, importance_weights=importance_weights, solver=solver, device=device)
    if solution_out is not None:
        sol.save(solution_out)
    if spec is None:
        raise EoraError("a solution alone was asked for: give --budget to write an adapter too")
    report = adapt(sol, gguf_path, out, spec, adapter_type=adapter_type, peft_dir=peft_dir, hf_dir=hf_dir,
                   name=name)
    report.seconds = {**sol.meta.get("seconds", {}), "total": round(time.perf_counter() - t0, 2)}
    return report


def _budget_types(adapter_type: str) -> tuple[str, ...]:
    if adapter_type == "auto":
        return budget_mod.AUTO_TYPES
    if adapter_type not in adapter_io.ADAPTER_DTYPES:
        raise EoraError(f"unknown --adapter-type {adapter_type!r}: choose auto or one of "
                        f"{', '.join(adapter_io.ADAPTER_DTYPES)}")
    return (adapter_type,)


def solve(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], *, max_rank: int = budget_mod.MAX_RANK,
          method: str = "eora", calib: str | None = "demo,stories",
          stats: calibration.CalibrationStats | str | os.PathLike[str] | None = None, samples: int = 64,
          seqlen: int = 512, adapter_types: tuple[str, ...] = budget_mod.AUTO_TYPES, eig_floor: float = 1e-6,
          batch_size: int = 8, tokenizer=None, importance_weights: bool = True, importance_samples: int = 16,
          importance_seqlen: int = 128, importance_draws: int = 8, allow_mismatch: bool = False,
          solver: str = "auto", device: str | None = None) -> budget_mod.Solution:
    """Solve every tensor once at min(max_rank, its dimensions) for `budget` (see budget.py): factors, gains, the
    exact objective per stored type and rank, and (importance_weights) each tensor's importance weight measured
    with `importance.fisher_kl` on the first importance_samples x importance_seqlen calibration tokens."""
    hf = Path(hf_dir)
    if method not in eora.METHODS:
        raise EoraError(f"unknown --method {method!r}: choose one of {', '.join(eora.METHODS)}")
    if max_rank < 1:
        raise EoraError(f"the largest rank must be a positive integer, got {max_rank}")
    for t in adapter_types:
        if t not in adapter_io.ADAPTER_DTYPES:
            raise EoraError(f"unknown adapter type {t!r}: choose one of {', '.join(adapter_io.ADAPTER_DTYPES)}")
    config = load_config(hf)
    names = NameMap.from_config(config)
    t_start = time.perf_counter()
    with open_gguf(gguf_path) as base:
        check_matches(config, base)
        if not allow_mismatch:
            check_same_model(hf, base, names)
        solver = _Solver(hf, base, names, method=method, rank=max_rank, eig_floor=eig_floor,
                         budget_types=tuple(adapter_types), solver=solver, device=devices.resolve(device))
        calib_meta, ids, _ = _run(solver, hf, names, calib=calib, stats=stats, samples=samples, seqlen=seqlen,
                               propagate="original", batch_size=batch_size, tokenizer=tokenizer,
                               device=devices.resolve(device))
        t_solve = time.perf_counter() - t_start
        sol = solver.solution
        before = {n: t.before for n, t in sol.tensors.items()}
        kl: dict[str, float] = {}
        if importance_weights:
            t0 = time.perf_counter()
            if ids is None:
                spec = calib_meta.get("calibration")
                if not spec:
                    raise EoraError("the statistics do not name their calibration text: give --calib to measure "
                                    "the importance weights, or turn them off")
                ids = calibration_ids(hf, str(spec), samples=importance_samples, seqlen=importance_seqlen,
                                      tokenizer=tokenizer)
            kl = measure_importance(hf, base, names, list(sol.tensors), ids[:importance_samples, :importance_seqlen],
                                    draws=importance_draws)
            sol.set_weights(importance.weights(kl, before))
            t_imp = time.perf_counter() - t0
        else:
            t_imp = 0.0
    sol.meta.update({"method": method, "base_model": Path(gguf_path).name, "max_rank": max_rank,
                     "adapter_types": list(adapter_types), **calib_meta,
                     "importance": "fisher" if importance_weights else "none", "kl": kl, "before": before,
                     "qtypes": {n: solver.tensors[n]["qtype"].name for n in sol.tensors},
                     "ref": {n: before[n] / solver.tensors[n]["rel_err_before"] if solver.tensors[n]["rel_err_before"]
                             else 0.0 for n in sol.tensors},  # ‖W X‖² per token, for relative errors
                     "seconds": {"calibrate_and_solve": round(t_solve, 2), "solve": round(solver.solve_seconds, 2),
                                 "importance": round(t_imp, 2)}})
    return sol


def measure_importance(hf_dir: str | os.PathLike[str], base: GGUFModel, names: NameMap, tensors: list[str],
                       ids: torch.Tensor, *, draws: int = 8, batch_size: int = 4) -> dict[str, float]:
    """`importance.fisher_kl` of each GGUF tensor's quantization error (W - Wq), by GGUF name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    params = dict(model.named_parameters())
    by_object = {id(m): n for n, m in model.named_modules()}
    special = {"token_embd.weight": by_object.get(id(model.get_input_embeddings())),
               "output.weight": by_object.get(id(model.get_output_embeddings()))}
    deltas: dict[str, torch.Tensor] = {}
    to_gguf: dict[str, str] = {}
    for gname in tensors:
        module = special[gname] if gname in special else names.to_hf(gname)
        if module is None:
            raise EoraError(f"{gname}: the HF model has no module for it")
        w = params[module + ".weight"].detach().to(torch.float64)
        wq = torch.from_numpy(base.dequantize(gname)).to(torch.float64)
        if gname in special:  # same (rows, dim) layout; rows the converter dropped from the vocabulary stay exact
            wq = torch.cat([wq.reshape(-1, w.shape[1]), w[wq.numel() // w.shape[1]:]])
        else:
            wq = names.gguf_to_hf_rows(module, wq.reshape(w.shape[0], w.shape[1]))
        deltas[module], to_gguf[module] = (w - wq).to(torch.float32), gname
    kl = importance.fisher_kl(model, deltas, ids, draws=draws, batch_size=batch_size)
    return {to_gguf[m]: v for m, v in kl.items()}


def adapt(solution: budget_mod.Solution | str | os.PathLike[str], gguf_path: str | os.PathLike[str],
          out: str | os.PathLike[str], budget: budget_mod.Budget | str, *, adapter_type: str = "auto",
          peft_dir: str | os.PathLike[str] | None = None, hf_dir: str | os.PathLike[str] | None = None,
          name: str | None = None) -> Report:
    """Write the adapter a budget buys from a saved solve (no solving): allocate, truncate, write, check.

    The written file never exceeds the budget (EoraError if it would; the accounting is exact, see budget.py).
    peft_dir (needs hf_dir for the module names): also a PEFT folder with the same ranks (rank_pattern,
    alpha_pattern: scale 1 everywhere) and the factors as the GGUF stores them (dequantized).
    """
    sol = solution if isinstance(solution, budget_mod.Solution) else budget_mod.Solution.load(solution)
    spec = budget_mod.Budget.parse(budget) if isinstance(budget, str) else budget
    dtypes = _budget_types(adapter_type)
    check_writable(out)
    if peft_dir is not None:
        if hf_dir is None:
            raise EoraError("a PEFT folder needs the HF model folder (its module names)")
        check_writable(Path(peft_dir))
    model_bytes = os.path.getsize(gguf_path)
    avail = spec.adapter_bytes(model_bytes, n_params(gguf_path))
    if sol.meta.get("base_model") not in (None, Path(gguf_path).name):
        log.warning("the solution was solved against %s, not %s", sol.meta.get("base_model"), Path(gguf_path).name)
    metadata = {"eora.method": str(sol.meta.get("method", "eora")), "eora.rank": 0, "eora.propagate": "original",
                "eora.base_model": Path(gguf_path).name, "eora.calibration": str(sol.meta.get("calibration")),
                "eora.budget": spec.spec or f"{spec.kind}:{spec.value:g}",
                **info.provenance(gguf_path, calib_tokens=sol.meta.get("calib_tokens"), name=name)}
    alloc = budget_mod.plan(sol, avail, dtypes=dtypes, metadata=metadata)
    if not alloc.ranks():
        raise EoraError(f"the budget leaves {avail} bytes for the adapter: not enough for rank 1 of any tensor")
    metadata["eora.rank"] = max(alloc.ranks().values())
    factors = budget_mod.truncated(sol, alloc)
    path = adapter_io.write_gguf_lora(out, factors, arch=sol.arch, dtype=alloc.types(), metadata=metadata)
    size = Path(path).stat().st_size
    if size > avail:  # only an F16 factor overflowing to F32 can do this; never leave an over-budget file
        Path(path).unlink()
        raise EoraError(f"the adapter would take {size} bytes, over its budget of {avail}: a factor overflowed F16; "
                        "choose a quantized --adapter-type")
    with open_gguf(gguf_path) as base:
        adapter_io.check_gguf_lora(path, base)
    if peft_dir is not None:
        _, stored = adapter_io.read_gguf_lora(path)
        names = NameMap.from_config(load_config(hf_dir))
        adapter_io.write_peft(peft_dir, stored, names, base_model_name_or_path=str(hf_dir))
    tensors = {}
    refs = sol.meta.get("ref", {})
    for n, t in sol.tensors.items():
        o = alloc.choices[n]
        obj = float(t.objective[o.dtype][o.rank]) if o.rank else t.before
        ref = refs.get(n) or float("nan")
        tensors[n] = {"rank": o.rank, "type": o.dtype or None, "bytes": o.bytes, "rel_err_before": t.before / ref,
                      "rel_err_after": obj / ref, "weight": t.weight, "kl": sol.meta.get("kl", {}).get(n)}
    summary = alloc.summary()
    return Report(adapter=str(path), method=str(sol.meta.get("method", "eora")), rank=metadata["eora.rank"],
                  tensors=tensors, meta={"propagate": "original", "adapter_bytes": size, "adapter_type": adapter_type,
                                         "budget": metadata["eora.budget"], "budget_adapter_bytes": avail,
                                         "model_bytes": model_bytes, "total_bytes": model_bytes + size,
                                         "calibration": sol.meta.get("calibration"),
                                         "calib_tokens": sol.meta.get("calib_tokens"), **summary})


def _run(solver: _Solver, hf: Path, names: NameMap, *, calib: str | None,
         stats: calibration.CalibrationStats | str | os.PathLike[str] | None, samples: int, seqlen: int,
         propagate: str, batch_size: int, tokenizer, return_hidden: bool = False, device: str | None = None,
         resume: Callable[[dict[str, Any]], checkpoint.Checkpoint] | None = None
         ) -> tuple[dict[str, Any], torch.Tensor | None, torch.Tensor | None]:
    """Stream calibration through the model (or reuse statistics), solving each layer; (calibration info, ids,
    the last decoder layer's outputs when return_hidden). resume(fingerprint of the calibration) opens the run's
    checkpoint: finished layers are loaded instead of solved, and every solved layer is recorded."""
    solver.want_weights = propagate == "compensated"
    if stats is not None:
        if propagate == "compensated":
            raise EoraError("--propagate compensated calibrates as it solves: give --calib, not --stats")
        st = stats if isinstance(stats, calibration.CalibrationStats) else calibration.CalibrationStats.load(stats)
        st.check_model(hf)
        ckpt = checkpoint.restore(solver, resume, {"stats": st.meta.get("calibration"), "tokens": st.meta.get("tokens")})
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

    def on_layer(i: int, layer_stats: calibration.CalibrationStats) -> dict[str, torch.Tensor]:
        weights = solver.layer(layer_stats, layer_stats.modules(i))
        return weights if propagate == "compensated" else {}

    def on_layer_done(i: int, hidden: list[torch.Tensor]) -> None:
        if ckpt is not None:
            ckpt.record(solver, i, hidden)

    _, hidden = calibration.stream(hf, ids, batch_size=batch_size, propagate=propagate, compensate=on_layer,
                                   keep=False, calib_fingerprint=fingerprint, return_hidden=return_hidden,
                                   device=device, start_layer=ckpt.done if ckpt else 0,
                                   hidden_in=ckpt.load_hidden() if ckpt else None, on_layer_done=on_layer_done)
    return {"calibration": calib, "calib_tokens": int(ids.numel())}, ids, hidden


def _compensate_rank(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                     out: str | os.PathLike[str], *, rank: int, method: str, calib: str | None,
                     stats: calibration.CalibrationStats | str | os.PathLike[str] | None, samples: int, seqlen: int,
                     propagate: str, adapter_type: str, peft_dir: str | os.PathLike[str] | None, eig_floor: float,
                     batch_size: int, also: dict[int, str | os.PathLike[str]] | None, tokenizer,
                     allow_mismatch: bool = False, embeddings: bool = False, embedding_smoothing: float = 0.0,
                     embedding_stats: embedding.EmbeddingStats | str | os.PathLike[str] | None = None,
                     name: str | None = None, solver: str = "auto", device: str | None = None,
                     resume: bool = False) -> Report:
    """One rank for every tensor (see `compensate`)."""
    hf = Path(hf_dir)
    if method not in eora.METHODS:
        raise EoraError(f"unknown --method {method!r}: choose one of {', '.join(eora.METHODS)}")
    if adapter_type not in adapter_io.ADAPTER_DTYPES:
        raise EoraError(f"unknown --adapter-type {adapter_type!r}: choose one of {', '.join(adapter_io.ADAPTER_DTYPES)}")
    if propagate not in calibration.PROPAGATE_MODES:
        raise EoraError(f"unknown --propagate {propagate!r}: choose one of {', '.join(calibration.PROPAGATE_MODES)}")
    config = load_config(hf)
    names = NameMap.from_config(config)
    check_rank(names, rank)
    also = dict(also or {})
    for r in also:
        if not 1 <= r <= rank:
            raise EoraError(f"extra rank {r} must lie in [1, {rank}]")
    if also and propagate == "compensated":
        raise EoraError("--propagate compensated depends on the rank: solve each rank on its own")
    if embeddings and embedding_stats is None and distributed.active():
        raise EoraError("--embeddings collects its statistics in one process: run it without torchrun, or give "
                        "embedding statistics")
    inputs = [hf, gguf_path, stats if isinstance(stats, (str, os.PathLike)) else None]
    t_start = time.perf_counter()
    main = distributed.is_main()  # under torchrun, rank 0 alone writes
    # Every output is staged (checked, then written to temporaries) before the work and renamed into place only
    # when all of them are complete: an interruption or a full disk leaves none of them, and a re-run works.
    with (staged_outputs() if main else contextlib.nullcontext()) as staging, open_gguf(gguf_path) as base:
        if staging is not None:
            out_tmp = staging.file(out, suffix=".gguf", inputs=inputs)
            also_tmp = {r: staging.file(p, suffix=".gguf", inputs=[*inputs, out]) for r, p in also.items()}
            peft_tmp = (staging.folder(peft_dir, may_hold=adapter_io.PEFT_FILES, inputs=[*inputs, out])
                        if peft_dir is not None else None)
        check_matches(config, base)
        if not allow_mismatch:
            check_same_model(hf, base, names)
        solver = _Solver(hf, base, names, method=method, rank=rank, eig_floor=eig_floor, solver=solver,
                         device=device)
        ckpt = None
        if resume:
            fingerprint = {"model": calibration.model_identity(hf), "gguf": checkpoint.file_identity(gguf_path),
                           "method": method, "rank": rank, "solver": solver.solver, "propagate": propagate,
                           "eig_floor": eig_floor, "samples": samples, "seqlen": seqlen,
                           "processes": distributed.world()}

            def ckpt(calib_fp: dict[str, Any]) -> checkpoint.Checkpoint:
                nonlocal opened
                opened = checkpoint.Checkpoint(out, {**fingerprint, **calib_fp})
                return opened
        opened: checkpoint.Checkpoint | None = None
        t0 = time.perf_counter()
        calib_meta, ids, hidden = _run(solver, hf, names, calib=calib, stats=stats, samples=samples,
                                       seqlen=seqlen, propagate=propagate, batch_size=batch_size, tokenizer=tokenizer,
                                       return_hidden=embeddings and embedding_stats is None and stats is None,
                                       device=device, resume=ckpt)
        est = _embedding_stats(embeddings, embedding_stats, ids, hidden, hf)
        del hidden
        if est is not None:
            t1 = time.perf_counter()
            sols, rows = embedding.solve_gguf(hf, base, est, rank, smoothing=embedding_smoothing,
                                              eig_floor=eig_floor, hf_prefix=names.hf_prefix)
            solver.factors.update({n: (s.b.to(torch.float32).numpy(), s.a.to(torch.float32).numpy())
                                   for n, s in sols.items()})
            solver.tensors.update(rows)  # type: ignore[arg-type]
            solver.solve_seconds += time.perf_counter() - t1
        t_cal = time.perf_counter() - t0
        arch = base.meta.arch
        metadata = {"eora.method": method, "eora.rank": rank, "eora.propagate": propagate,
                    "eora.base_model": Path(gguf_path).name, "eora.calibration": str(calib_meta["calibration"]),
                    **info.provenance(gguf_path, calib_tokens=calib_meta.get("calib_tokens"), name=name)}
        if staging is not None:
            adapter_io.write_gguf_lora(out_tmp, solver.factors, arch=arch, dtype=adapter_type, metadata=metadata)
            adapter_io.check_gguf_lora(out_tmp, base)
            for r, p in sorted(also_tmp.items()):
                low = {n: (b[:, :r], a[:r]) for n, (b, a) in solver.factors.items()}
                adapter_io.write_gguf_lora(p, low, arch=arch, dtype=adapter_type,
                                           metadata={**metadata, "eora.rank": r})
                adapter_io.check_gguf_lora(p, base)
            if peft_tmp is not None:
                adapter_io.write_peft(peft_tmp, solver.factors, names, base_model_name_or_path=str(hf))
    distributed.barrier()  # rank 0 has renamed its outputs into place
    if opened is not None:
        opened.remove()
    path = Path(out)
    log.info("wrote %s (%d LoRA pairs, rank %d, %s)%s", path, len(solver.factors), rank, adapter_type,
             f" and the PEFT folder {peft_dir}" if peft_dir is not None else "")
    total = time.perf_counter() - t_start
    report = Report(adapter=str(path), method=method, rank=rank, tensors=solver.tensors,
                    seconds={"calibrate_and_solve": round(t_cal, 2), "solve": round(solver.solve_seconds, 2),
                             "total": round(total, 2)},
                    meta={"propagate": propagate, "adapter_bytes": Path(path).stat().st_size if main else None,
                          "adapter_type": adapter_type, **calib_meta})
    return report


def _embedding_stats(wanted: bool, given: embedding.EmbeddingStats | str | os.PathLike[str] | None,
                     ids: torch.Tensor | None, hidden: torch.Tensor | None, hf: Path
                     ) -> embedding.EmbeddingStats | None:
    """The statistics the embedding solvers need, when `wanted`: given, or from this run's ids and hidden states."""
    if not wanted:
        return None
    if given is not None:
        return given if isinstance(given, embedding.EmbeddingStats) else embedding.EmbeddingStats.load(given)
    if ids is None:
        raise EoraError("compensating the embeddings needs calibration text (--calib) or embedding statistics, "
                        "not only --stats")
    return embedding.collect(hf, ids, hidden)


def n_params(gguf_path: str | os.PathLike[str]) -> int:
    """Number of weights in a GGUF (all tensors)."""
    with open_gguf(gguf_path) as m:
        return int(sum(int(np.prod(m.tensor(n).shape)) for n in m.names))


__all__ = ["Report", "adapt", "calibrate", "compensate", "check_rank", "measure_importance", "n_params", "model_dims",
           "solve"]
