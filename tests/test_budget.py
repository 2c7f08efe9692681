"""Byte budgets: specs, exact objectives of stored factors, the saved solve, written adapters that fit."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import allocation, eora
from eora_gguf import budget as B
from eora_gguf.adapter import ADAPTER_DTYPES, read_gguf_lora, write_gguf_lora
from eora_gguf.errors import EoraError


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def problem(rng, n_out, n_in, rank):
    """A quantization-like error (heavy-tailed spectrum) and an anisotropic covariance, solved at `rank`."""
    dw = rng.standard_normal((n_out, n_in)) * rng.uniform(0.2, 2.0, (1, n_in)) * 0.01
    x = rng.standard_normal((n_in, 3 * n_in)) * rng.uniform(0.1, 3.0, (n_in, 1))
    cov = x @ x.T
    b, a = eora.eora(torch.from_numpy(dw), torch.from_numpy(cov), rank)
    return dw, cov, b.numpy(), a.numpy()


def test_gains_are_the_exact_objective_drops_and_leave_factors_unchanged(rng):
    dw, cov, b, a = problem(rng, 48, 96, 20)
    gains = eora.component_gains(torch.from_numpy(a), torch.from_numpy(cov)).numpy()
    before = float(np.trace(dw @ cov @ dw.T))
    for r in (1, 5, 20):
        after = eora.weighted_error(torch.from_numpy(dw), torch.from_numpy(cov), torch.from_numpy(b[:, :r]),
                                    torch.from_numpy(a[:r]))
        assert before - gains[:r].sum() == pytest.approx(after, rel=1e-9)
    # σ_i² of ΔW C^½ (numpy SVD, independent of the solver), descending
    lam, q = np.linalg.eigh(cov)
    s = np.linalg.svd(dw @ (q * np.sqrt(lam.clip(0))), compute_uv=False)
    np.testing.assert_allclose(gains, s[:20] ** 2, rtol=1e-8)
    b2, a2 = eora.eora(torch.from_numpy(dw), torch.from_numpy(cov), 20)
    assert np.array_equal(b2.numpy(), b) and np.array_equal(a2.numpy(), a)  # computing gains changed nothing


@pytest.mark.parametrize("dtype", list(ADAPTER_DTYPES))
def test_objectives_match_the_written_adapter(rng, tmp_path, dtype):
    """objectives()[dtype][r] equals tr(E C Eᵀ) with the factors read back (gguf-py) from the file written at rank
    r, for ranks below, at, between and above whole blocks (B in F16 there)."""
    dw, cov, b, a = problem(rng, 40, 64, 40)
    obj = B.objectives(dw, cov, b, a, [dtype])[dtype]
    assert obj.shape == (41,) and obj[0] == pytest.approx(np.trace(dw @ cov @ dw.T), rel=1e-12)
    for r in (1, 7, 32, 33, 40):
        path = write_gguf_lora(tmp_path / f"{r}.gguf", {"blk.0.attn_q.weight": (b[:, :r], a[:r])}, arch="llama",
                               dtype=dtype)
        _, back = read_gguf_lora(path)
        bb, aa = (x.astype(np.float64) for x in back["blk.0.attn_q.weight"])
        e = dw - bb @ aa
        assert obj[r] == pytest.approx(float(np.sum((e @ cov) * e)), rel=1e-9, abs=1e-12 * obj[0]), r
    if dtype == "f32":
        gains = eora.component_gains(torch.from_numpy(a), torch.from_numpy(cov)).numpy()
        np.testing.assert_allclose(obj[1:], obj[0] - np.cumsum(gains), rtol=1e-5, atol=1e-9 * obj[0])


def test_objectives_of_an_embedding_quantize_a_along_the_rank(rng):
    """token_embd stores lora_b = Aᵀ with rows of r: A's blocks run along the rank, whole only at multiples of 32."""
    dw, cov, b, a = problem(rng, 80, 48, 40)
    obj = B.objectives(dw, cov, b, a, ["q4_0"], embedding=True)["q4_0"]
    q = gguf.GGMLQuantizationType.Q4_0
    for r in (32, 33):
        if r % 32 == 0:
            bt = gguf.quants.dequantize(gguf.quants.quantize(b[:, :r].astype(np.float32), q), q)
            at = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a[:r].T, np.float32), q), q).T
        else:
            bt, at = (x.astype(np.float32).astype(np.float16) for x in (b[:, :r], a[:r]))
        e = dw - bt.astype(np.float64) @ at.astype(np.float64)
        assert obj[r] == pytest.approx(float(np.sum((e @ cov) * e)), rel=1e-9)


def test_budget_parse():
    assert B.Budget.parse("95MB") == B.Budget("total", 95e6, "95MB")
    assert B.Budget.parse("95.5 MiB").value == 95.5 * 2**20
    assert B.Budget.parse("5.8bpw").kind == "bpw"
    assert B.Budget.parse("adapter:6MB") == B.Budget("adapter", 6e6, "adapter:6MB")
    assert B.Budget.parse("5.8bpw").adapter_bytes(model_bytes=1000, n_weights=2000) == 1450 - 1000
    assert B.Budget.parse("adapter:6MB").adapter_bytes(model_bytes=10**9, n_weights=1) == 6 * 10**6
    for bad in ("", "6 parsecs", "adapter:5bpw", "-3MB", "MB"):
        with pytest.raises(EoraError):
            B.Budget.parse(bad)
    with pytest.raises(EoraError, match="no room"):
        B.Budget.parse("1MB").adapter_bytes(model_bytes=2 * 10**6, n_weights=10)


# ------------------------------------------------------------------------------------------------ the file fits

def solution(rng, shapes, rank, dtypes=B.AUTO_TYPES):
    sol = B.Solution(arch="llama")
    for i, (name, (n_out, n_in)) in enumerate(shapes.items()):
        dw, cov, b, a = problem(rng, n_out, n_in, min(rank, n_out, n_in))
        gains = eora.component_gains(torch.from_numpy(a), torch.from_numpy(cov)).numpy()
        sol.tensors[name] = B.TensorSolution(b.astype(np.float32), a.astype(np.float32), gains,
                                             B.objectives(dw, cov, b, a, dtypes), weight=float(1 + i))
    return sol


SHAPES = {"blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64), "blk.0.ffn_up.weight": (96, 64),
          "blk.0.ffn_down.weight": (64, 96)}


def test_written_adapter_never_exceeds_the_budget(rng, tmp_path):
    sol = solution(rng, SHAPES, 48)
    meta = {"eora.method": "eora", "eora.budget": "test"}
    sizes = []
    for avail in (600, 1500, 2345, 5000, 9001, 20000, 40000, 10**6):
        for dtypes in (B.AUTO_TYPES, ("q4_0",), ("f16",)):
            alloc = allocation.plan(sol, avail, dtypes=dtypes, metadata=meta)
            if not alloc.ranks():
                assert alloc.value == 0.0
                continue
            path = write_gguf_lora(tmp_path / "a.gguf", allocation.truncated(sol, alloc), arch="llama",
                                   dtype=alloc.types(), metadata=meta)
            size = path.stat().st_size
            assert size <= avail and size <= alloc.file_bytes_max, (avail, dtypes, size)
            assert size > alloc.file_bytes_max - 2 * 32  # the accounting is exact up to the header's padding
            sizes.append((avail, size))
    assert any(avail - size < 0.1 * avail for avail, size in sizes if avail >= 5000)  # and it uses the bytes
    with pytest.raises(EoraError, match="overhead"):
        allocation.plan(sol, 100, metadata=meta)


def test_solution_file_round_trip(rng, tmp_path):
    sol = solution(rng, dict(list(SHAPES.items())[:2]), 16, dtypes=("f16", "q4_0"))
    sol.meta["method"] = "eora"
    back = B.Solution.load(sol.save(tmp_path / "s.safetensors"))
    assert back.arch == "llama" and back.meta == {"method": "eora"} and set(back.tensors) == set(sol.tensors)
    for n, t in sol.tensors.items():
        u = back.tensors[n]
        assert np.array_equal(u.b, t.b) and np.array_equal(u.a, t.a) and np.array_equal(u.gains, t.gains)
        assert u.weight == t.weight and set(u.objective) == {"f16", "q4_0"}
        assert all(np.array_equal(u.objective[k], t.objective[k]) for k in t.objective)
    a1 = allocation.plan(sol, 5000, dtypes=("f16", "q4_0"))
    a2 = allocation.plan(back, 5000, dtypes=("f16", "q4_0"))
    assert a1.choices == a2.choices
    with pytest.raises(EoraError, match="no objectives"):
        allocation.plan(back, 5000, dtypes=("q8_0",))
