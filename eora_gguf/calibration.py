"""Layer-streaming calibration: input covariances of every linear layer of an HF causal LM.

The model is built on the meta device from its config; only the tensors needed at each step are read from
its safetensors files. First the embeddings (and the final norm) are made real, and one cheap pass of the
base model with every decoder layer stubbed out captures, per batch, the first layer's input and the
keyword arguments each layer receives (attention mask of its type, rotary position embeddings of its type,
position ids). Then the decoder layers run one at a time over all batches, and are freed after use.
Peak memory ~ one decoder layer + embeddings + the activations of all samples (samples*seqlen*hidden*4 bytes).

Per layer, forward hooks on the linear modules accumulate C = Σ x xᵀ (float64) per input *site*:
q/k/v share `attn_in`, gate/up share `mlp_in`, o_proj reads `o_in`, down_proj reads `down_in`
(any other linear gets a site of its own). Each batch's block XᵀX is one float32 matmul, added into float64.

Propagation: "original" feeds each layer the outputs of the original previous layer. "compensated" (EoRA's
sequential mode) calls `compensate(layer_index, layer_stats)` after a layer's statistics are complete; the
weights it returns (HF module name -> (out, in) tensor) replace that layer's linear weights, and the layer's
outputs are recomputed with them to feed the next layer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)

FORMAT = "eora-gguf.calibration-stats"
FORMAT_VERSION = "1"

# Leaf name of a linear module -> the input site it shares with its siblings.
SITE_OF_LEAF = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in",
    "down_proj": "down_in",
}
PROPAGATE_MODES = ("original", "compensated")
# config.json keys that do not change the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_attn_implementation", "attn_implementation", "_commit_hash"}

Compensate = Callable[[int, "CalibrationStats"], "dict[str, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------- statistics

@dataclass
class CalibrationStats:
    """Input statistics of linear layers.

    covariances[site]: (d_in, d_in) float64, Σ over calibration tokens of x xᵀ (not divided by n).
    n_tokens[site]: tokens summed into it. module_sites[hf_module_name] -> site (e.g.
    "model.layers.3.self_attn.q_proj" -> "model.layers.3.attn_in"). meta: model identity
    (see `model_identity`), calibration fingerprint, samples, seqlen, tokens, propagate mode.
    """

    covariances: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: dict[str, int] = field(default_factory=dict)
    module_sites: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def covariance(self, module: str) -> torch.Tensor:
        """Mean covariance E[x xᵀ] (d_in, d_in) float64 of the input of HF module `module`."""
        site = self.module_sites.get(module)
        if site is None or site not in self.covariances:
            raise EoraError(f"no calibration statistics for {module}: calibrate this model again")
        return self.covariances[site] / max(self.n_tokens[site], 1)

    def modules(self, layer: int | None = None) -> list[str]:
        """HF names of the linear modules covered (of one decoder layer when `layer` is given)."""
        names = [m for m, s in self.module_sites.items() if s in self.covariances]
        if layer is not None:
            names = [m for m in names if _layer_of(m) == layer]
        return names

    def update(self, other: CalibrationStats) -> None:
        self.covariances.update(other.covariances)
        self.n_tokens.update(other.n_tokens)
        self.module_sites.update(other.module_sites)

    def save(self, path: str | os.PathLike[str], *, inputs: tuple[str | os.PathLike[str], ...] = ()) -> None:
        """Write as safetensors (one float64 tensor per site; the rest as JSON metadata), atomically.

        inputs: files and folders `path` must not be, nor lie in (the model's folder)."""
        from safetensors.torch import save_file

        tensors = {site: cov.contiguous() for site, cov in self.covariances.items()}
        metadata = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "n_tokens": json.dumps(self.n_tokens), "module_sites": json.dumps(self.module_sites),
            "meta": json.dumps(self.meta),
        }
        with atomic_output(path, suffix=".safetensors", inputs=inputs) as tmp:
            try:
                save_file(tensors, str(tmp), metadata=metadata)
            except Exception as exc:  # safetensors reports a full disk as its own error type
                raise EoraError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationStats:
        from safetensors import safe_open

        if not Path(path).is_file():
            raise EoraError(f"calibration statistics {path} do not exist: run calibration first")
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise EoraError(f"{path} is not an eora-gguf calibration statistics file")
                if metadata.get("version") != FORMAT_VERSION:
                    raise EoraError(f"{path} has statistics format version {metadata.get('version')}, "
                                    f"this eora-gguf reads {FORMAT_VERSION}: calibrate again")
                covs = {k: fh.get_tensor(k) for k in fh.keys()}
        except EoraError:
            raise
        except Exception as exc:  # safetensors raises its own types for truncated or foreign files
            raise EoraError(f"cannot read calibration statistics {path}: {exc}") from None
        return cls(covs, json.loads(metadata["n_tokens"]), json.loads(metadata["module_sites"]),
                   json.loads(metadata["meta"]))

    def check_model(self, model_dir: str | os.PathLike[str]) -> None:
        """Refuse (EoraError) if these statistics were not collected on the model in `model_dir`."""
        mine, theirs = self.meta.get("model", {}), model_identity(model_dir)
        for key in ("architecture", "num_layers", "hidden_size", "config_sha256", "weights_sha256"):
            if mine.get(key) != theirs.get(key):
                raise EoraError(f"calibration statistics were collected on another model ({key}: "
                                f"{mine.get(key)} vs {theirs.get(key)} in {model_dir}): calibrate this model")


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


# ------------------------------------------------------------------------------------------ model on disk

def _read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise EoraError(f"{model_dir} has no config.json: point --hf at a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except UnicodeDecodeError:
        raise EoraError(f"{path} is not UTF-8 text: restore the model's config.json") from None
    except json.JSONDecodeError as exc:
        raise EoraError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                        "restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise EoraError(f"{path} holds a JSON {type(cfg).__name__}, not an object: restore the model's config.json")
    return cfg


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_folder(model_dir: str | os.PathLike[str], *, tokenizer: bool = True) -> dict[str, Any]:
    """Refuse (EoraError, naming the file and the fix) an HF model folder we cannot use; return its config.

    Checks: the folder exists and is not empty; config.json is a JSON object with a model_type; the safetensors
    checkpoint exists, every file is complete and lists every shard; the sizes in config.json agree with the
    weights (vocabulary, hidden size, layers, MLP width); with `tokenizer`, that tokenizer files are there.
    """
    from safetensors import safe_open

    d = Path(model_dir)
    if not d.exists():
        raise EoraError(f"HF model folder {d} does not exist")
    if not d.is_dir():
        raise EoraError(f"{d} is not a folder: point at a Hugging Face model folder (config.json, *.safetensors)")
    if not any(d.iterdir()):
        raise EoraError(f"HF model folder {d} is empty (no config.json, no safetensors): download or save the model "
                        "into it")
    cfg = _read_config_json(d)
    text = cfg.get("text_config", cfg)
    if not isinstance(text, dict) or not isinstance(cfg.get("model_type"), str):
        raise EoraError(f"{d / 'config.json'} has no model_type: it is not a transformers config, restore it")
    files = tensor_files(d)
    shapes: dict[str, list[int]] = {}
    for path in sorted(set(files.values())):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    shapes[name] = list(fh.get_slice(name).get_shape())
        except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
            raise EoraError(f"{path} cannot be read ({str(exc).splitlines()[0]}): it is truncated or not a "
                            "safetensors file, download the model again") from None
    missing = [n for n in files if n not in shapes]
    if missing:
        raise EoraError(f"{d}: the index lists {missing[0]} but no shard holds it: download the model again")
    _check_sizes(d, text, shapes)
    if tokenizer:
        check_tokenizer_files(d)
    return cfg


def check_tokenizer_files(model_dir: str | os.PathLike[str]) -> None:
    d = Path(model_dir)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise EoraError(f"{d} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the model's tokenizer files "
                        "into it")


def _check_sizes(d: Path, text: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """config.json's sizes against the checkpoint's tensor shapes (the first mismatch is an EoraError)."""
    def want(key: str) -> int | None:
        v = text.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def found(suffix: str) -> list[int] | None:
        return next((s for n, s in shapes.items() if n.endswith(suffix)), None)

    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads"):
        if key in text and (want(key) is None or want(key) <= 0):
            raise EoraError(f"{d / 'config.json'}: {key} is {text[key]!r}, not a positive integer: restore it")
    layers = {int(m) for n in shapes for m in re.findall(r"\.layers\.(\d+)\.", n)}
    checks = []
    emb = found("embed_tokens.weight")
    if emb and len(emb) == 2:
        checks += [("vocab_size", emb[0], "embed_tokens rows"), ("hidden_size", emb[1], "embed_tokens width")]
    gate = found("layers.0.mlp.gate_proj.weight") or found("layers.0.mlp.up_proj.weight")
    if gate and len(gate) == 2:
        checks += [("intermediate_size", gate[0], "the MLP width"), ("hidden_size", gate[1], "the MLP input")]
    if layers:
        checks.append(("num_hidden_layers", max(layers) + 1, "decoder layers"))
    if not shapes:
        raise EoraError(f"{d}: the safetensors checkpoint holds no tensors: download the model again")
    for key, got, what in checks:
        if want(key) is not None and want(key) != got:
            raise EoraError(f"{d / 'config.json'} says {key} = {want(key)} but the weights have {got} ({what}): "
                            "config.json and the weights are from different models, restore the right config.json")


def tensor_files(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Checkpoint tensor name -> safetensors file (single file or sharded with an index)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (ValueError, AttributeError) as exc:
            raise EoraError(f"{index} is not a valid index ({exc}): download the model again") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise EoraError(f"shard {f.name} listed in {index.name} is missing: download the model again")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as fh:
                return {name: single for name in fh.keys()}
        except Exception as exc:  # truncated or not safetensors
            raise EoraError(f"{single} cannot be read ({str(exc).splitlines()[0]}): it is truncated or not a "
                            "safetensors file, download the model again") from None
    raise EoraError(f"{model_dir} has no model.safetensors(.index.json): only safetensors checkpoints are read")


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for name in group:
                out[name] = fh.get_tensor(name)
    return out


def model_identity(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model for its statistics: architecture, sizes, a hash of config.json (volatile keys
    dropped), and a hash of the tensor names/shapes plus the first rows of one layer-0 weight."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = _read_config_json(model_dir)
    text_cfg = cfg.get("text_config", cfg)
    canon = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    files = tensor_files(model_dir)
    shapes: dict[str, list[int]] = {}
    probe_name = next((n for n in sorted(files) if ".layers.0." in n and n.endswith("proj.weight")), None)
    probe = None
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                shapes[name] = list(sl.get_shape())
                if name == probe_name:
                    probe = sl[:8].to(torch.float32).contiguous()
    h = hashlib.sha256(json.dumps(sorted(shapes.items())).encode())
    if probe is not None:
        h.update(probe.numpy().tobytes())
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        "model_type": cfg.get("model_type"),
        "num_layers": text_cfg.get("num_hidden_layers"),
        "hidden_size": text_cfg.get("hidden_size"),
        "config_sha256": hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
    }


# ------------------------------------------------------------------------------------- streamed skeleton

class _StopForward(Exception):
    pass


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    """An HF causal LM whose parameters stay on the meta device until `load_layer` makes one layer real."""

    def __init__(self, model_dir: str | os.PathLike[str], *, attn_implementation: str | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        _read_config_json(self.model_dir)
        self.files = tensor_files(self.model_dir)
        try:
            config = AutoConfig.from_pretrained(self.model_dir)
        except Exception as exc:  # ValueError, KeyError, OSError, ... for configs transformers cannot use
            raise EoraError(f"transformers cannot read {self.model_dir}/config.json: "
                            f"{str(exc).splitlines()[0][:300]}") from None
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        # Buffers stay real so rotary inverse frequencies and embedding scales are computed on the CPU.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        self.model.eval()
        self.config = self.model.config
        self.base = self.model.base_model
        self.layers = getattr(self.base, "layers", None)
        if not isinstance(self.layers, nn.ModuleList):
            raise EoraError(f"{type(self.model).__name__} has no decoder layer list: architecture not supported")
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layers_prefix = names[id(self.layers)]
        base_prefix = names[id(self.base)]
        outer = [n for n, _ in self.model.named_parameters()
                 if n.startswith(base_prefix + ".") and not n.startswith(self.layers_prefix + ".")]
        for name, value in self._read(outer).items():
            _set_param(self.model, name, value)

    def __len__(self) -> int:
        return len(self.layers)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.files]
        if missing:
            raise EoraError(f"checkpoint in {self.model_dir} lacks tensor {missing[0]}: "
                            "it does not match its config.json (is it a causal LM checkpoint?)")
        return {n: t.to(torch.float32) for n, t in _read_tensors(self.files, names).items()}

    def layer_name(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}"

    def load_layer(self, i: int, device: torch.device | None = None) -> nn.Module:
        layer = self.layers[i]
        prefix = self.layer_name(i) + "."
        values = self._read([prefix + n for n, _ in layer.named_parameters()])
        for name, value in values.items():
            _set_param(layer, name[len(prefix):], value if device is None else value.to(device))
        if device is not None:
            layer.to(device)  # its buffers
        return layer

    def free_layer(self, i: int) -> None:
        layer = self.layers[i]
        for name, p in list(layer.named_parameters()):
            _set_param(layer, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """First decoder layer's input (batch, seq, hidden) and, per layer, the extra (args, kwargs) it gets."""
        calls: list[tuple[tuple, dict] | None] = [None] * len(self.layers)
        first: list[torch.Tensor] = []

        def stub(i: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    first.append(hidden)
                kwargs.pop("past_key_values", None)
                calls[i] = (tuple(args[1:]), kwargs)
                if i == len(self.layers) - 1:
                    raise _StopForward
                return hidden
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            self.base(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        if not first or any(c is None for c in calls):
            raise EoraError(f"{type(self.model).__name__} did not call its decoder layers in order: "
                            "architecture not supported")
        return first[0], calls  # type: ignore[return-value]


def _linears(layer: nn.Module, layer_name: str) -> dict[str, tuple[nn.Linear, str]]:
    """HF module name -> (module, site name) for the linear modules of one decoder layer."""
    out = {}
    for rel, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            leaf = rel.rsplit(".", 1)[-1]
            out[f"{layer_name}.{rel}"] = (mod, f"{layer_name}.{SITE_OF_LEAF.get(leaf, rel)}")
    return out


class _Accumulator:
    """Forward hooks summing XᵀX per site; the first module of a site sums, its siblings are checked once."""

    def __init__(self, linears: dict[str, tuple[nn.Linear, str]], dtype: torch.dtype):
        self.dtype = dtype
        self.covs: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self.seen: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.checking = True
        self.handles = []
        for name, (mod, site) in linears.items():
            self.owner.setdefault(site, name)
            self.handles.append(mod.register_forward_hook(self._hook(name, site)))

    def _hook(self, name: str, site: str):
        def hook(module, args, output):
            x = args[0]
            if self.checking:
                self.seen.setdefault(site, []).append((name, x))
            if self.owner[site] != name:
                return
            x = x.reshape(-1, x.shape[-1])
            block = x.to(self.dtype)
            block = block.T @ block
            if site in self.covs:
                self.covs[site] += block
            else:
                self.covs[site] = block.to(torch.float64)
            self.counts[site] = self.counts.get(site, 0) + x.shape[0]
        return hook

    def end_first_batch(self) -> None:
        for site, entries in self.seen.items():
            ref_name, ref = entries[0]
            for name, x in entries[1:]:
                if x is not ref and not torch.equal(x, ref):
                    raise EoraError(f"{name} and {ref_name} were expected to share one input: "
                                    "this architecture is not supported")
        self.seen.clear()
        self.checking = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise EoraError(f"NaN/Inf in {what}: the model or its calibration text overflows float32 here")


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _apply_weights(layer: nn.Module, linears: dict[str, tuple[nn.Linear, str]],
                   weights: dict[str, torch.Tensor], layer_index: int) -> None:
    for name, w in weights.items():
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        if key not in linears:
            raise EoraError(f"compensate() for layer {layer_index} returned {name}, not a linear of that layer")
        mod = linears[key][0]
        if tuple(w.shape) != tuple(mod.weight.shape):
            raise EoraError(f"compensate() returned {name} of shape {tuple(w.shape)}, "
                            f"expected {tuple(mod.weight.shape)} (HF layout: out, in)")
        mod._parameters["weight"] = nn.Parameter(w.detach().to(mod.weight.device, torch.float32),
                                                 requires_grad=False)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not sys.stderr.isatty())


@torch.no_grad()
def stream(model_dir: str | os.PathLike[str], input_ids: torch.Tensor, *, batch_size: int = 8,
           propagate: str = "original", compensate: Compensate | None = None, keep: bool = True,
           accumulate_dtype: torch.dtype = torch.float32, calib_fingerprint: str | None = None,
           attn_implementation: str | None = None, return_hidden: bool = True,
           device: str | torch.device | None = None, start_layer: int = 0,
           hidden_in: list[torch.Tensor] | None = None,
           on_layer_done: Callable[[int, list[torch.Tensor]], None] | None = None
           ) -> tuple[CalibrationStats, torch.Tensor | None]:
    """Run the model layer by layer over `input_ids` (samples, seqlen); return the statistics and (when
    return_hidden) the last decoder layer's output (samples, seqlen, hidden) before the final norm.

    compensate(layer_index, layer_stats) -> {hf_module_name: weight (out, in)}: required for
    propagate="compensated"; in "original" mode it is optional, called for every layer and its return
    value must be empty (use it to consume statistics as they arrive, with keep=False to not retain them).
    accumulate_dtype: dtype of each batch's XᵀX block before it is added into the float64 sum.
    device: where each decoder layer, the activations and the covariance sums live (default CPU); the layer
    statistics handed to `compensate` stay there, the kept ones are copied to the CPU.
    Under torchrun (`distributed`), each process runs its share of the samples and the sums are all-reduced;
    the returned hidden states are this process's share.
    start_layer, hidden_in: resume at decoder layer `start_layer` with `hidden_in`, the per-batch inputs of that
    layer saved by `on_layer_done(i, hidden)`, which is called after each layer with its outputs (the inputs of
    layer i + 1, compensated outputs in that mode).
    """
    if propagate not in PROPAGATE_MODES:
        raise EoraError(f"propagate must be one of {', '.join(PROPAGATE_MODES)}, not {propagate!r}")
    if propagate == "compensated" and compensate is None:
        raise EoraError("propagate='compensated' needs a compensate(layer_index, stats) callback")
    if input_ids.ndim != 2 or input_ids.shape[0] < 1:
        raise EoraError(f"calibration input_ids must be (samples, seqlen), got {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise EoraError(f"batch size must be >= 1, got {batch_size}")
    sm = StreamedModel(model_dir, attn_implementation=attn_implementation)
    vocab = sm.config.get_text_config().vocab_size
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        raise EoraError(f"calibration token ids fall outside the model vocabulary of {vocab}: "
                        "tokenize with this model's tokenizer")
    samples, seqlen = input_ids.shape
    dev = torch.device(device) if device is not None else None
    stats = CalibrationStats(meta={
        "model": model_identity(model_dir), "calibration": calib_fingerprint, "samples": int(samples),
        "seqlen": int(seqlen), "tokens": int(samples * seqlen), "propagate": propagate,
    })
    batches = list(distributed.shard_samples(input_ids.long()).split(batch_size))
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    for ids in batches:
        h, c = sm.capture(ids)
        hidden.append(_to(h, dev))
        calls.append([_to(call, dev) for call in c])
    _check_finite(torch.stack([h.abs().amax() for h in hidden]), "the token embeddings")
    if hidden_in is not None:
        if [tuple(h.shape) for h in hidden_in] != [tuple(h.shape) for h in hidden]:
            raise EoraError("the saved activations do not match this calibration's batches: start again")
        hidden = [_to(h, dev) for h in hidden_in]

    with _progress(len(sm), "calibrate") as bar:
        bar.update(start_layer)
        for i in range(start_layer, len(sm)):
            layer = sm.load_layer(i) if dev is None else sm.load_layer(i, dev)
            name = sm.layer_name(i)
            linears = _linears(layer, name)
            acc = _Accumulator(linears, accumulate_dtype)
            try:
                for b, h in enumerate(hidden):
                    out = _run_layer(layer, h, calls[b][i])
                    if b == 0:
                        acc.end_first_batch()
                    _check_finite(out, f"the output of decoder layer {i} ({name})")
                    if propagate == "original":
                        hidden[b] = out
            finally:
                acc.remove()
            distributed.all_reduce_sums(acc.covs, acc.counts)
            for site, cov in acc.covs.items():
                _check_finite(cov, f"the inputs of {site} (decoder layer {i})")
            layer_stats = CalibrationStats(acc.covs, acc.counts, {m: s for m, (_, s) in linears.items()},
                                           stats.meta)
            if compensate is not None:
                weights = compensate(i, layer_stats) or {}
                if propagate == "original" and weights:
                    raise EoraError("compensate() returned weights but propagate='original': "
                                    "use propagate='compensated' to feed them forward")
                if propagate == "compensated":
                    _apply_weights(layer, linears, weights, i)
                    for b, h in enumerate(hidden):
                        hidden[b] = _run_layer(layer, h, calls[b][i])
                        _check_finite(hidden[b], f"the compensated output of decoder layer {i} ({name})")
            if keep:
                stats.update(CalibrationStats({k: v.cpu() for k, v in layer_stats.covariances.items()},
                                              layer_stats.n_tokens, layer_stats.module_sites))
            else:
                stats.module_sites.update(layer_stats.module_sites)
            sm.free_layer(i)
            if on_layer_done is not None:
                on_layer_done(i, hidden)
            bar.update(1)
    log.info("calibrated %d layers on %d tokens (%s propagation)", len(sm), samples * seqlen, propagate)
    return stats, (torch.cat(hidden, dim=0).cpu() if return_hidden else None)


def _to(x: Any, device: torch.device | None) -> Any:
    """x with every tensor inside (tuples, lists, dicts) moved to `device` (None: unchanged)."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def collect_stats(model_dir: str | os.PathLike[str], input_ids: torch.Tensor, **kwargs: Any) -> CalibrationStats:
    """Input covariances of every decoder-layer linear of the HF model in `model_dir`; see `stream`."""
    return stream(model_dir, input_ids, return_hidden=False, **kwargs)[0]
