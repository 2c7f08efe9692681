"""token_embd / output compensation (eora_gguf/embedding.py): the solvers against independent fp64 oracles, the
adapter layout llama.cpp expects for token_embd, PEFT export, and tiny random llamas through the pinned llama.cpp
(untied: logits equal the torch reconstruction; tied: llama.cpp cannot apply a token_embd LoRA).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import compensate as comp
from eora_gguf import embedding, llama_tools, reconstruct
from eora_gguf.adapter import check_gguf_lora, read_gguf_lora, write_gguf_lora
from eora_gguf.errors import EoraError
from eora_gguf.gguf_io import open_gguf
from eora_gguf.hf_model import load_config
from eora_gguf.naming import NameMap
from eora_gguf.peft import write_peft

from tiny_models import SYNTH, build_tiny_model, load_tokenizer, write_out, write_synthetic_gguf

V, D = 60, 8


def problem(seed: int = 0, zeros: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A (V, D) error with a decaying spectrum and token weights with `zeros` unseen tokens."""
    g = torch.Generator().manual_seed(seed)
    de = torch.randn(V, D, generator=g, dtype=torch.float64) * torch.logspace(0, -1, D, dtype=torch.float64)
    counts = torch.randint(1, 50, (V,), generator=g).to(torch.float64)
    counts[torch.randperm(V, generator=g)[:zeros]] = 0.0
    return de, counts / counts.sum()


def svd_oracle(de: torch.Tensor, w: torch.Tensor, r: int) -> float:
    """The weighted row objective's optimum by the textbook route: SVD of D^½ ΔE on the rows with w > 0 (rows
    with w = 0 do not enter the objective), mapped back by D^-½: e* = Σ_{i>r} σ_i²."""
    keep = w > 0
    s = torch.linalg.svdvals(w[keep].sqrt()[:, None] * de[keep])
    return float((s[r:] ** 2).sum())


# ------------------------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("r", [1, 3, D])
def test_token_embd_solution_is_the_weighted_optimum(r):
    de, w = problem()
    sol = embedding.solve_token_embd(de, w, D)
    b, a = sol.truncate(r)
    got = embedding.weighted_row_error(de, w, b, a)
    assert got == pytest.approx(svd_oracle(de, w, r), rel=1e-9, abs=1e-14)
    # gains: exact per-component drops, descending, summing to the drop at every rank
    assert sol.objective == pytest.approx(float(((de ** 2) * w[:, None]).sum()), rel=1e-12)
    assert sol.objective - float(sol.gains[:r].sum()) == pytest.approx(got, rel=1e-9, abs=1e-14)
    assert bool((sol.gains[:-1] >= sol.gains[1:] - 1e-15).all())
    # no rank-r perturbation of the optimum does better
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        bp = b + 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
        ap = a + 1e-3 * torch.randn(a.shape, generator=g, dtype=torch.float64)
        assert embedding.weighted_row_error(de, w, bp, ap) >= got - 1e-15


def test_token_embd_unseen_tokens_are_projected_not_ignored():
    de, w = problem(zeros=20)
    b, a = embedding.solve_token_embd(de, w, 4).truncate(4)
    unseen = w == 0
    before = (de[unseen] ** 2).sum(1)
    after = ((de - b @ a)[unseen] ** 2).sum(1)
    assert bool((after <= before + 1e-15).all()) and float(after.sum()) < float(before.sum())
    # and the correction of every row is its error projected on one shared subspace: A has orthonormal rows
    assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, de @ a.T, atol=1e-12)


def test_row_weights_and_smoothing():
    st = embedding.EmbeddingStats(embedding.token_counts(torch.tensor([[0, 1, 1], [3, 3, 3]]), 5), None, 6)
    assert st.counts.tolist() == [1, 2, 0, 3, 0]
    assert st.row_weights().tolist() == pytest.approx([1 / 6, 2 / 6, 0, 3 / 6, 0])
    assert st.row_weights(1.0).tolist() == pytest.approx([2 / 11, 3 / 11, 1 / 11, 4 / 11, 1 / 11])
    with pytest.raises(EoraError, match="non-negative"):
        st.row_weights(-1.0)
    with pytest.raises(EoraError, match="vocabulary"):
        embedding.token_counts(torch.tensor([5]), 5)
    with pytest.raises(EoraError, match="output-head statistics"):
        st.head_covariance()


@pytest.mark.parametrize("r", [1, 4, D])
def test_output_head_solution_is_the_eora_optimum(r):
    g = torch.Generator().manual_seed(2)
    dw = torch.randn(V, D, generator=g, dtype=torch.float64)
    x = torch.randn(D, 200, generator=g, dtype=torch.float64) * torch.logspace(0, -2, D, dtype=torch.float64)[:, None]
    cov = x @ x.T / 200
    sol = embedding.solve_output(dw, cov, D)
    b, a = sol.truncate(r)
    got = float((((dw - b @ a) @ x) ** 2).sum() / 200)  # the objective on the samples themselves
    lam, q = torch.linalg.eigh(cov)
    s = torch.linalg.svdvals(dw @ q @ torch.diag(lam.clamp(min=0).sqrt()))  # ‖(ΔW − P) C^½‖ route
    assert got == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-8)
    assert sol.objective - float(sol.gains[:r].sum()) == pytest.approx(got, rel=1e-8)
    assert sol.gains[:r].tolist() == pytest.approx((s[:r] ** 2).tolist(), rel=1e-8)


def test_solvable_tensors_leave_a_tied_embedding_out():
    assert embedding.solvable_tensors(["token_embd.weight", "output.weight", "blk.0.attn_q.weight"]) == \
        ["token_embd.weight", "output.weight"]
    assert embedding.solvable_tensors(["token_embd.weight", "blk.0.attn_q.weight"]) == []


def test_stats_round_trip(tmp_path):
    st = embedding.EmbeddingStats(torch.arange(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64), 10)
    st.save(tmp_path / "e.safetensors")
    back = embedding.EmbeddingStats.load(tmp_path / "e.safetensors")
    assert torch.equal(back.counts, st.counts) and torch.equal(back.head_cov_sum, st.head_cov_sum)
    assert back.n_tokens == 10


# ------------------------------------------------------------------------------------------- adapter layout


def with_embeddings(tmp_path, tied: bool) -> tuple:
    """The synthetic GGUF plus token_embd (V, hidden) and, unless tied, output (V, hidden)."""
    src = tmp_path / "syn.gguf"
    write_synthetic_gguf(src)
    rng = np.random.default_rng(0)
    extra = {"token_embd.weight": rng.standard_normal((V, SYNTH["hidden_size"]))}
    if not tied:
        extra["output.weight"] = rng.standard_normal((V, SYNTH["hidden_size"]))
    reader = gguf.GGUFReader(src)
    dst = tmp_path / ("tied.gguf" if tied else "untied.gguf")
    writer = gguf.GGUFWriter(dst, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    for name, x in extra.items():
        writer.add_tensor(name, x.astype(np.float32))
    write_out(writer)
    return dst, extra


def test_token_embd_is_written_in_llama_cpp_layout(tmp_path):
    base, extra = with_embeddings(tmp_path, tied=False)
    rng = np.random.default_rng(1)
    hidden = SYNTH["hidden_size"]
    factors = {"token_embd.weight": (rng.standard_normal((V, 32)), rng.standard_normal((32, hidden))),
               "output.weight": (rng.standard_normal((V, 32)), rng.standard_normal((32, hidden)))}
    out = write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama", dtype="f32")
    info = check_gguf_lora(out, base)
    assert info.ranks == {"token_embd.weight": 32, "output.weight": 32} and info.alpha == 32.0
    ne = {t.name: list(t.shape) for t in gguf.GGUFReader(out).tensors}
    # llama-adapter.cpp: token_embd base ne [d, V] needs lora_b ne[1] = d and lora_a ne[1] = V, both ne[0] = r
    assert ne["token_embd.weight.lora_a"] == [32, V] and ne["token_embd.weight.lora_b"] == [32, hidden]
    assert ne["output.weight.lora_a"] == [hidden, 32] and ne["output.weight.lora_b"] == [32, V]
    _, back = read_gguf_lora(out)
    for name, (b, a) in factors.items():
        assert np.allclose(back[name][0] @ back[name][1], b @ a, rtol=1e-6, atol=1e-5), name
    # a Q8_0 adapter: token_embd rows are r long on both sides
    q8 = write_gguf_lora(tmp_path / "q8.gguf", factors, arch="llama", dtype="q8_0")
    assert check_gguf_lora(q8, base).types["token_embd.weight"] == ("Q8_0", "Q8_0")


def test_checker_refuses_token_embd_on_a_tied_model(tmp_path):
    base, _ = with_embeddings(tmp_path, tied=True)
    rng = np.random.default_rng(1)
    factors = {"token_embd.weight": (rng.standard_normal((V, 4)), rng.standard_normal((4, SYNTH["hidden_size"])))}
    out = write_gguf_lora(tmp_path / "a.gguf", factors, arch="llama")
    with pytest.raises(EoraError, match="tied to the output head"):
        check_gguf_lora(out, base)


def test_checker_refuses_a_token_embd_pair_in_linear_layout(tmp_path):
    base, _ = with_embeddings(tmp_path, tied=False)
    hidden = SYNTH["hidden_size"]
    writer_path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(writer_path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    w.add_tensor("token_embd.weight.lora_a", np.zeros((4, hidden), np.float32))  # linear layout: wrong here
    w.add_tensor("token_embd.weight.lora_b", np.zeros((V, 4), np.float32))
    write_out(w)
    with pytest.raises(EoraError, match="incorrect shape"):
        check_gguf_lora(writer_path, base)


# ------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama):
    """tiny(tied) -> dict(hf, f16, q): a tiny random llama, its F16 GGUF and a Q2_K whose token_embd is Q2_K
    and output Q6_K (llama-quantize's defaults for an untied llama)."""
    made: dict[bool, dict] = {}

    def get(tied: bool) -> dict:
        if tied not in made:
            d = tmp_path_factory.mktemp("tied" if tied else "untied")
            hf = build_tiny_model("llama", d / "hf", tied=tied)
            f16 = llama_tools.convert(llama, hf, d / "f16.gguf", outtype="f16")
            q = llama_tools.quantize(llama, f16, d / "q2k.gguf", "Q2_K")
            made[tied] = {"hf": hf, "f16": f16, "q": q, "dir": d}
        return made[tied]

    return get


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from test_compensate import word_text

    d = tmp_path_factory.mktemp("text")
    return {"calib": word_text(d / "calib.txt", 6000, seed=1), "heldout": word_text(d / "heldout.txt", 3000, seed=2)}


@pytest.mark.llama_cpp
def test_untied_llama_cpp_applies_token_embd_and_output_like_the_torch_reconstruction(tiny, llama, text, tmp_path):
    """compensate(embeddings=True) on an untied tiny llama: the adapter covers token_embd and output, loads in
    stock llama.cpp, and llama.cpp's logits equal the torch model built from the dequantized GGUF + B·A."""
    t = tiny(False)
    with open_gguf(t["q"]) as m:
        assert m.tensor("token_embd.weight").qtype.name == "Q2_K" and "output.weight" in m
    out = tmp_path / "emb.gguf"
    report = comp.compensate(t["hf"], t["q"], out, rank=8, calib=str(text["calib"]), samples=8, seqlen=128,
                             tokenizer=load_tokenizer(t["hf"]), adapter_type="f32", embeddings=True)
    assert {"token_embd.weight", "output.weight"} <= set(report.tensors)
    for name in ("token_embd.weight", "output.weight"):
        assert report.tensors[name]["rel_err_after"] < report.tensors[name]["rel_err_before"]
    res = reconstruct.check_logits(llama, t["hf"], t["q"], text["heldout"], tmp_path, adapter=out, threads=2)
    print(reconstruct.summarize(res))
    assert res["adapter"]["nmse_centered"] < 2e-3 and res["adapter"]["top1"] >= 0.9
    assert res["adapter"]["nmse_centered"] < 0.02 * res["adapter_effect"]["nmse_centered"]
    # an adapter on the embeddings alone: the reconstruction must follow llama.cpp there too
    _, factors = read_gguf_lora(out)
    only = write_gguf_lora(tmp_path / "only.gguf", {n: factors[n] for n in embedding.EMBEDDING_TENSORS},
                           arch="llama", dtype="f32")
    (tmp_path / "only").mkdir()
    res2 = reconstruct.check_logits(llama, t["hf"], t["q"], text["heldout"], tmp_path / "only", adapter=only,
                                    threads=2)
    print(reconstruct.summarize(res2))
    assert res2["adapter"]["nmse_centered"] < 0.02 * res2["adapter_effect"]["nmse_centered"]
    assert res2["adapter"]["nmse_centered"] < 0.02 * res2["adapter_vs_torch_base"]["nmse_centered"]


@pytest.mark.llama_cpp
def test_untied_embedding_adapter_brings_llama_cpp_closer_to_f16(tiny, llama, text, tmp_path):
    """KL to F16 on held-out text: blk-only adapter vs blk + token_embd/output adapter (same rank). Measured:
    Q2_K 7.2e-5, + blk r8 7.1e-5, + blk and token_embd/output r8 5.5e-5 (the Q2_K embedding dominates here)."""
    from test_compensate import kl

    t = tiny(False)
    adapters = {}
    for emb in (False, True):
        adapters[emb] = tmp_path / f"e{int(emb)}.gguf"
        comp.compensate(t["hf"], t["q"], adapters[emb], rank=8, calib=str(text["calib"]), samples=8, seqlen=128,
                        tokenizer=load_tokenizer(t["hf"]), adapter_type="f32", embeddings=emb)
    _, ref = llama_tools.token_logprobs(llama, t["f16"], text["heldout"], tmp_path / "f16.bin", threads=2)
    base_lp = llama_tools.token_logprobs(llama, t["q"], text["heldout"], tmp_path / "q.bin", threads=2)[1]
    div = {"base": kl(ref, base_lp)}
    for emb, a in adapters.items():
        lp = llama_tools.token_logprobs(llama, t["q"], text["heldout"], tmp_path / f"{emb}.bin", lora=[a], threads=2)[1]
        div["blk+emb" if emb else "blk"] = kl(ref, lp)
    print("KL to F16", div)
    assert div["blk+emb"] < 0.85 * div["blk"] and div["blk"] < div["base"]


@pytest.mark.llama_cpp
def test_tied_model_gets_no_token_embd_pair_and_llama_cpp_would_abort_on_one(tiny, llama, text, tmp_path):
    """A tied model: compensate leaves token_embd out. Why: llama.cpp looks the pair up for the output head too
    (same tensor name) and cannot multiply its layout there — a forced adapter kills llama-perplexity."""
    t = tiny(True)
    with open_gguf(t["q"]) as m:
        assert "output.weight" not in m
        d = m.tensor("token_embd.weight").shape
    out = tmp_path / "tied.gguf"
    report = comp.compensate(t["hf"], t["q"], out, rank=8, calib=str(text["calib"]), samples=8, seqlen=128,
                             tokenizer=load_tokenizer(t["hf"]), embeddings=True)
    assert not set(report.tensors) & set(embedding.EMBEDDING_TENSORS)
    rng = np.random.default_rng(0)
    forced = write_gguf_lora(tmp_path / "forced.gguf", {"token_embd.weight": (
        rng.standard_normal((d[0], 8)) * 0.01, rng.standard_normal((8, d[1])) * 0.01)}, arch="llama")
    with pytest.raises(EoraError, match=r"ggml_can_mul_mat"):  # the head's mul_mat(lora_a, x): r != n_embd
        llama_tools.token_logprobs(llama, t["q"], text["heldout"], tmp_path / "forced.bin", lora=[forced], threads=2)
    with pytest.raises(EoraError, match="tied to the output head"):  # our checker says so before llama.cpp does
        check_gguf_lora(forced, t["q"])


def test_peft_export_of_token_embd_and_lm_head(tmp_path):
    """PEFT loads the embedding pair as an Embedding LoRA and lm_head as a Linear one, both with scale 1:
    merged weights equal W + B A."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hf = build_tiny_model("llama", tmp_path / "hf")
    names = NameMap.from_config(load_config(hf))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    vocab, hidden = model.get_input_embeddings().weight.shape
    rng = np.random.default_rng(3)
    factors = {n: (rng.standard_normal((vocab, 16)) * 0.1, rng.standard_normal((16, hidden)) * 0.1)
               for n in embedding.EMBEDDING_TENSORS}
    factors["blk.0.attn_q.weight"] = (rng.standard_normal((hidden, 4)), rng.standard_normal((4, hidden)) * 0.01)
    write_peft(tmp_path / "peft", factors, names, base_model_name_or_path=str(hf))
    e0 = model.get_input_embeddings().weight.detach().double().clone()
    o0 = model.lm_head.weight.detach().double().clone()
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "peft").merge_and_unload()
    b, a = factors["token_embd.weight"]
    assert np.allclose(merged.get_input_embeddings().weight.detach().double().numpy(), e0.numpy() + b @ a,
                       atol=1e-5)
    b, a = factors["output.weight"]
    assert np.allclose(merged.lm_head.weight.detach().double().numpy(), o0.numpy() + b @ a, atol=1e-5)


def test_solve_gguf_skips_a_tensor_stored_without_error(tmp_path):
    """The demo SmolLM2's original embedding was Q8_0 already, so its Q8_0 copy has no error: no pair for it."""
    from safetensors.torch import save_file

    base, extra = with_embeddings(tmp_path, tied=False)
    e32 = torch.from_numpy(extra["token_embd.weight"].astype(np.float32))
    o32 = torch.from_numpy(extra["output.weight"].astype(np.float32))
    hf = tmp_path / "hf"
    hf.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": e32 + 0.01 * torch.randn(e32.shape, generator=g),
               "lm_head.weight": o32.clone()}, str(hf / "model.safetensors"))
    st = embedding.EmbeddingStats(torch.arange(V, dtype=torch.float64), torch.eye(e32.shape[1], dtype=torch.float64),
                                  1)
    with open_gguf(base) as m:
        sols, rows = embedding.solve_gguf(hf, m, st, 4)
    assert set(sols) == {"token_embd.weight"} and rows["token_embd.weight"]["qtype"] == "F32"
    assert rows["token_embd.weight"]["rel_err_after"] < rows["token_embd.weight"]["rel_err_before"]
    assert sols["token_embd.weight"].b.shape == (V, 4)
