"""The compensation as a PEFT LoRA folder (HF row order), beside the GGUF LoRA that adapter.py writes."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .adapter import Factors, check_pair
from .embedding import EMBEDDING_TENSORS, TOKEN_EMBD, hf_module
from .errors import EoraError, atomic_output
from .naming import NameMap

log = logging.getLogger(__name__)

# What write_peft puts in its folder: an existing folder holding only these is ours to replace.
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")



def write_peft(out_dir: str | os.PathLike[str], factors: Factors, names: NameMap, *,
               base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA folder (adapter_model.safetensors + adapter_config.json) that loads with scale 1.

    factors are keyed by GGUF name in GGUF row order, as for `write_gguf_lora`; B rows are put back into HF
    order (the llama Q/K permutation undone). output.weight becomes `lm_head` (a Linear); token_embd.weight
    becomes PEFT's Embedding LoRA on `model.embed_tokens`: lora_embedding_A = Bᵀ (r, V), lora_embedding_B = Aᵀ
    (d, r), since PEFT adds (lora_embedding_B @ lora_embedding_A)ᵀ·scale to the (V, d) embedding.
    Keys: `base_model.model.<hf module>.lora_A.weight` (r, in) and
    `.lora_B.weight` (out, r). lora_alpha = r (the most common rank); other ranks go in rank_pattern with an
    equal alpha_pattern entry, so every module's scale alpha/r is 1.
    """
    if not factors:
        raise EoraError("no adapter tensors to write: the rank or the module selection left nothing")
    out = Path(out_dir)
    if not out.parent.is_dir():
        raise EoraError(f"output directory {out.parent} does not exist: create it or choose another path")
    out.mkdir(exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for gguf_name, (b, a) in factors.items():
        b, a = check_pair(gguf_name, b, a)
        if gguf_name in EMBEDDING_TENSORS:
            module = hf_module(gguf_name, names.hf_prefix)
            if gguf_name == TOKEN_EMBD:  # PEFT's Embedding: ΔE = (lora_embedding_B @ lora_embedding_A)ᵀ
                tensors[f"base_model.model.{module}.lora_embedding_A"] = np.ascontiguousarray(b.T, dtype=np.float32)
                tensors[f"base_model.model.{module}.lora_embedding_B"] = np.ascontiguousarray(a.T, dtype=np.float32)
                ranks[module] = a.shape[0]
                continue
            b_hf = b
        else:
            module = names.to_hf(gguf_name)
            b_hf = names.gguf_to_hf_rows(module, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b_hf, dtype=np.float32)
        ranks[module] = a.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None,
    }
    with atomic_output(out / "adapter_model.safetensors") as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except Exception as exc:  # safetensors reports a full disk as its own error type
            raise EoraError(f"cannot write {out / 'adapter_model.safetensors'}: {str(exc).splitlines()[0]}") from None
    with atomic_output(out / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    (log.debug if out.name.endswith(".partial") else log.info)("wrote PEFT adapter %s: %d modules, r %d%s", out,
                                                                len(ranks), r,
             f" ({len(pattern)} with other ranks)" if pattern else "")
    return out
