"""Calibration statistics and their file: per input site, Σ x xᵀ (float64) over the calibration tokens.

The file is safetensors: one float64 (d_in, d_in) tensor per site (e.g. `model.layers.3.attn_in`, shared by
q/k/v), and as JSON metadata the token count per site, the HF module -> site map, and `meta` (the model's
identity from `hf_model.model_identity`, the calibration fingerprint, samples, seqlen, tokens, propagation).
`calibration.stream` fills it layer by layer; `compensate`, `imatrix` and `make` read it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import EoraError, atomic_output
from .hf_model import model_identity

FORMAT = "eora-gguf.calibration-stats"
FORMAT_VERSION = "1"


@dataclass
class CalibrationStats:
    """Input statistics of linear layers.

    covariances[site]: (d_in, d_in) float64, Σ over calibration tokens of x xᵀ (not divided by n).
    n_tokens[site]: tokens summed into it. module_sites[hf_module_name] -> site (e.g.
    "model.layers.3.self_attn.q_proj" -> "model.layers.3.attn_in"). meta: model identity
    (see `model_identity`), calibration fingerprint, samples, seqlen, tokens, propagate mode.
    """

    covariances: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    module_sites: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def covariance(self, module: str) -> torch.Tensor:
        """Mean covariance E[x xᵀ] (d_in, d_in) float64 of the input of HF module `module`."""
        site = self.module_sites.get(module)
        if site is None or site not in self.covariances:
            raise EoraError(f"no calibration statistics for {module}: calibrate this model again")
        return self.covariances[site] / max(self.n_tokens[site], 1)

    def modules(self, layer: int | None = None) -> list[str]:
        """HF names of the linear modules covered (of one decoder layer when `layer` is given)."""
        names = [m for m, s in self.module_sites.items() if s in self.covariances]
        if layer is not None:
            names = [m for m in names if _layer_of(m) == layer]
        return names

    def update(self, other: CalibrationStats) -> None:
        self.covariances.update(other.covariances)
        self.n_tokens.update(other.n_tokens)
        self.module_sites.update(other.module_sites)

    def save(self, path: str | os.PathLike[str], *, inputs: tuple[str | os.PathLike[str], ...] = ()) -> None:
        """Write as safetensors (one float64 tensor per site; the rest as JSON metadata), atomically.

        inputs: files and folders `path` must not be, nor lie in (the model's folder)."""
        tensors = {site: cov.contiguous() for site, cov in self.covariances.items()}
        metadata = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "n_tokens": json.dumps(self.n_tokens), "module_sites": json.dumps(self.module_sites),
            "meta": json.dumps(self.meta),
        }
        with atomic_output(path, suffix=".safetensors", inputs=inputs) as tmp:
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except Exception as exc:  # safetensors reports a full disk as its own error type
                raise EoraError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationStats:
        if not Path(path).is_file():
            raise EoraError(f"calibration statistics {path} do not exist: run calibration first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise EoraError(f"{path} is not an eora-gguf calibration statistics file")
                if metadata.get("version") != FORMAT_VERSION:
                    raise EoraError(f"{path} has statistics format version {metadata.get('version')}, "
                                    f"this eora-gguf reads {FORMAT_VERSION}: calibrate again")
                covs = {k: fh.get_tensor(k) for k in fh.keys()}
        except EoraError:
            raise
        except Exception as exc:  # safetensors raises its own types for truncated or foreign files
            raise EoraError(f"cannot read calibration statistics {path}: {exc}") from None
        return cls(covs, json.loads(metadata["n_tokens"]), json.loads(metadata["module_sites"]),
                   json.loads(metadata["meta"]))

    def check_model(self, model_dir: str | os.PathLike[str]) -> None:
        """Refuse (EoraError) if these statistics were not collected on the model in `model_dir`."""
        mine, theirs = self.meta.get("model", {}), model_identity(model_dir)
        for key in ("architecture", "num_layers", "hidden_size", "config_sha256", "weights_sha256"):
            if mine.get(key) != theirs.get(key):
                raise EoraError(f"calibration statistics were collected on another model ({key}: "
                                f"{mine.get(key)} vs {theirs.get(key)} in {model_dir}): calibrate this model")


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
