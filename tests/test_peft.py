"""The PEFT folder: keys, ranks and alpha patterns, HF row order, and peft itself merging it with scale 1."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eora_gguf.naming import NameMap, permute_rows
from eora_gguf.peft import write_peft

from tiny_models import SYNTH, hf_state, random_factors


def test_peft_folder(synth_base, tmp_path):
    from safetensors.numpy import load_file

    path, weights = synth_base
    names = NameMap.from_config(SYNTH)
    factors = random_factors(weights, [8, 8, 8, 4])
    out = write_peft(tmp_path / "peft", factors, names, base_model_name_or_path="tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 8, 8)
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] and set(cfg["rank_pattern"].values()) == {4}
    state = load_file(out / "adapter_model.safetensors")
    assert len(state) == 2 * len(factors)
    for gname, (b, a) in factors.items():
        module = names.to_hf(gname)
        hb, ha = state[f"base_model.model.{module}.lora_B.weight"], state[f"base_model.model.{module}.lora_A.weight"]
        np.testing.assert_allclose(ha, a, rtol=1e-6)
        groups = {"attn_q": 4, "attn_k": 2}.get(gname.split(".")[2])
        # HF-order B, permuted the converter's way, gives back the GGUF-order B
        np.testing.assert_allclose(permute_rows(hb, groups) if groups else hb, b, rtol=1e-6)
        r = a.shape[0]
        assert cfg["rank_pattern"].get(module, cfg["r"]) == r


def test_peft_loads_with_scale_one(tmp_path):
    """peft itself (when installed) merges our folder into the HF model as W + B A, i.e. with scale 1."""
    peft = pytest.importorskip("peft")
    import transformers as tf

    from tiny_models import build_tiny_model

    hf_dir = build_tiny_model("llama", tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    names = NameMap.from_config(config)
    state = hf_state(hf_dir)
    rng = np.random.default_rng(3)
    factors = {}
    for i, module in enumerate(names.modules()):
        w = state[module + ".weight"]
        r = 8 if i % 3 else 4  # mixed ranks exercise rank_pattern/alpha_pattern
        factors[names.to_gguf(module)] = (rng.standard_normal((w.shape[0], r)) * 0.1,
                                          rng.standard_normal((r, w.shape[1])) * 0.1)
    out = write_peft(tmp_path / "peft", factors, names)
    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    for module in names.modules():
        b, a = factors[names.to_gguf(module)]
        want = state[module + ".weight"] + names.gguf_to_hf_rows(module, b) @ a
        np.testing.assert_allclose(merged[module + ".weight"].double().numpy(), want, atol=1e-5)

