"""Importance matrix (imatrix) for `llama-quantize --imatrix`, from our calibration statistics.

What llama-imatrix collects (tools/imatrix/imatrix.cpp at the pinned commit): for every MUL_MAT whose weight is
named `blk.*`, the sum over token rows of x_j² per input column j, and the number of rows — the diagonal of XᵀX,
unnormalised. Our statistics hold the full XᵀX per input site in float64 (`CalibrationStats.covariances`), so the
imatrix is exact arithmetic on them: `in_sum2 = diag(Σ x xᵀ)`, `counts = n_tokens`, written once for every GGUF
weight that reads the site (q/k/v share the attention-norm output, gate/up the ffn-norm output). The inputs are
the ones llama.cpp's graph feeds those weights: the llama Q/K row permutation reorders output rows only.

File (GGUF, what common/imatrix-loader.cpp reads): KV `general.type = "imatrix"`, `imatrix.datasets` (string
array), `imatrix.chunk_count` (u32), `imatrix.chunk_size` (u32) — llama-quantize refuses a file missing any of the
three `imatrix.*` keys; per weight, in sorted name order, `<name>.in_sum2` F32 ne = [n_in, n_mat] and
`<name>.counts` F32 ne = [1, n_mat] (numpy shapes (n_mat, n_in) and (n_mat, 1)); for dense weights n_mat = 1 and
both are stored 1-d, ne = [n_in] and [1], as ggml writes them.
llama-quantize weighs each column of a weight by in_sum2 / counts.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .errors import EoraError, atomic_output
from .llama_tools import _perplexity_args, run_tool
from .naming import NameMap
from .stats import CalibrationStats

log = logging.getLogger(__name__)

FILE_TYPE = "imatrix"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """An importance matrix. sums[name]: (n_mat, n_in) float32 Σ x² per column; counts[name]: (n_mat,) float32
    token rows summed; name is the GGUF weight name (`blk.3.attn_q.weight`)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray:
        """Per-column weight llama-quantize uses: in_sum2 / counts (1 where a count is 0), (n_mat, n_in) float64."""
        s, c = self.sums[name].astype(np.float64), self.counts[name].astype(np.float64)[:, None]
        return np.where(c > 0, s / np.where(c > 0, c, 1.0), 1.0)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the GGUF imatrix file (atomically); the KV set and tensor order are llama-imatrix's."""
        if not self.sums:
            raise EoraError("the importance matrix has no entries: calibrate a model with decoder layers first")
        writer = gguf.GGUFWriter(None, FILE_TYPE)
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        writer.add_type(FILE_TYPE)
        writer.add_array(KEY_DATASETS, list(self.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
        writer.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
        for name in sorted(self.sums):
            s = np.ascontiguousarray(self.sums[name], dtype=np.float32)
            c = np.ascontiguousarray(self.counts[name], dtype=np.float32)[:, None]
            if s.shape[0] == 1:  # ggml stores [n_in, 1] and [1, 1] as 1-d tensors (ggml_n_dims drops trailing 1s)
                s, c = s[0], c[0]
            writer.add_tensor(name + SUM_SUFFIX, s)
            writer.add_tensor(name + COUNT_SUFFIX, c)
        out = Path(path)
        with atomic_output(out, suffix=".gguf") as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        log.info("wrote an importance matrix of %d weights to %s", len(self.sums), out)
        return out


def from_stats(stats: CalibrationStats, names: NameMap, *, datasets: Sequence[str] | None = None) -> Imatrix:
    """The imatrix of every adapted weight covered by `stats`: in_sum2 = diag(Σ x xᵀ) of its input site, counts =
    the site's tokens. datasets: what the file names as its text (default: the statistics' calibration spec)."""
    if not stats.covariances:
        raise EoraError("the calibration statistics are empty: calibrate the model first")
    if stats.meta.get("propagate", "original") != "original":
        log.warning("imatrix from %s-propagation statistics: llama-imatrix sees the original model's inputs",
                    stats.meta["propagate"])
    out = Imatrix(datasets=list(datasets) if datasets is not None else
                  [str(stats.meta["calib_spec"])] if stats.meta.get("calib_spec") else [])
    diags: dict[str, np.ndarray] = {}
    for module, site in sorted(stats.module_sites.items()):
        if site not in stats.covariances:
            raise EoraError(f"calibration statistics lack the input site {site} of {module}: calibrate again")
        try:
            name = names.to_gguf(module)
        except EoraError:
            log.warning("imatrix: %s is not a weight llama.cpp names for %s; left out", module, names.dims.arch)
            continue
        n_in = names.dims.linear_shape(names.split(module)[1])[1]
        if site not in diags:
            cov = stats.covariances[site]
            if tuple(cov.shape) != (n_in, n_in):
                raise EoraError(f"statistics of {site} are {tuple(cov.shape)}, {module} reads {n_in} inputs: "
                                "these statistics belong to another model")
            d = cov.diagonal().double().cpu().numpy()
            if not np.all(np.isfinite(d)) or np.any(d < 0):
                raise EoraError(f"statistics of {site} have a NaN, Inf or negative diagonal: calibrate again")
            n = int(stats.n_tokens.get(site, 0))
            if n < 1:
                raise EoraError(f"statistics of {site} count {n} tokens: calibrate on some text")
            diags[site] = d
        out.sums[name] = diags[site].astype(np.float32)[None, :]
        out.counts[name] = np.array([stats.n_tokens[site]], dtype=np.float32)
    if not out.sums:
        raise EoraError(f"no calibrated module maps to a {names.dims.arch} GGUF weight: wrong model for these stats?")
    n_max = max(int(c.max()) for c in out.counts.values())
    out.chunk_size = int(stats.meta.get("seqlen") or n_max)
    out.chunk_count = n_max // max(out.chunk_size, 1)
    return out


def write_imatrix(stats: CalibrationStats, names: NameMap, path: str | os.PathLike[str], *,
                  datasets: Sequence[str] | None = None) -> Path:
    """`from_stats(stats, names, datasets=...).save(path)`: the file `llama-quantize --imatrix` takes."""
    return from_stats(stats, names, datasets=datasets).save(path)


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF imatrix (ours or llama-imatrix's) with the checks llama-quantize applies."""
    path = Path(path)
    if not path.is_file():
        raise EoraError(f"imatrix file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise EoraError(f"{path} is not a GGUF imatrix ({str(exc).splitlines()[0][:120]}); a legacy .dat file can "
                        "be converted with `llama-imatrix --in-file F.dat -o F.gguf`") from None
    fields = reader.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        raise EoraError(f"{path} lacks the imatrix metadata {missing[0]}: llama-quantize refuses it")
    out = Imatrix(datasets=[str(s) for s in fields[KEY_DATASETS].contents()],
                  chunk_count=int(fields[KEY_CHUNK_COUNT].contents()),
                  chunk_size=int(fields[KEY_CHUNK_SIZE].contents()))
    tensors = {t.name: t for t in reader.tensors}
    for tname in tensors:
        if not tname.endswith((SUM_SUFFIX, COUNT_SUFFIX)):
            continue
        base = tname.rsplit(".", 1)[0]
        s, c = tensors.get(base + SUM_SUFFIX), tensors.get(base + COUNT_SUFFIX)
        if s is None or c is None:
            raise EoraError(f"{path}: {base} has {'counts' if s is None else 'in_sum2'} but not the other")
        if s.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise EoraError(f"{path}: in_sum2 and counts of {base} must be F32")
        n_mat = int(c.n_elements)
        if n_mat < 1 or int(s.n_elements) % n_mat:
            raise EoraError(f"{path}: {base} has {s.n_elements} sums for {n_mat} counts")
        out.sums[base] = np.array(s.data, dtype=np.float32).reshape(n_mat, -1)
        out.counts[base] = np.array(c.data, dtype=np.float32).reshape(n_mat)
    if not out.sums:
        raise EoraError(f"{path} has no imatrix entries (<name>.in_sum2 / <name>.counts)")
    return out


def compare(a: Imatrix, b: Imatrix) -> dict[str, dict[str, float]]:
    """Per weight both cover: cosine similarity of the importance vectors (in_sum2 / counts, flattened) and the
    counts of each. Weights only one side has are left out (see the key sets)."""
    out = {}
    for name in sorted(set(a.sums) & set(b.sums)):
        x, y = a.importance(name).ravel(), b.importance(name).ravel()
        if x.shape != y.shape:
            raise EoraError(f"{name} has {x.size} columns in one imatrix and {y.size} in the other: other models")
        den = float(np.linalg.norm(x) * np.linalg.norm(y))
        out[name] = {"cosine": float(x @ y / den) if den > 0 else float("nan"),
                     "count_a": float(a.counts[name].max()), "count_b": float(b.counts[name].max())}
    return out


def llama_imatrix_windows(llama, model: str | os.PathLike[str], text: str | os.PathLike[str], *, ctx: int,
                          chunks: int, threads: int | None = None) -> np.ndarray:
    """The token windows (chunks, ctx) int64 that `llama-imatrix -m model -f text -c ctx --chunks N` evaluates.

    llama-imatrix tokenizes the whole text with the pinned llama.cpp (BOS first when the vocabulary adds one),
    cuts it into ctx-token chunks and puts BOS in each chunk's first position. llama-perplexity tokenizes and
    chunks the same way and stores the chunks' tokens at the head of its --kl-divergence-base file (a temporary
    file of about chunks*ctx*n_vocab bytes); feeding these windows to `calibration.stream` gives statistics over
    exactly llama-imatrix's tokens.
    """
    args = _perplexity_args(llama, model, text, lora=(), ctx=ctx, chunks=chunks, threads=threads)
    with tempfile.TemporaryDirectory(prefix="eora-tokens-") as tmp_dir:
        tmp = Path(tmp_dir) / "logits.bin"
        run_tool([*args, "--kl-divergence-base", tmp], f"llama-perplexity (tokens) on {Path(model).name}")
        with open(tmp, "rb") as fh:
            head = fh.read(20)
            if head[:8] != b"_logits_" or len(head) < 20:
                raise EoraError(f"llama-perplexity wrote no tokens for {text}")
            n_ctx, _, n_chunk = (int(x) for x in np.frombuffer(head[8:20], np.int32))
            ids = np.frombuffer(fh.read(4 * n_ctx * n_chunk), np.int32).astype(np.int64).reshape(n_chunk, n_ctx)
    bos = gguf.GGUFReader(model).fields.get("tokenizer.ggml.bos_token_id")
    if bos is not None and int(ids[0, 0]) == int(bos.contents()):  # the vocabulary adds BOS
        ids[:, 0] = int(bos.contents())
    return ids
