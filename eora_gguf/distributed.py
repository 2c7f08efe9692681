"""Many processes, one adapter: torch.distributed under `torchrun`.

    torchrun --nproc-per-node 8 -m eora_gguf compensate --hf HF --gguf Q.gguf --rank 64 --device cuda -o a.gguf

`init_from_env` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR/PORT): NCCL when the run uses CUDA devices, gloo otherwise. Then

- calibration samples are split across ranks (`shard_samples`, contiguous, as even as possible); every rank
  runs the same decoder layer on its samples and the per-site sums Σ x xᵀ and token counts are all-reduced
  (`all_reduce_sums`): they are sums, so the result is the single-process one up to summation order;
- the per-tensor solves of a layer are dealt round-robin across ranks (`mine`) and their results are
  all-gathered (`gather`), so every rank holds every factor (the sequential mode needs them all);
- rank 0 alone writes outputs (`is_main`).

Without torchrun (WORLD_SIZE unset or 1) every function is the single-process identity.
"""
from __future__ import annotations

import atexit
import logging
import os
from typing import Any, TypeVar

import torch

from .errors import EoraError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether this process is one rank of an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None) -> bool:
    """Join torchrun's process group when the environment names one (WORLD_SIZE > 1); True if joined.

    device: the run's --device; a CUDA device selects NCCL and is pinned to LOCAL_RANK's GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = _dist()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    if not dist.is_available():
        raise EoraError("this torch build has no torch.distributed: run without torchrun")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise EoraError(f"WORLD_SIZE={size} but {key} is not set: start the run with torchrun")
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    # Leave the group before the interpreter exits: a process that exits with a live gloo group can abort in its
    # teardown ("terminate called without an active exception", seen here under load) and fail the whole run.
    atexit.register(_leave)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def _leave() -> None:
    """At exit: destroy the group (no barrier: a process leaving on an error must not wait for the others)."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | None) -> str | None:
    """Under torchrun, plain 'cuda' means this rank's GPU (cuda:LOCAL_RANK); anything else is kept."""
    if device == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard_samples(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration samples (rows of `ids`)."""
    if not active():
        return ids
    if ids.shape[0] < world():
        raise EoraError(f"{ids.shape[0]} calibration samples cannot be split across {world()} processes: "
                        "give at least one sample per process (--samples)")
    return torch.tensor_split(ids, world())[rank()]


def all_reduce_sums(covs: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Sum every rank's covariance blocks and token counts in place (sites in sorted order on every rank)."""
    if not active():
        return
    dist = _dist()
    sites = sorted(covs)
    names = [None] * world()
    dist.all_gather_object(names, sites)
    if any(n != sites for n in names):
        raise EoraError("the processes collected statistics of different modules: run one model on every rank")
    for site in sites:
        dist.all_reduce(covs[site], op=dist.ReduceOp.SUM)
    n = torch.tensor([counts[s] for s in sites], dtype=torch.int64, device=covs[sites[0]].device if sites else None)
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    for site, v in zip(sites, n.tolist()):
        counts[site] = int(v)


def mine(index: int) -> bool:
    """Whether work item `index` (e.g. the i-th tensor of a layer) is this rank's: round-robin."""
    return index % world() == rank()


def gather(part: dict[str, T]) -> dict[str, T]:
    """The union of every rank's dict (keys are disjoint); objects travel pickled (factors as CPU tensors)."""
    if not active():
        return part
    parts: list[Any] = [None] * world()
    _dist().all_gather_object(parts, part)
    out: dict[str, T] = {}
    for p in parts:
        out.update(p)
    return out


def barrier() -> None:
    if active():
        _dist().barrier()


def shutdown() -> None:
    if active():
        _dist().destroy_process_group()
