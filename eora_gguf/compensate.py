"""Compensation end to end: HF model + its quantized GGUF + calibration -> GGUF LoRA (and PEFT) adapter.

For every decoder-layer linear: W from the HF safetensors (rows put into GGUF order), Wq dequantized from the
GGUF, ΔW = W - Wq, C the calibration input covariance; the solver gives (B, A) with W ≈ Wq + B A. Layers are
solved as calibration streams through them, so statistics never pile up in memory, and so the paper's
sequential mode (`propagate="compensated"`: each layer feeds Wq + B A outputs forward) falls out naturally.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import adapter as adapter_io
from . import calib_data, calibration, embedding, eora
from .errors import EoraError, check_writable
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
    return AutoConfig.from_pretrained(hf)


def load_tokenizer(hf_dir: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # transformers raises many kinds here
        raise EoraError(f"cannot load the tokenizer of {hf_dir}: {str(exc).splitlines()[0]}") from None


def check_rank(names: NameMap, rank: int) -> None:
    if rank < 1:
        raise EoraError(f"--rank must be a positive integer, got {rank}")
    for module in LINEAR_MODULES:
        d_out, d_in = names.dims.linear_shape(module)
        if rank > min(d_out, d_in):
            raise EoraError(f"--rank {rank} exceeds min(d_in, d_out) = {min(d_out, d_in)} of {module} "
                            f"({d_out}x{d_in}): choose a rank of at most {min(d_out, d_in)}")


def calibration_ids(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int,
                    tokenizer=None) -> torch.Tensor:
    tok = tokenizer if tokenizer is not None else load_tokenizer(hf_dir)
    return calib_data.build_calibration(spec, tok, samples=samples, seqlen=seqlen)


def calibrate(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int, batch_size: int = 8,
              tokenizer=None) -> calibration.CalibrationStats:
    """Input covariances of every linear layer with original propagation: reusable across quants and ranks."""
    ids = calibration_ids(hf_dir, spec, samples=samples, seqlen=seqlen, tokenizer=tokenizer)
    stats, _ = calibration.stream(hf_dir, ids, batch_size=batch_size, propagate="original",
                                  calib_fingerprint=calib_data.calibration_fingerprint(spec, ids),
                                  return_hidden=False)
    stats.meta["calib_spec"] = spec
    return stats


class _Solver:
    """Solves one decoder layer at a time against the GGUF; collects factors in GGUF names/row order."""

    def __init__(self, hf_dir: Path, base: GGUFModel, names: NameMap, *, method: str, rank: int,
                 eig_floor: float) -> None:
        self.hf_dir, self.base, self.names = hf_dir, base, names
        self.method, self.rank, self.eig_floor = method, rank, eig_floor
        self.files = calibration.tensor_files(hf_dir)
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.tensors: dict[str, dict[str, float]] = {}
        self.solve_seconds = 0.0

    def _hf_weight(self, module: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{module}.weight"
        path = self.files.get(key)
        if path is None:
            raise EoraError(f"{self.hf_dir} has no tensor {key}")
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float64)

    def layer(self, stats: calibration.CalibrationStats, modules: list[str]) -> dict[str, torch.Tensor]:
        """Solve `modules` (HF names) with `stats`; returns the compensated weights Wq + BA in HF layout."""
        t0 = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        for module in modules:
            gname = self.names.to_gguf(module)
            w = self.names.hf_to_gguf_rows(module, self._hf_weight(module))
            wq = torch.from_numpy(self.base.dequantize(gname)).to(torch.float64).reshape(w.shape)
            dw = w - wq
            if not torch.isfinite(dw).all():
                raise EoraError(f"{gname}: the HF or GGUF weight holds NaN/Inf: check both model files")
            cov = stats.covariance(module) if self.method != "svd" else None
            b, a = eora.solve(self.method, dw, cov, self.rank, name=gname, eig_floor=self.eig_floor)
            self.factors[gname] = (b.to(torch.float32).numpy(), a.to(torch.float32).numpy())
            c = cov if cov is not None else stats.covariance(module)
            before = float(((dw @ c) * dw).sum())
            after = eora.weighted_error(dw, c, b, a)
            ref = float(((w @ c) * w).sum())
            self.tensors[gname] = {"rel_err_before": before / ref, "rel_err_after": after / ref,
                                   "qtype": self.base.tensor(gname).qtype}
            out[module] = self.names.gguf_to_hf_rows(module, wq + b @ a).to(torch.float32)
        self.solve_seconds += time.perf_counter() - t0
        return out


def compensate(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
               rank: int, method: str = "eora", calib: str | None = "demo,stories",
               stats: calibration.CalibrationStats | str | os.PathLike[str] | None = None,
               samples: int = 64, seqlen: int = 512, propagate: str = "original", adapter_type: str = "f16",
               peft_dir: str | os.PathLike[str] | None = None, eig_floor: float = 1e-6,
               batch_size: int = 8, also: dict[int, str | os.PathLike[str]] | None = None,
               tokenizer=None, embeddings: bool = False, embedding_smoothing: float = 0.0,
               embedding_stats: embedding.EmbeddingStats | str | os.PathLike[str] | None = None) -> Report:
    """Write a GGUF LoRA adapter for `gguf_path` that brings it back toward the HF model in `hf_dir`.

    stats: reuse calibration statistics (a CalibrationStats or a file from `calibrate`) instead of `calib`.
    tokenizer: tokenizes `calib` (default: the HF folder's AutoTokenizer).
    propagate="compensated" calibrates each layer on the outputs of the already compensated layers before it
    (it cannot reuse statistics, which depend on the quantization and the rank).
    also: {lower rank: path} — also write those ranks' adapters. Every method's rank-r solution is the first r
    components of its rank-R one (B's columns are the top eigenvectors of one Gram matrix, in descending
    order), so one solve serves all ranks (with propagate="original"; compensated mode depends on the rank).
    embeddings: also compensate token_embd.weight and output.weight where llama.cpp can apply a LoRA to them
    (embedding.py; a tied token_embd cannot be), at `rank` (capped at the hidden size), with token counts
    smoothed by `embedding_smoothing` pseudo-counts; `embedding_stats` (an EmbeddingStats or its file) reuses
    statistics, otherwise they come from this run's calibration (not from `stats`).
    """
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
    check_writable(out)
    also = dict(also or {})
    for r, p in also.items():
        if not 1 <= r <= rank:
            raise EoraError(f"extra rank {r} must lie in [1, {rank}]")
        check_writable(p)
    if also and propagate == "compensated":
        raise EoraError("--propagate compensated depends on the rank: solve each rank on its own")
    if peft_dir is not None:
        check_writable(Path(peft_dir))
    t_start = time.perf_counter()
    with open_gguf(gguf_path) as base:
        check_matches(config, base)
        solver = _Solver(hf, base, names, method=method, rank=rank, eig_floor=eig_floor)
        t0 = time.perf_counter()
        if stats is not None:
            if propagate == "compensated":
                raise EoraError("--propagate compensated calibrates as it solves: give --calib, not --stats")
            st = stats if isinstance(stats, calibration.CalibrationStats) else calibration.CalibrationStats.load(stats)
            st.check_model(hf)
            for bid in range(names.dims.n_layers):
                solver.layer(st, st.modules(bid))
            est = _embedding_stats(embeddings, embedding_stats, None, None, hf)
            calib_meta = {"calibration": st.meta.get("calib_spec"), "calib_tokens": st.meta.get("tokens")}
        elif calib is None:
            raise EoraError("give calibration data (--calib) or statistics (--stats)")
        else:
            ids = calibration_ids(hf, calib, samples=samples, seqlen=seqlen, tokenizer=tokenizer)

            def on_layer(i: int, layer_stats: calibration.CalibrationStats) -> dict[str, torch.Tensor]:
                weights = solver.layer(layer_stats, layer_stats.modules(i))
                return weights if propagate == "compensated" else {}

            _, hidden = calibration.stream(
                hf, ids, batch_size=batch_size, propagate=propagate, compensate=on_layer, keep=False,
                calib_fingerprint=calib_data.calibration_fingerprint(calib, ids),
                return_hidden=embeddings and embedding_stats is None)
            est = _embedding_stats(embeddings, embedding_stats, ids, hidden, hf)
            del hidden
            calib_meta = {"calibration": calib, "calib_tokens": int(ids.numel())}
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
                    "eora.base_model": Path(gguf_path).name, "eora.calibration": str(calib_meta["calibration"])}
        path = adapter_io.write_gguf_lora(out, solver.factors, arch=arch, dtype=adapter_type, metadata=metadata)
        adapter_io.check_gguf_lora(path, base)
        for r, p in sorted(also.items()):
            low = {n: (b[:, :r], a[:r]) for n, (b, a) in solver.factors.items()}
            adapter_io.write_gguf_lora(p, low, arch=arch, dtype=adapter_type, metadata={**metadata, "eora.rank": r})
            adapter_io.check_gguf_lora(p, base)
    if peft_dir is not None:
        adapter_io.write_peft(peft_dir, solver.factors, names, base_model_name_or_path=str(hf))
    total = time.perf_counter() - t_start
    report = Report(adapter=str(path), method=method, rank=rank, tensors=solver.tensors,
                    seconds={"calibrate_and_solve": round(t_cal, 2), "solve": round(solver.solve_seconds, 2),
                             "total": round(total, 2)},
                    meta={"propagate": propagate, "adapter_bytes": Path(path).stat().st_size,
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


__all__ = ["Report", "calibrate", "compensate", "check_rank", "n_params", "model_dims"]
