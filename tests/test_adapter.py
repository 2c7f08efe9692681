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
from eora_gguf.naming import NameMap

from tiny_models import _WORDS, ARCHS, SYNTH, hf_state, random_factors, write_gguf_copy, write_out, write_synthetic_gguf

Q = gguf.GGMLQuantizationType


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b ** 2))


@pytest.mark.parametrize("dtype,bound", [("f32", 1e-14), ("f16", 1e-6), ("q8_0", 1e-4)])
def test_gguf_lora_round_trip(synth_base, tmp_path, dtype, bound):
    path, weights = synth_base
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
def test_block_types_store_gguf_py_quantization_and_fall_back_per_tensor(synth_base, tmp_path, dtype):
    """Each block type reads back exactly as gguf-py's quantize -> dequantize of the factors; a rank-8 B (rows of 8)
    falls back to F16; the file's size is header_bytes + Σ pair_bytes."""
    from eora_gguf.adapter import ADAPTER_DTYPES, header_bytes, pair_bytes

    path, weights = synth_base
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


def test_q8_0_falls_back_to_f16_for_short_rows(synth_base, tmp_path, caplog):
    path, weights = synth_base
    with caplog.at_level(logging.INFO, logger="eora_gguf.adapter"):
        out = write_gguf_lora(tmp_path / "a.gguf", random_factors(weights, 8), arch="llama", dtype="q8_0")
    info = check_gguf_lora(out, path)
    assert set(info.types.values()) == {("Q8_0", "F16")}
    # one line for all of them (the rank 8 of every lora_b), not one per tensor
    summary = [r.getMessage() for r in caplog.records
               if r.levelno >= logging.INFO and "stored as F16" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith(f"{len(info.types)} adapter tensor(s)"), summary


def test_mixed_ranks_get_alpha_zero(synth_base, tmp_path):
    path, weights = synth_base
    factors = random_factors(weights, [4, 16, 7])
    info = check_gguf_lora(write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama"), path)
    assert info.alpha == 0.0
    assert {n: info.ranks[n] for n in factors} == {n: a.shape[0] for n, (_, a) in factors.items()}
    assert all(info.scale(n) == 1.0 for n in factors)


def test_check_refuses_adapters_for_another_model(synth_base, tmp_path):
    path, weights = synth_base
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
    write_out(w)
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
def test_check_mirrors_llama_cpp_loader(synth_base, tmp_path, tensors, kwargs, match):
    path, _ = synth_base
    with pytest.raises(EoraError, match=match):
        check_gguf_lora(hand_adapter(tmp_path / "bad.gguf", tensors, **kwargs), path)


def test_norm_entries_are_ignored_and_alpha_zero_means_scale_one(synth_base, tmp_path):
    path, _ = synth_base
    adapter = hand_adapter(tmp_path / "ok.gguf", {"blk.0.attn_q.weight.lora_a": np.ones((2, 64)),
                                                  "blk.0.attn_q.weight.lora_b": np.ones((64, 2)),
                                                  "blk.0.attn_norm.weight": np.ones(64)})
    info = check_gguf_lora(adapter, path)
    assert info.ranks == {"blk.0.attn_q.weight": 2} and info.alpha == 0.0 and info.scale("blk.0.attn_q.weight") == 1.0


def test_failed_write_leaves_no_file(synth_base, tmp_path):
    _, weights = synth_base
    factors = random_factors(weights, 4)
    name = next(iter(factors))
    factors[name][1][0, 0] = np.nan
    with pytest.raises(EoraError, match="NaN"):
        write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama")
    with pytest.raises(EoraError, match="unknown adapter type"):
        write_gguf_lora(tmp_path / "a.gguf", random_factors(weights, 4), arch="llama", dtype="q2_k")
    assert list(tmp_path.iterdir()) == [tmp_path / "base.gguf"]


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
