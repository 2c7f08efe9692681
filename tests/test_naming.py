from __future__ import annotations

import numpy as np
import pytest
import torch

from eora_gguf.errors import EoraError
from eora_gguf.naming import (
    GGUF_ARCH,
    INPUT_GROUPS,
    LINEAR_MODULES,
    NameMap,
    gguf_arch,
    model_dims,
    permute_rows,
    unpermute_rows,
)

CFG = dict(model_type="llama", num_hidden_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=512)

GGUF_SHORT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def converter_order(rows: int, groups: int) -> np.ndarray:
    """Where each GGUF row comes from, written out index by index (not with reshapes)."""
    half = rows // groups // 2
    src = []
    for g in range(groups):
        for i in range(half):
            for j in range(2):
                src.append(g * 2 * half + j * half + i)
    return np.array(src)


@pytest.mark.parametrize("rows,groups", [(256, 8), (64, 2), (12, 3)])
def test_permutation_matches_index_formula_and_inverts(rows, groups):
    x = np.random.default_rng(0).standard_normal((rows, 5))
    np.testing.assert_array_equal(permute_rows(x, groups), x[converter_order(rows, groups)])
    np.testing.assert_array_equal(unpermute_rows(permute_rows(x, groups), groups), x)
    np.testing.assert_array_equal(permute_rows(unpermute_rows(x, groups), groups), x)
    t = torch.from_numpy(x)
    assert torch.equal(permute_rows(t, groups), torch.from_numpy(permute_rows(x, groups)))
    v = np.arange(rows)  # 1-D (a bias) works too
    np.testing.assert_array_equal(permute_rows(v, groups), converter_order(rows, groups))


def test_permutation_bad_rows():
    with pytest.raises(EoraError, match="multiple of 2"):
        permute_rows(np.zeros((10, 3)), 4)


@pytest.mark.parametrize("model_type", sorted(GGUF_ARCH))
def test_names_round_trip(model_type):
    names = NameMap.from_config(dict(CFG, model_type=model_type))
    seen = set()
    for module in names.modules():
        g = names.to_gguf(module)
        bid, short = names.split(module)
        assert g == f"blk.{bid}.{GGUF_SHORT[short]}.weight"
        assert names.to_hf(g) == module
        assert names.to_gguf(module + ".weight") == g
        seen.add(g)
    assert len(seen) == 3 * len(LINEAR_MODULES)


def test_permuted_only_for_llama_family():
    for model_type, arch in GGUF_ARCH.items():
        names = NameMap.from_config(dict(CFG, model_type=model_type))
        q, k = names.row_groups("model.layers.0.self_attn.q_proj"), names.row_groups("model.layers.0.self_attn.k_proj")
        assert names.row_groups("model.layers.0.self_attn.v_proj") is None
        if arch == "llama":
            assert (q, k) == (8, 2)
            x = np.arange(64 * 8).reshape(64, 8)
            k_rows = names.hf_to_gguf_rows("model.layers.1.self_attn.k_proj", x)
            np.testing.assert_array_equal(k_rows, permute_rows(x, 2))
            np.testing.assert_array_equal(
                names.gguf_to_hf_rows("model.layers.1.self_attn.k_proj", permute_rows(x, 2)), x)
        else:
            assert (q, k) == (None, None)


def test_unsupported_arch_lists_supported():
    with pytest.raises(EoraError, match="qwen2"):
        gguf_arch("gpt2")
    with pytest.raises(EoraError, match="not supported"):
        NameMap.from_config(dict(CFG, model_type="phi3"))


def test_dims_from_transformers_config_and_nested_text_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in CFG.items() if k != "model_type"})
    d = model_dims(cfg)
    assert (d.arch, d.n_layers, d.hidden, d.n_head, d.n_head_kv, d.head_dim, d.ffn) == ("llama", 3, 256, 8, 2, 32, 512)
    assert d.linear_shape("self_attn.k_proj") == (64, 256)
    nested = {"model_type": "gemma3", "text_config": dict(CFG, model_type="gemma3_text", head_dim=64)}
    g = model_dims(nested)
    assert (g.arch, g.head_dim, g.linear_shape("self_attn.q_proj")) == ("gemma3", 64, (512, 256))
    names = NameMap(g)
    assert names.to_gguf("model.language_model.layers.2.mlp.down_proj") == "blk.2.ffn_down.weight"


def test_input_groups_cover_every_module_once():
    names = NameMap.from_config(CFG)
    groups = names.input_groups(1)
    assert [len(g) for g in groups] == [len(g) for g in INPUT_GROUPS]
    flat = [m for g in groups for m in g]
    assert flat == [m for m in names.modules() if names.split(m)[0] == 1]
    assert groups[0] == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]


@pytest.mark.parametrize("bad", ["model.layers.1.self_attn.rotary_emb", "model.embed_tokens", "lm_head",
                                 "model.layers.9.mlp.up_proj", "blk.0.attn_q.weight"])
def test_bad_module_names(bad):
    names = NameMap.from_config(CFG)
    with pytest.raises(EoraError):
        names.to_gguf(bad)


def test_bad_gguf_names():
    names = NameMap.from_config(CFG)
    for bad in ("token_embd.weight", "blk.0.attn_norm.weight", "output.weight"):
        with pytest.raises(EoraError, match="not an adapted linear layer"):
            names.to_hf(bad)
