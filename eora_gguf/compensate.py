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
from . import calib_data, calibration, eora
from .errors import EoraError, staged_outputs
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
               tokenizer=None, allow_mismatch: bool = False) -> Report:
    """Write a GGUF LoRA adapter for `gguf_path` that brings it back toward the HF model in `hf_dir`.

    stats: reuse calibration statistics (a CalibrationStats or a file from `calibrate`) instead of `calib`.
    tokenizer: tokenizes `calib` (default: the HF folder's AutoTokenizer).
    propagate="compensated" calibrates each layer on the outputs of the already compensated layers before it
    (it cannot reuse statistics, which depend on the quantization and the rank).
    also: {lower rank: path} — also write those ranks' adapters. Every method's rank-r solution is the first r
    components of its rank-R one (B's columns are the top eigenvectors of one Gram matrix, in descending
    order), so one solve serves all ranks (with propagate="original"; compensated mode depends on the rank).
    allow_mismatch: skip `check_same_model` (a GGUF whose weights are far from the HF model's).
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
    also = dict(also or {})
    for r in also:
        if not 1 <= r <= rank:
            raise EoraError(f"extra rank {r} must lie in [1, {rank}]")
    if also and propagate == "compensated":
        raise EoraError("--propagate compensated depends on the rank: solve each rank on its own")
    inputs = [hf, gguf_path, stats if isinstance(stats, (str, os.PathLike)) else None]
    t_start = time.perf_counter()
    # Every output is staged (checked, then written to temporaries) before the work and renamed into place only
    # when all of them are complete: an interruption or a full disk leaves none of them, and a re-run works.
    with staged_outputs() as staging, open_gguf(gguf_path) as base:
        out_tmp = staging.file(out, suffix=".gguf", inputs=inputs)
        also_tmp = {r: staging.file(p, suffix=".gguf", inputs=[*inputs, out]) for r, p in also.items()}
        peft_tmp = (staging.folder(peft_dir, may_hold=adapter_io.PEFT_FILES, inputs=[*inputs, out])
                    if peft_dir is not None else None)
        check_matches(config, base)
        if not allow_mismatch:
            check_same_model(hf, base, names)
        solver = _Solver(hf, base, names, method=method, rank=rank, eig_floor=eig_floor)
        t0 = time.perf_counter()
        if stats is not None:
            if propagate == "compensated":
                raise EoraError("--propagate compensated calibrates as it solves: give --calib, not --stats")
            st = stats if isinstance(stats, calibration.CalibrationStats) else calibration.CalibrationStats.load(stats)
            st.check_model(hf)
            for bid in range(names.dims.n_layers):
                solver.layer(st, st.modules(bid))
            calib_meta = {"calibration": st.meta.get("calib_spec"), "calib_tokens": st.meta.get("tokens")}
        elif calib is None:
            raise EoraError("give calibration data (--calib) or statistics (--stats)")
        else:
            ids = calibration_ids(hf, calib, samples=samples, seqlen=seqlen, tokenizer=tokenizer)

            def on_layer(i: int, layer_stats: calibration.CalibrationStats) -> dict[str, torch.Tensor]:
                weights = solver.layer(layer_stats, layer_stats.modules(i))
                return weights if propagate == "compensated" else {}

            calibration.stream(hf, ids, batch_size=batch_size, propagate=propagate, compensate=on_layer,
                               keep=False, calib_fingerprint=calib_data.calibration_fingerprint(calib, ids),
                               return_hidden=False)
            calib_meta = {"calibration": calib, "calib_tokens": int(ids.numel())}
        t_cal = time.perf_counter() - t0
        arch = base.meta.arch
        metadata = {"eora.method": method, "eora.rank": rank, "eora.propagate": propagate,
                    "eora.base_model": Path(gguf_path).name, "eora.calibration": str(calib_meta["calibration"])}
        adapter_io.write_gguf_lora(out_tmp, solver.factors, arch=arch, dtype=adapter_type, metadata=metadata)
        adapter_io.check_gguf_lora(out_tmp, base)
        for r, p in sorted(also_tmp.items()):
            low = {n: (b[:, :r], a[:r]) for n, (b, a) in solver.factors.items()}
            adapter_io.write_gguf_lora(p, low, arch=arch, dtype=adapter_type, metadata={**metadata, "eora.rank": r})
            adapter_io.check_gguf_lora(p, base)
        if peft_tmp is not None:
            adapter_io.write_peft(peft_tmp, solver.factors, names, base_model_name_or_path=str(hf))
    path = Path(out)
    log.info("wrote %s (%d LoRA pairs, rank %d, %s)%s", path, len(solver.factors), rank, adapter_type,
             f" and the PEFT folder {peft_dir}" if peft_dir is not None else "")
    total = time.perf_counter() - t_start
    report = Report(adapter=str(path), method=method, rank=rank, tensors=solver.tensors,
                    seconds={"calibrate_and_solve": round(t_cal, 2), "solve": round(solver.solve_seconds, 2),
                             "total": round(total, 2)},
                    meta={"propagate": propagate, "adapter_bytes": Path(path).stat().st_size,
                          "adapter_type": adapter_type, **calib_meta})
    return report


def n_params(gguf_path: str | os.PathLike[str]) -> int:
    """Number of weights in a GGUF (all tensors)."""
    with open_gguf(gguf_path) as m:
        return int(sum(int(np.prod(m.tensor(n).shape)) for n in m.names))


__all__ = ["Report", "calibrate", "compensate", "check_rank", "n_params", "model_dims"]
