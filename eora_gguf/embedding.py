"""Compensating the token embedding (`token_embd.weight`) and the output head (`output.weight`).

Both are (V, d) matrices in numpy order (V vocabulary rows, d = hidden). Factors follow the package's convention
for a GGUF tensor W of numpy shape (n_out, n_in): W ≈ Wq + B A, B (n_out, r), A (r, n_in); here n_out = V,
n_in = d. Every solver returns the rank-R optimum with components in descending order, so the first r components
are the rank-r optimum, and `gains[i]`, the exact drop of the tensor's own objective when component i is added
(Σ gains[:r] = objective(0) − objective(rank r)). The adapter writer maps token_embd's factors to the transposed,
swapped layout llama.cpp expects (see `adapter.py`).

Token embedding. Its input is a one-hot token x = e_t, its output the row E_t. Over calibration tokens with counts
n_t (N in all) the output error is Σ_t n_t ‖(ΔE − P)_t‖², so with weights w_t = n_t / N (the diagonal covariance
of one-hot inputs, as a mean like the linears' covariances) the objective is

    e(P) = ‖D^½ (ΔE − P)‖²_F,   D = diag(w) (V, V),   rank(P) ≤ r.

With G = ΔEᵀ D ΔE = Σ_t w_t ΔE_tᵀ ΔE_t (d, d) = V_G Μ V_Gᵀ, Eckart–Young on M = D^½ ΔE (whose right singular
vectors are those of G) gives D^½ P = M V_r V_rᵀ, hence

    P = ΔE V_r V_rᵀ,   B = ΔE V_r (V, r),   A = V_rᵀ (r, d),   gains_i = μ_i = Σ_t w_t B_ti².

A projection of every row onto one d-dimensional subspace: nothing is divided by a weight, so a token never seen in
calibration (w_t = 0) still gets its error projected onto the subspace its frequent neighbours chose — it is not
left uncorrected, it just has no say in the subspace. `smoothing` (a pseudo-count α added to every token's count,
w_t = (n_t + α)/(N + αV)) gives unseen tokens that say; α = 0 is the exact calibration objective. One eigh of a
d × d matrix: the V × V covariance is never formed.

Output head. Its input is the final hidden state after the final norm (x, d); C = E[x xᵀ] (d, d). This is a
linear layer like the others: EoRA (`eora.eora`) with that covariance, B (V, r) orthonormal, A = Bᵀ ΔW (r, d), and
gains_i = a_i C a_iᵀ (row i of A), exact because P = B Bᵀ ΔW is an orthogonal projection of M = ΔW C^½:
e(P) = ‖M‖² − ‖Bᵀ M‖².

Tied embeddings (no output.weight in the GGUF; llama.cpp uses token_embd.weight as the head). llama.cpp names the
head tensor `token_embd.weight` too, so a LoRA on it would be looked up in both places; but the two uses need
incompatible layouts — get_rows on lora_a needs lora_a ne = [r, V], the head's mul_mat(lora_a, x) needs
ne[0] = d — and the pinned llama.cpp aborts in ggml_mul_mat (tests/test_embedding.py shows it). So a tied model
cannot carry an embedding adapter in stock llama.cpp: `solvable_tensors` leaves token_embd out there and
`adapter.check_gguf_lora` refuses such an adapter.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import eora
from .errors import EoraError, atomic_output
from .gguf_io import GGUFModel
from .hf_model import tensor_files
from .walker import StreamedModel

log = logging.getLogger(__name__)

TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"
EMBEDDING_TENSORS = (TOKEN_EMBD, OUTPUT)
STATS_FORMAT = "eora-gguf.embedding-stats"
HF_MODULE = {TOKEN_EMBD: "embed_tokens", OUTPUT: "lm_head"}  # embed_tokens sits under the model prefix


@dataclass
class Solution:
    """Max-rank factors of one tensor: B (n_out, R), A (R, n_in) float64; gains (R,) descending objective drops;
    objective: e(0) = the tensor's weighted error before any correction, in the same units as gains."""

    b: torch.Tensor
    a: torch.Tensor
    gains: torch.Tensor
    objective: float

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-r optimum (first r components)."""
        return self.b[:, :rank], self.a[:rank]


# ------------------------------------------------------------------------------------------- statistics


@dataclass
class EmbeddingStats:
    """What the two solvers need from calibration: token counts (V,) and the head's input covariance Σ x xᵀ
    (d, d) over n_tokens final normed hidden states (float64 sums; None when not collected)."""

    counts: torch.Tensor
    head_cov_sum: torch.Tensor | None
    n_tokens: int

    def row_weights(self, smoothing: float = 0.0) -> torch.Tensor:
        """w_t = (n_t + α) / (N + α V): the diagonal of the one-hot input covariance, α pseudo-counts added."""
        if not smoothing >= 0.0:
            raise EoraError(f"embedding smoothing must be a non-negative pseudo-count, got {smoothing}")
        c = self.counts.to(torch.float64) + smoothing
        total = float(c.sum())
        if total <= 0.0:
            raise EoraError("no calibration tokens were counted: give calibration text")
        return c / total

    def head_covariance(self) -> torch.Tensor:
        """Mean E[x xᵀ] (d, d) of the output head's input."""
        if self.head_cov_sum is None:
            raise EoraError("no output-head statistics were collected: calibrate with the hidden states")
        return self.head_cov_sum / max(self.n_tokens, 1)


    def save(self, path: str | os.PathLike[str]) -> None:
        """safetensors (counts, head_cov_sum) + n_tokens as metadata; atomic."""
        tensors = {"counts": self.counts.contiguous()}
        if self.head_cov_sum is not None:
            tensors["head_cov_sum"] = self.head_cov_sum.contiguous()
        with atomic_output(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": STATS_FORMAT, "n_tokens": str(self.n_tokens)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddingStats:
        if not Path(path).is_file():
            raise EoraError(f"embedding statistics {path} do not exist: calibrate with embeddings first")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise EoraError(f"{path} is not an eora-gguf embedding statistics file")
            keys = set(fh.keys())
            return cls(fh.get_tensor("counts"), fh.get_tensor("head_cov_sum") if "head_cov_sum" in keys else None,
                       int(meta["n_tokens"]))


def token_counts(input_ids: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """How often each token id occurs in `input_ids` (any shape): (n_vocab,) float64."""
    ids = torch.as_tensor(input_ids).reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_vocab):
        raise EoraError(f"token ids fall outside the vocabulary of {n_vocab}: tokenize with this model's tokenizer")
    return torch.bincount(ids, minlength=n_vocab).to(torch.float64)


@torch.no_grad()
def final_norm_covariance(norm: torch.nn.Module, hidden: torch.Tensor, *, batch: int = 4096) -> torch.Tensor:
    """Σ x xᵀ (d, d) float64 over every position of `hidden` (..., d) passed through the model's final `norm`."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
    for chunk in flat.split(batch):
        x = norm(chunk.to(torch.float32)).to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise EoraError("the final norm's output holds NaN/Inf: check the model weights")
        cov += (x.T @ x).to(torch.float64)
    return cov


def collect(model_dir: str | os.PathLike[str], input_ids: torch.Tensor, hidden: torch.Tensor | None
            ) -> EmbeddingStats:
    """EmbeddingStats from calibration ids (samples, seqlen) and `calibration.stream`'s last hidden states
    (samples, seqlen, d), which are taken before the final norm: the model's own norm is applied here."""
    sm = StreamedModel(model_dir)
    n_vocab = sm.config.get_text_config().vocab_size
    counts = token_counts(input_ids, n_vocab)
    cov = None
    if hidden is not None:
        norm = getattr(sm.base, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            raise EoraError(f"{type(sm.model).__name__} has no final norm `norm`: output head not supported")
        cov = final_norm_covariance(norm, hidden)
    return EmbeddingStats(counts, cov, int(torch.as_tensor(input_ids).numel()))


# ------------------------------------------------------------------------------------------- solvers


def solve_token_embd(delta_e: torch.Tensor, weights: torch.Tensor, rank: int, *, name: str = TOKEN_EMBD
                     ) -> Solution:
    """argmin over rank-r P of Σ_t w_t ‖(ΔE − P)_t‖²: B = ΔE V_r (V, r), A = V_rᵀ (r, d) (module docstring).

    delta_e: (V, d) E − Eq, rows = tokens. weights: (V,) w_t ≥ 0 (see EmbeddingStats.row_weights).
    """
    de = eora._as_matrix(delta_e, "delta_e", name)
    w = torch.as_tensor(weights).to(torch.float64).reshape(-1)
    if w.shape[0] != de.shape[0]:
        raise EoraError(f"{name}: {w.shape[0]} token weights for {de.shape[0]} embedding rows: "
                        "calibration and weights come from different models")
    if bool((w < 0).any()) or float(w.sum()) <= 0.0:
        raise EoraError(f"{name}: token weights must be non-negative and not all zero")
    eora._check_rank(rank, de.shape, name)
    gram = de.T @ (de * w[:, None])                                          # (d, d) = ΔEᵀ D ΔE
    mu, v = eora._top_eigh(gram, rank)                                            # (r,), (d, r)
    b = de @ v                                                               # (V, r)
    gains = ((b * b) * w[:, None]).sum(0)                                    # = mu up to rounding
    objective = float(((de * de) * w[:, None]).sum())
    return Solution(b, v.T.contiguous(), gains, objective)


def solve_output(delta_w: torch.Tensor, cov: torch.Tensor, rank: int, *, eig_floor: float = 1e-6,
                 name: str = OUTPUT) -> Solution:
    """EoRA for the output head: argmin tr((ΔW − BA) C (ΔW − BA)ᵀ), C the final normed hidden covariance.

    delta_w: (V, d); cov: (d, d). B (V, r) orthonormal, A = Bᵀ ΔW (r, d); gains_i = a_i C a_iᵀ.
    """
    dw = eora._as_matrix(delta_w, "delta_w", name)
    b, a = eora.eora(dw, cov, rank, eig_floor=eig_floor, name=name)
    c = torch.as_tensor(cov).to(torch.float64)
    gains = ((a @ c) * a).sum(1)
    objective = float(((dw @ c) * dw).sum())
    return Solution(b, a, gains, objective)


def weighted_row_error(delta_e: torch.Tensor, weights: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """Σ_t w_t ‖(ΔE − B A)_t‖² in float64 (the token-embedding objective of given factors)."""
    e = delta_e.to(torch.float64) - b.to(torch.float64) @ a.to(torch.float64)
    return float(((e * e) * torch.as_tensor(weights).to(torch.float64)[:, None]).sum())


# ------------------------------------------------------------------------------------------- which tensors


def solvable_tensors(gguf_names: set[str] | frozenset[str] | list[str]) -> list[str]:
    """The embedding tensors of a GGUF that stock llama.cpp can carry a LoRA on: output.weight when present;
    token_embd.weight only when the head is untied (see the module docstring)."""
    names = set(gguf_names)
    out = [OUTPUT] if OUTPUT in names else []
    if TOKEN_EMBD in names:
        if OUTPUT in names:
            out.insert(0, TOKEN_EMBD)
        else:
            log.warning("token_embd.weight is tied to the output head (no output.weight): llama.cpp cannot apply "
                        "a LoRA to it, so the embeddings are left uncompensated")
    return out


def hf_module(gguf_name: str, hf_prefix: str = "model.") -> str:
    """GGUF embedding tensor -> HF module name (`model.embed_tokens`, `lm_head`)."""
    if gguf_name == TOKEN_EMBD:
        return hf_prefix + HF_MODULE[TOKEN_EMBD]
    if gguf_name == OUTPUT:
        return HF_MODULE[OUTPUT]
    raise EoraError(f"{gguf_name!r} is not token_embd.weight or output.weight")


def hf_weight(files: dict[str, Path], gguf_name: str, hf_prefix: str = "model.") -> torch.Tensor:
    """The HF checkpoint's (V, d) matrix for token_embd/output (a tied lm_head reads embed_tokens)."""
    key = hf_module(gguf_name, hf_prefix) + ".weight"
    if key not in files and gguf_name == OUTPUT:
        key = hf_module(TOKEN_EMBD, hf_prefix) + ".weight"
    if key not in files:
        raise EoraError(f"the HF checkpoint has no tensor {key}")
    with safe_open(str(files[key]), framework="pt") as fh:
        return fh.get_tensor(key).to(torch.float64)


# ------------------------------------------------------------------------------------------- against a GGUF


def solve_gguf(hf_dir: str | os.PathLike[str], base: GGUFModel, stats: EmbeddingStats, rank: int, *,
               smoothing: float = 0.0, eig_floor: float = 1e-6, hf_prefix: str = "model."
               ) -> tuple[dict[str, Solution], dict[str, dict[str, float | str]]]:
    """Solve every embedding tensor of `base` llama.cpp can adapt (`solvable_tensors`) at `rank` (capped at d).

    Returns ({GGUF name: Solution}, {GGUF name: report row like compensate's: rel_err_before/after, qtype}).
    A vocabulary the converter trimmed is solved on the GGUF's rows (the first V of the HF matrix). A tensor the
    GGUF stores without error is skipped (the demo SmolLM2's original embedding was Q8_0 already).
    """
    files = tensor_files(hf_dir)
    solutions: dict[str, Solution] = {}
    rows: dict[str, dict[str, float | str]] = {}
    for name in solvable_tensors(list(base.names)):
        wq = torch.from_numpy(base.dequantize(name)).to(torch.float64)
        w = hf_weight(files, name, hf_prefix)
        if w.shape[1] != wq.shape[1] or w.shape[0] < wq.shape[0]:
            raise EoraError(f"{name}: HF matrix {tuple(w.shape)} does not fit the GGUF's {tuple(wq.shape)}: "
                            "is it the GGUF of this model?")
        w = w[: wq.shape[0]]
        if bool(torch.equal(w, wq)):  # e.g. a Q8_0 copy of an original that was itself Q8_0: nothing to correct
            log.info("%s (%s) reproduces the HF weights exactly: no adapter for it", name, base.tensor(name).qtype.name)
            continue
        r = min(rank, *wq.shape)
        if name == TOKEN_EMBD:
            weights = stats.row_weights(smoothing)[: wq.shape[0]]
            sol = solve_token_embd(w - wq, weights, r, name=name)
            ref = float(((w * w) * weights[:, None]).sum())
        else:
            cov = stats.head_covariance()
            sol = solve_output(w - wq, cov, r, eig_floor=eig_floor, name=name)
            ref = float(((w @ cov) * w).sum())
        solutions[name] = sol
        after = sol.objective - float(sol.gains.sum())
        rows[name] = {"rel_err_before": sol.objective / ref, "rel_err_after": after / ref,
                      "qtype": base.tensor(name).qtype.name}
        log.info("%s (%s): rank %d, relative error %.3g -> %.3g", name, rows[name]["qtype"], r,
                 sol.objective / ref, after / ref)
    return solutions, rows


__all__ = ["EMBEDDING_TENSORS", "EmbeddingStats", "OUTPUT", "Solution", "TOKEN_EMBD", "collect",
           "final_norm_covariance", "hf_module", "hf_weight", "solvable_tensors", "solve_output",
           "solve_token_embd", "token_counts", "weighted_row_error"]
