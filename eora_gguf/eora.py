"""The EoRA solver: the best rank-r correction of a quantization error under the calibration inputs.

Notation (shapes in parentheses):
    W  (d_out, d_in)   original weight          Wq (d_out, d_in)  dequantized GGUF weight
    ΔW = W - Wq        the quantization error    X  (d_in, n)      calibration inputs of this layer
    C  = X Xᵀ (d_in, d_in) = Q Λ Qᵀ              B (d_out, r), A (r, d_in): the adapter, W ≈ Wq + B A

EoRA (arXiv 2410.21271) minimises the output error on the calibration inputs

    e(P) = ‖(ΔW - P) X‖²_F = tr((ΔW - P) C (ΔW - P)ᵀ)   over rank(P) ≤ r.

With S = Q Λ^½ (so C = S Sᵀ) this is ‖(ΔW - P) S‖²_F, and the paper's answer is the truncated SVD of
M = ΔW S = U Σ Vᵀ mapped back: P = U_r Σ_r V_rᵀ Λ^-½ Qᵀ, with optimum e* = Σ_{i>r} σ_i².

We compute the same P without forming Λ^-½. Eckart–Young gives the optimal P S = U_r U_rᵀ M, hence

    P = U_r U_rᵀ ΔW   (the projection of ΔW onto the top-r left singular subspace of ΔW S),

and U_r, σ² are the top eigenpairs of the Gram matrix M Mᵀ = ΔW C ΔWᵀ (d_out, d_out). So B = U_r and
A = U_rᵀ ΔW. This is algebraically the paper's formula when C is invertible, and it stays well defined
(and still optimal) when C is singular, because nothing is divided by an eigenvalue of C. The split of P into
B and A is free (B D, D⁻¹ A); orthonormal B makes both factors independent of the scale of C (a sum or a mean
over tokens) and keeps A on the scale of ΔW, which F16/Q8_0 adapters store accurately.

When d_in < d_out (gate/up projections) the smaller Gram matrix is Mᵀ M: with the Cholesky factor C = L Lᵀ,
ΔW L has the same left singular vectors and values as ΔW S, so we take the top eigenpairs (V_r, σ²) of
Lᵀ ΔWᵀ ΔW L (d_in, d_in) and U_r = ΔW L V_r / σ_r.

Eigenvalue floor. Directions of input space that calibration (almost) never excites have λ_i ≈ 0; the
objective is blind to them, its optimum is not unique, and the Cholesky factor does not exist. Where some
λ_i < τ = eig_floor·λ_max we add the ridge τ I to C (Tikhonov), which lifts every eigenvalue by exactly τ: the
ones below the floor land in [τ, 2τ) — a clamp up to a factor 2 — and the others move by at most eig_floor
relative. We prefer this to dropping those directions: the solution is continuous in C, rank left over when
rank(C) < r is spent on the largest error in the unseen directions (EoRA → plain SVD there) instead of being
wasted, and it needs no eigendecomposition of C (45 s at d = 4096 on 2 cores, against 0.9 s for a Cholesky).
The cost is bounded: since C ⪯ C + τI, for any optimal P* of the true objective
    e_C(P_τ) ≤ e_{C+τI}(P_τ) ≤ e_{C+τI}(P*) = e_C(P*) + τ ‖ΔW - P*‖²_F .

Precision. Everything is float64. The Gram route determines σ_i² to an absolute error of about d·ε·σ_1², so the
objective is within ~r·d·ε·σ_1² (ε = 2.2e-16) of the exact optimum; components with σ_i² below that noise
are dropped (zero columns of B, zero rows of A), which changes the objective by less than the same amount.
Exact `torch.linalg.eigh` (float64, one thread) is used; measured on this 2-core machine: 576: 0.08 s,
1536: 1.5 s, 4096: 34 s — one eigh per weight, on its smaller side. The paper's route needs an eigh of C
(same cost) plus an SVD of M (`torch.linalg.svd` of a square M: 0.2 / 5.6 / 23 s on 2 threads). A randomized
SVD is not used: its error is only bounded in expectation, and the exact solve is already cheap at these sizes.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator

import torch

from .errors import EoraError

log = logging.getLogger(__name__)

METHODS = ("eora", "svd", "diag")
EPS64 = torch.finfo(torch.float64).eps
SMALL_DIM = 2048  # weights no wider than this are solved on one thread (see _threads_for)


def eora(delta_w: torch.Tensor, cov: torch.Tensor, rank: int, *, eig_floor: float = 1e-6,
         name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA factors for one linear layer: argmin over rank-r B A of tr((ΔW - BA) C (ΔW - BA)ᵀ).

    delta_w: (d_out, d_in) W - Wq, rows in the order the adapter will use (GGUF order for llama Q/K).
    cov:     (d_in, d_in) C = X Xᵀ of this layer's inputs, symmetric positive semi-definite.
    rank:    1 ≤ r ≤ min(d_out, d_in).
    eig_floor: eigenvalues of C below eig_floor·λ_max trigger the ridge described in the module docstring.
    name:    the tensor's name, for log messages.
    Returns B (d_out, r) with orthonormal (or zero) columns and A (r, d_in), both float64.
    """
    with _threads_for(delta_w):
        dw = _as_matrix(delta_w, "delta_w", name)
        c = _as_cov(cov, dw.shape[1], name)
        _check_rank(rank, dw.shape, name)
        c = _floor(c, eig_floor, name)
        return _project(dw, c, rank, name)


def svd(delta_w: torch.Tensor, rank: int, *, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD of ΔW (the data-free baseline): B = U_r (d_out, r), A = U_rᵀ ΔW = Σ_r V_rᵀ (r, d_in)."""
    with _threads_for(delta_w):
        dw = _as_matrix(delta_w, "delta_w", name)
        _check_rank(rank, dw.shape, name)
        return _project(dw, None, rank, name)


def diag(delta_w: torch.Tensor, cov: torch.Tensor, rank: int, *, eig_floor: float = 1e-6,
         name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal activation scaling (ASVD/LQER-like): truncated SVD of ΔW·S, S = diag(√C_ii), mapped back by S⁻¹.

    Minimising ‖(ΔW - P) S‖_F is the EoRA objective with C replaced by its diagonal D = S², so this is `eora`
    with cov = diag(C): it sees each input channel's energy but not their correlations. Channels with
    C_ii < eig_floor·max C_ii are raised to that floor. Shapes as in `eora`.
    """
    with _threads_for(delta_w):
        dw = _as_matrix(delta_w, "delta_w", name)
        c = _as_cov(cov, dw.shape[1], name)
        _check_rank(rank, dw.shape, name)
        d = torch.diagonal(c).clamp(min=0.0)
        dmax = float(d.max())
        if dmax <= 0.0:
            raise EoraError(f"{_who(name)}: the calibration covariance is zero: no activations reached this layer")
        return _project(dw, torch.diag(d.clamp(min=eig_floor * dmax)), rank, name)


def solve(method: str, delta_w: torch.Tensor, cov: torch.Tensor | None, rank: int, name: str | None = None,
          *, eig_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to `eora`, `svd` (ignores cov) or `diag`; returns (B (d_out, r), A (r, d_in))."""
    solvers: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        "eora": lambda: eora(delta_w, _need_cov(cov, method, name), rank, eig_floor=eig_floor, name=name),
        "svd": lambda: svd(delta_w, rank, name=name),
        "diag": lambda: diag(delta_w, _need_cov(cov, method, name), rank, eig_floor=eig_floor, name=name),
    }
    if method not in solvers:
        raise EoraError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return solvers[method]()


def component_gains(a: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The exact objective drop of each component of a solver's factors: gains (r,) float64, in tr(E C Eᵀ) units.

    Every solver here returns B = U with orthonormal (or zero) columns and A = Uᵀ ΔW, so P_r = U_r U_rᵀ ΔW is an
    orthogonal projection of ΔW's columns and, with G = ΔW C ΔWᵀ (d_out, d_out),

        e(P_r) = tr((I - U_r U_rᵀ) G (I - U_r U_rᵀ)) = tr(G) - Σ_{i≤r} u_iᵀ G u_i = tr(G) - Σ_{i≤r} a_i C a_iᵀ,

    so component i lowers the objective by exactly gain_i = a_i C a_iᵀ (a_i the i-th row of A), whatever the rank
    it is truncated at. For `eora` without the eigenvalue floor gain_i = σ_i² (descending); with the floor, or
    for `svd`/`diag`, the gains are still exact for the true C but need not be sorted. A zeroed component gains 0.
    a: (r, d_in) the solver's A; cov: (d_in, d_in) the calibration covariance C (not floored).
    """
    a64 = torch.as_tensor(a).to(torch.float64)
    c = torch.as_tensor(cov).to(torch.float64)
    return ((a64 @ (0.5 * (c + c.T))) * a64).sum(dim=1).clamp(min=0.0)


def weighted_error(delta_w: torch.Tensor, cov: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """‖(ΔW - BA) X‖²_F computed as tr(E C Eᵀ), E = ΔW - BA (d_out, d_in); float64."""
    e = delta_w.to(torch.float64) - b.to(torch.float64) @ a.to(torch.float64)
    return float(((e @ cov.to(torch.float64)) * e).sum())


# --------------------------------------------------------------------------------------------------------------
# internals


def _project(dw: torch.Tensor, c: torch.Tensor | None, rank: int, name: str | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_r, A = U_rᵀ ΔW with U_r the top-r left singular vectors of ΔW·C^½ (C = I when c is None)."""
    d_out, d_in = dw.shape
    if d_out <= d_in:
        gram = dw @ dw.T if c is None else dw @ c @ dw.T                      # (d_out, d_out) = M Mᵀ
        mu, u = _top_eigh(gram, rank)                                        # (r,), (d_out, r)
    else:
        m = dw if c is None else dw @ _cholesky(c, name)                     # (d_out, d_in), same U, Σ as ΔW S
        mu, v = _top_eigh(m.T @ m, rank)                                     # (r,), (d_in, r)
        u = (m @ v) / mu.clamp(min=EPS64).sqrt()                             # (d_out, r)
    noise = max(d_out, d_in) * EPS64 * float(mu[0]) if mu.numel() else 0.0
    keep = mu > noise
    if not bool(keep.all()):
        log.debug("%s: %d of %d components are at rounding level and left zero", _who(name),
                  int((~keep).sum()), rank)
        u = u * keep.to(u.dtype)
    return u, u.T @ dw


def _top_eigh(sym: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest `rank` eigenpairs of a symmetric matrix, descending: values (r,), vectors (n, r)."""
    sym = 0.5 * (sym + sym.T)
    with _one_thread():
        try:
            vals, vecs = torch.linalg.eigh(sym)
        except torch.linalg.LinAlgError:
            vals, vecs = _eigh_fallback(sym)
    idx = torch.arange(sym.shape[0] - 1, sym.shape[0] - 1 - rank, -1, device=sym.device)
    return vals[idx].clamp(min=0.0), vecs[:, idx]


def _eigh_fallback(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh for the matrices LAPACK's divide and conquer does not converge on (seen on SmolLM2 Q5_K_M + imatrix,
    whose error is exactly zero for two thirds of the weights): the same matrix scaled to unit size, then an SVD,
    whose singular pairs are the eigenpairs of a positive semidefinite matrix (our Gram matrices are, up to
    rounding). Ascending, like eigh."""
    scale = float(sym.abs().max())
    if not math.isfinite(scale):
        raise EoraError("the solver's Gram matrix holds NaN or Inf: the weights or the calibration statistics are "
                        "corrupt; recompute them")
    if scale == 0.0:
        return (torch.zeros(sym.shape[0], dtype=sym.dtype, device=sym.device),
                torch.eye(sym.shape[0], dtype=sym.dtype, device=sym.device))
    try:
        vals, vecs = torch.linalg.eigh(sym / scale)
        log.debug("eigh converged only on the scaled matrix (n=%d)", sym.shape[0])
        return vals * scale, vecs
    except torch.linalg.LinAlgError:
        u, s, _ = torch.linalg.svd(sym / scale)
        log.debug("eigh did not converge (n=%d): eigenpairs from the SVD", sym.shape[0])
        return s.flip(0) * scale, u.flip(1)


def _threads_for(delta_w: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Solve weights up to SMALL_DIM wide on one thread: there the work is too small to share, and on a busy
    machine OpenMP's default active waiting makes 2 threads slower (576x576 on 2 loaded cores: 0.57 s vs 0.18 s)."""
    shape = getattr(delta_w, "shape", ())
    return _one_thread() if shape and max(shape) <= SMALL_DIM else contextlib.nullcontext()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run MKL's eigh on one thread: measured here it is never slower (4096: 34 s vs 46 s on 2 threads) and with
    OpenMP's default active waiting on a busy machine the 2-thread run stalls 100x (576: 9 s vs 0.08 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cholesky(c: torch.Tensor, name: str | None) -> torch.Tensor:
    low, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:  # only if the floor could not make C positive definite (it is checked there)
        raise EoraError(f"{_who(name)}: covariance is not positive definite even after the eigenvalue floor")
    return low


def _floor(c: torch.Tensor, eig_floor: float, name: str | None) -> torch.Tensor:
    """C, or C + τI (τ = eig_floor·λ_max) when C has an eigenvalue below τ; warns naming the tensor."""
    if not eig_floor > 0.0:
        raise EoraError(f"eig_floor must be positive, got {eig_floor}")
    lam_max = _lambda_max(c)
    if lam_max <= 0.0:
        raise EoraError(f"{_who(name)}: the calibration covariance is zero: no activations reached this layer")
    tau = eig_floor * lam_max
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    if int(torch.linalg.cholesky_ex(c - tau * eye)[1]) == 0:
        return c  # every eigenvalue is above the floor: exact EoRA
    # share of the mean eigenvalue the ridge adds: how much it changes this layer's weighting (for the summary)
    weight = tau / max(float(torch.diagonal(c).mean()), 1e-300)
    log.warning("%s: calibration covariance has eigenvalues below %.1e·λmax (fewer tokens than its %d inputs, "
                "dead channels, or outlier channels that dominate λmax); adding the ridge %.3g·I",
                _who(name), eig_floor, c.shape[0], tau,
                extra={"summary": ("ridge", f"calibration covariances with eigenvalues below {eig_floor:.0e}·λmax "
                                            "got a ridge (normal with fewer tokens than inputs; --verbose lists them)",
                                   weight, f"{_who(name)}, ridge {weight:.2g} of its mean eigenvalue")})
    return c + tau * eye


def _lambda_max(c: torch.Tensor, iters: int = 50) -> float:
    """λ_max of a PSD matrix by power iteration (a lower bound, within a few percent: enough for a floor)."""
    x = torch.diagonal(c).clamp(min=0.0).sqrt() + 1.0 / c.shape[0] ** 0.5
    est = 0.0
    for _ in range(iters):
        y = c @ x
        n = float(torch.linalg.vector_norm(y))
        if n == 0.0:
            break
        est = float(x @ y) / float(x @ x)
        x = y / n
    return max(est, float(torch.diagonal(c).max()))


def _as_matrix(x: torch.Tensor, what: str, name: str | None) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 2 or 0 in t.shape:
        raise EoraError(f"{_who(name)}: {what} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise EoraError(f"{_who(name)}: {what} has NaN or Inf entries: check the original and quantized weights")
    return t


def _as_cov(cov: torch.Tensor, d_in: int, name: str | None) -> torch.Tensor:
    c = _as_matrix(cov, "covariance", name)
    if c.shape != (d_in, d_in):
        raise EoraError(f"{_who(name)}: covariance has shape {tuple(c.shape)} but the weight has {d_in} inputs: "
                        "calibration and weights come from different models or modules")
    return 0.5 * (c + c.T)


def _need_cov(cov: torch.Tensor | None, method: str, name: str | None) -> torch.Tensor:
    if cov is None:
        raise EoraError(f"{_who(name)}: method {method!r} needs a calibration covariance (use 'svd' without one)")
    return cov


def _check_rank(rank: int, shape: torch.Size, name: str | None) -> None:
    limit = min(shape)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise EoraError(f"{_who(name)}: rank {rank!r} is out of range for a {shape[0]}x{shape[1]} weight: "
                        f"choose 1..{limit}")


def _who(name: str | None) -> str:
    return name or "tensor"
