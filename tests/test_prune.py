"""Pruning: Wanda and SparseGPT on single layers against direct computations, and the streamed HF folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eora_gguf.errors import EoraError
from eora_gguf.prune import Sparsity, nm_violations, prune_model, sparsegpt, wanda


def _layer(seed: int, d_out: int = 32, d_in: int = 128, n: int = 1024):
    """A random weight and correlated inputs X (n, d_in) whose channel scales span 100x in random order (so
    ‖X_j‖ matters, and the channels that matter are not all at one end of the row)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.2 + torch.eye(d_in, dtype=torch.float64)
    scale = torch.logspace(-1, 1, d_in, dtype=torch.float64)[torch.randperm(d_in, generator=g)]
    return w, torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix * scale


def _output_error(w, wp, x) -> float:
    return float(torch.linalg.norm(x @ (w - wp).T))


def test_sparsity_parse():
    assert Sparsity.parse("2:4") == Sparsity(0.5, 2, 4)
    assert Sparsity.parse("4:8").fraction == 0.5 and Sparsity.parse("4:8").m == 8
    assert Sparsity.parse("0.3") == Sparsity(0.3)
    for bad in ("4:2", "0:4", "2:", "1.5", "0", "half"):
        with pytest.raises(EoraError, match="sparsity"):
            Sparsity.parse(bad)


def test_wanda_matches_direct_numpy():
    """|W_ij|·‖X_j‖ from the raw inputs, ranked per row with numpy, against our pruner fed C = XᵀX."""
    w, x = _layer(0)
    cov = x.T @ x
    W, X = w.numpy(), x.numpy()
    score = np.abs(W) * np.sqrt((X ** 2).sum(0))[None, :]
    for spec in ("2:4", "4:8", "0.5", "0.25"):
        sp = Sparsity.parse(spec)
        want = W.copy()
        for i in range(W.shape[0]):
            if sp.structured:
                for g in range(0, W.shape[1], sp.m):
                    drop = g + np.argsort(score[i, g:g + sp.m], kind="stable")[: sp.m - sp.n]
                    want[i, drop] = 0
            else:
                want[i, np.argsort(score[i], kind="stable")[: int(W.shape[1] * sp.fraction)]] = 0
        np.testing.assert_array_equal(wanda(w, cov, sp).numpy(), want, err_msg=spec)


@pytest.mark.parametrize("method", [wanda, sparsegpt])
@pytest.mark.parametrize("spec", ["2:4", "4:8"])
def test_nm_mask_property(method, spec):
    w, x = _layer(1)
    sp = Sparsity.parse(spec)
    wp = method(w, x.T @ x, sp)
    groups = (wp != 0).reshape(w.shape[0], -1, sp.m).sum(-1)
    assert (groups == sp.n).all()  # exactly n kept: random weights are never 0 by chance
    assert nm_violations(wp, sp.n, sp.m) == 0 and nm_violations(w, sp.n, sp.m) > 0


@pytest.mark.parametrize("spec", ["2:4", "0.5"])
def test_sparsegpt_update_reduces_output_error(spec):
    """The OBS update beats keeping the surviving weights as they were, on the same mask, and beats Wanda."""
    w, x = _layer(2)
    sp = Sparsity.parse(spec)
    wp = sparsegpt(w, x.T @ x, sp)
    mask = wp == 0
    assert abs(mask.double().mean().item() - sp.fraction) < 1e-9
    same_mask = w.masked_fill(mask, 0)
    err, err_mask_only, err_wanda = (_output_error(w, wp, x), _output_error(w, same_mask, x),
                                     _output_error(w, wanda(w, x.T @ x, sp), x))
    assert err < 0.92 * err_mask_only, (err, err_mask_only)
    assert err < err_wanda, (err, err_wanda)


def test_sparsegpt_dead_inputs_and_bad_shapes():
    w, x = _layer(3)
    x[:, 5] = 0  # an input that never fires
    wp = sparsegpt(w, x.T @ x, Sparsity.parse("0.5"))
    assert torch.isfinite(wp).all() and (wp[:, 5] == 0).all()
    with pytest.raises(EoraError, match="multiple of M"):
        wanda(w[:, :30], (x.T @ x)[:30, :30], Sparsity.parse("2:8"))


def _calib_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog, one two three."] * 80))
    return str(text)


@pytest.fixture(scope="module")
def pruned(tiny_hf, tmp_path_factory):
    from tiny_models import load_tokenizer

    src = tiny_hf("llama")
    tmp = tmp_path_factory.mktemp("prune")
    out = tmp / "pruned"
    res = prune_model(src, out, sparsity="2:4", method="wanda", calib=_calib_text(tmp), samples=4, seqlen=32,
                      tokenizer=load_tokenizer(src))
    return src, out, res


def test_pruned_folder_has_the_2_4_pattern_and_loads(pruned):
    from transformers import AutoModelForCausalLM

    from tiny_models import hf_state

    src, out, res = pruned
    dense, sparse = hf_state(src), hf_state(out)
    assert set(dense) == set(sparse)
    linear = [k for k in dense if ".layers." in k and k.endswith("proj.weight")]
    assert res["pruned_weights"] == len(linear) == 14
    for k in dense:
        if k in linear:
            w = torch.from_numpy(sparse[k])
            assert nm_violations(w, 2, 4) == 0 and (w == 0).double().mean() == 0.5, k
            kept = sparse[k] != 0
            np.testing.assert_array_equal(sparse[k][kept], dense[k][kept])  # Wanda keeps survivors unchanged
        else:
            np.testing.assert_array_equal(sparse[k], dense[k])  # embeddings, norms, head stay dense
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == "2:4"
    AutoModelForCausalLM.from_pretrained(out)


def test_pruning_is_sequential(pruned, tmp_path):
    """Layer 1 was pruned on the inputs the *pruned* layer 0 produces: recompute them with the pruned model."""
    from transformers import AutoModelForCausalLM

    from eora_gguf.calib_data import build_calibration

    from tiny_models import load_tokenizer

    src, out, _ = pruned
    ids = build_calibration(_calib_text(tmp_path), load_tokenizer(src), samples=4, seqlen=32)
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    sparse = AutoModelForCausalLM.from_pretrained(out).eval()
    seen = {}
    def grab(key):
        def hook(module, args, output):
            seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        return hook

    hook = sparse.model.layers[1].self_attn.q_proj.register_forward_hook(grab("x"))
    with torch.no_grad():
        sparse(ids)
    hook.remove()
    hook = dense.model.layers[1].self_attn.q_proj.register_forward_hook(grab("x_dense"))
    with torch.no_grad():
        dense(ids)
    hook.remove()
    x, x_dense = seen["x"], seen["x_dense"]
    w = dense.model.layers[1].self_attn.q_proj.weight.detach().double()
    got = sparse.model.layers[1].self_attn.q_proj.weight.detach().double() == 0
    differ_seq = (got != (wanda(w, x.T @ x, Sparsity.parse("2:4")) == 0)).double().mean().item()
    differ_dense = (got != (wanda(w, x_dense.T @ x_dense, Sparsity.parse("2:4")) == 0)).double().mean().item()
    assert differ_seq < 1e-3 < differ_dense, (differ_seq, differ_dense)  # float32 near-ties may flip a few


def test_prune_refuses_bad_input(tiny_hf, tmp_path):
    src = tiny_hf("llama")
    with pytest.raises(EoraError, match="pruning method"):
        prune_model(src, tmp_path / "o", sparsity="2:4", method="magnitude")
    with pytest.raises(EoraError, match="sparsity"):
        prune_model(src, tmp_path / "o", sparsity="5:4")
    with pytest.raises(EoraError):
        prune_model(src, src / "inside", sparsity="2:4", calib=_calib_text(tmp_path))
    assert not (tmp_path / "o").exists()


def test_prune_cli_sparsegpt_unstructured(tiny_hf, tmp_path, capsys):
    from eora_gguf.cli import main

    from tiny_models import hf_state

    src = tiny_hf("llama")
    capsys.readouterr()  # building the tiny model (first use) writes progress bars
    assert main(["prune", str(src), "-o", str(tmp_path / "p"), "--sparsity", "3:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "N:M needs integers" in err[0]
    argv = ["prune", str(src), "-o", str(tmp_path / "p"), "--sparsity", "0.5", "--method", "sparsegpt",
            "--calib", _calib_text(tmp_path), "--samples", "2", "--seqlen", "32", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "sparsegpt" and 0 < res["mean_rel_output_error"] < 1
    dense, sparse = hf_state(src), hf_state(tmp_path / "p")
    w = sparse["model.layers.1.mlp.down_proj.weight"]
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # half of every row, chosen per block of 128 columns
    assert not np.array_equal(w[w != 0], dense["model.layers.1.mlp.down_proj.weight"][w != 0])  # the OBS update


def test_run_prune_quantizes_the_pruned_model_and_compensates_against_the_dense(tiny_hf, llama, tmp_path, capsys):
    """`run --prune 2:4`: the quantization is made from the pruned model, rows are labelled, the adapters are solved
    against the dense model (so the pruned weights' own error is corrected too) and the dense F16 stays the
    reference."""
    from eora_gguf.cli import main
    from eora_gguf.gguf_io import open_gguf

    hf = tiny_hf("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog, one two three four."] * 300))
    argv = ["run", hf, "--prune", "2:4", "--quant", "Q8_0", "--rank", "8", "--method", "eora", "--chunks", "2",
            "--ctx", "64", "--samples", "4", "--seqlen", "64", "--calib", calib, "--text", calib, "--workdir",
            tmp_path / "work", "--threads", "2", "--no-imatrix", "--json"]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    res = json.loads(capsys.readouterr().out)
    got = [(r["quant"], r["method"], r["rank"]) for r in res["rows"]]
    assert got == [("F16", "-", 0), ("F16+2:4 wanda", "-", 0), ("Q8_0+2:4 wanda", "-", 0),
                   ("Q8_0+2:4 wanda", "eora", 8)]
    kld = [r["kld"] for r in res["rows"]]
    assert kld[0] == 0 < kld[1] and kld[3] < kld[2]  # pruning costs, the adapter gives some of it back
    with open_gguf(res["rows"][2]["model"]) as m:  # Q8_0 keeps zeros exactly
        w = torch.from_numpy(m.dequantize("blk.0.ffn_down.weight"))
    assert nm_violations(w, 2, 4) == 0 and (w == 0).double().mean() == 0.5
