"""`--device auto|cpu|cuda|cuda:N`: where decoder layers run, covariances accumulate and solves happen.

The code paths are device-agnostic torch (calibration.stream moves each layer and the activations to the device,
solver.LayerSolver moves ΔW and C there); this module only turns the user's word into a torch device string and
refuses one that this machine does not have, in one line. Under torchrun, plain `cuda` is each process's own GPU
(distributed.local_device).
"""
from __future__ import annotations

import re

import torch

from . import distributed
from .errors import EoraError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve(device: str | None) -> str | None:
    """None stays None (the CPU, as before devices existed); 'auto' is the first GPU torch sees, else the CPU."""
    if device is None:
        return None
    word = str(device).strip().lower()
    if word == "auto":
        word = "cuda" if torch.cuda.is_available() else "cpu"
    if word == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", word)
    if not m:
        raise EoraError(f"--device {device!r} is not a device: choose {CHOICES}")
    if not torch.cuda.is_available():
        raise EoraError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}): use --device cpu")
    index = int(m.group(1)) if m.group(1) else None
    if index is not None and index >= torch.cuda.device_count():
        raise EoraError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return distributed.local_device(word)
