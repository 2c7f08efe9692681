"""Read a (quantized) GGUF model: metadata, tensor directory, one-tensor-at-a-time dequantization.

Shapes. ggml lists a tensor's dimensions fastest-first (`ne[0]` = row length), gguf-py's numpy views list them
slowest-first, so every shape here is the reverse of ggml's `ne`: a linear layer with `ne = [n_in, n_out]`
is the numpy/torch matrix (n_out, n_in) — the same orientation as the HF `nn.Linear.weight`. `TensorInfo`
carries both. Dequantization uses gguf-py (`gguf.quants.dequantize`, bit-exact with ggml for every type it
supports) and returns float32 numpy arrays; the file itself is memory-mapped, so only the tensor being
dequantized is held in RAM.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import EoraError
from .naming import LINEAR_MODULES, NameMap, model_dims

log = logging.getLogger(__name__)

# The KV fields gguf-py invents from the header; they are not stored key/values.
HEADER_FIELDS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]   # numpy order (n_out, n_in) — reversed ggml ne
    ne: tuple[int, ...]      # ggml order (n_in, n_out)
    n_bytes: int


@dataclass(frozen=True)
class GGUFMeta:
    arch: str
    n_blocks: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int | None
    file_type: int | None
    general_type: str | None


class GGUFModel:
    """An open GGUF file. `dequantize(name)` -> float32 (n_out, n_in); `field(key)` -> a KV value."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            _check_tensor(self.path, t)
        self.meta = self._read_meta()

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (numpy releases it once no array views it)."""
        self._tensors = {}
        self._reader = None  # type: ignore[assignment]

    @property
    def reader(self) -> gguf.GGUFReader:
        if self._reader is None:
            raise EoraError(f"{self.path} is closed")
        return self._reader

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None or not f.types:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError, TypeError) as exc:
            raise EoraError(f"{self.path}: metadata {key} cannot be read ({type(exc).__name__}): the file is corrupt, "
                            "convert or download it again") from None

    def tensor(self, name: str) -> TensorInfo:
        t = self._tensors.get(name)
        if t is None:
            raise EoraError(f"{self.path.name} has no tensor {name!r}: is it the GGUF of the same model?")
        ne = tuple(int(x) for x in t.shape)
        return TensorInfo(name=name, qtype=t.tensor_type, shape=tuple(reversed(ne)), ne=ne, n_bytes=int(t.n_bytes))

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data as gguf-py exposes it (a memmap view; typed for float types, else bytes)."""
        self.tensor(name)
        return self._tensors[name].data

    def dequantize(self, name: str) -> np.ndarray:
        """float32 numpy array in numpy order, e.g. (n_out, n_in) for a linear weight; a fresh copy."""
        info = self.tensor(name)
        data = self._tensors[name].data
        try:
            out = gguf.quants.dequantize(data, info.qtype)
        except NotImplementedError:
            raise EoraError(f"{name} is {info.qtype.name}, which gguf-py {_gguf_version()} cannot dequantize: "
                            "requantize the model with another type") from None
        except (ValueError, IndexError, TypeError) as exc:  # a directory entry that contradicts its data
            raise EoraError(f"{self.path}: tensor {name} cannot be read ({exc}): the file is corrupt, "
                            "convert or download it again") from None
        out = np.asarray(out, dtype=np.float32)
        if out.shape != info.shape:
            out = out.reshape(info.shape)
        return out.copy() if np.shares_memory(out, data) else out

    def _read_meta(self) -> GGUFMeta:
        arch = self.field("general.architecture")
        if not isinstance(arch, str):
            raise EoraError(f"{self.path} has no general.architecture: it is not a llama.cpp GGUF")
        general_type = self.field("general.type")

        def num(key: str) -> int | None:
            value = self.field(key.format(arch=arch))
            if isinstance(value, list):  # per-layer arrays (some archs); the first entry is representative
                value = value[0] if value else None
            return _int_or_none(value)

        n_head = num(gguf.Keys.Attention.HEAD_COUNT) or 0
        return GGUFMeta(arch=arch, n_blocks=num(gguf.Keys.LLM.BLOCK_COUNT) or 0,
                        n_embd=num(gguf.Keys.LLM.EMBEDDING_LENGTH) or 0, n_head=n_head,
                        n_head_kv=num(gguf.Keys.Attention.HEAD_COUNT_KV) or n_head,
                        n_ff=num(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
                        file_type=_int_or_none(self.field("general.file_type")),
                        general_type=general_type if isinstance(general_type, str) else None)


def open_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Open a model GGUF for reading; EoraError for a missing, non-GGUF, truncated or adapter file."""
    model = GGUFModel(path)
    meta = model.meta
    if meta.general_type == "adapter":
        raise EoraError(f"{path} is an adapter, not a model: pass the quantized model GGUF")
    for key, value in (("block_count", meta.n_blocks), ("embedding_length", meta.n_embd),
                       ("attention.head_count", meta.n_head)):
        if not value:
            raise EoraError(f"{path} lacks {meta.arch}.{key}: the GGUF is incomplete, convert it again")
    return model


def check_matches(hf_config: Any, model: GGUFModel | str | os.PathLike[str]) -> None:
    """Refuse a GGUF made from another model: arch, layers, hidden size, heads and every adapted weight's shape.

    hf_config: a transformers config or a config.json dict; model: an open GGUFModel or a path.
    Raises EoraError with the first mismatch.
    """
    if not isinstance(model, GGUFModel):
        with open_gguf(model) as opened:
            return check_matches(hf_config, opened)
    dims = model_dims(hf_config)
    meta = model.meta
    where = f"{model.path.name} does not match the HF model"
    hint = "pass the GGUF converted/quantized from this same model"
    for what, hf, gg in (("architecture", dims.arch, meta.arch), ("layers", dims.n_layers, meta.n_blocks),
                         ("hidden size", dims.hidden, meta.n_embd), ("attention heads", dims.n_head, meta.n_head),
                         ("KV heads", dims.n_head_kv, meta.n_head_kv)):
        if hf != gg:
            raise EoraError(f"{where}: {what} {gg} in the GGUF vs {hf} in config.json ({dims.model_type}): {hint}")
    names = NameMap(dims)
    for bid in range(dims.n_layers):
        for module in LINEAR_MODULES:
            name = names.to_gguf(f"model.layers.{bid}.{module}")
            if name not in model:
                raise EoraError(f"{where}: it has no tensor {name}: {hint}")
            got, want = model.tensor(name).shape, dims.linear_shape(module)
            if got != want:
                raise EoraError(f"{where}: {name} is {got[0]}x{got[1]} (out x in), config.json implies "
                                f"{want[0]}x{want[1]}: {hint}")


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise EoraError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EoraError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf made by llama.cpp")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on truncated or corrupt files
        raise EoraError(f"{path} is not a readable GGUF ({type(exc).__name__}: {exc}); "
                        "it may be truncated: convert or download it again") from None


def _check_tensor(path: Path, t: Any) -> None:
    """Refuse a directory entry whose shape or data cannot be this tensor's (llama.cpp refuses it too)."""
    ne = [int(x) for x in t.shape]
    if not ne or any(n <= 0 for n in ne):
        raise EoraError(f"{path}: tensor {t.name} has shape {ne}: the file is corrupt, convert or download it again")
    block, type_size = gguf.GGML_QUANT_SIZES.get(t.tensor_type, (None, None))
    if block is None:
        raise EoraError(f"{path}: tensor {t.name} has unknown type {int(t.tensor_type)}: the file is corrupt or "
                        "from a newer llama.cpp")
    if ne[0] % block:
        raise EoraError(f"{path}: tensor {t.name} has rows of {ne[0]} elements, not a multiple of the "
                        f"{t.tensor_type.name} block ({block}): the file is corrupt, convert it again")
    need = int(np.prod(ne, dtype=object)) // block * type_size
    if int(t.data.nbytes) != need:
        raise EoraError(f"{path}: tensor {t.name} data is not within the file bounds ({t.data.nbytes} of {need} "
                        "bytes): the file is truncated, convert or download it again")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _gguf_version() -> str:
    try:
        return version("gguf")
    except Exception:
        return "?"
