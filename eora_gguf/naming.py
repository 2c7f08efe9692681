"""Hugging Face ⇄ GGUF tensor names, the llama Q/K row order, and which linear layers share an input.

Names come from gguf-py's own table (`gguf.get_tensor_name_map`), the one llama.cpp's converter uses:
`model.layers.3.self_attn.q_proj` ⇄ `blk.3.attn_q.weight`.

Row order. For the llama architecture (HF llama and mistral) the converter reorders the output rows of q_proj
and k_proj so llama.cpp's rotary embedding can pair rows its own way: rows are viewed as (groups, 2, half),
axes 1 and 2 are swapped, and the view is flattened back, with groups = n_head for q and n_head_kv for k.
Qwen2/Qwen3/Gemma are stored in HF order. The permutation acts on output rows only, so ΔW and the B factor
carry it and the covariance and the A factor do not.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gguf

from .errors import EoraError

# HF config.model_type -> GGUF general.architecture (what convert_hf_to_gguf.py writes for it)
GGUF_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
PERMUTED_ARCHS = frozenset({"llama"})

# The adapted linear layers of one decoder block, grouped by the activation they read (one covariance each).
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # attention-norm output
    ("self_attn.o_proj",),                                          # attention output
    ("mlp.gate_proj", "mlp.up_proj"),                               # ffn-norm output
    ("mlp.down_proj",),                                             # gated activation
)
LINEAR_MODULES: tuple[str, ...] = tuple(m for group in INPUT_GROUPS for m in group)

_LAYER = re.compile(r"^(?P<prefix>.*?)layers\.(?P<bid>\d+)\.(?P<module>[\w.]+?)(?:\.weight)?$")
# Multimodal wrappers put the text model under another prefix; the converter strips it the same way.
_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


@dataclass(frozen=True)
class ModelDims:
    """The hyper-parameters naming and shape checks need, read from an HF config (object or dict)."""

    model_type: str
    arch: str          # GGUF general.architecture
    n_layers: int
    hidden: int
    n_head: int
    n_head_kv: int
    head_dim: int
    ffn: int

    @property
    def permute_qk(self) -> bool:
        return self.arch in PERMUTED_ARCHS

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of a linear layer named like `self_attn.q_proj` (numpy order of its GGUF tensor)."""
        shapes = {
            "self_attn.q_proj": (self.n_head * self.head_dim, self.hidden),
            "self_attn.k_proj": (self.n_head_kv * self.head_dim, self.hidden),
            "self_attn.v_proj": (self.n_head_kv * self.head_dim, self.hidden),
            "self_attn.o_proj": (self.hidden, self.n_head * self.head_dim),
            "mlp.gate_proj": (self.ffn, self.hidden),
            "mlp.up_proj": (self.ffn, self.hidden),
            "mlp.down_proj": (self.hidden, self.ffn),
        }
        if module not in shapes:
            raise EoraError(f"{module!r} is not one of the adapted modules: {', '.join(LINEAR_MODULES)}")
        return shapes[module]


def gguf_arch(model_type: str) -> str:
    """GGUF architecture name for an HF model_type; EoraError naming the supported ones otherwise."""
    if model_type not in GGUF_ARCH:
        raise EoraError(f"model type {model_type!r} is not supported: use one of {', '.join(sorted(GGUF_ARCH))}")
    return GGUF_ARCH[model_type]


def model_dims(config: Any) -> ModelDims:
    """Read ModelDims from a transformers config or a config.json dict (a nested text_config is used)."""
    get = _getter(config)
    model_type = get("model_type")
    text = get("text_config")
    if text is not None and get("num_hidden_layers") is None:
        get = _getter(text)
    arch = gguf_arch(str(model_type))
    try:
        hidden, n_head = int(get("hidden_size")), int(get("num_attention_heads"))
        n_kv = get("num_key_value_heads")
        head_dim = get("head_dim")
        return ModelDims(model_type=str(model_type), arch=arch, n_layers=int(get("num_hidden_layers")),
                         hidden=hidden, n_head=n_head, n_head_kv=int(n_kv) if n_kv else n_head,
                         head_dim=int(head_dim) if head_dim else hidden // n_head,
                         ffn=int(get("intermediate_size")))
    except (TypeError, ValueError) as exc:
        raise EoraError(f"the {model_type} config lacks a size field ({exc}): is config.json complete?") from None


class NameMap:
    """HF module names ⇄ GGUF tensor names for one model, and its Q/K row order."""

    def __init__(self, dims: ModelDims, *, hf_prefix: str = "model.") -> None:
        self.dims = dims
        self.hf_prefix = hf_prefix
        self._map = gguf.get_tensor_name_map(arch_enum(dims.arch), dims.n_layers)

    @classmethod
    def from_config(cls, config: Any, *, hf_prefix: str = "model.") -> NameMap:
        return cls(model_dims(config), hf_prefix=hf_prefix)

    def to_gguf(self, hf_module: str) -> str:
        """`model.layers.3.self_attn.q_proj` (with or without `.weight`) -> `blk.3.attn_q.weight`."""
        bid, module = self.split(hf_module)
        name = self._map.get_name(f"model.layers.{bid}.{module}")
        if name is None:
            raise EoraError(f"no GGUF name for HF module {hf_module!r} in architecture {self.dims.arch}")
        return name + ".weight"

    def to_hf(self, gguf_name: str) -> str:
        """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj` (the module, without `.weight`)."""
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)(?:\.weight)?", gguf_name)
        for module in LINEAR_MODULES if m else ():
            if self._map.get_name(f"model.layers.{m[1]}.{module}") == f"blk.{m[1]}.{m[2]}":
                return f"{self.hf_prefix}layers.{m[1]}.{module}"
        raise EoraError(f"GGUF tensor {gguf_name!r} is not an adapted linear layer of this {self.dims.arch} model")

    def split(self, hf_module: str) -> tuple[int, str]:
        """`model.layers.3.self_attn.q_proj` -> (3, 'self_attn.q_proj'); EoraError if not an adapted module."""
        name = hf_module
        for prefix in _HF_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix):]
                break
        m = _LAYER.match(name)
        if not m or m["prefix"] != "model." or m["module"] not in LINEAR_MODULES:
            raise EoraError(f"{hf_module!r} is not an adapted linear layer "
                            f"(model.layers.N.<{'|'.join(LINEAR_MODULES)}>)")
        bid = int(m["bid"])
        if bid >= self.dims.n_layers:
            raise EoraError(f"{hf_module!r}: the model has only {self.dims.n_layers} layers")
        return bid, m["module"]

    def modules(self) -> list[str]:
        """All adapted HF modules, block by block, in INPUT_GROUPS order."""
        return [f"{self.hf_prefix}layers.{b}.{m}" for b in range(self.dims.n_layers) for m in LINEAR_MODULES]

    def input_groups(self, bid: int) -> list[list[str]]:
        """HF module names of block `bid` grouped by shared input: [[q, k, v], [o], [gate, up], [down]]."""
        return [[f"{self.hf_prefix}layers.{bid}.{m}" for m in group] for group in INPUT_GROUPS]

    def row_groups(self, hf_module: str) -> int | None:
        """Number of row groups the converter permutes this module's rows with, or None when it does not."""
        if not self.dims.permute_qk:
            return None
        _, module = self.split(hf_module)
        return {"self_attn.q_proj": self.dims.n_head, "self_attn.k_proj": self.dims.n_head_kv}.get(module)

    def hf_to_gguf_rows(self, hf_module: str, x: Any) -> Any:
        """Rows (axis 0) of a weight, bias or B factor of `hf_module`, from HF order into GGUF order."""
        groups = self.row_groups(hf_module)
        return x if groups is None else permute_rows(x, groups)

    def gguf_to_hf_rows(self, hf_module: str, x: Any) -> Any:
        """Inverse of `hf_to_gguf_rows`."""
        groups = self.row_groups(hf_module)
        return x if groups is None else unpermute_rows(x, groups)


def permute_rows(x: Any, groups: int) -> Any:
    """HF -> GGUF order of axis 0 (numpy array or torch tensor, any trailing shape): view the d rows as
    (groups, 2, d/groups/2), swap the last two of those axes, flatten back. Same as the converter's permute."""
    d = _check_rows(x, groups)
    return x.reshape(groups, 2, d // groups // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: Any, groups: int) -> Any:
    """GGUF -> HF order of axis 0: the inverse of `permute_rows`."""
    d = _check_rows(x, groups)
    return x.reshape(groups, d // groups // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _check_rows(x: Any, groups: int) -> int:
    d = int(x.shape[0])
    if groups <= 0 or d % (2 * groups):
        raise EoraError(f"cannot permute {d} rows in {groups} head groups: row count must be a multiple of 2×groups")
    return d


def arch_enum(arch: str) -> gguf.MODEL_ARCH:
    for enum, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return enum
    raise EoraError(f"gguf-py does not know architecture {arch!r}")


def _getter(config: Any):
    if isinstance(config, Mapping):
        return lambda key: config.get(key)
    return lambda key: getattr(config, key, None)
