"""The fast solver against the exact one: objective within its certificate, and the certificate itself honest."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eora_gguf import eora as E
from eora_gguf import fast_solve as F
from eora_gguf.errors import EoraError


def problem(shape: tuple[int, int], spectrum: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW uniform noise; C flat (identity: Marchenko–Pastur Gram spectrum, no gap: the worst case), decaying
    (random rotation, eigenvalues over 4 decades) or outlier (channel scales + a low-rank part)."""
    rng = np.random.default_rng(seed)
    d_out, d_in = shape
    dw = rng.uniform(-0.5, 0.5, shape)
    if spectrum == "flat":
        c = np.eye(d_in)
    elif spectrum == "decaying":
        q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
        c = (q * np.logspace(2, -2, d_in)) @ q.T
    else:
        s = np.exp(rng.standard_normal(d_in))
        low = rng.standard_normal((d_in, 16)) * np.logspace(1, -1, 16)
        c = (np.eye(d_in) + low @ low.T) * s[:, None] * s[None, :]
    return torch.from_numpy(dw), torch.from_numpy(0.5 * (c + c.T))


def optimum(dw: torch.Tensor, c: torch.Tensor, rank: int) -> float:
    """e* = Σ_{i>r} λ_i(ΔW C ΔWᵀ), from a full eigendecomposition (numpy, independent of both solvers)."""
    lam = np.linalg.eigvalsh((dw @ c @ dw.T).numpy())[::-1]
    return float(lam[rank:].sum())


CASES = [((96, 160), "flat", 8), ((160, 96), "flat", 16), ((128, 128), "flat", 32),
         ((96, 160), "decaying", 8), ((160, 96), "decaying", 24), ((128, 128), "outlier", 16)]


@pytest.mark.parametrize("shape,spectrum,rank", CASES)
def test_objective_within_the_certificate(shape, spectrum, rank):
    dw, c = problem(shape, spectrum, seed=rank)
    b, a, cert = F.fast_eora(dw, c, rank, eig_floor=1e-12, eps=1e-2)
    e_star = optimum(dw, c, rank)
    e = E.weighted_error(dw, c, b, a)
    assert cert.certified
    assert e <= e_star * (1 + 1e-2) + 1e-9 * e_star
    # the certificate's two numbers are what they claim: an upper bound on the excess, a lower bound on e*
    assert e - e_star <= cert.bound * (1 + 1e-6) + 1e-9 * e_star
    assert cert.optimum_low <= e_star * (1 + 1e-6)
    # the factors have the exact solver's form: orthonormal B, A = Bᵀ ΔW
    torch.testing.assert_close(b.T @ b, torch.eye(rank, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(a, b.T @ dw.to(torch.float64))


def test_matches_exact_when_asked_for_a_tight_certificate():
    dw, c = problem((120, 200), "decaying", seed=3)
    be, ae = E.eora(dw, c, 10, eig_floor=1e-12)
    bf, af, cert = F.fast_eora(dw, c, 10, eig_floor=1e-12, eps=1e-6)
    assert cert.certified
    e_exact, e_fast = E.weighted_error(dw, c, be, ae), E.weighted_error(dw, c, bf, af)
    assert abs(e_fast - e_exact) <= 1e-6 * e_exact
    torch.testing.assert_close(bf @ af, be @ ae, atol=1e-6 * float(ae.abs().max()), rtol=0)


def test_uncertified_runs_fall_back_to_the_exact_solver():
    """A Krylov space capped below what the flat spectrum needs cannot certify 1e-6: the exact answer comes back."""
    dw, c = problem((128, 128), "flat", seed=5)
    be, ae = E.eora(dw, c, 16)
    bf, af, cert = F.fast_eora(dw, c, 16, eps=1e-6, max_columns=64)
    assert not cert.certified
    torch.testing.assert_close(bf @ af, be @ ae)


def test_svd_and_diag_methods():
    dw, c = problem((96, 160), "outlier", seed=7)
    for method in ("svd", "diag"):
        be, ae = E.solve(method, dw, c, 8)
        bf, af = F.solve(method, dw, c, 8, solver="fast", eps=1e-8)
        ref = c if method != "diag" else torch.diag(torch.diagonal(c))
        assert E.weighted_error(dw, ref, bf, af) <= E.weighted_error(dw, ref, be, ae) * (1 + 1e-7)


def test_auto_keeps_the_exact_solver_for_small_weights():
    """SmolLM2 (576, 1536) and the tiny test models stay on the exact path: bit-identical factors."""
    dw, c = problem((96, 160), "decaying", seed=1)
    b0, a0 = E.solve("eora", dw, c, 8)
    b1, a1 = F.solve("eora", dw, c, 8, solver="auto")
    assert torch.equal(b0, b1) and torch.equal(a0, a1)
    assert not F.use_fast("auto", (576, 1536), 64)
    assert F.use_fast("auto", (4096, 14336), 128) and F.use_fast("auto", (14336, 4096), 64)
    assert not F.use_fast("auto", (4096, 4096), 1024)  # rank near the size: a full eigh is the better tool


def test_bad_input_is_refused():
    dw, c = problem((64, 96), "flat", seed=2)
    with pytest.raises(EoraError, match="unknown solver 'quick'"):
        F.solve("eora", dw, c, 4, solver="quick")
    with pytest.raises(EoraError, match="covariance has shape"):
        F.fast_eora(dw, c[:50, :50], 4)
    bad = dw.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(EoraError, match="NaN or Inf"):
        F.fast_eora(bad, c, 4)
    with pytest.raises(EoraError, match="out of range"):
        F.fast_eora(dw, c, 65)


@pytest.mark.parametrize("shape,spectrum", [((160, 96), "decaying"), ((96, 160), "outlier"), ((128, 128), "flat")])
def test_trace_estimate_brackets_the_exact_trace(shape, spectrum):
    """Hutch++'s estimate lies within a few of its own standard errors of tr(ΔW C ΔWᵀ); within 2% where the
    spectrum decays (the sketch takes the top exactly), within 10% on a flat one of only 128 dimensions."""
    dw, c = problem(shape, spectrum, seed=11)
    exact = float(((dw @ c) * dw).sum())
    est, se = F.trace_estimate(dw, c, sketch=24, probes=16, seed=2)
    assert se > 0.0
    assert abs(est - exact) <= 4 * se + 1e-5 * exact
    assert abs(est - exact) <= (0.1 if spectrum == "flat" else 0.02) * exact
    # C = I (svd) and a sketch that spans the whole side: exact
    est_i, _ = F.trace_estimate(dw, None, sketch=24, probes=16)
    assert abs(est_i - float((dw * dw).sum())) <= 0.1 * float((dw * dw).sum())
    full, se0 = F.trace_estimate(dw, c, sketch=shape[0])
    assert se0 == 0.0 and abs(full - exact) <= 1e-5 * exact


@pytest.mark.parametrize("shape", [(160, 96), (96, 160)])
def test_gains_from_the_certificate_equal_component_gains(shape):
    """θ_i - τ‖a_i‖² (free from the certificate) is a_i C a_iᵀ for the true C, on either Krylov side."""
    dw, c = problem(shape, "outlier", seed=13)
    b, a, gains = F.solve_with_gains("eora", dw, c, 12, solver="fast")
    assert gains is not None and gains.shape == (12,)
    np.testing.assert_allclose(gains.numpy(), E.component_gains(a, c).numpy(), rtol=1e-8,
                               atol=1e-10 * float(gains.abs().max()))
    # the exact path and the other methods leave them to component_gains
    assert F.solve_with_gains("eora", dw, c, 12, solver="exact")[2] is None
    assert F.solve_with_gains("diag", dw, c, 12, solver="fast")[2] is None
