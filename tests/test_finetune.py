"""LoRA fine-tuning on the dequantized GGUF base: a few steps on the tiny model, from each initialisation."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from eora_gguf import adapter as adapter_io
from eora_gguf.errors import EoraError
from eora_gguf.finetune import encode, finetune, load_examples
from eora_gguf.naming import NameMap, arch_enum, model_dims


def _quantized_gguf(hf_dir, path, qtype=gguf.GGMLQuantizationType.Q4_0):
    """Every HF parameter in a GGUF under llama.cpp's names (linears quantized to `qtype`, Q/K rows permuted as the
    converter does), with the metadata our reader checks: enough for the torch reconstruction, no llama.cpp."""
    from tiny_models import hf_state, model_writer, write_out

    cfg = json.loads((hf_dir / "config.json").read_text())
    dims = model_dims(cfg)
    names = NameMap(dims)
    tmap = gguf.get_tensor_name_map(arch_enum(dims.arch), dims.n_layers)
    w = model_writer(path, dims)
    for hf_name, value in hf_state(hf_dir).items():
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        module = hf_name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            data = gguf.quants.quantize(np.asarray(names.hf_to_gguf_rows(module, value), np.float32), qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, value.astype(np.float32))
    write_out(w)
    return path


@pytest.fixture(scope="module")
def setup(tiny_hf, tmp_path_factory):
    from tiny_models import load_tokenizer

    hf = tiny_hf("llama")
    tmp = tmp_path_factory.mktemp("ft")
    base = _quantized_gguf(hf, tmp / "tiny-Q4_0.gguf")
    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight nine ten".split()
    data = tmp / "train.jsonl"
    with open(data, "w") as fh:  # a learnable task: the answer is the word after the prompt's last word
        for _ in range(96):
            k = int(rng.integers(0, len(words) - 1))
            prompt = " ".join(words[max(0, k - 3): k + 1])
            fh.write(json.dumps({"prompt": prompt, "completion": " " + words[k + 1]}) + "\n")
    calib = tmp / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog, one two three four."] * 80))
    return hf, base, data, calib, load_tokenizer(hf), tmp


def _run(setup, init, name, **kw):
    hf, base, data, calib, tok, tmp = setup
    out = tmp / f"{name}.gguf"
    rec = finetune(hf, base, out, init=init, data=str(data), rank=8, steps=12, lr=3e-3, batch_size=8, seqlen=32,
                   heldout=16, eval_every=6, calib=str(calib), calib_samples=4, calib_seqlen=32, tokenizer=tok,
                   log_path=tmp / f"{name}.json", peft_dir=tmp / f"{name}-peft", device="cpu", **kw)
    return out, rec


@pytest.mark.parametrize("init", ["lora", "eora"])
def test_finetune_smoke_loss_decreases_and_adapter_loads(setup, init):
    from tiny_models import hf_state

    hf, base, *_ , tmp = setup
    out, rec = _run(setup, init, init)
    held = [e["heldout_loss"] for e in rec["log"] if "heldout_loss" in e]
    train = [e["loss"] for e in rec["log"] if "loss" in e]
    assert len(train) == 12 and held[-1] < held[0]
    assert np.mean(train[-4:]) < np.mean(train[:4])
    assert json.loads((tmp / f"{init}.json").read_text())["log"] == rec["log"]
    info = adapter_io.check_gguf_lora(out, base)  # shapes, names, scale 1: what llama.cpp's loader checks
    _, factors = adapter_io.read_gguf_lora(out)
    assert len(factors) == 14 and {a.shape[0] for _, a in factors.values()} == {8}
    assert info.alpha == 8
    peft = hf_state(tmp / f"{init}-peft")
    assert len(peft) == 28


def test_eora_init_starts_at_the_eora_solution(setup):
    """Step 0 of the EoRA init is the quantized base + the EoRA adapter: lower held-out loss than B = 0."""
    _, lora = _run(setup, "lora", "lora0", )
    _, eora = _run(setup, "eora", "eora0")
    assert eora["log"][0]["heldout_loss"] < lora["log"][0]["heldout_loss"]


def test_init_from_adapter_file_reproduces_its_factors(setup):
    """An adapter file as the init: zero learning rate steps nothing, so the written factors equal the file's."""
    hf, base, data, calib, tok, tmp = setup
    first, _ = _run(setup, "eora", "first")
    again = tmp / "again.gguf"
    finetune(hf, base, again, init=str(first), data=str(data), steps=1, lr=1e-30, batch_size=8, seqlen=32,
             heldout=16, tokenizer=tok, device="cpu", adapter_type="f32")
    _, a = adapter_io.read_gguf_lora(first)
    _, b = adapter_io.read_gguf_lora(again)
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-4)


def test_examples_and_errors(setup, tmp_path):
    hf, base, data, calib, tok, tmp = setup
    ex = load_examples(str(data))
    assert len(ex) == 96 and ex[0].answer.startswith(" ")
    enc = encode(ex[:3], tok, 6)
    assert all(len(ids) <= 6 and 1 <= n < 6 for ids, n in enc)
    with pytest.raises(EoraError, match="test"):
        load_examples("gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(EoraError, match="neither ARC fields"):
        load_examples(str(bad))
    with pytest.raises(EoraError, match="neither"):
        finetune(hf, base, tmp_path / "x.gguf", init="nothing.gguf", data=str(data), tokenizer=tok, heldout=16)
    with pytest.raises(EoraError, match="rank"):
        finetune(hf, base, tmp_path / "x.gguf", init="lora", data=str(data), tokenizer=tok, heldout=16, rank=0)
    assert not (tmp_path / "x.gguf").exists()


def test_finetune_cli_error_is_one_line(setup, tmp_path, capsys):
    from eora_gguf.cli import main

    hf, base, data, *_ = setup
    capsys.readouterr()
    rc = main(["finetune", "--hf", str(hf), "--gguf", str(base), "--init", "lora", "--data", "gsm8k",
               "-o", str(tmp_path / "a.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "evaluation (test) split" in err[0]


def test_padded_batch_loss_equals_each_example_alone(setup):
    """Left padding, position ids and logits kept for the answers only give the loss of unpadded examples."""
    from eora_gguf.finetune import _batch, _loss
    from eora_gguf.reconstruct import build_model

    hf, base, data, _, tok, _ = setup
    model = build_model(hf, base, dtype=torch.float64)
    rows = encode(load_examples(str(data))[:5], tok, 32)
    assert len({len(ids) for ids, _ in rows}) > 1  # the batch really is padded
    loss, n = _loss(model, _batch(rows, 0, torch.device("cpu")))
    total = 0.0
    for ids, n_answer in rows:
        logits = model(torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        total -= float(lp[-n_answer:].sum())
    assert n == sum(k for _, k in rows)
    assert abs(float(loss) - total / n) < 1e-9
