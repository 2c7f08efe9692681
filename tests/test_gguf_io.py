from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest

from eora_gguf.errors import EoraError
from eora_gguf.gguf_io import check_matches, open_gguf

from tiny_models import SYNTH, write_synthetic_gguf

Q = gguf.GGMLQuantizationType


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


# (type, nmse bound of the round trip for Gaussian data): what each format's precision allows
ROUND_TRIP = [(Q.F32, 0.0), (Q.F16, 1e-6), (Q.BF16, 1e-4), (Q.Q8_0, 1e-4), (Q.Q5_1, 3e-3), (Q.Q4_0, 2e-2)]


@pytest.mark.parametrize("qtype,bound", ROUND_TRIP)
def test_dequantize_orientation_and_precision(tmp_path, qtype, bound):
    path = tmp_path / "m.gguf"
    weights = write_synthetic_gguf(path, qtype=qtype)
    with open_gguf(path) as model:
        for name, w in weights.items():
            info = model.tensor(name)
            assert info.qtype == qtype
            assert info.shape == w.shape and info.ne == w.shape[::-1]
            got = model.dequantize(name)
            assert got.dtype == np.float32 and got.shape == w.shape
            assert nmse(got, w) <= bound
            got[0, 0] = 1e9  # a private copy, not a view of the file
            assert model.dequantize(name)[0, 0] != 1e9


def test_metadata(tmp_path):
    write_synthetic_gguf(tmp_path / "m.gguf")
    with open_gguf(tmp_path / "m.gguf") as model:
        m = model.meta
        assert (m.arch, m.n_blocks, m.n_embd, m.n_head, m.n_head_kv, m.n_ff) == ("llama", 1, 64, 4, 2, 128)
        assert "blk.0.attn_q.weight" in model and "blk.0.attn_q.lora_a" not in model
        with pytest.raises(EoraError, match="no tensor"):
            model.tensor("blk.5.attn_q.weight")


def test_check_matches_accepts_own_model(tmp_path):
    write_synthetic_gguf(tmp_path / "m.gguf")
    with open_gguf(tmp_path / "m.gguf") as model:
        check_matches(SYNTH, model)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="qwen2"), "architecture"),
    (dict(num_hidden_layers=2), "layers"),
    (dict(hidden_size=128), "hidden size"),
    (dict(num_attention_heads=8), "attention heads"),
    (dict(num_key_value_heads=4), "KV heads"),
    (dict(intermediate_size=256), "ffn_gate.weight is 128x64"),
    (dict(head_dim=32), "attn_q.weight is 64x64"),
])
def test_check_matches_refuses_other_model(tmp_path, change, match):
    write_synthetic_gguf(tmp_path / "m.gguf")
    with open_gguf(tmp_path / "m.gguf") as model:
        with pytest.raises(EoraError, match=match) as err:
            check_matches(dict(SYNTH, **change), model)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(EoraError, match="does not exist"):
        open_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(EoraError, match="not a GGUF"):
        open_gguf(tmp_path / "text.gguf")
    write_synthetic_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (10, 200, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(EoraError, match="not a readable GGUF"):
            open_gguf(tmp_path / "cut.gguf")


def test_adapter_is_not_a_model(tmp_path):
    from eora_gguf.adapter import write_gguf_lora

    write_gguf_lora(tmp_path / "a.gguf", {"blk.0.attn_q.weight": (np.ones((64, 2)), np.ones((2, 64)))}, arch="llama")
    with pytest.raises(EoraError, match="adapter, not a model"):
        open_gguf(tmp_path / "a.gguf")


@pytest.mark.llama_cpp
def test_k_quants_from_llama_quantize(tiny_hf, tiny_gguf, llama, tmp_path):
    """A real llama-quantize Q4_K_M file: every adapted weight dequantizes close to the HF weight, in GGUF order."""
    from eora_gguf import llama_tools
    from eora_gguf.naming import NameMap

    from tiny_models import hf_state

    hf_dir, f32 = tiny_hf("llama"), tiny_gguf("llama", "f32")
    out = llama_tools.quantize(llama, f32, tmp_path / "q4km.gguf", "Q4_K_M", threads=os.cpu_count())
    config = json.loads((hf_dir / "config.json").read_text())
    state = hf_state(hf_dir)
    names = NameMap.from_config(config)
    with open_gguf(out) as model:
        check_matches(config, model)
        kinds = set()
        for module in names.modules():
            name = names.to_gguf(module)
            kinds.add(model.tensor(name).qtype)
            want = names.hf_to_gguf_rows(module, state[module + ".weight"])
            assert nmse(model.dequantize(name), want) < 1e-2
    assert kinds & {Q.Q4_K, Q.Q6_K}, kinds
