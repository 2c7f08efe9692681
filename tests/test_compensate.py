"""compensate() end to end on tiny random models: through the pinned llama.cpp for the effect of the adapter and
for the torch reconstruction, and through the CLI for every kind of bad input (one line, exit 2, no file left).

The tiny Q2_K models keep their embeddings and output head in F16 (llama-quantize --token-embedding-type /
--output-tensor-type) so the quantization error llama.cpp sees sits in the linears the adapter compensates: with
Q2_K embeddings the embedding error dominates the tiny llama's output and no adapter of the linears can move it
(measured: even the exact linears recover only 2% of the gap there).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import budget as B
from eora_gguf import compensate as comp
from eora_gguf import llama_tools, reconstruct
from eora_gguf.adapter import check_gguf_lora, read_gguf_lora
from eora_gguf.budgeted import measure_importance
from eora_gguf.cli import main
from eora_gguf.errors import EoraError
from eora_gguf.gguf_io import open_gguf
from eora_gguf.naming import NameMap

from tiny_models import _WORDS, load_tokenizer, write_gguf_copy, write_synthetic_gguf

RANK = 8
SAMPLES, SEQLEN = 8, 128


def word_text(path: Path, n_words: int, seed: int) -> Path:
    """Text of the tokenizer's training distribution (the tiny models' 'calibration distribution')."""
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(_WORDS) for _ in range(n_words)))
    return path


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    return {"calib": word_text(d / "calib.txt", 6000, seed=1), "heldout": word_text(d / "heldout.txt", 3000, seed=2),
            "short": word_text(d / "short.txt", 5, seed=3)}


@pytest.fixture(scope="module")
def solved(tiny_hf, tiny_gguf, llama, texts, tmp_path_factory):
    """solved(arch) -> dict: hf, f16, q (Q2_K, F16 embeddings/head), stats, eora and svd adapters (rank 8)."""
    made: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"solved-{arch}")
            hf, f16 = tiny_hf(arch), tiny_gguf(arch, "f16")
            q = llama_tools.quantize(llama, f16, d / "q2k.gguf", "Q2_K",
                                  extra_args=["--token-embedding-type", "f16", "--output-tensor-type", "f16"])
            # the tiny qwen2 needs its own tokenizer (see tiny_models.load_tokenizer): calibrate, then reuse stats
            stats = comp.calibrate(hf, str(texts["calib"]), samples=SAMPLES, seqlen=SEQLEN,
                                   tokenizer=load_tokenizer(hf))
            out = {"hf": hf, "f16": f16, "q": q, "stats": stats, "dir": d}
            for method in ("eora", "svd"):
                out[method] = d / f"{method}.gguf"
                comp.compensate(hf, q, out[method], rank=RANK, method=method, stats=stats, adapter_type="f32")
            made[arch] = out
        return made[arch]

    return get


def centered_nmse(ref: np.ndarray, x: np.ndarray) -> float:
    """Σ over tokens and vocab of the log-prob error, each row's mean removed, relative to the rows' spread."""
    rc, xc = ref - ref.mean(1, keepdims=True), x - x.mean(1, keepdims=True)
    return float(np.sum((xc - rc) ** 2) / np.sum(rc ** 2))


def kl(ref: np.ndarray, x: np.ndarray) -> float:
    return float(np.mean(np.sum(np.exp(ref) * (ref - x), axis=1)))


# ------------------------------------------------------------------------------------------- through llama.cpp


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_adapter_brings_llama_cpp_back_toward_f16(solved, llama, texts, tmp_path, arch):
    """llama.cpp's own log-probs on held-out text of the calibration distribution: Q2_K + EoRA adapter is closer
    to the F16 model than Q2_K alone, and closer than Q2_K + plain-SVD adapter of the same rank.

    Measured (KL / centered nmse vs F16): llama base 1.4e-6/1.7e-3, svd 1.2e-6/1.4e-3, eora 5.9e-7/7.1e-4;
    qwen2 1.1e-5/1.6e-2, 9.7e-6/1.4e-2, 1.9e-7/2.8e-4; gemma3 0.081/0.26, 0.074/0.24, 0.055/0.17.
    """
    s = solved(arch)
    text = texts["heldout"]
    _, ref = llama_tools.token_logprobs(llama, s["f16"], text, tmp_path / "f16.bin", threads=2)
    _, base = llama_tools.token_logprobs(llama, s["q"], text, tmp_path / "q.bin", threads=2)
    got = {m: llama_tools.token_logprobs(llama, s["q"], text, tmp_path / f"{m}.bin", lora=[s[m]], threads=2)[1]
           for m in ("eora", "svd")}
    err = {"base": centered_nmse(ref, base), **{m: centered_nmse(ref, lp) for m, lp in got.items()}}
    div = {"base": kl(ref, base), **{m: kl(ref, lp) for m, lp in got.items()}}
    print(f"{arch}: centered nmse {err}, KL {div}")
    assert err["base"] > 1e-4  # Q2_K visibly changes the output ...
    assert err["eora"] < 0.8 * err["base"] and div["eora"] < 0.8 * div["base"]  # ... the adapter undoes part
    assert err["eora"] < 0.9 * err["svd"] and div["eora"] < 0.9 * div["svd"]  # ... more than plain SVD does
    assert err["svd"] < err["base"]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_llama_cpp_agrees_with_the_torch_reconstruction(solved, llama, texts, tmp_path, arch):
    """llama.cpp (Q2_K + adapter) vs the HF architecture running the dequantized GGUF + B·A in float64.

    They differ by llama.cpp's 8-bit activation quantization (see the next test): measured centered nmse
    llama 5e-6, qwen2 2.7e-5, gemma3 3.9e-4, each at least 200x below how far the adapter moves the output.
    """
    s = solved(arch)
    res = reconstruct.check_logits(llama, s["hf"], s["q"], texts["heldout"], tmp_path, adapter=s["eora"],
                                   threads=2)
    print(arch, reconstruct.summarize(res))
    assert res["tokens"] == 3 * 63
    for key in ("base", "adapter"):
        assert res[key]["nmse_centered"] < 2e-3, key
        assert res[key]["top1"] >= 0.9, key
    # the reconstruction tells apart whether (and how) llama.cpp applied the adapter
    assert res["adapter"]["nmse_centered"] < 0.02 * res["adapter_effect"]["nmse_centered"]
    assert res["adapter"]["nmse_centered"] < 0.02 * res["adapter_vs_torch_base"]["nmse_centered"]


@pytest.mark.llama_cpp
def test_reconstruction_is_exact_without_activation_quantization(solved, llama, texts, tmp_path):
    """The same Q2_K weights stored as F32 (dequantized by gguf-py) make llama.cpp multiply in float32, without
    quantizing activations: then llama.cpp and the torch reconstruction agree to float32 rounding (measured
    centered nmse 2e-7 on SmolLM2-135M, 1.7e-9 on the tiny llama)."""
    s = solved("llama")
    with open_gguf(s["q"]) as m:
        deq = {n: m.dequantize(n) for n in m.names if m.tensor(n).qtype.name not in ("F32",)}
    copy = write_gguf_copy(s["q"], tmp_path / "deq-f32.gguf", deq)
    res = reconstruct.check_logits(llama, s["hf"], copy, texts["heldout"], tmp_path, adapter=s["eora"], threads=2)
    print(reconstruct.summarize(res))
    for key in ("base", "adapter"):
        assert res[key]["nmse_centered"] < 1e-7, key
        assert res[key]["top1"] >= 0.98, key


@pytest.fixture(scope="module")
def budgeted(solved, tmp_path_factory):
    """One budget solve of the tiny llama (every type's objectives, Fisher importance on the calibration text)."""
    s = solved("llama")
    sol = comp.solve(s["hf"], s["q"], max_rank=64, stats=s["stats"], adapter_types=("f32", *B.AUTO_TYPES),
                     importance_samples=4, importance_seqlen=64, importance_draws=2)
    return s, sol


def _assert_non_uniform(info, path, budget_bytes):
    assert len(set(info.ranks.values())) > 1, info.ranks  # non-uniform ranks ...
    assert info.alpha == 0.0 and all(info.scale(n) == 1.0 for n in info.ranks)  # ... each applied with scale 1
    assert path.stat().st_size <= budget_bytes


@pytest.mark.llama_cpp
def test_non_uniform_ranks_apply_exactly_in_llama_cpp(budgeted, llama, texts, tmp_path):
    """A budget-allocated F32 adapter on the Q2_K weights stored as F32: llama.cpp multiplies in float32, so its
    logits equal the torch reconstruction (dequantized GGUF + B·A per tensor at its own rank) to float32 rounding,
    while the adapter visibly moves them."""
    s, sol = budgeted
    copy_dir = tmp_path / "deq"
    copy_dir.mkdir()
    with open_gguf(s["q"]) as m:
        deq = {n: m.dequantize(n) for n in m.names if m.tensor(n).qtype.name not in ("F32",)}
    copy = write_gguf_copy(s["q"], copy_dir / s["q"].name, deq)  # same file name: the solution's base_model
    rep = comp.adapt(sol, copy, tmp_path / "a.gguf", "adapter:300KB", adapter_type="f32")
    info = check_gguf_lora(rep.adapter, copy)
    _assert_non_uniform(info, Path(rep.adapter), 300_000)
    assert info.ranks == {n: t["rank"] for n, t in rep.tensors.items() if t["rank"]}
    res = reconstruct.check_logits(llama, s["hf"], copy, texts["heldout"], tmp_path, adapter=rep.adapter, threads=2)
    print(reconstruct.summarize(res))
    assert res["adapter"]["nmse_centered"] < 1e-7 and res["adapter"]["top1"] >= 0.98
    assert res["adapter_effect"]["nmse_centered"] > 1e4 * res["adapter"]["nmse_centered"]


@pytest.mark.llama_cpp
@pytest.mark.parametrize("dtype", ["auto", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_budget_adapter_types_apply_in_llama_cpp(budgeted, llama, texts, tmp_path, dtype):
    """Each adapter type, with budget-allocated ranks, on the Q2_K base: llama.cpp's logits equal the torch
    reconstruction with the factors as the file stores them (dequantized by gguf-py), within llama.cpp's 8-bit
    activation rounding (as in test_llama_cpp_agrees_with_the_torch_reconstruction), far below the adapter's own
    effect; and the adapter brings the output toward F16."""
    s, sol = budgeted
    rep = comp.adapt(sol, s["q"], tmp_path / "a.gguf", "adapter:200KB", adapter_type=dtype)
    info = check_gguf_lora(rep.adapter, s["q"])
    _assert_non_uniform(info, Path(rep.adapter), 200_000)
    if dtype not in ("auto", "f16"):
        want = dtype.upper()
        assert {a for a, _ in info.types.values()} == {want}
        assert {b for n, (_, b) in info.types.items()} <= {want, "F16"}
        assert any(b == want for _, b in info.types.values())  # some ranks are whole blocks of 32
    res = reconstruct.check_logits(llama, s["hf"], s["q"], texts["heldout"], tmp_path, adapter=rep.adapter,
                                   threads=2)
    print(dtype, info.types, reconstruct.summarize(res))
    assert res["adapter"]["nmse_centered"] < 2e-3 and res["adapter"]["top1"] >= 0.9
    assert res["adapter"]["nmse_centered"] < 0.02 * res["adapter_effect"]["nmse_centered"]
    _, ref = llama_tools.token_logprobs(llama, s["f16"], texts["heldout"], tmp_path / "f16.bin", threads=2)
    _, base = llama_tools.token_logprobs(llama, s["q"], texts["heldout"], tmp_path / "q.bin", threads=2)
    _, fixed = llama_tools.token_logprobs(llama, s["q"], texts["heldout"], tmp_path / "a.bin", lora=[rep.adapter],
                                       threads=2)
    assert kl(ref, fixed) < kl(ref, base)


@pytest.mark.llama_cpp
def test_budget_cli_and_peft_rank_pattern(budgeted, tmp_path, capsys):
    """`compensate --budget` writes a non-uniform adapter within its bytes and a solution file; `adapt` re-plans
    from the file without solving; the PEFT folder carries the same ranks (rank_pattern, alpha_pattern: scale 1)
    and peft merges the GGUF's own (dequantized) factors."""
    peft = pytest.importorskip("peft")
    import transformers as tf

    s, _ = budgeted
    stats = tmp_path / "stats.safetensors"
    s["stats"].save(stats)
    sol_file, out = tmp_path / "sol.safetensors", tmp_path / "a.gguf"
    rc = main(["compensate", "--hf", str(s["hf"]), "--gguf", str(s["q"]), "--stats", str(stats), "--rank", "48",
               "--budget", "adapter:150KB", "--solution", str(sol_file), "-o", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["adapter_bytes"] == out.stat().st_size <= 150_000 and res["rank_max"] <= 48
    peft_dir = tmp_path / "peft"
    rc = main(["adapt", "--solution", str(sol_file), "--gguf", str(s["q"]), "--budget", "adapter:100KB",
               "--adapter-type", "q8_0", "--peft", str(peft_dir), "--hf", str(s["hf"]), "-o",
               str(tmp_path / "b.gguf"), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert (tmp_path / "b.gguf").stat().st_size <= 100_000 and res["types"].keys() == {"q8_0"}
    info, stored = read_gguf_lora(tmp_path / "b.gguf")
    assert len(set(info.ranks.values())) > 1
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    names = NameMap.from_config(json.loads((s["hf"] / "config.json").read_text()))
    assert {names.to_hf(n): r for n, r in info.ranks.items()} == {m: cfg["rank_pattern"].get(m, cfg["r"])
                                                                    for m in cfg["target_modules"]}
    model = tf.AutoModelForCausalLM.from_pretrained(s["hf"], dtype=torch.float32)
    state = {k: v.double() for k, v in model.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(model, peft_dir).merge_and_unload().state_dict()
    for gname, (b, a) in stored.items():
        module = names.to_hf(gname)
        want = state[module + ".weight"].numpy() + names.gguf_to_hf_rows(module, b.astype(np.float64)) @ a
        np.testing.assert_allclose(merged[module + ".weight"].double().numpy(), want, atol=1e-5)
    with pytest.raises(EoraError, match="no room"):
        comp.adapt(sol_file, s["q"], tmp_path / "c.gguf", "1KB")
    assert not (tmp_path / "c.gguf").exists()


def test_reconstruction_refuses_unsupported_archs(tmp_path):
    from tiny_models import SYNTH

    cfg = dict(SYNTH, model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EoraError, match="supports llama, qwen2, gemma3"):
        reconstruct.build_model(tmp_path, tmp_path / "none.gguf")


@pytest.mark.llama_cpp
def test_stats_reuse_gives_the_same_adapter(solved, texts, tmp_path):
    """calibrate() + compensate(stats=file) == compensate(calib=...) calibrating inline (original propagation)."""
    s = solved("llama")
    stats = comp.calibrate(s["hf"], str(texts["calib"]), samples=4, seqlen=64)
    stats.save(tmp_path / "stats.safetensors")
    a = comp.compensate(s["hf"], s["q"], tmp_path / "reused.gguf", rank=RANK, stats=tmp_path / "stats.safetensors",
                        adapter_type="f32")
    b = comp.compensate(s["hf"], s["q"], tmp_path / "inline.gguf", rank=RANK, calib=str(texts["calib"]), samples=4,
                        seqlen=64, adapter_type="f32")
    assert a.meta["calib_tokens"] == b.meta["calib_tokens"] == 4 * 64
    _, fa = read_gguf_lora(a.adapter)
    _, fb = read_gguf_lora(b.adapter)
    assert set(fa) == set(fb) and len(fa) == 14
    for name in fa:
        pa, pb = fa[name][0] @ fa[name][1], fb[name][0] @ fb[name][1]
        np.testing.assert_allclose(pa, pb, atol=1e-6 * np.abs(pb).max(), err_msg=name)
    # and the statistics matter: other calibration text gives another adapter
    c = comp.compensate(s["hf"], s["q"], tmp_path / "other.gguf", rank=RANK, calib=str(texts["heldout"]),
                        samples=4, seqlen=64, adapter_type="f32")
    _, fc = read_gguf_lora(c.adapter)
    name = "blk.0.ffn_down.weight"
    assert np.abs(fc[name][0] @ fc[name][1] - fa[name][0] @ fa[name][1]).max() > 1e-3 * np.abs(fa[name][0]).max()


@pytest.mark.llama_cpp
def test_propagate_compensated_writes_a_loadable_adapter(solved, llama, texts, tmp_path):
    """Sequential mode: layer 0 sees the same inputs either way (same factors); layer 1 sees the compensated
    layer 0's outputs (other factors); llama.cpp loads the adapter and runs it."""
    s = solved("llama")
    kw = dict(rank=RANK, calib=str(texts["calib"]), samples=4, seqlen=64, adapter_type="f32")
    seq = comp.compensate(s["hf"], s["q"], tmp_path / "seq.gguf", propagate="compensated", **kw)
    orig = comp.compensate(s["hf"], s["q"], tmp_path / "orig.gguf", propagate="original", **kw)
    assert seq.meta["propagate"] == "compensated"
    info = check_gguf_lora(seq.adapter, s["q"])
    assert len(info.ranks) == 14 and set(info.ranks.values()) == {RANK}
    _, fs = read_gguf_lora(seq.adapter)
    _, fo = read_gguf_lora(orig.adapter)
    for name in fs:
        ps, po = fs[name][0] @ fs[name][1], fo[name][0] @ fo[name][1]
        if name.startswith("blk.0."):
            np.testing.assert_allclose(ps, po, atol=1e-6 * np.abs(po).max(), err_msg=name)
        else:
            assert np.abs(ps - po).max() > 1e-4 * np.abs(po).max(), name
    _, base = llama_tools.token_logprobs(llama, s["q"], texts["heldout"], tmp_path / "b.bin", threads=2)
    _, lp = llama_tools.token_logprobs(llama, s["q"], texts["heldout"], tmp_path / "s.bin", lora=[seq.adapter],
                                    threads=2)
    assert lp.shape == base.shape and np.isfinite(lp).all() and np.abs(lp - base).max() > 1e-4


@pytest.mark.llama_cpp
def test_cli_peft_folder(solved, tmp_path, capsys):
    """`compensate --peft DIR` writes a PEFT folder holding the same B·A as the GGUF adapter, in HF row order."""
    from safetensors.numpy import load_file

    s = solved("llama")
    stats = tmp_path / "stats.safetensors"
    s["stats"].save(stats)
    rc = main(["compensate", "--hf", str(s["hf"]), "--gguf", str(s["q"]), "--stats", str(stats), "--rank", "4",
               "--adapter-type", "f32", "--peft", str(tmp_path / "peft"), "-o", str(tmp_path / "a.gguf"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rank"] == 4 and out["tensors"] == 14 and out["adapter"] == str(tmp_path / "a.gguf")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 4, "LORA")
    state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    names = NameMap.from_config(json.loads((s["hf"] / "config.json").read_text()))
    _, factors = read_gguf_lora(tmp_path / "a.gguf")
    assert len(state) == 2 * len(factors) == 28
    for gname, (b, a) in factors.items():
        module = names.to_hf(gname)
        hb, ha = state[f"base_model.model.{module}.lora_B.weight"], state[f"base_model.model.{module}.lora_A.weight"]
        np.testing.assert_allclose(hb @ ha, names.gguf_to_hf_rows(module, b) @ a, atol=1e-6 * np.abs(hb).max())


# ------------------------------------------------------------------------------------------- bad input, via the CLI


@pytest.fixture(scope="module")
def bad_inputs(tiny_hf, texts, tmp_path_factory):
    """Inputs for the refusal tests; none needs llama.cpp (GGUFs are written with gguf-py)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("bad")
    hf = tiny_hf("llama")
    cfg = json.loads((hf / "config.json").read_text())
    ok = d / "ok.gguf"
    # the HF weights quantized to Q4_0: a real quantization of this model (passes the same-model measurement)
    write_synthetic_gguf(ok, cfg, hf_dir=hf, qtype=gguf.GGMLQuantizationType.Q4_0)

    def hf_copy(name: str, edit) -> Path:
        out = d / name
        shutil.copytree(hf, out)
        state = load_file(hf / "model.safetensors")
        edit(state)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out

    def put_nan(state):
        state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")

    def overflow(state):  # finite weights whose activations overflow float32 (q/k/v inputs ~1e38)
        state["model.layers.0.input_layernorm.weight"][:] = 3e38

    gpt2 = d / "gpt2"
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=512, n_positions=64)
                       ).save_pretrained(gpt2)
    qwen_hf = tiny_hf("qwen2")
    other_stats = d / "qwen2-stats.safetensors"
    comp.calibrate(qwen_hf, str(texts["calib"]), samples=2, seqlen=32, tokenizer=load_tokenizer(qwen_hf)
                   ).save(other_stats)
    (d / "afile").write_text("x")
    (d / "adir").mkdir()
    return {
        "hf": hf, "ok": ok, "calib": texts["calib"], "short": texts["short"], "gpt2": gpt2,
        "qwen2_arch": _synthetic(d / "arch.gguf", cfg, arch="qwen2"),
        "fewer_layers": _synthetic(d / "layers.gguf", dict(cfg, num_hidden_layers=1)),
        "narrower": _synthetic(d / "ffn.gguf", dict(cfg, intermediate_size=256)),
        "nan_hf": hf_copy("nan", put_nan), "overflow_hf": hf_copy("overflow", overflow),
        "other_stats": other_stats, "afile": d / "afile", "adir": d / "adir",
    }


def _synthetic(path: Path, cfg: dict, **kw) -> Path:
    write_synthetic_gguf(path, cfg, **kw)
    return path


BAD = {
    # case: (argv builder from the fixture dict and an output dir, expected message fragment)
    "gguf of another arch": (lambda f, o: ["--hf", f["hf"], "--gguf", f["qwen2_arch"], "-o", o / "a.gguf"],
                             "architecture qwen2 in the GGUF vs llama"),
    "gguf with fewer layers": (lambda f, o: ["--hf", f["hf"], "--gguf", f["fewer_layers"], "-o", o / "a.gguf"],
                               "layers 1 in the GGUF vs 2"),
    "gguf with other shapes": (lambda f, o: ["--hf", f["hf"], "--gguf", f["narrower"], "-o", o / "a.gguf"],
                               "config.json implies 512x256"),
    "missing gguf": (lambda f, o: ["--hf", f["hf"], "--gguf", o / "none.gguf", "-o", o / "a.gguf"], "does not exist"),
    "unsupported arch": (lambda f, o: ["--hf", f["gpt2"], "--gguf", f["ok"], "-o", o / "a.gguf"],
                         "model type 'gpt2' is not supported"),
    "rank too large": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--rank", "257", "-o", o / "a.gguf"],
                       "exceeds min(d_in, d_out) = 128 of self_attn.k_proj"),
    # q_proj (256x256) takes rank 200, k_proj (128x256) does not: the message names the real maximum, 128
    "rank above the smallest weight": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--rank", "200",
                                                     "-o", o / "a.gguf"], "choose a rank of at most 128"),
    "rank zero": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--rank", "0", "-o", o / "a.gguf"],
                  "positive integer"),
    "calibration text too short": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--calib", f["short"],
                                                 "--seqlen", "64", "-o", o / "a.gguf"], "fewer than one sample"),
    "NaN in HF weights": (lambda f, o: ["--hf", f["nan_hf"], "--gguf", f["ok"], "-o", o / "a.gguf"], "NaN/Inf"),
    "NaN/Inf in activations": (lambda f, o: ["--hf", f["overflow_hf"], "--gguf", f["ok"], "-o", o / "a.gguf"],
                               "NaN/Inf in the"),
    "output directory missing": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "-o", o / "no" / "a.gguf"],
                                 "does not exist"),
    "output under a regular file": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "-o", f["afile"] / "a.gguf"],
                                    "is not a directory"),
    "output is a directory": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "-o", f["adir"]], "cannot write"),
    "peft directory missing": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--peft", o / "no" / "peft",
                                             "-o", o / "a.gguf"], "does not exist"),
    "stats from another model": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--stats", f["other_stats"],
                                               "-o", o / "a.gguf"], "another model"),
    "stats file missing": (lambda f, o: ["--hf", f["hf"], "--gguf", f["ok"], "--stats", o / "none.safetensors",
                                         "-o", o / "a.gguf"], "do not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_file(bad_inputs, tmp_path, capsys, case):
    build, fragment = BAD[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["compensate", "--rank", "4", "--calib", str(bad_inputs["calib"]), "--samples", "2", "--seqlen", "32"]
    argv += [str(a) for a in build(bad_inputs, out_dir)]  # later options win
    watched = [out_dir, bad_inputs["adir"], bad_inputs["afile"].parent]
    before = {p: sorted(x.name for x in p.iterdir()) for p in watched}
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("eora-gguf: error: "), err
    assert fragment in err[0]
    assert {p: sorted(x.name for x in p.iterdir()) for p in watched} == before
    assert not list(tmp_path.rglob("*.partial"))


def test_nan_in_weights_is_caught_by_the_solver_too(bad_inputs, tmp_path):
    """With statistics from the clean model (the NaN sits in layer 1, which the model fingerprint does not
    sample), calibration is skipped and the solver's own check refuses ΔW with a NaN."""
    stats = comp.calibrate(bad_inputs["hf"], str(bad_inputs["calib"]), samples=2, seqlen=32)
    with pytest.raises(EoraError, match="NaN/Inf: check both model files"):  # past the same-model measurement
        comp.compensate(bad_inputs["nan_hf"], bad_inputs["ok"], tmp_path / "a.gguf", rank=4, stats=stats,
                        allow_mismatch=True)
    assert list(tmp_path.iterdir()) == []


def test_synthetic_gguf_compensates(bad_inputs, tmp_path):
    """The control for the refusals above: the same arguments with good inputs succeed."""
    rep = comp.compensate(bad_inputs["hf"], bad_inputs["ok"], tmp_path / "a.gguf", rank=4,
                          calib=str(bad_inputs["calib"]), samples=2, seqlen=32)
    assert rep.as_dict()["tensors"] == 14
    assert rep.as_dict()["mean_rel_output_error_after"] < rep.as_dict()["mean_rel_output_error_before"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]



def test_synthetic_gguf_budget(bad_inputs, tmp_path):
    """compensate --budget without llama.cpp: per-tensor ranks and types within the adapter bytes, Fisher weights
    measured, and a solution file that `adapt` turns into the same adapter without solving."""
    budget = "adapter:120KB"
    rep = comp.compensate(bad_inputs["hf"], bad_inputs["ok"], tmp_path / "a.gguf", calib=str(bad_inputs["calib"]),
                          samples=4, seqlen=32, budget=budget, rank=64, solution_out=tmp_path / "s.safetensors")
    d = rep.as_dict()
    assert d["adapter_bytes"] == (tmp_path / "a.gguf").stat().st_size <= 120_000
    assert d["adapter_bytes"] > 0.9 * 120_000  # the budget is spent
    assert d["mean_rel_output_error_after"] < d["mean_rel_output_error_before"]
    info = check_gguf_lora(tmp_path / "a.gguf", bad_inputs["ok"])
    assert len(set(info.ranks.values())) > 1 and max(info.ranks.values()) <= 64
    assert all(t["weight"] > 0 and t["kl"] > 0 for t in rep.tensors.values())
    again = comp.adapt(tmp_path / "s.safetensors", bad_inputs["ok"], tmp_path / "b.gguf", budget)
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
    assert again.meta["types"] == d["types"]


@pytest.mark.llama_cpp
def test_importance_of_embeddings_and_head(solved):
    """measure_importance takes token_embd/output (the embedding-compensation tensors) beside the linears: the
    F16 embeddings' rounding error costs far less output KL than Q2_K's error in a linear."""
    s = solved("llama")
    names = NameMap.from_config(json.loads((s["hf"] / "config.json").read_text()))
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    with open_gguf(s["q"]) as base:
        kl = measure_importance(s["hf"], base, names, ["token_embd.weight", "output.weight",
                                                             "blk.0.ffn_down.weight"], ids, draws=2)
    assert set(kl) == {"token_embd.weight", "output.weight", "blk.0.ffn_down.weight"}
    assert all(v >= 0 for v in kl.values())
    assert kl["token_embd.weight"] < 0.1 * kl["blk.0.ffn_down.weight"]  # measured < 0.01
    assert kl["output.weight"] < 0.1 * kl["blk.0.ffn_down.weight"]  # measured 0.02


@pytest.mark.llama_cpp
def test_fast_path_reports_estimated_errors_close_to_the_exact_ones(solved, tmp_path):
    """With the fast solver the summary's per-tensor errors come from Hutch++ trace estimates and
    e(BA) = tr(G) - Σ gains: close to the exact path's (tiny layers: 64-wide, the estimate's worst case)."""
    s = solved("llama")
    ex = comp.compensate(s["hf"], s["q"], tmp_path / "exact.gguf", rank=RANK, stats=s["stats"], solver="exact")
    fa = comp.compensate(s["hf"], s["q"], tmp_path / "fast.gguf", rank=RANK, stats=s["stats"], solver="fast")
    assert set(ex.tensors) == set(fa.tensors) and len(ex.tensors) == 14
    for name, row in ex.tensors.items():
        for key in ("rel_err_before", "rel_err_after"):
            assert fa.tensors[name][key] == pytest.approx(row[key], rel=0.05), (name, key)
        assert fa.tensors[name]["rel_err_after"] < fa.tensors[name]["rel_err_before"]
