"""Compensation under a byte budget: solve every tensor once at its largest rank, then buy ranks and types.

`solve` keeps, per tensor, the factors, the gain of every component and the exact objective of every rank in
every stored type (budget.Solution), weighted by each tensor's measured effect on the output
(`measure_importance`: importance.fisher_kl of W - Wq); `adapt` allocates a budget over that solve (allocation.plan),
writes the adapter and checks it never exceeds the budget. `compensate.compensate(budget=...)` runs both.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import adapter as adapter_io
from . import allocation, devices, eora, importance, info, peft
from . import budget as budget_mod
from .errors import EoraError, check_writable
from .gguf_io import GGUFModel, check_matches, open_gguf
from .hf_model import calibration_ids, load_config
from .naming import NameMap
from .solver import LayerSolver, Report, check_same_model, solve_layers
from .stats import CalibrationStats

log = logging.getLogger(__name__)


def budget_types(adapter_type: str) -> tuple[str, ...]:
    if adapter_type == "auto":
        return budget_mod.AUTO_TYPES
    if adapter_type not in adapter_io.ADAPTER_DTYPES:
        raise EoraError(f"unknown --adapter-type {adapter_type!r}: choose auto or one of "
                        f"{', '.join(adapter_io.ADAPTER_DTYPES)}")
    return (adapter_type,)


def solve(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], *, max_rank: int = budget_mod.MAX_RANK,
          method: str = "eora", calib: str | None = "demo,stories",
          stats: CalibrationStats | str | os.PathLike[str] | None = None, samples: int = 64,
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
        solver = LayerSolver(hf, base, names, method=method, rank=max_rank, eig_floor=eig_floor,
                         budget_types=tuple(adapter_types), solver=solver, device=devices.resolve(device))
        calib_meta, ids, _ = solve_layers(solver, hf, names, calib=calib, stats=stats, samples=samples, seqlen=seqlen,
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
    dtypes = budget_types(adapter_type)
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
    alloc = allocation.plan(sol, avail, dtypes=dtypes, metadata=metadata)
    if not alloc.ranks():
        raise EoraError(f"the budget leaves {avail} bytes for the adapter: not enough for rank 1 of any tensor")
    metadata["eora.rank"] = max(alloc.ranks().values())
    factors = allocation.truncated(sol, alloc)
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
        peft.write_peft(peft_dir, stored, names, base_model_name_or_path=str(hf_dir))
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


def n_params(gguf_path: str | os.PathLike[str]) -> int:
    """Number of weights in a GGUF (all tensors)."""
    with open_gguf(gguf_path) as m:
        return int(sum(int(np.prod(m.tensor(n).shape)) for n in m.names))
