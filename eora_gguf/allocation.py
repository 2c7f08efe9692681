"""Allocate a byte budget over a solve (budget.Solution): one (storage type, rank) per tensor.

Value and cost of a choice: value_t(q, r) = w_t·(e_t(q, 0) - e_t(q, r)), bytes_t(q, r) = the pair's data in the
file (`adapter.pair_bytes`, padding included) + its two tensor-info records; the file's key-values and the final
header padding are a fixed overhead counted once. `allocate` maximises Σ_t value_t under the byte budget (one
(type, rank) per tensor, rank 0 = not adapted): a multiple-choice knapsack. We walk the Lagrangian path: every
tensor's options reduced to their upper concave hull in (bytes, value), all hull steps taken in order of value per
byte while they fit. Each point on that path maximises Σ value - λ·Σ bytes for some λ, so it is optimal among all
choices of at most its own bytes (tests/test_allocation.py checks this against brute force); the remaining bytes (less
than one hull step) are then filled greedily by the largest single upgrades that fit, and the LP bound (the path
continued fractionally) is reported, so the distance to the true optimum is known: for real models it is well under
1% of the value.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import adapter as adapter_io
from .budget import AUTO_TYPES, Solution, TensorSolution
from .errors import EoraError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Option:
    """One tensor's choice: rank (0 = no adapter), stored type, file bytes, value (weighted objective drop)."""

    rank: int
    dtype: str
    bytes: int
    value: float


@dataclass
class Allocation:
    """The chosen option per tensor, the bytes they take (data + tensor infos) and the file's fixed overhead."""

    choices: dict[str, Option]
    bytes: int  # Σ option bytes
    overhead: int  # key-values + header padding bound
    value: float
    bound: float  # LP upper bound on the value any allocation of the same budget can reach

    @property
    def file_bytes_max(self) -> int:
        return self.bytes + self.overhead

    def ranks(self) -> dict[str, int]:
        return {n: o.rank for n, o in self.choices.items() if o.rank > 0}

    def types(self) -> dict[str, str]:
        return {n: o.dtype for n, o in self.choices.items() if o.rank > 0}

    def summary(self) -> dict[str, Any]:
        ranks = [o.rank for o in self.choices.values()]
        used = dict(sorted(Counter(o.dtype for o in self.choices.values() if o.rank > 0).items()))
        return {"bytes_max": self.file_bytes_max, "value": self.value, "value_bound": self.bound,
                "tensors_adapted": sum(r > 0 for r in ranks), "rank_mean": float(np.mean(ranks)) if ranks else 0.0,
                "rank_max": max(ranks, default=0), "types": used}


def info_bytes(name: str) -> int:
    """Bytes of the two tensor-info records of `name`'s LoRA pair in the file header."""
    return sum(8 + len(f"{name}{s}".encode()) + 4 + 2 * 8 + 4 + 8 for s in (".lora_a", ".lora_b"))


def options(name: str, t: TensorSolution, dtypes: Iterable[str]) -> list[Option]:
    """Every (type, rank) choice of one tensor with its exact bytes and value; rank 0 first."""
    n_out, n_in = t.shape
    out = [Option(0, "", 0, 0.0)]
    extra = info_bytes(name)
    for dtype in dtypes:
        obj = t.objective.get(dtype)
        if obj is None:
            raise EoraError(f"{name}: the solution has no objectives for adapter type {dtype!r}: solve with it")
        qtype = adapter_io.ADAPTER_DTYPES[dtype]
        for r in range(1, len(obj)):
            out.append(Option(r, dtype, adapter_io.pair_bytes(name, n_out, n_in, r, qtype) + extra,
                              t.weight * float(obj[0] - obj[r])))
    return out


def _hull(opts: list[Option]) -> list[Option]:
    """Upper concave hull of options in (bytes, value), from the zero option, value strictly increasing."""
    pts = sorted(opts, key=lambda o: (o.bytes, -o.value))
    front: list[Option] = []
    for o in pts:  # Pareto front: more bytes only for more value
        if not front or o.value > front[-1].value:
            if front and o.bytes == front[-1].bytes:
                front[-1] = o
            else:
                front.append(o)
    hull: list[Option] = []
    for o in front:
        while len(hull) >= 2:
            p, q = hull[-2], hull[-1]
            # drop q if it lies on or below the segment p -> o
            if (q.value - p.value) * (o.bytes - p.bytes) <= (o.value - p.value) * (q.bytes - p.bytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(tables: Mapping[str, list[Option]], budget_bytes: int, *, overhead: int = 0) -> Allocation:
    """Choose one option per tensor to maximise Σ value with Σ bytes ≤ budget_bytes - overhead (see module doc).

    tables: {tensor: options} (each must contain the zero option, as `options` makes them).
    """
    avail = int(budget_bytes) - int(overhead)
    if avail < 0:
        raise EoraError(f"the byte budget ({budget_bytes}) is smaller than the adapter file's fixed overhead "
                        f"({overhead} bytes): give a larger budget")
    hulls = {n: _hull(opts) for n, opts in tables.items()}
    for n, h in hulls.items():
        if h[0].bytes != 0:
            raise EoraError(f"{n}: its options lack the zero option (rank 0, 0 bytes)")
    steps = []
    for i, (n, h) in enumerate(hulls.items()):
        for j in range(1, len(h)):
            db, dv = h[j].bytes - h[j - 1].bytes, h[j].value - h[j - 1].value
            steps.append((-dv / db, i, j, n, db, dv))
    steps.sort(key=lambda s: s[:3])
    pos = {n: 0 for n in hulls}
    used, value, bound = 0, 0.0, None
    for _, _, j, n, db, dv in steps:
        if pos[n] != j - 1:  # an earlier step of this tensor was refused: the path stopped here for it
            continue
        if used + db > avail:
            if bound is None:
                bound = value + dv * (avail - used) / db
            continue
        used, value, pos[n] = used + db, value + dv, j  # after a refusal: off the path, a greedy extra
    choice = {n: hulls[n][pos[n]] for n in hulls}
    if bound is None:
        bound = value
    choice, used, value = _fill(tables, choice, avail)
    return Allocation(choice, used, int(overhead), value, max(bound, value))


def _fill(tables: Mapping[str, list[Option]], choice: dict[str, Option], avail: int
          ) -> tuple[dict[str, Option], int, float]:
    """Spend what the hull path left: repeatedly take the single upgrade (any option of any tensor) that fits and
    raises the value most."""
    choice = dict(choice)
    arrays = {n: (np.array([o.bytes for o in opts]), np.array([o.value for o in opts])) for n, opts in tables.items()}
    used = sum(o.bytes for o in choice.values())
    while True:
        best, best_gain = None, 0.0
        for n, (nb, nv) in arrays.items():
            cur = choice[n]
            ok = nb - cur.bytes <= avail - used
            if not ok.any():
                continue
            gain = np.where(ok, nv - cur.value, -np.inf)
            k = int(np.argmax(gain))
            if gain[k] > best_gain * (1 + 1e-12) and gain[k] > 0:
                best, best_gain = (n, k), float(gain[k])
        if best is None:
            break
        n, k = best
        used += tables[n][k].bytes - choice[n].bytes
        choice[n] = tables[n][k]
    return choice, used, float(sum(o.value for o in choice.values()))


def uniform(tables: Mapping[str, list[Option]], rank: int, dtype: str) -> Allocation:
    """The same rank and type on every tensor (capped at each tensor's largest rank), for comparisons."""
    choice = {}
    for n, opts in tables.items():
        fit = [o for o in opts if o.dtype == dtype and o.rank <= rank]
        choice[n] = max(fit, key=lambda o: o.rank) if fit else opts[0]
    used = sum(o.bytes for o in choice.values())
    value = float(sum(o.value for o in choice.values()))
    return Allocation(choice, used, 0, value, value)


def plan(solution: Solution, budget_bytes: int, *, dtypes: Iterable[str] = AUTO_TYPES,
         metadata: Mapping[str, str | int | float] | None = None) -> Allocation:
    """Allocate `budget_bytes` of adapter file over a Solution's tensors among `dtypes`; the written file (with
    `metadata`) is guaranteed to fit: the fixed overhead counts its key-values and the worst header padding."""
    dtypes = tuple(dtypes)
    tables = {n: options(n, t, dtypes) for n, t in solution.tensors.items()}
    overhead = adapter_io.header_bytes(solution.arch, [], metadata) + adapter_io.ALIGNMENT - 1
    return allocate(tables, budget_bytes, overhead=overhead)


def truncated(solution: Solution, alloc: Allocation) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The factors the allocation keeps: {name: (B[:, :r], A[:r])} for every tensor with rank ≥ 1."""
    return {n: (solution.tensors[n].b[:, :r], solution.tensors[n].a[:r]) for n, r in alloc.ranks().items()}
