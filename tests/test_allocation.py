"""The byte allocation (a multiple-choice knapsack): optimal on its Lagrangian path, against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from eora_gguf import allocation


def synthetic_tables(rng, n_tensors=3, n_opts=5):
    """Random option tables: per tensor a zero option, then options with random bytes and values (neither
    monotone nor concave), as (type, rank) choices of real tensors can be."""
    tables = {}
    for t in range(n_tensors):
        opts = [allocation.Option(0, "", 0, 0.0)]
        for k in range(n_opts):
            value = float(rng.uniform(0, 10)) * (t + 1)
            opts.append(allocation.Option(k + 1, "f16", int(rng.integers(10, 200)), value))
        tables[f"t{t}"] = opts
    return tables


def brute_force(tables, avail):
    best = 0.0
    for combo in itertools.product(*tables.values()):
        if sum(o.bytes for o in combo) <= avail:
            best = max(best, sum(o.value for o in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    tables = synthetic_tables(rng, n_tensors=3, n_opts=5)
    # the Lagrangian path's points: exactly optimal at their own bytes
    hulls = {n: allocation._hull(o) for n, o in tables.items()}
    steps = sorted(((h[j].value - h[j - 1].value) / (h[j].bytes - h[j - 1].bytes), n, j)
                   for n, h in hulls.items() for j in range(1, len(h)))[::-1]
    path_budgets, spent = [], 0
    max_step = max(h[j].value - h[j - 1].value for h in hulls.values() for j in range(1, len(h)))
    for _, n, j in steps:
        spent += hulls[n][j].bytes - hulls[n][j - 1].bytes
        path_budgets.append(spent)
    for avail in path_budgets:
        alloc = allocation.allocate(tables, avail)
        assert alloc.value == pytest.approx(brute_force(tables, avail), rel=1e-12), avail
    # any budget: within the bytes, never above the LP bound, which bounds the true optimum too
    for avail in [0, 5, 17, *rng.integers(0, 700, 25)]:
        alloc = allocation.allocate(tables, int(avail))
        best = brute_force(tables, avail)
        assert alloc.bytes <= avail
        assert sum(o.bytes for o in alloc.choices.values()) == alloc.bytes
        assert alloc.value <= best + 1e-9 <= alloc.bound + 1e-9
        # the path stops short of the LP bound by at most one hull step
        assert alloc.value >= best - max_step - 1e-9


def test_allocation_with_concave_gains_spends_where_value_per_byte_is_highest():
    """Two equal tensors, one with 4x the importance: it gets more rank."""
    def table(weight):
        gains = 1.0 / np.arange(1, 9)
        return [allocation.Option(0, "", 0, 0.0)] + [allocation.Option(r, "f16", 100 * r, weight * gains[:r].sum())
                                                     for r in range(1, 9)]

    alloc = allocation.allocate({"a": table(4.0), "b": table(1.0)}, 600)
    assert alloc.choices["a"].rank > alloc.choices["b"].rank and alloc.bytes == 600
    assert alloc.value == pytest.approx(brute_force({"a": table(4.0), "b": table(1.0)}, 600))
