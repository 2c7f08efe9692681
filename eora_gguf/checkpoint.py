"""Resume an interrupted compensation at the next unfinished decoder layer.

Beside the output ADAPTER.gguf, a folder ADAPTER.gguf.eora-resume/ holds

    manifest.json            the run's fingerprint (every input that changes the result) and `done`, the number
                             of decoder layers finished
    layer-<i>.safetensors    layer i's factors (GGUF names, float32 B and A as the adapter stores them) and its
                             per-tensor report rows
    hidden-<rank>.pt         the activations entering layer `done` (this process's samples; the compensated
                             outputs in the sequential mode), replaced after every layer

The folder appears when the first layer is finished. A layer counts as done only once its factors and every
process's activations are on disk and the manifest says so (files are written to temporaries and renamed). A
rerun with the same fingerprint loads the finished layers and streams on from layer `done`; a rerun whose
fingerprint differs is refused with one line, since mixing the layers of two runs would write a wrong adapter
silently. The folder is removed once the adapter is written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from . import distributed
from .errors import EoraError

log = logging.getLogger(__name__)

SUFFIX = ".eora-resume"
VERSION = 1


def folder_for(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.parent / (out.name + SUFFIX)


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Name, size and modification time: what tells a rebuilt or replaced input file apart cheaply."""
    st = Path(path).stat()
    return {"name": Path(path).name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class Checkpoint:
    """The resume folder of one output; `done` layers are finished (0 for a fresh run)."""

    def __init__(self, out: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.dir = folder_for(out)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.done = 0
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                raise EoraError(f"{self.dir} holds an unreadable resume manifest: delete the folder to start "
                                "over") from None
            if saved.get("version") != VERSION or saved.get("fingerprint") != self.fingerprint:
                key = _first_difference(saved.get("fingerprint") or {}, self.fingerprint)
                raise EoraError(f"{self.dir} holds an unfinished run with other inputs ({key} differs): rerun "
                                "with the same inputs to resume it, or delete the folder to start over")
            self.done = int(saved.get("done", 0))
            if self.done:
                log.info("resuming after %d finished decoder layers (%s)", self.done, self.dir)
        distributed.barrier()  # every process has read the manifest before any rewrites it

    def _write_manifest(self) -> None:
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps({"version": VERSION, "fingerprint": self.fingerprint, "done": self.done}))
        os.replace(tmp, self.dir / "manifest.json")

    def save_layer(self, layer: int, factors: dict[str, tuple[np.ndarray, np.ndarray]],
                   rows: dict[str, dict[str, Any]], hidden: list[torch.Tensor] | None) -> None:
        """Record decoder layer `layer` as finished: its factors and rows (rank 0), the next layer's inputs."""
        if distributed.is_main():
            self.dir.mkdir(exist_ok=True)  # made when the first layer is done: a run failing before leaves nothing
        distributed.barrier()
        if hidden is not None:
            tmp = self.dir / f"hidden-{distributed.rank()}.pt.tmp"
            torch.save([h.detach().cpu() for h in hidden], tmp)
            os.replace(tmp, self.dir / f"hidden-{distributed.rank()}.pt")
        if distributed.is_main():
            tensors = {}
            for name, (b, a) in factors.items():
                tensors[f"{name}.lora_b"] = np.ascontiguousarray(b)
                tensors[f"{name}.lora_a"] = np.ascontiguousarray(a)
            meta = {"rows": json.dumps({n: {k: v for k, v in r.items() if k != "qtype"} for n, r in rows.items()})}
            tmp = self.dir / f"layer-{layer}.safetensors.tmp"
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.dir / f"layer-{layer}.safetensors")
        distributed.barrier()  # every process's activations are on disk before the manifest counts the layer
        if distributed.is_main():
            self.done = layer + 1
            self._write_manifest()
        self.done = layer + 1

    def load_layers(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, dict[str, Any]]]:
        """Factors and report rows of every finished layer."""
        factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for layer in range(self.done):
            path = self.dir / f"layer-{layer}.safetensors"
            try:
                with safe_open(str(path), framework="numpy") as fh:
                    layer_rows = json.loads((fh.metadata() or {})["rows"])
                    rows.update(layer_rows)
                    for n in layer_rows:  # in the order they were solved: the adapter lists tensors in this order
                        factors[n] = (fh.get_tensor(f"{n}.lora_b"), fh.get_tensor(f"{n}.lora_a"))
            except Exception as exc:  # a missing or damaged file: safetensors raises several types
                raise EoraError(f"cannot read {path} ({str(exc).splitlines()[0][:200]}): delete {self.dir} to "
                                "start over") from None
        return factors, rows

    def load_hidden(self) -> list[torch.Tensor] | None:
        """This process's saved activations (the inputs of layer `done`), or None for a fresh run."""
        if not self.done:
            return None
        path = self.dir / f"hidden-{distributed.rank()}.pt"
        try:
            return torch.load(path, weights_only=True)
        except Exception as exc:  # missing or damaged
            raise EoraError(f"cannot read {path} ({str(exc).splitlines()[0][:200]}): delete {self.dir} to start "
                            "over") from None

    def record(self, solver: Any, layer: int, hidden: list[torch.Tensor] | None) -> None:
        """save_layer with decoder layer `layer`'s factors and rows from a solver.LayerSolver."""
        prefix = f"blk.{layer}."  # GGUF names of the layer's tensors
        keys = [n for n in solver.factors if n.startswith(prefix)]
        self.save_layer(layer, {n: solver.factors[n] for n in keys}, {n: solver.tensors[n] for n in keys}, hidden)

    def remove(self) -> None:
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)


def restore(solver: Any, resume: Callable[[dict[str, Any]], Checkpoint] | None,
            calib: dict[str, Any]) -> Checkpoint | None:
    """Open the checkpoint (resume(calibration fingerprint); None: no checkpointing) and load the finished
    layers' factors and report rows into a solver.LayerSolver."""
    if resume is None:
        return None
    ckpt = resume(calib)
    factors, rows = ckpt.load_layers()
    solver.factors.update(factors)
    solver.tensors.update({n: {**r, "qtype": solver.base.tensor(n).qtype} for n, r in rows.items()})
    return ckpt


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return "format version"
