"""The fast top-r solver: randomized block Krylov (block Lanczos) on the Gram matrix of `eora.py`, with a certificate.

Same objective and notation as `eora.py`: the optimal rank-r correction is P = U_r U_rᵀ ΔW with U_r the top-r
eigenvectors of G = ΔW C ΔWᵀ (d_out, d_out). The exact solver forms G (or its d_in-side twin) and runs a full
`eigh`, O(d³). Here G is never formed: it is applied to blocks, G Y = ΔW (C (ΔWᵀ Y)) — two ΔW products and one
C product per block, so the cost is O(d_out·d_in·m + d_in²·m) for a Krylov space of m columns.

Algorithm. Block Lanczos with full reorthogonalisation: a random Gaussian block Ω (d_out, k), k = r + p
(oversampling p), and Krylov blocks Q_0 = orth(Ω), Q_{j+1} = orth((I - QQᵀ) G Q_j) (classical Gram–Schmidt
twice). After each block past the second, Rayleigh–Ritz on the whole space Q (d_out, m): H = Qᵀ G Q (m, m) from
the stored products G Q, eigenpairs θ_1 ≥ … ≥ θ_m, Ritz vectors U = Q Y_r (d_out, r). B = U, A = Uᵀ ΔW.

Certificate (stopping rule). With Θ = diag(θ_1..θ_r) and the residual R = G U - U Θ (d_out, r), in the basis
[U, U⊥] G = [[Θ, Rᵀ], [R, D]], D = U⊥ᵀ G U⊥. Ky Fan's inequality for sums of top eigenvalues of a sum
(G = diag(Θ, D) + the off-diagonal part, whose eigenvalues are ±σ_j(R)) gives

    Σ_{i≤r} λ_i(G) ≤ Σ top-r of {θ_1..θ_r} ∪ {λ_max(D)}  +  ‖R‖_*   (nuclear norm),

and since the objective of U is e(U) = tr(G) - Σ_{i≤r} θ_i while the optimum is e* = tr(G) - Σ_{i≤r} λ_i(G):

    e(U) - e*  ≤  β := ‖R‖_* + Σ_{i≤r} (λ̂_D - θ_i)_+ ,

where λ̂_D ≥ λ_max(D) is required. We take λ̂_D = θ_{r+1} + ‖r_{r+1}‖ (the next Ritz value plus its residual,
which brackets an eigenvalue of G): this is the one estimated quantity — it assumes the random start block did
not miss an eigenvector of G larger than that (a miss has probability exponentially small in p). For the scale of
the optimum, interlacing gives e* = Σ_{i>r} λ_i(G) ≥ Σ_{r<j≤m} θ_j; and e* ≥ tr(G) - Σ_{i≤r} θ_i - β, where
tr(G) = Σ_{j≤m} θ_j + tr(D_Q) (D_Q: G on the complement of the whole Krylov space) is the caller's exact trace
when given, else Σ θ_j plus a lower bound on tr(D_Q) from 8 Gaussian probes ωᵀ D_Q ω that holds with probability
≥ 1 - 10⁻⁶ (Laurent–Massart, `_trace_low`; the probes are only drawn when the interlacing bound is not enough,
which is the flat-spectrum case). The iteration stops when β ≤ ε·e_low (e_low the larger of the two), which
proves e(U) ≤ (1 + ε)·e* (under the λ̂_D estimate above, and with that probability).

Precision. The Krylov blocks and their products are float32 (half the time of float64 products); the decision to
stop is taken on their Ritz pairs, and then redone in float64: the top r+1 Ritz vectors are orthonormalised, G is
applied to them in float64, Rayleigh–Ritz is repeated on their span and β comes from those float64 residuals.
Sums taken from float32 Ritz values or probes are scaled down by 1e-4 to stay lower bounds. float32 limits how
far the iteration can converge (≈1e-7·λ_1 per residual), so a float32 run that cannot certify within
`max_columns` is repeated in float64; if that fails too, `fast_eora` falls back to the exact solver and logs
it, so a result is never worse than (1 + ε) of the optimum for lack of iterations.

Eigenvalue floor: the fast path always adds the ridge τ I, τ = eig_floor·λ_max(C) (λ_max by power iteration,
as `eora._floor`), instead of testing for it with a Cholesky factorisation of C, which alone would cost as much as
the whole fast solve for d_in = 14336. As `eora.py` shows, the ridge moves the true objective by at most
τ‖ΔW - P*‖²_F, a relative 1e-6-level change; no Cholesky is needed because nothing is divided.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import eora as exact

log = logging.getLogger(__name__)

SOLVERS = ("auto", "exact", "fast")
FAST_MIN_DIM = 2048   # auto: the fast path for weights whose smaller side exceeds this (exact eigh is cheap below)
FAST_MAX_RANK_SHARE = 8  # ... and whose rank is at most min(d_out, d_in) / this (else the Krylov space is near d)
EPS = 1e-2  # certified relative excess of the objective over the optimum
OVERSAMPLE = 16  # block size k = rank + this (measured on the Llama-3-8B shapes: larger blocks need more columns)
PROBES = 8   # Gaussian probes of the trace outside the Krylov space
PROBE_X = math.log(1e6)  # their lower bound on that trace fails with probability ≤ e^-x = 1e-6


@dataclass
class Certificate:
    """What the fast solve proved: excess ≤ bound ≤ eps·optimum_low (see the module docstring)."""

    bound: float          # β, an upper bound on e(U) - e*
    optimum_low: float    # e_low, a lower bound on e*
    columns: int          # Krylov space size m
    blocks: int
    certified: bool
    gains: torch.Tensor | None = None  # (r,) each component's exact objective drop for the true C (see `solve`)

    @property
    def rel_excess_bound(self) -> float:
        return self.bound / self.optimum_low if self.optimum_low > 0 else math.inf


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise exact.EoraError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")


def use_fast(solver: str, shape: tuple[int, int], rank: int) -> bool:
    """Whether `solver` ('auto', 'exact', 'fast') picks the fast path for a weight of `shape` at `rank`."""
    check_solver(solver)
    if solver == "auto":
        small = min(shape)
        return small > FAST_MIN_DIM and rank * FAST_MAX_RANK_SHARE <= small
    return solver == "fast"


def solve(method: str, delta_w: torch.Tensor, cov: torch.Tensor | None, rank: int, name: str | None = None, *,
          eig_floor: float = 1e-6, solver: str = "exact", eps: float = EPS,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`eora.solve` with a choice of solver: the exact one, or `fast_eora` where `use_fast` says so."""
    return solve_with_gains(method, delta_w, cov, rank, name, eig_floor=eig_floor, solver=solver, eps=eps,
                            seed=seed)[:2]


def solve_with_gains(method: str, delta_w: torch.Tensor, cov: torch.Tensor | None, rank: int,
                     name: str | None = None, *, eig_floor: float = 1e-6, solver: str = "exact", eps: float = EPS,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`solve`, and for the fast `eora` path each component's exact objective drop a_i C a_iᵀ (else None:
    `eora.component_gains` computes it). They come free from the certificate: its float64 Ritz values θ_i =
    u_iᵀ ΔW (C + τI) ΔWᵀ u_i, so a_i C a_iᵀ = θ_i - τ‖a_i‖² — where `component_gains` would cost r·d_in²
    (13 GMAC for a 4096 × 14336 weight at rank 64)."""
    if method not in exact.METHODS:
        raise exact.EoraError(f"unknown method {method!r}: choose one of {', '.join(exact.METHODS)}")
    if not use_fast(solver, tuple(delta_w.shape), rank):
        return (*exact.solve(method, delta_w, cov, rank, name, eig_floor=eig_floor), None)
    if method == "eora":
        b, a, cert = fast_eora(delta_w, exact._need_cov(cov, method, name), rank, eig_floor=eig_floor, name=name,
                               eps=eps, seed=seed)
        return b, a, cert.gains
    if method == "svd":
        return (*fast_eora(delta_w, None, rank, eig_floor=eig_floor, name=name, eps=eps, seed=seed)[:2], None)
    c = exact._need_cov(cov, method, name)
    return (*fast_eora(delta_w, torch.diagonal(torch.as_tensor(c)).clamp(min=0.0), rank, eig_floor=eig_floor,
                       name=name, eps=eps, seed=seed, diagonal=True)[:2], None)


def fast_eora(delta_w: torch.Tensor, cov: torch.Tensor | None, rank: int, *, eig_floor: float = 1e-6,
              name: str | None = None, eps: float = EPS, oversample: int | None = None,
              max_columns: int | None = None, trace: float | None = None, seed: int = 0,
              diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor, Certificate]:
    """Certified top-r EoRA factors (B (d_out, r) orthonormal or zero columns, A = Bᵀ ΔW (r, d_in)), float64.

    cov: (d_in, d_in) C; (d_in,) its diagonal when `diagonal` (the `diag` method); None for C = I (`svd`).
    eps: the certified relative excess e(B A) ≤ (1 + eps)·e*. oversample: block size k = rank + oversample
    (default OVERSAMPLE). max_columns: the largest Krylov space before falling back to the exact
    solver (default min(d_out, max(6 k, 4 rank + 256))). trace: tr(ΔW C ΔWᵀ) if the caller has it (a tighter
    lower bound on the optimum). Works on whatever device the inputs are on.
    """
    with exact._threads_for(delta_w):
        dw = _matrix(delta_w, "delta_w", name)
        d_out, d_in = dw.shape
        exact._check_rank(rank, dw.shape, name)
        apply_c, half_c, tau = _c_operator(cov, d_in, eig_floor, name, diagonal)
        p = oversample if oversample is not None else OVERSAMPLE
        gen = torch.Generator(device=dw.device).manual_seed(seed)
        dw32 = dw.to(torch.float32)

        def gram(y: torch.Tensor) -> torch.Tensor:  # G y = ΔW C ΔWᵀ y, in y's precision
            a = dw if y.dtype == torch.float64 else dw32
            return a @ apply_c(_t_mul(y, a))

        def space(n: int) -> tuple[int, int]:  # (block size k, largest Krylov space) for a side of n rows
            k = min(rank + p, n)
            return k, min(n, max_columns if max_columns is not None else max(6 * k, 4 * rank + 256))

        # The Krylov space is built in float32 (half the time of float64 products) and the certificate of its
        # Ritz vectors is recomputed in float64 (`_validate`); float32 only limits how far it converges, and a
        # float32 run that cannot certify (steep spectra at small eps) is redone in float64. A weight with more
        # outputs than inputs is first tried on its input side (`_input_side`).
        cert = None
        if d_out > d_in and (half := half_c()) is not None:
            theta, u, cert = _krylov(_input_side(dw32, half), d_in, *space(d_in), rank, eps, trace, gen,
                                     torch.float32, check=gram, lift=lambda v: dw32 @ half[0](v))
        for work in (torch.float32, torch.float64):
            if cert is not None and cert.certified:
                break
            theta, u, cert = _krylov(gram, d_out, *space(d_out), rank, eps, trace, gen, work)
        if not cert.certified:
            log.info("%s: fast solver not certified within %d columns (excess bound %.2g of the optimum): "
                     "solving exactly", exact._who(name), cert.columns, cert.rel_excess_bound)
            c_full = None if cov is None else (torch.diag(cov) if diagonal else cov)
            method = "svd" if cov is None else ("diag" if diagonal else "eora")
            b, a = exact.solve(method, dw, c_full, rank, name, eig_floor=eig_floor)
            return b, a, cert
        log.debug("%s: fast solve, %d Krylov columns, excess ≤ %.2g of the optimum", exact._who(name),
                  cert.columns, cert.rel_excess_bound)
        noise = max(d_out, d_in) * exact.EPS64 * float(theta[0]) if theta.numel() else 0.0
        keep = (theta > noise).to(u.dtype)
        u = u * keep
        a = u.T @ dw
        if tau is not None:  # a ridge (C + τI), not a floor: the exact gains for the true C (see solve_with_gains)
            cert.gains = (theta - tau * (a * a).sum(1)) * keep
        return u, a, cert


def _krylov(gram, n: int, k: int, cap: int, rank: int, eps: float, trace: float | None, gen: torch.Generator,
            work: torch.dtype, check=None, lift=None) -> tuple[torch.Tensor, torch.Tensor | None, Certificate]:
    """Block Lanczos in `work` precision until certified or `cap` columns: (θ (r,), U (d_out, r), certificate).

    gram: the operator the Krylov space is built for, on n rows. check/lift (input side): G itself in float64 for
    the certificate, and the map of the operator's vectors to G's (`_input_side`); None: gram is G."""
    blocks: list[torch.Tensor] = []
    products: list[torch.Tensor] = []
    q = torch.linalg.qr(torch.randn(n, k, dtype=work, device=gen.device, generator=gen)).Q
    while True:
        blocks.append(q)
        products.append(gram(q))
        basis, gq = torch.cat(blocks, 1), torch.cat(products, 1)
        m = basis.shape[1]
        nxt = _orth_against(products[-1], basis) if m < cap else None
        full = m >= n or (m < cap and nxt is None)  # span(Q) is G-invariant: its Ritz pairs are exact
        if len(blocks) >= 2 or m >= cap or full:
            theta, u, cert = _validate(basis, gq, rank, eps, trace, len(blocks), gram, gen, full, check, lift)
            if cert.certified or m >= cap or full:
                return theta, u, cert
        q = nxt[:, :cap - m]  # type: ignore[index]  # the last block may be cut to end at `cap` columns


def _c_operator(cov: torch.Tensor | None, d_in: int, eig_floor: float, name: str | None, diagonal: bool):
    """(y ↦ (C + τ I) y, half, τ) with τ = eig_floor·λ_max(C) (C = I when cov is None: no ridge needed, τ = 0;
    for a diagonal C the floor is a clamp, not a ridge: τ is None).

    half() gives float32 (v ↦ L v, w ↦ Lᵀ w) for a factor L Lᵀ = C + τ I (Cholesky; the square root of a
    diagonal), or None where float32 Cholesky fails; it is only computed when called."""
    if not eig_floor > 0.0:
        raise exact.EoraError(f"eig_floor must be positive, got {eig_floor}")
    if cov is None:
        return (lambda y: y), (lambda: (lambda v: v, lambda w: w)), 0.0
    if diagonal:
        d = torch.as_tensor(cov).to(torch.float64)
        if d.shape != (d_in,):
            raise exact.EoraError(f"{exact._who(name)}: diagonal covariance has shape {tuple(d.shape)}, "
                                  f"the weight has {d_in} inputs")
        dmax = float(d.max())
        if dmax <= 0.0:
            raise exact.EoraError(f"{exact._who(name)}: the calibration covariance is zero: no activations "
                                  "reached this layer")
        d = d.clamp(min=eig_floor * dmax)  # the same floor as eora.diag
        d32, root = d.to(torch.float32), d.sqrt().to(torch.float32)[:, None]
        return (lambda y: (d if y.dtype == torch.float64 else d32)[:, None] * y), (lambda: (root.mul, root.mul)), None
    c = _matrix(cov, "covariance", name)  # symmetric by construction (Σ x xᵀ); not symmetrised here
    if c.shape != (d_in, d_in):
        exact._as_cov(c, d_in, name)  # its one-line error
    c32 = c.to(torch.float32)
    lam_max = exact._lambda_max(c32, iters=12)  # only sets the ridge's size: a few percent is enough
    if lam_max <= 0.0:
        raise exact.EoraError(f"{exact._who(name)}: the calibration covariance is zero: no activations reached "
                              "this layer")
    tau = eig_floor * lam_max

    def half():
        ridged = c32.clone()
        ridged.diagonal().add_(tau)
        low, info = torch.linalg.cholesky_ex(ridged)
        return None if int(info) else (low.__matmul__, lambda w: _t_mul(w, low))

    return (lambda y: (c if y.dtype == torch.float64 else c32) @ y + tau * y), half, tau


def _t_mul(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """aᵀ y computed as (yᵀ a)ᵀ: BLAS reads `a` row-major either way, but a transposed left operand with few
    columns in y (the probes, the float64 check) runs several times slower than this form on CPU."""
    return (y.T @ a).T


def _input_side(dw32: torch.Tensor, half) -> Callable[[torch.Tensor], torch.Tensor]:
    """The operator H = Lᵀ ΔWᵀ ΔW L (d_in, d_in), float32, for a weight with d_out > d_in.

    H and G = ΔW (L Lᵀ) ΔWᵀ are M ᵀM and M Mᵀ for M = ΔW L: the same nonzero eigenvalues, and an eigenvector v
    of H gives G's as M v. Its Krylov space lives on the shorter side (cheaper orthogonalisation and Ritz steps;
    the same products per column), its Ritz vectors are lifted to G's side as M V and certified there in
    float64 against G with the exact C (`_validate`), so the float32 Cholesky factor only steers the search."""
    mul, t_mul = half
    return lambda v: t_mul(_t_mul(dw32 @ mul(v), dw32))


def _matrix(x: torch.Tensor, what: str, name: str | None) -> torch.Tensor:
    """`eora._as_matrix` with a cheaper finiteness test (one sum: NaN/Inf anywhere make it non-finite)."""
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 2 or 0 in t.shape:
        raise exact.EoraError(f"{exact._who(name)}: {what} must be a non-empty 2-D matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.sum())):
        raise exact.EoraError(f"{exact._who(name)}: {what} has NaN or Inf entries: check the original and quantized "
                              "weights")
    return t


def _orth_against(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis of (I - QQᵀ) z (classical Gram–Schmidt twice, then QR); None if z lies in span(Q)."""
    scale = float(torch.linalg.matrix_norm(z))
    for _ in range(2):
        z = z - basis @ (basis.T @ z)
    if float(torch.linalg.matrix_norm(z)) <= 1e-10 * max(scale, 1e-300):
        return None
    q, rr = torch.linalg.qr(z)
    # directions that vanished (a rank-deficient block) are replaced by nothing: keep only the well-defined ones
    keep = torch.diagonal(rr).abs() > 1e-10 * float(torch.diagonal(rr).abs().max())
    q = q[:, keep]
    for _ in range(1):
        q = q - basis @ (basis.T @ q)
        q = torch.linalg.qr(q).Q
    return q


def _probes(basis: torch.Tensor, gram, gen: torch.Generator) -> torch.Tensor:
    """ωᵢᵀ G ωᵢ (PROBES,) for Gaussian ωᵢ projected onto the complement of span(basis): tr(D_Q) estimates
    (in the basis's precision, float64 results scaled down by 1e-4 to cover float32 rounding)."""
    n = basis.shape[0]
    if basis.shape[1] >= n:
        return torch.zeros(PROBES, dtype=torch.float64)
    w = torch.randn(n, PROBES, dtype=basis.dtype, device=basis.device, generator=gen)
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return (w * gram(w)).sum(0).double() * (1.0 - 1e-4)


def _trace_low(probes: torch.Tensor, lam_max: float) -> float:
    """A lower bound on tr(D) from Gaussian quadratic forms ωᵀDω, holding with probability ≥ 1 - e^-x (x = PROBE_X).

    Laurent–Massart: for T̂ the probe mean, T̂ - tr(D) ≤ 2‖λ‖₂√(x/b) + 2λ_max x/b; with ‖λ‖₂² ≤ λ_max tr(D) and
    α = λ_max x/b this is (√tr(D) + √α)² ≥ T̂ - α, so √tr(D) ≥ √(T̂ - α) - √α."""
    t = float(probes.mean())
    alpha = max(lam_max, 0.0) * PROBE_X / probes.numel()
    if t <= alpha:
        return 0.0
    return max(math.sqrt(t - alpha) - math.sqrt(alpha), 0.0) ** 2


def _ritz(basis: torch.Tensor, gq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All Ritz values (m,) descending and their coefficient vectors (m, m) of G on span(basis), float64."""
    h = (basis.T @ gq).to(torch.float64)
    with exact._one_thread():
        vals, vecs = torch.linalg.eigh(0.5 * (h + h.T))
    return vals.flip(0).clamp(min=0.0), vecs.flip(1)


def _bound(theta: torch.Tensor, resid: torch.Tensor, rank: int) -> tuple[float, float]:
    """(β, λ̂_D) of the module docstring from r+1 Ritz values (r+1,) and their residuals (n, r+1)."""
    nuclear = float(torch.linalg.svdvals(resid[:, :rank]).sum())
    if theta.numel() <= rank:
        return nuclear, 0.0
    lam_d = float(theta[rank]) + float(torch.linalg.vector_norm(resid[:, rank]))
    return nuclear + float((lam_d - theta[:rank]).clamp(min=0.0).sum()), lam_d


def _validate(basis: torch.Tensor, gq: torch.Tensor, rank: int, eps: float, trace: float | None, blocks: int,
              gram, gen: torch.Generator, full: bool, check=None,
              lift=None) -> tuple[torch.Tensor, torch.Tensor | None, Certificate]:
    """Top-r Ritz values (r,) and vectors (d_out, r) of G on span(basis) and their certificate, in float64.

    The float32 Ritz pairs decide whether to stop; if they pass, the top r+1 Ritz vectors are orthonormalised
    (lifted to G's side first, for the input side) and Rayleigh–Ritz is redone on their span with float64
    products G U, which gives the certified residuals. Only G's own Krylov space can be `full` (exact Ritz
    pairs): a lifted one is certified by its residuals alone."""
    lift = lift or (lambda v: v)
    full = full and check is None
    vals, vecs = _ritz(basis, gq)
    m = vals.numel()
    r1 = min(rank + 1, m)
    tail_low = float(vals[rank:].sum()) * (1.0 - 1e-4)  # interlacing; the margin covers float32 rounding
    y32 = vecs[:, :r1].to(basis.dtype)
    bound32, lam_d = _bound(vals[:r1], (gq @ y32 - (basis @ y32) * vals[:r1].to(basis.dtype)).double(), rank)
    trace_q = float(vals.sum()) * (1.0 - 1e-4) if trace is None else float(trace)  # ≤ tr(G)
    if trace is None and not bound32 <= eps * tail_low:  # the interlacing bound is not enough: probe the rest
        trace_q += _trace_low(_probes(basis, gram, gen), lam_d)  # still ≤ tr(G), with probability ≥ 1 - 1e-6
    low32 = max(tail_low, trace_q - float(vals[:rank].sum()) - bound32)
    cert = Certificate(bound32, low32, m, blocks, False)
    if not (full or bound32 <= eps * low32):
        return vals[:rank], None, cert  # not certified: `fast_eora` solves exactly, the vectors are not used
    u = torch.linalg.qr(lift(basis @ y32).double()).Q                   # (d_out, r+1)
    gu = (check or gram)(u)
    h = u.T @ gu
    with exact._one_thread():
        theta, z = torch.linalg.eigh(0.5 * (h + h.T))
    theta, z = theta.flip(0).clamp(min=0.0), z.flip(1)
    u, gu = u @ z, gu @ z
    bound, lam_d = _bound(theta, gu - u * theta, rank)
    if full:
        bound = float(torch.linalg.svdvals(gu[:, :rank] - u[:, :rank] * theta[:rank]).sum())
    low = max(tail_low, trace_q - float(theta[:rank].sum()) - bound)
    cert = Certificate(bound, low, m, blocks, full or bound <= eps * low)
    return theta[:rank], u[:, :rank], cert


def trace_estimate(x: torch.Tensor, cov: torch.Tensor | None, *, sketch: int = 48, probes: int = 16,
                   seed: int = 0) -> tuple[float, float]:
    """tr(X C Xᵀ) (C = I when cov is None) by Hutch++, and its standard error, from 2·sketch + probes products.

    For the weights the fast path solves, the exact trace costs d_out·d_in² (a full product, 842 GMAC for a
    4096 × 14336 weight), far more than the solve. Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): the top of
    G = X C Xᵀ is taken exactly on the span Q of G·Ω (Ω Gaussian, `sketch` columns), tr(QᵀGQ), and only the rest
    (I - QQᵀ)G(I - QQᵀ) is estimated by Gaussian probes projected onto Q's complement; the standard error is
    the probes' sample standard deviation over √probes. Exact (error 0) when the sketch spans G's side.
    Products in float32, sums in float64: a diagnostic (the summary's relative errors), not a solver input."""
    x32 = torch.as_tensor(x).to(torch.float32)
    n = x32.shape[0]
    c32 = None if cov is None else torch.as_tensor(cov).to(torch.float32)

    def gram(y: torch.Tensor) -> torch.Tensor:
        z = _t_mul(y, x32)
        return x32 @ (z if c32 is None else c32 @ z)

    gen = torch.Generator(device=x32.device).manual_seed(seed)
    if n <= sketch:
        return float(torch.diagonal(gram(torch.eye(n, dtype=torch.float32, device=x32.device))).double().sum()), 0.0
    q = torch.linalg.qr(gram(torch.randn(n, sketch, generator=gen, device=x32.device))).Q
    top = float((q * gram(q)).double().sum())
    w = torch.randn(n, probes, generator=gen, device=x32.device)
    w = w - q @ (q.T @ w)
    terms = (w * gram(w)).double().sum(0)
    return top + float(terms.mean()), float(terms.std()) / math.sqrt(probes)
