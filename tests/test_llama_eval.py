"""Perplexity and KL divergence through our libllama client, checked against llama-perplexity's own output files."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from eora_gguf import llama_eval, llama_tools
from eora_gguf.cli import main
from eora_gguf.errors import EoraError

pytestmark = pytest.mark.llama_cpp

CTX, CHUNKS = 64, 3


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven cats sleep near old red barn".split()
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(rng.choice(words, 1500)))
    return path


@pytest.fixture(scope="module")
def models(tiny_gguf, llama, tmp_path_factory):
    f16 = tiny_gguf("llama")
    q = llama_tools.quantize(llama, f16, tmp_path_factory.mktemp("q") / "q2k.gguf", "Q2_K")
    return {"f16": f16, "q": q}


def _stock_base(llama, model: Path, text: Path, out: Path) -> Path:
    """llama-perplexity's own --kl-divergence-base file: the oracle (read from the file, not from its log)."""
    llama_tools.run_tool([llama.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(CTX), "--chunks",
                       str(CHUNKS), "-t", "2", "--no-warmup", "--kl-divergence-base", out], "llama-perplexity")
    return out


def test_saved_base_is_byte_identical_to_llama_perplexity(models, llama, text, tmp_path):
    """Same tokens, same chunking and batches, same logits: the files agree byte for byte."""
    for name, model in models.items():
        ours = tmp_path / f"{name}-ours.kld"
        res = llama_eval.text_eval(llama, model, text=text, ctx=CTX, chunks=CHUNKS, threads=2, save_base=ours)
        stock = _stock_base(llama, model, text, tmp_path / f"{name}-stock.kld")
        assert ours.read_bytes() == stock.read_bytes(), name
        assert res.chunks == CHUNKS and res.ctx == CTX and res.tokens == CHUNKS * (CTX - 1 - CTX // 2)
        # perplexity from the stored log-probabilities (quantized to 16 bits) agrees with the exact one
        tokens, lp = llama_tools.read_logprobs_file(stock)
        nxt = tokens[:, CTX // 2 + 1:].reshape(-1)
        ppl_file = math.exp(-float(lp[np.arange(nxt.size), nxt].mean()))
        assert res.ppl == pytest.approx(ppl_file, rel=2e-4), name


def test_kl_divergence_matches_numpy_on_llama_perplexity_files(models, llama, text, tmp_path):
    base = _stock_base(llama, models["f16"], text, tmp_path / "f16.kld")
    qfile = _stock_base(llama, models["q"], text, tmp_path / "q.kld")
    res = llama_eval.text_eval(llama, models["q"], base=base, threads=2)
    _, lp_base = llama_tools.read_logprobs_file(base)
    _, lp_q = llama_tools.read_logprobs_file(qfile)
    keep = lp_base > -16  # llama.cpp's KLD skips base probabilities below e^-16
    kld_rows = np.where(keep, np.exp(lp_base) * (lp_base - lp_q), 0.0).sum(axis=1)
    assert res.kld > 1e-6  # Q2_K really differs from F16 (the tiny random model is nearly uniform)
    assert res.kld == pytest.approx(float(kld_rows.mean()), rel=5e-3, abs=1e-6)
    assert res.top1 == pytest.approx(float((lp_base.argmax(1) == lp_q.argmax(1)).mean()), abs=2 / lp_q.shape[0])
    assert res.ppl_base == pytest.approx(llama_eval.text_eval(llama, models["f16"], base=base, threads=2).ppl,
                                         rel=2e-4)


def test_model_against_its_own_base_has_zero_divergence(models, llama, text, tmp_path):
    base, ref = llama_eval.kld_base(llama, models["q"], text, ctx=CTX, chunks=CHUNKS, threads=2, cache=tmp_path)
    again, _ = llama_eval.kld_base(llama, models["q"], text, ctx=CTX, chunks=CHUNKS, threads=2, cache=tmp_path)
    assert again == base  # cached
    res = llama_eval.text_eval(llama, models["q"], base=base, threads=2)
    assert res.kld < 1e-6 and res.top1 == 1.0
    assert res.ppl == pytest.approx(ref.ppl, rel=1e-12)


def test_chunk_split_across_batches(models, llama, text):
    """-b below the context decodes each chunk in pieces (as llama-perplexity does): same numbers up to rounding."""
    whole = llama_eval.text_eval(llama, models["f16"], text=text, ctx=CTX, chunks=CHUNKS, threads=2)
    split = llama_eval.text_eval(llama, models["f16"], text=text, ctx=CTX, chunks=CHUNKS, threads=2, batch=16)
    assert split.ppl == pytest.approx(whole.ppl, rel=1e-3)


def test_text_errors_are_one_line(models, llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(EoraError, match="tokens long; a context of 64 needs at least 128"):
        llama_eval.text_eval(llama, models["f16"], text=short, ctx=CTX, threads=2)
    bogus = tmp_path / "bogus.kld"
    bogus.write_bytes(b"not a base file at all")
    with pytest.raises(EoraError, match="not a log-probability file"):
        llama_eval.text_eval(llama, models["f16"], base=bogus, threads=2)
    with pytest.raises(EoraError, match="does not exist"):
        llama_eval.text_eval(llama, models["f16"], base=tmp_path / "missing.kld", threads=2)


def test_base_of_another_vocabulary_is_refused(models, llama, text, tmp_path):
    base, _ = llama_eval.kld_base(llama, models["f16"], text, ctx=CTX, chunks=CHUNKS, threads=2, cache=tmp_path)
    raw = bytearray(base.read_bytes())
    n_vocab = int(np.frombuffer(bytes(raw[12:16]), np.int32)[0])
    raw[12:16] = np.int32(n_vocab + 2).tobytes()  # as if made by a model with another vocabulary
    other = tmp_path / "other.kld"
    other.write_bytes(bytes(raw))
    with pytest.raises(EoraError, match="vocabulary"):
        llama_eval.text_eval(llama, models["f16"], base=other, threads=2)


def test_eval_cli_reports_kld(models, text, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(models["q"]), "--reference", str(models["f16"]), "--ppl", str(text),
                 "--ctx", str(CTX), "--chunks", str(CHUNKS), "--threads", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KL divergence to" in printed and "top-1 agreement" in printed
    import json

    res = json.loads(out.read_text())
    assert res["divergence"]["kld"] > 0 and 0 < res["divergence"]["top1"] <= 1
    assert res["perplexity"]["scored_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    assert res["perplexity"]["tokens"] == CHUNKS * CTX
