"""Write the compensation as a GGUF LoRA for stock llama.cpp (`--lora`), read it back, check it against a base.

The PEFT folder writer is peft.py.

Factors come keyed by the base GGUF tensor name (`blk.3.attn_q.weight`) as (B (n_out, r), A (r, n_in)) with
rows in GGUF order, so that Wq + B A ≈ W for the GGUF's own weight.

GGUF LoRA (what src/llama-adapter.cpp accepts at the pinned commit): general.type = "adapter",
general.architecture = the base's, adapter.type = "lora", adapter.lora.alpha (float32), and per weight the
tensors `<name>.lora_a` (numpy (r, n_in), ggml ne [n_in, r]) and `<name>.lora_b` (numpy (n_out, r)). The runtime
scale is user_scale·alpha/r (r read from lora_b), or user_scale when alpha is 0; EoRA needs 1, so alpha = r
when every tensor has rank r and 0 otherwise.

token_embd.weight (numpy (V, d)) is the exception: llama.cpp's build_inp_embd takes get_rows(lora_a, tokens) and
multiplies by lora_b, so for ΔE ≈ B A (B (V, r), A (r, d)) the file holds lora_a = B (numpy (V, r), ne [r, V])
and lora_b = Aᵀ (numpy (d, r), ne [r, d]); the loader checks base ne[0] = lora_b ne[1] and base ne[1] =
lora_a ne[1]. On a tied model (no output.weight) llama.cpp also looks the pair up for the output head, where
that layout cannot multiply (ggml aborts), so the checker refuses it there (see embedding.py).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import EoraError, atomic_output
from .gguf_io import GGUFModel, open_gguf

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# Storage types of the factors. llama-adapter.cpp puts no restriction on them (the loader copies whatever ggml type
# the file holds, and build_lora_mm multiplies with ggml_mul_mat, which takes every type whose rows are whole
# blocks); the lower-bit ones are those gguf-py can quantize. Block types need rows (n_in for A, r for B) that are
# whole 32-element blocks; other tensors are stored as F16 (`storage_type`).
ADAPTER_DTYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0,
                                "q4_1": Q.Q4_1, "q4_0": Q.Q4_0}
# Types the loader takes and our reader dequantizes.
READABLE_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0})
F16_MAX = float(np.finfo(np.float16).max)
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # tensor data offsets and sizes are padded to this in the file

Factors = Mapping[str, tuple[Any, Any]]


@dataclass(frozen=True)
class LoraInfo:
    """What llama.cpp will see in an adapter: per base tensor, its rank, storage types and runtime scale."""

    arch: str
    alpha: float
    ranks: dict[str, int] = field(default_factory=dict)
    types: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (lora_a type, lora_b type)

    def scale(self, name: str, user_scale: float = 1.0) -> float:
        """llama.cpp's scale for this tensor: user_scale·alpha/r, or user_scale when alpha is 0."""
        return user_scale * self.alpha / self.ranks[name] if self.alpha else user_scale


# --------------------------------------------------------------------------------------------------------------
# bytes, exactly as the file stores them


def storage_type(qtype: Q, row_len: int) -> Q:
    """The type a factor with rows of `row_len` is stored as: `qtype` when its rows are whole blocks, else F16."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if row_len % block == 0 else Q.F16


def stored_shapes(name: str, n_out: int, n_in: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """numpy shapes (rows, row length) of `<name>.lora_a` and `.lora_b` for a base weight of n_out x n_in (numpy).

    Linears: lora_a (r, n_in), lora_b (n_out, r). token_embd (numpy (n_vocab, n_embd)) is applied as
    mul_mat(lora_b, get_rows(lora_a, tokens)) with "A and B flipped" (llama-adapter.cpp checks base ne[0] = B ne[1],
    base ne[1] = A ne[1]): lora_a (n_vocab, r), lora_b (n_embd, r), both rows of r.
    """
    if name.endswith("token_embd.weight"):
        return (n_out, rank), (n_in, rank)
    return (rank, n_in), (n_out, rank)


def tensor_nbytes(qtype: Q, rows: int, row_len: int) -> int:
    """Bytes of a (rows, row_len) tensor stored as `qtype` (after `storage_type`'s fallback), unpadded."""
    qtype = storage_type(qtype, row_len)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rows * (row_len // block) * size


def pair_bytes(name: str, n_out: int, n_in: int, rank: int, qtype: Q) -> int:
    """File bytes of one LoRA pair's data (both tensors, each padded to ALIGNMENT) at `rank` stored as `qtype`."""
    (ar, al), (br, bl) = stored_shapes(name, n_out, n_in, rank)
    return _pad(tensor_nbytes(qtype, ar, al)) + _pad(tensor_nbytes(qtype, br, bl))


def header_bytes(arch: str, names: list[str] | tuple[str, ...],
                 metadata: Mapping[str, str | int | float] | None = None) -> int:
    """Bytes of a `write_gguf_lora` file before its tensor data: header, key-values, tensor infos, padding.

    It does not depend on the ranks or types (every dimension is a u64, every type a u32), so the file's size is
    exactly header_bytes(...) + Σ pair_bytes(...) (tests/test_budget.py checks it against written files).
    """
    def string(x: str) -> int:
        return 8 + len(x.encode("utf-8"))

    def value(v: str | int | float) -> int:
        return string(v) if isinstance(v, str) else 1 if isinstance(v, bool) else 8 if isinstance(v, int) else 4

    kv: dict[str, str | int | float] = {gguf.Keys.General.ARCHITECTURE: arch, gguf.Keys.General.TYPE: "adapter",
                                        gguf.Keys.Adapter.TYPE: "lora", gguf.Keys.Adapter.LORA_ALPHA: 0.0,
                                        **(metadata or {})}
    n = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    n += sum(string(k) + 4 + value(v) for k, v in kv.items())
    n += sum(string(f"{name}{suffix}") + 4 + 2 * 8 + 4 + 8 for name in names for suffix in (".lora_a", ".lora_b"))
    return _pad(n)


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# --------------------------------------------------------------------------------------------------------------
# GGUF LoRA


def write_gguf_lora(path: str | os.PathLike[str], factors: Factors, *, arch: str,
                    dtype: str | Mapping[str, str] = "f16",
                    metadata: Mapping[str, str | int | float] | None = None) -> Path:
    """Write factors as a GGUF LoRA adapter that llama.cpp applies with scale 1; atomic.

    factors: {base tensor name: (B (n_out, r), A (r, n_in))} in GGUF row order (numpy or torch).
    dtype: a key of ADAPTER_DTYPES (f32, f16, q8_0, q5_1, q5_0, q4_1, q4_0), or {name: dtype} per pair. Block
    types need a row length (n_in for A, r for B) divisible by 32; other tensors fall back to F16 (logged, see
    `storage_type`). F16 falls back to F32 for a tensor whose values overflow it.
    metadata: extra string/int/float key-values (e.g. eora.method), written as given.
    """
    if not factors:
        raise EoraError("no adapter tensors to write: the rank or the module selection left nothing")
    types = {name: dtype if isinstance(dtype, str) else dtype.get(name, "") for name in factors}
    for name, t in types.items():
        if t not in ADAPTER_DTYPES:
            raise EoraError(f"unknown adapter type {t!r} for {name}: choose one of {', '.join(ADAPTER_DTYPES)}")
    pairs = {name: check_pair(name, b, a) for name, (b, a) in factors.items()}
    ranks = {name: a.shape[0] for name, (_, a) in pairs.items()}
    alpha = float(next(iter(ranks.values()))) if len(set(ranks.values())) == 1 else 0.0
    path = Path(path)
    with atomic_output(path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key, value in (metadata or {}).items():
            _add_metadata(writer, key, value)
        fell_back: list[str] = []  # tensors whose row length does not fit their type's blocks: F16
        for name, (b, a) in pairs.items():
            file_a, file_b = (b, a.T) if _is_token_embd(name) else (a, b)
            for part, x in ((f"{name}.lora_a", file_a), (f"{name}.lora_b", file_b)):
                if not _add_tensor(writer, part, x, ADAPTER_DTYPES[types[name]]):
                    fell_back.append(part)
        if fell_back:
            log.info("%d adapter tensor(s) stored as F16: their row length (the rank, for lora_b) is not a multiple "
                     "of their type's block size (e.g. %s; --verbose lists them)", len(fell_back), fell_back[0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    # a staged temporary (errors.staged_outputs) is announced by its caller under its final name
    (log.debug if path.name.endswith(".partial") else log.info)(
        "wrote %s: %d LoRA pairs, alpha %g, %s", path, len(pairs), alpha,
        dtype if isinstance(dtype, str) else dict(Counter(types.values())))
    return path


def check_gguf_lora(adapter: str | os.PathLike[str], base: GGUFModel | str | os.PathLike[str], *,
                    require_unit_scale: bool = True) -> LoraInfo:
    """Check an adapter against its base GGUF the way llama.cpp's loader does; EoraError on the first problem.

    Metadata (general.type, architecture, adapter.type, alpha stored as float32), tensor suffixes
    (`.lora_a`/`.lora_b`, `*_norm.weight` ignored), complete pairs, base tensor present, and shapes:
    base ne[0] = A ne[0] (n_in), base ne[1] = B ne[1] (n_out), A ne[1] = B ne[0] (r). With require_unit_scale,
    also that every pair gets runtime scale 1 (what EoRA needs).
    """
    owned = not isinstance(base, GGUFModel)
    base_model = open_gguf(base) if owned else base
    try:
        return _check(Path(adapter), base_model, require_unit_scale)
    finally:
        if owned:
            base_model.close()


def lora_info(adapter: str | os.PathLike[str]) -> LoraInfo:
    """An adapter's own metadata and pairs, checked as llama.cpp's loader checks them without a base."""
    model = GGUFModel(adapter)
    try:
        return _pairs(model)[0]
    finally:
        model.close()


def read_gguf_lora(adapter: str | os.PathLike[str]) -> tuple[LoraInfo, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Load an adapter's factors dequantized to float32: {base name: (B (n_out, r), A (r, n_in))}."""
    model = GGUFModel(adapter)
    try:
        info, pairs = _pairs(model)
        out = {}
        for name, (ta, tb) in pairs.items():
            fa, fb = model.dequantize(ta), model.dequantize(tb)
            out[name] = (fa, np.ascontiguousarray(fb.T)) if _is_token_embd(name) else (fb, fa)
    finally:
        model.close()
    return info, out


def _check(path: Path, base: GGUFModel, require_unit_scale: bool) -> LoraInfo:
    model = GGUFModel(path)
    try:
        info, pairs = _pairs(model)
        if info.arch != base.meta.arch:
            raise EoraError(f"{path.name}: adapter architecture {info.arch!r} != base {base.meta.arch!r} "
                            "(llama.cpp: model arch and LoRA arch mismatch): write it for this base")
        for name, (ta, tb) in pairs.items():
            if name not in base:
                raise EoraError(f"{path.name}: LoRA tensor {name!r} does not exist in base model "
                                f"{base.path.name}: it was made for another model")
            w, a, b = base.tensor(name).ne, model.tensor(ta).ne, model.tensor(tb).ne
            if _is_token_embd(name):
                ok = w[0] == b[1] and w[1] == a[1]
                if ok and a[0] != b[0]:
                    raise EoraError(f"{path.name}: {ta} ne {list(a)} and {tb} ne {list(b)} disagree on the rank")
                if ok and "output.weight" not in base:
                    raise EoraError(f"{path.name}: {name} is tied to the output head in {base.path.name} (no "
                                    "output.weight); llama.cpp would apply this LoRA there too and abort: "
                                    "drop the token_embd pair")
            else:
                ok = w[0] == a[0] and w[1] == b[1]
                if ok and a[1] != b[0]:
                    raise EoraError(f"{path.name}: {ta} ne {list(a)} and {tb} ne {list(b)} disagree on the rank")
            if not ok:
                raise EoraError(f"{path.name}: {name} has incorrect shape (lora_a ne {list(a)}, lora_b ne {list(b)}, "
                                f"base ne {list(w)}): it was made for another model")
            if require_unit_scale and abs(info.scale(name) - 1.0) > 1e-6:
                raise EoraError(f"{path.name}: {name} would run with scale {info.scale(name):g}, not 1 "
                                f"(alpha {info.alpha:g}, rank {info.ranks[name]})")
        return info
    finally:
        model.close()


def _pairs(model: GGUFModel) -> tuple[LoraInfo, dict[str, tuple[str, str]]]:
    """Validate an adapter's own metadata and tensor names; {base name: (lora_a name, lora_b name)}."""
    name = model.path.name
    general_type = model.field("general.type")
    if general_type != "adapter":
        raise EoraError(f"{name}: general.type is {general_type!r}, llama.cpp expects 'adapter'")
    if model.field(gguf.Keys.Adapter.TYPE) != "lora":
        raise EoraError(f"{name}: adapter.type is {model.field(gguf.Keys.Adapter.TYPE)!r}, llama.cpp expects 'lora'")
    alpha_field = model.reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = 0.0
    if alpha_field is not None:
        if alpha_field.types != [gguf.GGUFValueType.FLOAT32]:
            raise EoraError(f"{name}: adapter.lora.alpha must be a float32, llama.cpp aborts on "
                            f"{alpha_field.types[0].name}")
        alpha = float(alpha_field.contents())
    parts: dict[str, dict[str, str]] = {}
    for tname in model.names:
        for suffix in (".lora_a", ".lora_b"):
            if tname.endswith(suffix):
                parts.setdefault(tname[: -len(suffix)], {})[suffix] = tname
                break
        else:
            if not tname.endswith("_norm.weight"):
                raise EoraError(f"{name}: LoRA tensor {tname!r} has unexpected suffix (llama.cpp refuses it)")
    pairs: dict[str, tuple[str, str]] = {}
    info = LoraInfo(arch=str(model.meta.arch), alpha=alpha)
    for base_name, p in parts.items():
        if len(p) != 2:
            raise EoraError(f"{name}: LoRA tensor pair for {base_name!r} is missing one component")
        ta, tb = p[".lora_a"], p[".lora_b"]
        for t in (ta, tb):
            if model.tensor(t).qtype not in READABLE_TYPES:
                raise EoraError(f"{name}: {t} is {model.tensor(t).qtype.name}; expected one of "
                                f"{', '.join(sorted(q.name for q in READABLE_TYPES))}")
        a_ne, b_ne = model.tensor(ta).ne, model.tensor(tb).ne
        # the rank: lora_a ne[1] and lora_b ne[0]; token_embd's pair is flipped (lora_a ne [r, n_vocab])
        a_rank = a_ne[0] if _is_token_embd(base_name) else a_ne[1] if len(a_ne) == 2 else None
        if len(a_ne) != 2 or len(b_ne) != 2 or a_rank != b_ne[0]:
            layout = (" (llama.cpp needs token_embd's pair flipped: lora_a ne [r, n_vocab], lora_b ne [r, n_embd];"
                      " incorrect shape)") if _is_token_embd(base_name) else ""
            raise EoraError(f"{name}: {ta} ne {list(a_ne)} and {tb} ne {list(b_ne)} are not a LoRA pair of one "
                            f"rank{layout}: the adapter is corrupt, write it again")
        pairs[base_name] = (ta, tb)
        info.ranks[base_name] = model.tensor(tb).ne[0]
        info.types[base_name] = (model.tensor(ta).qtype.name, model.tensor(tb).qtype.name)
    if not pairs:
        raise EoraError(f"{name}: the adapter holds no LoRA tensors")
    return info, pairs


def _is_token_embd(name: str) -> bool:
    return name.endswith("token_embd.weight")  # the loader's own test (llama-adapter.cpp)


def check_pair(name: str, b: Any, a: Any) -> tuple[np.ndarray, np.ndarray]:
    b, a = _numpy(b), _numpy(a)
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0] or a.shape[0] == 0:
        raise EoraError(f"{name}: factors must be B (n_out, r) and A (r, n_in) with r ≥ 1, "
                        f"got B {b.shape}, A {a.shape}")
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise EoraError(f"{name}: adapter factors contain NaN or Inf")
    return b, a


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; avoid importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _add_tensor(writer: gguf.GGUFWriter, name: str, x: np.ndarray, qtype: Q) -> bool:
    """Write one factor; False when its row length made it fall back to F16 (the caller sums those up)."""
    stored = storage_type(qtype, x.shape[1])
    as_asked = stored == qtype
    if stored != qtype:
        log.debug("%s: row length %d is not a multiple of %d, stored as F16 instead of %s", name, x.shape[1],
                  gguf.GGML_QUANT_SIZES[qtype][0], qtype.name)
        qtype = stored
    if qtype == Q.F16 and np.abs(x).max(initial=0.0) > F16_MAX:
        log.warning("%s: values exceed the F16 range, stored as F32", name)
        qtype = Q.F32
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        writer.add_tensor(name, x32)
    elif qtype == Q.F16:
        writer.add_tensor(name, x32.astype(np.float16))
    else:
        data = gguf.quants.quantize(x32, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    return as_asked


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: str | int | float) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise EoraError(f"metadata {key!r} must be a string, int or float, got {type(value).__name__}")
