"""Compensation end to end: HF model + its quantized GGUF + calibration -> GGUF LoRA (and PEFT) adapter.

`compensate` checks its inputs, stages every output, walks the model solving each layer (solver.py), adds the
embedding tensors when asked (embedding.py), writes the GGUF LoRA (and lower ranks, a PEFT folder) and checks it
against the base; with a byte budget it hands over to budgeted.py. `calibrate` collects reusable statistics.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import adapter as adapter_io
from . import budget as budget_mod
from . import calib_data, calibration, checkpoint, devices, distributed, embedding, eora, fast_solve, info, peft
from .budgeted import adapt, budget_types, solve
from .errors import EoraError, check_writable, staged_outputs
from .gguf_io import check_matches, open_gguf
from .hf_model import calibration_ids, load_config, model_identity
from .naming import NameMap
from .solver import LayerSolver, Report, check_rank, check_same_model, solve_layers
from .stats import CalibrationStats
from .walker import PROPAGATE_MODES

log = logging.getLogger(__name__)


def calibrate(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int, batch_size: int = 8,
              tokenizer=None, seed: int = 0, draw: int = 0, device: str | None = None) -> CalibrationStats:
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


def compensate(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
               rank: int | None = None, method: str = "eora", calib: str | None = "demo,stories",
               stats: CalibrationStats | str | os.PathLike[str] | None = None,
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
    dtypes = budget_types(adapter_type)
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


def _compensate_rank(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                     out: str | os.PathLike[str], *, rank: int, method: str, calib: str | None,
                     stats: CalibrationStats | str | os.PathLike[str] | None, samples: int, seqlen: int,
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
        raise EoraError(f"unknown --adapter-type {adapter_type!r}: "
                        f"choose one of {', '.join(adapter_io.ADAPTER_DTYPES)}")
    if propagate not in PROPAGATE_MODES:
        raise EoraError(f"unknown --propagate {propagate!r}: choose one of {', '.join(PROPAGATE_MODES)}")
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
            peft_tmp = (staging.folder(peft_dir, may_hold=peft.PEFT_FILES, inputs=[*inputs, out])
                        if peft_dir is not None else None)
        check_matches(config, base)
        if not allow_mismatch:
            check_same_model(hf, base, names)
        solver = LayerSolver(hf, base, names, method=method, rank=rank, eig_floor=eig_floor, solver=solver,
                         device=device)
        ckpt = None
        if resume:
            fingerprint = {"model": model_identity(hf), "gguf": checkpoint.file_identity(gguf_path),
                           "method": method, "rank": rank, "solver": solver.solver, "propagate": propagate,
                           "eig_floor": eig_floor, "samples": samples, "seqlen": seqlen,
                           "processes": distributed.world()}

            def ckpt(calib_fp: dict[str, Any]) -> checkpoint.Checkpoint:
                nonlocal opened
                opened = checkpoint.Checkpoint(out, {**fingerprint, **calib_fp})
                return opened
        opened: checkpoint.Checkpoint | None = None
        t0 = time.perf_counter()
        calib_meta, ids, hidden = solve_layers(solver, hf, names, calib=calib, stats=stats, samples=samples,
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
                peft.write_peft(peft_tmp, solver.factors, names, base_model_name_or_path=str(hf))
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
