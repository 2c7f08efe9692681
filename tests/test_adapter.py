from __future__ import annotations

import json
import logging
import random

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import eora
from eora_gguf.adapter import check_gguf_lora, read_gguf_lora, write_gguf_lora
from eora_gguf.errors import EoraError
from eora_gguf.gguf_io import open_gguf
from eora_gguf.llama_tools import token_logprobs
from eora_gguf.naming import NameMap, permute_rows
from eora_gguf.peft import write_peft

from tiny_models import _WORDS, ARCHS, SYNTH, hf_state, write_gguf_copy, write_synthetic_gguf

Q = gguf.GGMLQuantizationType


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


def random_factors(base_weights: dict[str, np.ndarray], rank,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (name, w) in enumerate(base_weights.items()):
        r = rank[i % len(rank)] if isinstance(rank, list) else rank
        out[name] = (rng.standard_normal((w.shape[0], r)) * 0.1, rng.standard_normal((r, w.shape[1])) * 0.01)
    return out


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.gguf"
    return path, write_synthetic_gguf(path)


@pytest.mark.parametrize("dtype,bound", [("f32", 1e-14), ("f16", 1e-6), ("q8_0", 1e-4)])
def test_gguf_lora_round_trip(base, tmp_path, dtype, bound):
    path, weights = base
    factors = random_factors(weights, 32)
    out = write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama", dtype=dtype, metadata={"eora.method": "eora"})
    info = check_gguf_lora(out, path)
    assert info.alpha == 32.0 and set(info.ranks.values()) == {32}
    assert all(info.scale(n) == 1.0 for n in factors)
    assert set(info.types.values()) == {(dtype.upper(), dtype.upper())}
    _, back = read_gguf_lora(out)
    assert set(back) == set(factors)
    for name, (b, a) in factors.items():
        bb, aa = back[name]
        assert bb.shape == b.shape and aa.shape == a.shape
        assert nmse(bb, b) <= bound and nmse(aa, a) <= bound
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["eora.method"].contents() == "eora"
    lora_a = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight.lora_a")
    assert list(lora_a.shape) == [128, 32]  # ggml ne = [n_in, r]


@pytest.mark.parametrize("dtype", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_block_types_store_gguf_py_quantization_and_fall_back_per_tensor(base, tmp_path, dtype):
    """Each block type reads back exactly as gguf-py's quantize -> dequantize of the factors; a rank-8 B (rows of 8)
    falls back to F16; the file's size is header_bytes + Σ pair_bytes."""
    from eora_gguf.adapter import ADAPTER_DTYPES, header_bytes, pair_bytes

    path, weights = base
    qtype = ADAPTER_DTYPES[dtype]
    ranks = [32, 8, 64]
    factors = random_factors(weights, ranks)
    out = write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama", dtype=dtype, metadata={"eora.method": "x"})
    info = check_gguf_lora(out, path)
    _, back = read_gguf_lora(out)
    for name, (b, a) in factors.items():
        r = a.shape[0]
        assert info.types[name] == (qtype.name, qtype.name if r % 32 == 0 else "F16")
        want_a = gguf.quants.dequantize(gguf.quants.quantize(a.astype(np.float32), qtype), qtype)
        want_b = (gguf.quants.dequantize(gguf.quants.quantize(b.astype(np.float32), qtype), qtype) if r % 32 == 0
                  else b.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(back[name][1], want_a)
        np.testing.assert_array_equal(back[name][0], want_b)
    size = header_bytes("llama", list(factors), {"eora.method": "x"})
    size += sum(pair_bytes(n, b.shape[0], a.shape[1], a.shape[0], qtype) for n, (b, a) in factors.items())
    assert out.stat().st_size == size


def test_q8_0_falls_back_to_f16_for_short_rows(base, tmp_path, caplog):
    path, weights = base
    with caplog.at_level(logging.INFO, logger="eora_gguf.adapter"):
        out = write_gguf_lora(tmp_path / "a.gguf", random_factors(weights, 8), arch="llama", dtype="q8_0")
    info = check_gguf_lora(out, path)
    assert set(info.types.values()) == {("Q8_0", "F16")}
    # one line for all of them (the rank 8 of every lora_b), not one per tensor
    summary = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.INFO and "stored as F16" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith(f"{len(info.types)} adapter tensor(s)"), summary


def test_mixed_ranks_get_alpha_zero(base, tmp_path):
    path, weights = base
    factors = random_factors(weights, [4, 16, 7])
    info = check_gguf_lora(write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama"), path)
    assert info.alpha == 0.0
    assert {n: info.ranks[n] for n in factors} == {n: a.shape[0] for n, (_, a) in factors.items()}
    assert all(info.scale(n) == 1.0 for n in factors)


def test_check_refuses_adapters_for_another_model(base, tmp_path):
    path, weights = base
    factors = random_factors(weights, 4)
    with pytest.raises(EoraError, match="architecture"):
        check_gguf_lora(write_gguf_lora(tmp_path / "arch.gguf", factors, arch="qwen2"), path)
    other = write_synthetic_gguf(tmp_path / "other.gguf", dict(SYNTH, intermediate_size=256))
    with pytest.raises(EoraError, match="incorrect shape"):
        check_gguf_lora(write_gguf_lora(tmp_path / "shape.gguf", random_factors(other, 4), arch="llama"), path)
    bigger = write_synthetic_gguf(tmp_path / "deep.gguf", dict(SYNTH, num_hidden_layers=2))
    with pytest.raises(EoraError, match="does not exist in base"):
        check_gguf_lora(write_gguf_lora(tmp_path / "deep-a.gguf", random_factors(bigger, 4), arch="llama"), path)


def hand_adapter(path, tensors: dict[str, np.ndarray], *, general_type="adapter", alpha=None):
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.type", general_type)
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_key_value("adapter.lora.alpha", alpha[0], alpha[1])
    for name, t in tensors.items():
        w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tensors,kwargs,match", [
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 2)),
      "blk.0.attn_q.weight.lora_c": np.ones((2, 2))}, {}, "unexpected suffix"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64))}, {}, "missing one component"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 3))}, {}, "rank"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 2))},
     {"general_type": "model"}, "general.type"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 2))},
     {"alpha": (2.0, gguf.GGUFValueType.FLOAT64)}, "float32"),
    ({"blk.0.attn_q.weight.lora_a": np.ones((2, 64)), "blk.0.attn_q.weight.lora_b": np.ones((64, 2))},
     {"alpha": (4.0, gguf.GGUFValueType.FLOAT32)}, "scale 2"),
])
def test_check_mirrors_llama_cpp_loader(base, tmp_path, tensors, kwargs, match):
    path, _ = base
    with pytest.raises(EoraError, match=match):
        check_gguf_lora(hand_adapter(tmp_path / "bad.gguf", tensors, **kwargs), path)


def test_norm_entries_are_ignored_and_alpha_zero_means_scale_one(base, tmp_path):
    path, _ = base
    adapter = hand_adapter(tmp_path / "ok.gguf", {"blk.0.attn_q.weight.lora_a": np.ones((2, 64)),
                                                  "blk.0.attn_q.weight.lora_b": np.ones((64, 2)),
                                                  "blk.0.attn_norm.weight": np.ones(64)})
    info = check_gguf_lora(adapter, path)
    assert info.ranks == {"blk.0.attn_q.weight": 2} and info.alpha == 0.0 and info.scale("blk.0.attn_q.weight") == 1.0


def test_failed_write_leaves_no_file(base, tmp_path):
    _, weights = base
    factors = random_factors(weights, 4)
    name = next(iter(factors))
    factors[name][1][0, 0] = np.nan
    with pytest.raises(EoraError, match="NaN"):
        write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama")
    with pytest.raises(EoraError, match="unknown adapter type"):
        write_gguf_lora(tmp_path / "a.gguf", random_factors(weights, 4), arch="llama", dtype="q2_k")
    assert list(tmp_path.iterdir()) == [tmp_path / "base.gguf"]


def test_peft_folder(base, tmp_path):
    from safetensors.numpy import load_file

    path, weights = base
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


# --------------------------------------------------------------------------------------------------------------
# through the real converter (and, for the runtime check, llama.cpp itself)


def plant(tiny_hf, tiny_gguf, arch, tmp_path, rank, seed=0):
    """Convert the tiny model, write a 'quantized' copy whose weights are W - P with P rank `rank` (GGUF order).

    Returns (names, HF state, original GGUF path, copy path, planted P by GGUF name)."""
    hf_dir, f32 = tiny_hf(arch), tiny_gguf(arch, "f32")
    config = json.loads((hf_dir / "config.json").read_text())
    names = NameMap.from_config(config)
    rng = np.random.default_rng(seed)
    planted, replace = {}, {}
    with open_gguf(f32) as model:
        for module in names.modules():
            name = names.to_gguf(module)
            w = model.dequantize(name)
            p = rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal((rank, w.shape[1])) * 0.01
            planted[name], replace[name] = p, w.astype(np.float64) - p
    copy = write_gguf_copy(f32, tmp_path / f"{arch}-planted.gguf", replace)
    return names, hf_state(hf_dir), f32, copy, planted


def solve_all(names, state, copy, rank, method="eora", seed=1):
    rng = np.random.default_rng(seed)
    factors = {}
    with open_gguf(copy) as model:
        for bid in range(names.dims.n_layers):
            for group in names.input_groups(bid):
                d_in = state[group[0] + ".weight"].shape[1]
                x = rng.standard_normal((d_in, 2 * d_in)) * rng.uniform(0.1, 3.0, (d_in, 1))
                cov = torch.from_numpy(x @ x.T)
                for module in group:
                    name = names.to_gguf(module)
                    w = names.hf_to_gguf_rows(module, state[module + ".weight"])
                    delta = torch.from_numpy(w - model.dequantize(name).astype(np.float64))
                    factors[name] = eora.solve(method, delta, cov, rank, name=name)
    return factors


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_planted_low_rank_error_is_recovered_through_the_gguf_adapter(tiny_hf, tiny_gguf, tmp_path, arch):
    rank = 5
    names, state, _, copy, planted = plant(tiny_hf, tiny_gguf, arch, tmp_path, rank)
    factors = solve_all(names, state, copy, rank)
    adapter = write_gguf_lora(tmp_path / "eora.gguf", factors, arch=names.dims.arch, dtype="f32")
    info = check_gguf_lora(adapter, copy)
    assert set(info.ranks) == set(planted) and info.alpha == rank
    _, back = read_gguf_lora(adapter)
    with open_gguf(copy) as model:
        for module in names.modules():
            name = names.to_gguf(module)
            b, a = back[name]
            wq_hf = names.gguf_to_hf_rows(module, model.dequantize(name).astype(np.float64))
            b_hf = names.gguf_to_hf_rows(module, b.astype(np.float64))
            w_hf = state[module + ".weight"]
            assert np.abs(wq_hf - w_hf).max() > 1e-3  # the planted error is there ...
            np.testing.assert_allclose(wq_hf + b_hf @ a, w_hf, atol=2e-6 * np.abs(w_hf).max())  # ... and undone
            np.testing.assert_allclose(b @ a, planted[name], atol=2e-6 * np.abs(w_hf).max())


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ARCHS)
def test_qk_permutation_matches_the_converter(tiny_hf, tiny_gguf, arch):
    hf_dir, f32 = tiny_hf(arch), tiny_gguf(arch, "f32")
    names = NameMap.from_config(json.loads((hf_dir / "config.json").read_text()))
    state = hf_state(hf_dir)
    with open_gguf(f32) as model:
        for module in names.modules():
            hf_w, gguf_w = state[module + ".weight"], model.dequantize(names.to_gguf(module)).astype(np.float64)
            np.testing.assert_array_equal(names.hf_to_gguf_rows(module, hf_w), gguf_w)
            np.testing.assert_array_equal(names.gguf_to_hf_rows(module, gguf_w), hf_w)
            if module.endswith(("q_proj", "k_proj")):
                assert (names.dims.arch == "llama") == (not np.array_equal(hf_w, gguf_w))


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_llama_cpp_applies_the_adapter_with_scale_one(tiny_hf, tiny_gguf, llama, tmp_path, arch):
    """llama.cpp itself: planted copy + our adapter gives the original model's log-probs; the copy alone does not."""
    names, state, f32, copy, _ = plant(tiny_hf, tiny_gguf, arch, tmp_path, rank=4)
    adapter = write_gguf_lora(tmp_path / "a.gguf", solve_all(names, state, copy, 4), arch=names.dims.arch,
                              dtype="f32")
    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(rng.choice(_WORDS) for _ in range(1500)))
    _, ref = token_logprobs(llama, f32, text, tmp_path / "ref.bin", threads=2)
    _, broken = token_logprobs(llama, copy, text, tmp_path / "copy.bin", threads=2)
    _, fixed = token_logprobs(llama, copy, text, tmp_path / "fixed.bin", lora=[adapter], threads=2)
    assert ref.shape == fixed.shape and ref.shape[0] >= 3 * 63
    err_broken, err_fixed = np.abs(broken - ref).max(), np.abs(fixed - ref).max()
    print(f"{arch}: max |Δ log p| copy {err_broken:.3g}, copy+adapter {err_fixed:.3g}")
    assert err_broken > 1e-2
    assert err_fixed < err_broken / 50


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
