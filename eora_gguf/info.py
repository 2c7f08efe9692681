"""`eora-gguf info`: what a GGUF file is (model or adapter) and whether an adapter fits a base.

Adapters written by eora-gguf record what they are in their own key namespace (`eora.*`, beside llama.cpp's
`adapter.*` keys, which the loader reads; it ignores keys it does not know):

  eora.version            the eora-gguf version that wrote the file
  eora.method             eora | svd | diag
  eora.rank               the rank of every pair, or the largest one when ranks differ (`--budget`)
  eora.budget             the byte budget it was allocated under (budget adapters only)
  eora.propagate          original | compensated
  eora.calibration        the calibration spec (`--calib`, e.g. `arc_challenge:1,demo:1`)
  eora.calibration_tokens calibration tokens the statistics were collected over
  eora.base_model         the base GGUF's file name
  eora.base_sha256        sha256 of the whole base GGUF file (as `sha256sum` prints it)
  eora.name               the adapter's name in `eora-gguf make` (also llama.cpp's `adapter.lora.task_name`,
                          which llama-server lists in `/lora-adapters`)

`check_fit` checks an adapter against a base the way llama.cpp's loader does (architecture, every pair's base
tensor present, shapes), then compares the recorded base identity: a different sha256 with fitting shapes means
the adapter loads but was solved against another quantization of the model.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__
from . import adapter as adapter_io
from .cache import sha256_of
from .errors import EoraError
from .gguf_io import GGUFModel, open_gguf

log = logging.getLogger(__name__)

KEY_VERSION = "eora.version"
KEY_CALIB_TOKENS = "eora.calibration_tokens"
KEY_BASE_SHA256 = "eora.base_sha256"
KEY_NAME = "eora.name"
TASK_NAME = "adapter.lora.task_name"  # llama.cpp's own key: llama-server shows it in /lora-adapters


def provenance(base_path: str | os.PathLike[str], *, calib_tokens: int | None, name: str | None = None
               ) -> dict[str, str | int]:
    """The `eora.*` keys every adapter records beside method, rank and calibration spec: version, calibration
    token count, base file name and sha256 and, when given, the adapter's name."""
    meta: dict[str, str | int] = {KEY_VERSION: __version__, "eora.base_model": Path(base_path).name,
                                  KEY_BASE_SHA256: sha256_of(base_path)}
    if calib_tokens is not None:
        meta[KEY_CALIB_TOKENS] = int(calib_tokens)
    if name:
        meta[KEY_NAME] = name
        meta[TASK_NAME] = name
    return meta


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the file is: kind, architecture, bytes, tensor types; for an adapter also its pairs, ranks, runtime
    scale and every `eora.*` key it records."""
    p = Path(path)
    model = GGUFModel(p)
    try:
        kind = model.meta.general_type or "model"
        out: dict[str, Any] = {"file": str(p), "kind": kind, "architecture": model.meta.arch,
                               "bytes": p.stat().st_size, "tensors": len(model.names),
                               "name": model.field("general.name")}
        if kind != "adapter":
            types = Counter(model.tensor(n).qtype.name for n in model.names)
            out.update(layers=model.meta.n_blocks, embedding_length=model.meta.n_embd,
                       file_type=model.meta.file_type, tensor_types=dict(types.most_common()))
            return out
        eora = {k: model.field(k) for k in model.reader.fields if k.startswith("eora.")}
    finally:
        model.close()
    info = adapter_io.lora_info(p)
    ranks = sorted(info.ranks.values())
    scales = {round(info.scale(n), 6) for n in info.ranks}
    out.update(pairs=len(ranks), rank_min=ranks[0], rank_max=ranks[-1],
               rank_mean=round(sum(ranks) / len(ranks), 2), alpha=info.alpha,
               runtime_scale=scales.pop() if len(scales) == 1 else "varies",
               storage_types=dict(Counter(t for pair in info.types.values() for t in pair).most_common()),
               eora=eora)
    return out


def check_fit(adapter: str | os.PathLike[str], base: str | os.PathLike[str]) -> dict[str, Any]:
    """Does `adapter` fit `base`? EoraError (one line) when llama.cpp would refuse the pair; otherwise a verdict
    line, and whether the base is the very file the adapter was solved against (None when not recorded)."""
    a, b = Path(adapter), Path(base)
    with open_gguf(b) as base_model:
        adapter_io.lora_info(a)  # a broken adapter is its own error, not a verdict about the pair
        try:
            info = adapter_io.check_gguf_lora(a, base_model, require_unit_scale=False)
        except EoraError as exc:
            raise EoraError(f"does not fit: {exc}") from None
    recorded = GGUFModel(a)
    try:
        sha = recorded.field(KEY_BASE_SHA256)
        made_for = recorded.field("eora.base_model")
    finally:
        recorded.close()
    same = None if sha is None else sha == sha256_of(b)
    what = f"{len(info.ranks)} LoRA pairs, architecture {info.arch}"
    if same is None:
        verdict = f"fits: {a.name} loads on {b.name} ({what}); it records no base identity"
    elif same:
        verdict = f"fits: {a.name} was solved against this very file {b.name} ({what})"
    else:
        verdict = (f"fits, but solved against another base ({made_for}): names and shapes match ({what}), the "
                   f"sha256 differs, so its correction does not fit these quantized weights")
    return {"adapter": str(a), "base": str(b), "fits": True, "same_base": same, "verdict": verdict}


def format_info(desc: dict[str, Any]) -> str:
    """Human-readable lines of `describe`'s result."""
    lines = [f"{desc['file']}: {desc['kind']}, architecture {desc['architecture']}, {desc['bytes'] / 1e6:.2f} MB, "
             f"{desc['tensors']} tensors"]
    if desc["kind"] == "adapter":
        rank = (str(desc["rank_max"]) if desc["rank_min"] == desc["rank_max"]
                else f"{desc['rank_min']}..{desc['rank_max']} (mean {desc['rank_mean']})")
        lines.append(f"  {desc['pairs']} LoRA pairs, rank {rank}, alpha {desc['alpha']:g}, runtime scale "
                     f"{desc['runtime_scale']}, storage {_counts(desc['storage_types'])}")
        for k, v in desc["eora"].items():
            lines.append(f"  {k}: {v}")
        if not desc["eora"]:
            lines.append("  no eora.* keys: not written by eora-gguf")
    elif "tensor_types" in desc:
        lines.append(f"  {desc['layers']} layers, embedding length {desc['embedding_length']}, tensor types "
                     f"{_counts(desc['tensor_types'])}")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


__all__ = ["check_fit", "describe", "format_info", "provenance"]
