from __future__ import annotations

import gzip
import json
import sys
import types

import numpy as np
import pytest
import torch

from eora_gguf import calib_data
from eora_gguf.calib_data import (
    build_calibration,
    calibration_fingerprint,
    parse_spec,
    read_texts,
    record_text,
    split_counts,
)
from eora_gguf.errors import EoraError

WORDS_A = [f"alpha{i}" for i in range(40)]
WORDS_B = [f"beta{i}" for i in range(40)]


def _tokenizer(add_bos: bool):
    """A word-level fast tokenizer over WORDS_A + WORDS_B, optionally adding <s> like Llama does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS_A + WORDS_B:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _write_words(path, words, n, seed):
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(words, size=n)))
    return path


@pytest.fixture
def sources(tmp_path):
    a = _write_words(tmp_path / "a.txt", WORDS_A, 3000, 1)
    b = _write_words(tmp_path / "b.txt", WORDS_B, 3000, 2)
    return a, b


def test_parse_spec_weights_and_defaults():
    assert parse_spec("demo") == [("demo", 1.0)]
    assert parse_spec("arc_easy:0.5, demo:0.5") == [("arc_easy", 0.5), ("demo", 0.5)]
    assert parse_spec("mytask.jsonl:3,demo") == [("mytask.jsonl", 3.0), ("demo", 1.0)]


@pytest.mark.parametrize("spec, words", [
    ("", "empty"), ("  ", "empty"), ("demo,", "empty entry"), ("demo:0", "positive"), ("demo:-1", "positive"),
    ("demo:abc", "not a number"), (":2", "no source"), ("demo:nan", "positive"), ("demo:inf", "positive"),
])
def test_parse_spec_refuses_malformed(spec, words):
    with pytest.raises(EoraError, match=words) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_name(tmp_path):
    tok = _tokenizer(False)
    with pytest.raises(EoraError, match="does not exist"):
        build_calibration(str(tmp_path / "nope.txt"), tok, samples=2, seqlen=8)
    with pytest.raises(EoraError, match="does not exist"):
        build_calibration(str(tmp_path / "nope.jsonl") + ":2", tok, samples=2, seqlen=8)


def test_unknown_format_refused(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(EoraError, match="unknown format"):
        build_calibration(str(p), _tokenizer(False), samples=1, seqlen=2)


def test_record_text_rules():
    assert record_text("plain") == "plain"
    assert record_text({"text": "t", "question": "q", "answer": "a"}) == "t"
    # GSM8K: question + worked answer
    assert record_text({"question": "Q?", "answer": "A.", "short_answer": "4"}) == "Q?\nA."
    # ARC as shipped by eora_gguf.assets: list choices + gold index
    record = {"question": "Q?", "query": "Question: Q?\nAnswer:", "choices": ["x", "y"], "gold": 1}
    assert record_text(record) == "Q?\ny"
    # ARC as on the hub: labelled choices + answerKey
    rec = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    assert record_text(rec) == "Q?\nz"
    assert record_text({"query": "Q:", "continuation": " c"}) == "Q: c"
    assert record_text({"prompt": "p", "completion": "c"}) == "p c"
    assert record_text({"id": 3, "foo": "bar"}) is None
    assert record_text([1, 2]) is None


def test_jsonl_and_gz(tmp_path):
    rows = [{"question": f"q{i}", "choices": ["x", "y"], "gold": i % 2} for i in range(3)]
    p = tmp_path / "t.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_texts(p) == ["q0\nx", "q1\ny", "q2\nx"]


def test_jsonl_bad_record_names_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"id": 1}) + "\n")
    with pytest.raises(EoraError, match=r"t\.jsonl:2 has no text"):
        read_texts(p)
    p.write_text("{not json\n")
    with pytest.raises(EoraError, match=r"t\.jsonl:1 is not valid JSON"):
        read_texts(p)


@pytest.mark.parametrize("add_bos", [False, True])
def test_windows_come_from_the_token_stream(sources, add_bos):
    a, _ = sources
    tok = _tokenizer(add_bos)
    ids = build_calibration(str(a), tok, samples=6, seqlen=16, seed=3)
    assert ids.shape == (6, 16) and ids.dtype == torch.int64
    stream = tok(a.read_text(), add_special_tokens=False)["input_ids"]
    text = " " + " ".join(map(str, stream)) + " "
    body = ids[:, 1:] if add_bos else ids
    if add_bos:
        assert (ids[:, 0] == tok.bos_token_id).all()
    else:
        assert not (ids == tok.bos_token_id).any()
    for row in body.tolist():
        assert " " + " ".join(map(str, row)) + " " in text
    assert len({tuple(r) for r in body.tolist()}) == 6  # distinct windows while the source has enough


def test_deterministic_by_seed(sources):
    a, b = sources
    tok = _tokenizer(False)
    spec = f"{a}:1,{b}:1"
    x = build_calibration(spec, tok, samples=8, seqlen=16, seed=0)
    assert torch.equal(x, build_calibration(spec, tok, samples=8, seqlen=16, seed=0))
    assert not torch.equal(x, build_calibration(spec, tok, samples=8, seqlen=16, seed=1))


def test_draws_of_one_seed_share_no_window(sources, caplog):
    a, b = sources  # 3000 tokens each: 187 windows of 16
    tok = _tokenizer(False)
    spec = f"{a}:1,{b}:3"
    d0 = build_calibration(spec, tok, samples=40, seqlen=16, seed=5)
    assert torch.equal(d0, build_calibration(spec, tok, samples=40, seqlen=16, seed=5, draw=0))
    draws = [d0] + [build_calibration(spec, tok, samples=40, seqlen=16, seed=5, draw=k) for k in (1, 2)]
    rows = [{tuple(r) for r in d.tolist()} for d in draws]
    assert all(len(r) == 40 for r in rows)
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    # each draw keeps the spec's mix: the first 10 rows from a, the rest from b
    a_ids = {tok.convert_tokens_to_ids(w) for w in WORDS_A}
    assert all(all(t in a_ids for t in row) == (i < 10) for d in draws for i, row in enumerate(d.tolist()))
    assert "reusing windows" not in caplog.text
    # b has 187 windows: draw 6 of its 30 needs the 181st..210th of its order, so windows come round again (warned)
    build_calibration(spec, tok, samples=40, seqlen=16, seed=5, draw=6)
    assert "in draw 6: reusing windows" in caplog.text
    with pytest.raises(EoraError, match="draw must be 0 or more"):
        build_calibration(spec, tok, samples=40, seqlen=16, draw=-1)


def test_mix_proportions(sources):
    a, b = sources
    tok = _tokenizer(False)
    a_ids = {tok.convert_tokens_to_ids(w) for w in WORDS_A}
    for wa, wb, samples in [(3, 1, 8), (0.5, 0.5, 10), (1, 4, 7)]:
        ids = build_calibration(f"{a}:{wa},{b}:{wb}", tok, samples=samples, seqlen=16)
        from_a = sum(all(t in a_ids for t in row) for row in ids.tolist())
        exact = samples * wa / (wa + wb)
        assert abs(from_a - exact) < 1, (wa, wb, samples, from_a)


def test_split_counts_sum_and_rounding():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.uniform(0.01, 5, size=rng.integers(1, 6)).tolist()
        total = int(rng.integers(1, 200))
        c = split_counts(w, total)
        assert sum(c) == total
        exact = np.asarray(w) / sum(w) * total
        assert np.all(np.abs(np.asarray(c) - exact) < 1)


def test_source_shorter_than_one_sample(tmp_path, sources):
    a, _ = sources
    short = _write_words(tmp_path / "short.txt", WORDS_B, 10, 0)
    with pytest.raises(EoraError, match="short.txt has 10 tokens, fewer than one sample of 16"):
        build_calibration(f"{a}:1,{short}:1", _tokenizer(False), samples=4, seqlen=16)


def test_reuse_when_source_small(tmp_path, caplog):
    small = _write_words(tmp_path / "small.txt", WORDS_A, 40, 0)
    ids = build_calibration(str(small), _tokenizer(False), samples=5, seqlen=16)
    assert ids.shape == (5, 16)
    assert "reusing windows" in caplog.text


def test_builtin_names_go_through_assets(monkeypatch, sources):
    a, b = sources
    files = {"demo": a, "arc_easy": b}
    asked = []

    def data_file(name):
        asked.append(name)
        if name not in files:
            raise EoraError(f"unknown built-in data set {name!r}")
        return files[name]

    try:
        import eora_gguf.assets as assets
        monkeypatch.setattr(assets, "data_file", data_file)
    except ImportError:
        fake = types.ModuleType("eora_gguf.assets")
        fake.data_file = data_file
        monkeypatch.setitem(sys.modules, "eora_gguf.assets", fake)
        import eora_gguf
        monkeypatch.setattr(eora_gguf, "assets", fake, raising=False)
    tok = _tokenizer(False)
    ids = build_calibration("arc_easy:1,demo:3", tok, samples=4, seqlen=16)
    assert asked == ["arc_easy", "demo"]
    b_ids = {tok.convert_tokens_to_ids(w) for w in WORDS_B}
    assert all(t in b_ids for t in ids[0].tolist())
    with pytest.raises(EoraError, match="unknown built-in"):
        build_calibration("wikitext", tok, samples=4, seqlen=16)


def test_fingerprint():
    ids = torch.arange(32).reshape(4, 8)
    f = calibration_fingerprint("demo:1", ids)
    assert len(f) == 64 and f == calibration_fingerprint("demo", ids.clone())
    assert f != calibration_fingerprint("demo:2", ids)
    assert f != calibration_fingerprint("demo", ids.reshape(8, 4))
    other = ids.clone()
    other[3, 7] += 1
    assert f != calibration_fingerprint("demo", other)


def test_bad_sizes():
    with pytest.raises(EoraError, match="samples >= 1"):
        calib_data.build_calibration("demo", _tokenizer(False), samples=0, seqlen=8)
