"""The Hugging Face model on disk: folder checks, its config and tokenizer, its safetensors, its identity.

Everything that reads an HF model folder without running it: `check_model_folder` (one-line errors naming the
file and the fix), `read_config_json` / `load_config` (the raw JSON / transformers' config), `load_tokenizer`,
`calibration_ids` (calibration text tokenized with the model's tokenizer), `tensor_files` / `read_tensors` (the
checkpoint, single or sharded) and `model_identity` (what calibration statistics record to refuse another model).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import calib_data
from .errors import EoraError

# config.json keys that do not change the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_attn_implementation", "attn_implementation", "_commit_hash"}


def read_config_json(model_dir: Path) -> dict[str, Any]:
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
    d = Path(model_dir)
    if not d.exists():
        raise EoraError(f"HF model folder {d} does not exist")
    if not d.is_dir():
        raise EoraError(f"{d} is not a folder: point at a Hugging Face model folder (config.json, *.safetensors)")
    if not any(d.iterdir()):
        raise EoraError(f"HF model folder {d} is empty (no config.json, no safetensors): download or save the model "
                        "into it")
    cfg = read_config_json(d)
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


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
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
    model_dir = Path(model_dir)
    cfg = read_config_json(model_dir)
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



def load_config(hf_dir: str | os.PathLike[str]):
    """transformers' config of the model in `hf_dir` (EoraError in one line for a folder or config it cannot use)."""
    from transformers import AutoConfig

    hf = Path(hf_dir)
    if not (hf / "config.json").is_file():
        raise EoraError(f"{hf} is not a Hugging Face model folder (no config.json)")
    read_config_json(hf)  # one-line errors for a broken file
    try:
        return AutoConfig.from_pretrained(hf)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ... for configs it cannot use
        raise EoraError(f"transformers cannot use {hf / 'config.json'}: {str(exc).splitlines()[0][:300]}") from None


def load_tokenizer(hf_dir: str | os.PathLike[str]):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as exc:  # transformers raises many kinds here
        raise EoraError(f"cannot load the tokenizer of {hf_dir}: {str(exc).splitlines()[0]}") from None


def calibration_ids(hf_dir: str | os.PathLike[str], spec: str, *, samples: int, seqlen: int,
                    tokenizer=None, seed: int = 0, draw: int = 0) -> torch.Tensor:
    """(samples, seqlen) token ids of the calibration `spec` (calib_data), tokenized with the model's tokenizer."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(hf_dir)
    return calib_data.build_calibration(spec, tok, samples=samples, seqlen=seqlen, seed=seed, draw=draw)
