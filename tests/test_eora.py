"""The solver against an independent numpy float64 implementation of the paper's formula."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from eora_gguf import eora as E
from eora_gguf.errors import EoraError

SHAPES = [(48, 80), (80, 48), (64, 64)]  # d_out < d_in, d_out > d_in (Cholesky branch), square


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def anisotropic_cov(rng: np.random.Generator, d: int, spread: float = 4.0) -> np.ndarray:
    """Random rotation of eigenvalues spread over `spread` decades (well above the 1e-6 floor)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.logspace(-spread / 2, spread / 2, d)
    return (q * lam) @ q.T


def paper_eora(dw: np.ndarray, cov: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """arXiv 2410.21271 as written: SVD of ΔW·QΛ^½, P = U_r Σ_r V_rᵀ Λ^-½ Qᵀ; returns (P, Σ_{i>r} σ_i²)."""
    lam, q = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    u, s, vt = np.linalg.svd(dw @ (q * np.sqrt(lam)), full_matrices=False)
    inv = np.divide(1.0, np.sqrt(lam), out=np.zeros_like(lam), where=lam > 1e-12 * lam.max())
    p = (u[:, :r] * s[:r]) @ vt[:r] @ (q * inv).T
    return p, float(np.sum(s[r:] ** 2))


def truncated_svd(dw: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def product(ba: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    b, a = ba
    return (b @ a).numpy()


def werr(dw: np.ndarray, cov: np.ndarray, p: np.ndarray) -> float:
    e = dw - p
    return float(np.trace(e @ cov @ e.T))


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_covariance_is_truncated_svd(rng, shape):
    dw = rng.standard_normal(shape)
    r = 7
    want = truncated_svd(dw, r)
    got = product(E.eora(torch.from_numpy(dw), torch.eye(shape[1], dtype=torch.float64), r))
    np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(product(E.svd(torch.from_numpy(dw), r)), want, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", E.METHODS)
def test_full_rank_reconstructs_exactly(rng, shape, method):
    dw = rng.standard_normal(shape)
    cov = anisotropic_cov(rng, shape[1])
    got = product(E.solve(method, torch.from_numpy(dw), torch.from_numpy(cov), min(shape)))
    np.testing.assert_allclose(got, dw, atol=1e-9 * np.abs(dw).max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [1, 5, 17])
def test_eora_reaches_the_optimum_and_beats_baselines(rng, shape, r):
    dw = rng.standard_normal(shape)
    cov = anisotropic_cov(rng, shape[1])
    p_ref, opt = paper_eora(dw, cov, r)
    b, a = E.eora(torch.from_numpy(dw), torch.from_numpy(cov), r)
    err = E.weighted_error(torch.from_numpy(dw), torch.from_numpy(cov), b, a)
    assert err == pytest.approx(opt, rel=1e-9)
    assert werr(dw, cov, p_ref) == pytest.approx(opt, rel=1e-9)  # the oracle agrees with itself
    np.testing.assert_allclose((b @ a).numpy(), p_ref, atol=1e-7 * np.abs(p_ref).max())
    np.testing.assert_allclose((b.T @ b).numpy(), np.eye(r), atol=1e-10)
    for method in ("svd", "diag"):
        bb, aa = E.solve(method, torch.from_numpy(dw), torch.from_numpy(cov), r)
        assert err <= E.weighted_error(torch.from_numpy(dw), torch.from_numpy(cov), bb, aa) * (1 + 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_diag_matches_scaled_svd(rng, shape):
    dw = rng.standard_normal(shape)
    cov = anisotropic_cov(rng, shape[1])
    s = np.sqrt(np.diag(cov))
    want = truncated_svd(dw * s, 6) / s
    np.testing.assert_allclose(product(E.diag(torch.from_numpy(dw), torch.from_numpy(cov), 6)), want, atol=1e-9)


def test_weighted_error_is_output_error(rng):
    dw, x = rng.standard_normal((20, 30)), rng.standard_normal((30, 50))
    b, a = rng.standard_normal((20, 3)), rng.standard_normal((3, 30))
    want = np.linalg.norm((dw - b @ a) @ x) ** 2
    got = E.weighted_error(*(torch.from_numpy(t) for t in (dw, x @ x.T, b, a)))
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_rank_deficient_covariance(rng, shape, caplog):
    """n < d_in samples: C is singular. The ridge solution is finite and within τ‖ΔW - P*‖² of the optimum."""
    d_out, d_in = shape
    n, r = d_in // 3, 12
    x = rng.standard_normal((d_in, n)) * rng.uniform(0.1, 10.0, (d_in, 1))
    cov = x @ x.T
    dw = rng.standard_normal(shape)
    p_star, opt = paper_eora(dw, cov, r)
    with caplog.at_level(logging.WARNING, logger="eora_gguf.eora"):
        b, a = E.eora(torch.from_numpy(dw), torch.from_numpy(cov), r, name="blk.7.attn_q.weight")
    assert any("blk.7.attn_q.weight" in rec.getMessage() for rec in caplog.records)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    err = E.weighted_error(torch.from_numpy(dw), torch.from_numpy(cov), b, a)
    tau = 1e-6 * np.linalg.eigvalsh(cov).max()
    assert opt * (1 - 1e-9) <= err <= opt + tau * np.linalg.norm(dw - p_star) ** 2 + 1e-9 * opt
    # the error in the unseen directions is the projection of ΔW, so no blow-up: ‖BA‖ ≤ ‖ΔW‖
    assert np.linalg.norm((b @ a).numpy(), 2) <= np.linalg.norm(dw, 2) * (1 + 1e-9)


def test_rank_beyond_calibration_goes_to_unseen_directions(rng):
    """rank(C) = k < r: the spare rank reduces the plain error in directions C never saw (not wasted)."""
    d_out, d_in, k, r = 40, 60, 5, 20
    x = rng.standard_normal((d_in, k))
    cov, dw = x @ x.T, rng.standard_normal((d_out, d_in))
    b, a = E.eora(torch.from_numpy(dw), torch.from_numpy(cov), r)
    _, opt = paper_eora(dw, cov, r)
    assert opt < 1e-8 * np.linalg.norm(dw @ x) ** 2  # the k seen directions are fixed exactly
    plain_after = np.linalg.norm(dw - (b @ a).numpy())
    b5, a5 = E.eora(torch.from_numpy(dw), torch.from_numpy(cov), k)
    assert plain_after < np.linalg.norm(dw - (b5 @ a5).numpy()) * 0.95


def test_planted_low_rank_is_recovered(rng):
    d_out, d_in, k = 70, 50, 4
    dw = rng.standard_normal((d_out, k)) @ rng.standard_normal((k, d_in))
    for method in E.METHODS:
        got = product(E.solve(method, torch.from_numpy(dw), torch.from_numpy(anisotropic_cov(rng, d_in)), k))
        np.testing.assert_allclose(got, dw, atol=1e-10 * np.abs(dw).max())


@pytest.mark.parametrize("bad_rank", [0, -1, 49, 2.0, True])
def test_bad_rank_raises(rng, bad_rank):
    dw = torch.from_numpy(rng.standard_normal((48, 60)))
    with pytest.raises(EoraError, match="rank"):
        E.eora(dw, torch.eye(60, dtype=torch.float64), bad_rank)


def test_bad_inputs_raise(rng):
    dw = torch.from_numpy(rng.standard_normal((10, 12)))
    with pytest.raises(EoraError, match="12 inputs"):
        E.eora(dw, torch.eye(11, dtype=torch.float64), 2)
    nan = dw.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(EoraError, match="NaN"):
        E.eora(nan, torch.eye(12, dtype=torch.float64), 2)
    with pytest.raises(EoraError, match="zero"):
        E.eora(dw, torch.zeros(12, 12, dtype=torch.float64), 2, name="blk.0.ffn_up.weight")
    with pytest.raises(EoraError, match="unknown method"):
        E.solve("qr", dw, None, 2)
    with pytest.raises(EoraError, match="needs a calibration covariance"):
        E.solve("eora", dw, None, 2)


@pytest.mark.parametrize("fails", [1, 2])
def test_eigh_that_does_not_converge_falls_back(rng, monkeypatch, fails):
    """LAPACK's eigh failed to converge on one SmolLM2 Gram matrix (Q5_K_M + imatrix): the solve must still give
    the optimum, first from the scaled matrix (fails=1), else from the SVD (fails=2)."""
    dw = torch.from_numpy(rng.standard_normal((24, 40)))
    x = torch.from_numpy(rng.standard_normal((40, 200)))
    cov = x @ x.T
    want_b, want_a = E.eora(dw, cov, 5)
    real, calls = torch.linalg.eigh, []

    def flaky(m, *a, **k):
        calls.append(1)
        if len(calls) <= fails:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    b, a = E.eora(dw, cov, 5)
    assert len(calls) == min(fails + 1, 2)
    assert torch.allclose(b @ a, want_b @ want_a, atol=1e-9, rtol=1e-7)  # the same projection (signs may differ)
    assert E.weighted_error(dw, cov, b, a) == pytest.approx(E.weighted_error(dw, cov, want_b, want_a), rel=1e-9)


def test_eigh_fallback_refuses_non_finite():
    with pytest.raises(EoraError, match="NaN or Inf"):
        E._eigh_fallback(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64))
