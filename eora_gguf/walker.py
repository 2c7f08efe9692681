"""The layer walker: an HF causal LM run one decoder layer at a time, with processors plugged into each layer.

The model is built on the meta device from its config; only the tensors needed at each step are read from its
safetensors files (`StreamedModel`). First the embeddings (and the final norm) are made real, and one cheap pass
of the base model with every decoder layer stubbed out captures, per batch, the first layer's input and the
keyword arguments each layer receives (attention mask of its type, rotary position embeddings of its type,
position ids): `capture`. Then `walk` runs the decoder layers one at a time over all batches and frees each after
use. Peak memory ~ one decoder layer + embeddings + the activations of all samples (samples*seqlen*hidden*bytes of
the forward dtype); on a GPU they stay there when they fit, else in pinned host memory, one batch on the GPU at a
time (`activation_home`).

Per layer, every `Processor` goes through the same four steps (GPTQModel's looper):
  hook        register forward hooks on the layer's linears (`LayerContext.linears`: HF name -> (module, site))
  accumulate  the hooks see every batch's inputs while the layer runs (`first_batch_done` after batch 0)
  process     the layer's work once all batches ran; it may return new weights {HF module: (out, in)}, which
              replace the layer's linears and, with propagate="compensated", recompute its outputs
  finalize    once, after the last layer
Processors run in the order given and share the `LayerContext` (`results` carries what one hands the next, e.g.
the statistics the solve consumes). Statistics (`calibration`), the EoRA solve (`compensate`), pruning (`prune`)
and validation (`validate`) are processors; checkpoints hook in through `on_layer_done`.

Propagation: "original" feeds each layer the outputs of the original previous layer; "compensated" (EoRA's
sequential mode) feeds the outputs of the layer with the processors' new weights.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import EoraError
from .hf_model import read_config_json, read_tensors, tensor_files

log = logging.getLogger(__name__)

PROPAGATE_MODES = ("original", "compensated")

# Leaf name of a linear module -> the input site it shares with its siblings.
SITE_OF_LEAF = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in",
    "down_proj": "down_in",
}


class _StopForward(Exception):
    pass


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


# safetensors dtype names of the checkpoints a forward can run in as stored
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype of the checkpoint's first decoder-layer matrix (float32 for any other, e.g. F64 or quantized)."""
    from safetensors import safe_open

    name = next((n for n in files if ".layers." in n and n.endswith("proj.weight")), None)
    if name is None:
        return torch.float32
    with safe_open(str(files[name]), framework="pt") as fh:
        return STORED_DTYPES.get(fh.get_slice(name).get_dtype(), torch.float32)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 / AMX); torch has no public query for it."""
    probe = getattr(getattr(torch, "cpu", None), "_is_avx512_bf16_supported", None)
    return bool(probe()) if callable(probe) else False


def forward_dtype(stored: torch.dtype, device: torch.device | None) -> torch.dtype:
    """The dtype the decoder layers run in: the checkpoint's own (bf16, fp16 or fp32) on a GPU; on the CPU bf16
    where the CPU multiplies it natively (4.6x float32's speed on this machine's AVX512-BF16), else float32
    (fp16 and emulated bf16 matmuls are slower than float32 on CPUs). The covariance blocks are float32 either
    way (`calibration.Covariances`): bf16 activations times bf16 activations are exact in float32."""
    if device is not None and device.type == "cuda":
        return stored
    return torch.bfloat16 if stored == torch.bfloat16 and cpu_has_bf16() else torch.float32


class StreamedModel:
    """An HF causal LM whose parameters stay on the meta device until `load_layer` makes one layer real.

    dtype: what the layers run in (their weights are cast to it as they are read); None: `forward_dtype` of the
    checkpoint's dtype on `device` (what calibration does; validation and the embedding solve keep float32)."""

    def __init__(self, model_dir: str | os.PathLike[str], *, attn_implementation: str | None = None,
                 dtype: torch.dtype | None = torch.float32, device: torch.device | None = None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        read_config_json(self.model_dir)
        self.files = tensor_files(self.model_dir)
        self.dtype = dtype if dtype is not None else forward_dtype(stored_dtype(self.files), device)
        try:
            config = AutoConfig.from_pretrained(self.model_dir)
        except Exception as exc:  # ValueError, KeyError, OSError, ... for configs transformers cannot use
            raise EoraError(f"transformers cannot read {self.model_dir}/config.json: "
                            f"{str(exc).splitlines()[0][:300]}") from None
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        # Buffers stay real so rotary inverse frequencies and embedding scales are computed on the CPU.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, **kwargs)
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
        return {n: t.to(self.dtype) for n, t in read_tensors(self.files, names).items()}

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


def linears(layer: nn.Module, layer_name: str) -> dict[str, tuple[nn.Linear, str]]:
    """HF module name -> (module, site name) for the linear modules of one decoder layer."""
    out = {}
    for rel, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            leaf = rel.rsplit(".", 1)[-1]
            out[f"{layer_name}.{rel}"] = (mod, f"{layer_name}.{SITE_OF_LEAF.get(leaf, rel)}")
    return out


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise EoraError(f"NaN/Inf in {what}: the model or its calibration text overflows {str(t.dtype)[6:]} here")


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One decoder layer's output hidden states for one batch (`call`: the extra args `capture` recorded)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def to_device(x: Any, device: torch.device | None) -> Any:
    """x with every tensor inside (tuples, lists, dicts) moved to `device` (None: unchanged)."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


@dataclass
class LayerContext:
    """One decoder layer as the processors see it."""

    index: int
    name: str  # e.g. "model.layers.3"
    layer: nn.Module
    linears: dict[str, tuple[nn.Linear, str]]  # HF module name -> (module, input site)
    results: dict[str, Any] = field(default_factory=dict)  # what a processor hands the next ones

    def weight(self, module: str) -> torch.Tensor:
        """The (out, in) weight of HF module `module` of this layer as the layer holds it now."""
        return self.linears[module][0].weight


class Processor:
    """A pass over the decoder layers; override the steps it needs (each default does nothing)."""

    def hook(self, ctx: LayerContext) -> None:
        """Register forward hooks on ctx.layer's modules (they accumulate while the batches run)."""

    def first_batch_done(self, ctx: LayerContext) -> None:
        """Called once per layer after the first batch ran (checks that need one batch of inputs)."""

    def unhook(self, ctx: LayerContext) -> None:
        """Remove the hooks; called even when the layer's batches failed."""

    def process(self, ctx: LayerContext) -> dict[str, torch.Tensor] | None:
        """The layer's work; may return new weights {HF module name: (out, in)} for the layer."""
        return None

    def finalize(self) -> None:
        """Once, after the last layer."""


def _on(h: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A batch's activations on the layer's device (a no-op unless they live in host memory)."""
    return h if device is None or h.device == device else h.to(device, non_blocking=True)


def _back(out: torch.Tensor, home: torch.Tensor) -> torch.Tensor:
    """A layer's output where its input lived: in place into the (pinned) host buffer when streaming."""
    if out.device == home.device:
        return out
    return home.copy_(out, non_blocking=True)


def _apply_weights(ctx: LayerContext, weights: dict[str, torch.Tensor]) -> None:
    for name, w in weights.items():
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        if key not in ctx.linears:
            raise EoraError(f"compensate() for layer {ctx.index} returned {name}, not a linear of that layer")
        mod = ctx.linears[key][0]
        if tuple(w.shape) != tuple(mod.weight.shape):
            raise EoraError(f"compensate() returned {name} of shape {tuple(w.shape)}, "
                            f"expected {tuple(mod.weight.shape)} (HF layout: out, in)")
        mod._parameters["weight"] = nn.Parameter(w.detach().to(mod.weight.device, mod.weight.dtype),
                                                 requires_grad=False)


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="layer", disable=not sys.stderr.isatty())


FIT_SHARE = 0.5  # activations stay on a GPU when they take at most this share of its free memory at capture


def activation_home(nbytes: int, device: torch.device | None, free: int | None = None) -> torch.device | None:
    """Where the activations of all samples live between layers: on `device` when they fit (CPU: always; GPU:
    at most FIT_SHARE of its free memory, `free` bytes or torch's count), else in pinned host memory, each batch
    copied to the GPU for its turn through the layer (`walk`)."""
    if device is None or device.type != "cuda":
        return device
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    if nbytes <= FIT_SHARE * free:
        return device
    log.info("the activations (%.1f GiB) do not fit on %s (%.1f GiB free): streaming them from pinned host memory",
             nbytes / 2**30, device, free / 2**30)
    return torch.device("cpu")


def _home(h: torch.Tensor, home: torch.device | None, device: torch.device | None) -> torch.Tensor:
    """h moved to `home`; pinned when home is the host of a GPU run (fast asynchronous copies each layer)."""
    if home is None or h.device == home:
        return h
    out = h.to(home)
    return out.pin_memory() if home.type == "cpu" and device is not None and device.type == "cuda" else out


def capture(sm: StreamedModel, batches: Sequence[torch.Tensor], device: torch.device | None = None,
            home: torch.device | str | None = "auto") -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """Per batch of token ids: the first decoder layer's input (on `home`: "auto" = `activation_home`) and each
    layer's extra (args, kwargs) on device."""
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = []
    for ids in batches:
        h, c = sm.capture(ids)
        hidden.append(h)
        calls.append([to_device(call, device) for call in c])
    check_finite(torch.stack([h.abs().amax() for h in hidden]), "the token embeddings")
    if home == "auto":
        home = activation_home(sum(h.numel() * h.element_size() for h in hidden), device)
    return [_home(h, torch.device(home) if home is not None else device, device) for h in hidden], calls


@torch.no_grad()
def walk(sm: StreamedModel, hidden: list[torch.Tensor], calls: list[list[tuple[tuple, dict]]],
         processors: Sequence[Processor], *, propagate: str = "original", device: torch.device | None = None,
         start_layer: int = 0, on_layer_done: Callable[[int, list[torch.Tensor]], None] | None = None,
         desc: str = "calibrate") -> list[torch.Tensor]:
    """Run decoder layers start_layer.. of `sm` over the batches `hidden` (from `capture`, updated in place)
    with `processors`; returns the last layer's outputs per batch. on_layer_done(i, hidden) after each layer gets
    the inputs of layer i + 1 (the compensated outputs in that mode)."""
    if propagate not in PROPAGATE_MODES:
        raise EoraError(f"propagate must be one of {', '.join(PROPAGATE_MODES)}, not {propagate!r}")
    with _progress(len(sm), desc) as bar:
        bar.update(start_layer)
        for i in range(start_layer, len(sm)):
            layer = sm.load_layer(i) if device is None else sm.load_layer(i, device)
            name = sm.layer_name(i)
            ctx = LayerContext(i, name, layer, linears(layer, name))
            for p in processors:
                p.hook(ctx)
            try:
                for b, h in enumerate(hidden):
                    out = run_layer(layer, _on(h, device), calls[b][i])
                    if b == 0:
                        for p in processors:
                            p.first_batch_done(ctx)
                    check_finite(out, f"the output of decoder layer {i} ({name})")
                    if propagate == "original":
                        hidden[b] = _back(out, h)
            finally:
                for p in processors:
                    p.unhook(ctx)
            weights: dict[str, torch.Tensor] = {}
            for p in processors:
                weights.update(p.process(ctx) or {})
            if propagate == "original" and weights:
                raise EoraError("compensate() returned weights but propagate='original': "
                                "use propagate='compensated' to feed them forward")
            if propagate == "compensated":
                _apply_weights(ctx, weights)
                for b, h in enumerate(hidden):
                    out = run_layer(layer, _on(h, device), calls[b][i])
                    check_finite(out, f"the compensated output of decoder layer {i} ({name})")
                    hidden[b] = _back(out, h)
            sm.free_layer(i)
            if device is not None and device.type == "cuda" and hidden and hidden[0].device != device:
                torch.cuda.synchronize(device)  # the host copies of this layer's outputs are complete
            if on_layer_done is not None:
                on_layer_done(i, hidden)
            bar.update(1)
    for p in processors:
        p.finalize()
    return hidden
