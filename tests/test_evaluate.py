"""Evaluation: metric definitions, the llama.cpp scoring/generation client against torch, sweep -> report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eora_gguf import tasks
from eora_gguf.errors import EoraError

# ----------------------------------------------------------------------------------------------------------------
# metrics (pure)


def item(gold: int, *choices: str) -> tasks.MCItem:
    return tasks.MCItem(id="x", context="Question: q\nAnswer:", choices=[" " + c for c in choices], gold=gold)


def test_acc_and_acc_norm_follow_lm_eval_definitions():
    items = [item(0, "a", "much longer answer"),   # raw favours the long one, per byte the short one
             item(1, "a", "much longer answer"),
             item(2, "x", "y", "z")]
    lps = [[-3.0, -2.0], [-3.0, -2.0], [-5.0, -1.0, -1.0]]
    m = tasks.mc_metrics(items, lps)
    # item 0: acc picks 1 (wrong); per byte: -3/2=-1.5 vs -2/19 -> picks 1 (wrong)
    # item 1: acc picks 1 (right); per byte picks 1 (right)
    # item 2: tie between 1 and 2 -> first (1), wrong for both
    assert m["n"] == 3 and m["acc"] == pytest.approx(100 / 3) and m["acc_norm"] == pytest.approx(100 / 3)
    lps[0] = [-0.5, -2.0]  # now short wins raw; per byte -0.25 vs -0.105 -> long wins
    m = tasks.mc_metrics(items, lps)
    assert m["acc"] == pytest.approx(200 / 3) and m["acc_norm"] == pytest.approx(100 / 3)
    assert m["acc_stderr"] == pytest.approx(100 * math.sqrt((2 / 3) * (1 / 3) / 2))


def test_acc_norm_uses_bytes_not_characters():
    it = item(0, "é", "ab")  # 'é' is 2 bytes: " é" = 3 bytes, " ab" = 3 bytes, equal lengths
    assert tasks.mc_metrics([it], [[-3.0, -3.3]])["acc_norm"] == 100.0
    it = item(1, "éé", "abc")  # " éé" 5 bytes vs " abc" 4 bytes: -5/5 = -1 beats -4.4/4 = -1.1
    assert tasks.mc_metrics([it], [[-5.0, -4.4]])["acc_norm"] == 0.0


def test_gold_nll_is_the_token_weighted_loss_with_a_ratio_stderr():
    items = [item(0, "a", "b"), item(1, "a", "b"), item(0, "a", "b")]
    gold = [(-2.0, 1), (-9.0, 3), (-1.0, 2)]
    m = tasks.mc_gold_nll(items, gold)
    nll, n = np.array([2.0, 9.0, 1.0]), np.array([1, 3, 2])
    loss = nll.sum() / n.sum()  # as cross-entropy with reduction="mean" over all six tokens
    assert m["n"] == 3 and m["tokens"] == 6 and m["nll"] == pytest.approx(loss)
    # delta method for a ratio of means: var(mean(nll) / mean(n)) ~ var(mean(nll - L n)) / mean(n)^2
    assert m["nll_stderr"] == pytest.approx(np.std(nll - loss * n, ddof=1) / math.sqrt(3) / n.mean())
    with pytest.raises(EoraError, match="2 gold scores for 3 items"):
        tasks.mc_gold_nll(items, gold[:2])
    with pytest.raises(EoraError, match="0 tokens"):
        tasks.mc_gold_nll(items[:1], [(-1.0, 0)])


def test_metric_input_errors():
    with pytest.raises(EoraError, match="score rows"):
        tasks.mc_metrics([item(0, "a", "b")], [])
    with pytest.raises(EoraError, match="choices"):
        tasks.mc_metrics([item(0, "a", "b")], [[1.0]])
    with pytest.raises(EoraError, match="unknown task 'arc'"):
        tasks.parse_tasks("arc_easy,arc")


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day. The answer is 18.", "18"),
    ("The answer is $1,200.00", "1200"),
    ("so -3.50 degrees", "-3.5"),
    ("no digits here", None),
    ("12 apples and 7 pears, 19 in all.\n", "19"),
])
def test_gsm8k_final_number(text, expected):
    assert tasks.final_number(text) == expected


def test_gsm8k_metrics_and_prompt():
    items = [{"question": "q1", "short_answer": "18"}, {"question": "q2", "short_answer": "1,000"}]
    m = tasks.gsm8k_metrics(items, ["... The answer is 18.", "it is 100"])
    assert m["n"] == 2 and m["exact_match"] == 50.0
    shot = {"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5 apples\n#### 5"}
    p = tasks.gsm8k_prompt([shot], "And now?")
    assert p == "Question: How many?\nAnswer: 2 + 3 = 5 apples The answer is 5.\n\nQuestion: And now?\nAnswer:"


# ----------------------------------------------------------------------------------------------------------------
# through llama.cpp, against torch on a tiny model

MC = [  # hand-made items; which choice is right does not matter for the check, only the scores
    ("Question: the model reads a quantized weight and\nAnswer:", [" calibration text", " lazy dog", " one two"], 0),
    ("Question: quick brown fox jumps over the\nAnswer:", [" lazy dog", " matrix", " eigen value vector", " x"], 0),
    ("Question: one two three four\nAnswer:", [" five", " five six seven", " hello world"], 1),
    ("the adapter that llama runs with its own", [" kernels", " numbers one", " GGUF tensor"], 2),
]


def torch_scores(hf_dir: Path, requests: list[tuple[str, list[str]]]) -> list[list[float]]:
    """Independent lm-eval-style log-likelihoods in float64 with transformers and the HF tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models import load_tokenizer

    tok = load_tokenizer(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    out = []
    for ctx, conts in requests:
        c = tok(ctx)["input_ids"]
        row = []
        for cont in conts:
            whole = tok(ctx + cont)["input_ids"]
            assert whole[:len(c)] == c
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0], -1)
            row.append(float(sum(logp[p - 1, whole[p]] for p in range(len(c), len(whole)))))
        out.append(row)
    return out


@pytest.mark.llama_cpp
def test_llama_cpp_scores_match_torch(tiny_hf, tiny_gguf, llama):
    from eora_gguf import llama_eval

    reqs = [(c, conts) for c, conts, _ in MC]
    ours = llama_eval.score(llama, tiny_gguf("llama", "f32"), reqs, threads=2)
    ref = torch_scores(tiny_hf("llama"), reqs)
    for got, want in zip(ours, ref):
        assert [s.n_tokens > 0 for s in got] == [True] * len(want)
        np.testing.assert_allclose([s.logprob for s in got], want, rtol=1e-4, atol=2e-3)
    # the metrics on these scores equal the metrics on the reference scores
    items = [tasks.MCItem("i", c, conts, g) for c, conts, g in MC]
    assert tasks.mc_metrics(items, [[s.logprob for s in r] for r in ours]) == tasks.mc_metrics(items, ref)


@pytest.mark.llama_cpp
def test_scores_do_not_depend_on_batching(tiny_gguf, llama):
    """Packing many records into one decode (shared contexts, many sequences) gives each one's solo scores."""
    from eora_gguf import llama_eval

    model = tiny_gguf("llama", "f32")
    reqs = [(c, conts) for c, conts, _ in MC] * 5
    packed = llama_eval.score(llama, model, reqs, threads=2)
    solo = [llama_eval.score(llama, model, [r], threads=1, ctx=64)[0] for r in reqs[:4]]
    for a, b in zip(packed, solo):
        np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], rtol=1e-4, atol=1e-3)
    for a, b in zip(packed[:4], packed[4:8]):
        assert [s.logprob for s in a] == pytest.approx([s.logprob for s in b], abs=1e-3)


@pytest.mark.llama_cpp
def test_adapter_changes_scores(tiny_hf, tiny_gguf, llama, tmp_path):
    """--lora reaches the scoring client: an adapter that is not zero moves the scores."""
    from eora_gguf import compensate, llama_eval, llama_tools

    q = llama_tools.quantize(llama, tiny_gguf("llama"), tmp_path / "q.gguf", "Q2_K")
    words = " ".join(c + "".join(conts) for c, conts, _ in MC) * 40
    (tmp_path / "calib.txt").write_text(words)
    compensate.compensate(tiny_hf("llama"), q, tmp_path / "a.gguf", rank=8, calib=str(tmp_path / "calib.txt"),
                          samples=4, seqlen=64)
    reqs = [(c, conts) for c, conts, _ in MC]
    base = llama_eval.score(llama, q, reqs, threads=2)
    with_a = llama_eval.score(llama, q, reqs, lora=[tmp_path / "a.gguf"], threads=2)
    diff = max(abs(a.logprob - b.logprob) for ra, rb in zip(base, with_a) for a, b in zip(ra, rb))
    assert diff > 1e-3


@pytest.mark.llama_cpp
def test_greedy_generation_matches_torch_and_stops(tiny_hf, tiny_gguf, llama):
    import torch
    from transformers import AutoModelForCausalLM

    from eora_gguf import llama_eval

    from tiny_models import load_tokenizer

    hf = tiny_hf("llama")
    prompts = ["the model reads a quantized", "one two three", "quick brown fox"]
    gens = llama_eval.generate(llama, tiny_gguf("llama", "f32"), prompts, max_new=12, threads=2, parallel=2,
                               ctx_per_seq=128)
    tok = load_tokenizer(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    for p, g in zip(prompts, gens):
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        assert list(g.tokens) == out.tolist() and g.n_tokens == len(out)
    # a stop string cuts the text where it first appears, and generation stops there
    g = gens[0]
    at = g.text.find(" ", 3)
    assert 0 < at < len(g.text) - 3, g.text
    stop = g.text[at:at + 3]
    cut = llama_eval.generate(llama, tiny_gguf("llama", "f32"), prompts[:1], stop=[stop], max_new=12, threads=2,
                              ctx_per_seq=128)[0]
    assert cut.text == g.text[:g.text.find(stop)] and cut.n_tokens < g.n_tokens


@pytest.mark.llama_cpp
def test_client_reports_bad_input(tiny_gguf, llama, tmp_path):
    from eora_gguf import llama_eval

    with pytest.raises(EoraError, match="does not exist"):
        llama_eval.score(llama, tmp_path / "missing.gguf", [("a", [" b"])])
    with pytest.raises(EoraError, match="raise -c"):
        llama_eval.score(llama, tiny_gguf("llama", "f32"), [("the model " * 100, [" reads"])], ctx=64)
    with pytest.raises(EoraError, match="adds no token"):
        llama_eval.score(llama, tiny_gguf("llama", "f32"), [("the model", [""])])


# ----------------------------------------------------------------------------------------------------------------
# sweep -> report, end to end on the tiny model


@pytest.mark.llama_cpp
def test_sweep_then_report(tiny_hf, llama, tmp_path, capsys, monkeypatch):
    from test_cli import run_json, words

    from eora_gguf import assets

    # ARC-style items made from the tiny model's vocabulary, put where the task loader reads its data
    rng = np.random.default_rng(0)
    vocab = "the model reads a quantized weight and calibration text then writes an adapter".split()
    rows = []
    for i in range(12):
        q = " ".join(rng.choice(vocab, 6))
        rows.append({"id": f"t{i}", "question": q, "query": f"Question: {q}\nAnswer:",
                     "choices": [" ".join(rng.choice(vocab, k)) for k in (1, 2, 3, 2)], "gold": int(i % 4)})
    data = tmp_path / "arc_easy_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = assets.data_file
    monkeypatch.setattr(assets, "data_file", lambda name: data if name == "arc_easy_test" else real(name))

    hf = tiny_hf("llama")
    calib = words(tmp_path / "calib.txt", 3000, seed=6)
    text = words(tmp_path / "eval.txt", 1500, seed=7)
    argv = ["sweep", hf, "--quant", "Q2_K,Q4_K_M", "--rank", "0,8", "--method", "eora,svd", "--chunks", "2",
            "--ctx", "64", "--samples", "4", "--seqlen", "64", "--calib", calib, "--text", text,
            "--workdir", tmp_path / "work", "--threads", "2", "--tasks", "arc_easy", "--limit", "10"]
    res = run_json(capsys, argv)
    sweep_file = tmp_path / "work" / hf.name / "sweep.json"
    sweep = json.loads(sweep_file.read_text())
    assert res["summary_file"] == str(sweep_file)
    got = [(r["quant"], r["method"], r["rank"]) for r in sweep["rows"]]
    assert got == [("F16", "-", 0), ("Q2_K", "-", 0), ("Q2_K", "eora", 8), ("Q2_K", "svd", 8),
                   ("Q4_K_M", "-", 0), ("Q4_K_M", "eora", 8), ("Q4_K_M", "svd", 8)]
    for r in sweep["rows"]:
        m = r["tasks"]["arc_easy"]
        assert m["n"] == 10 and 0 <= m["acc"] <= 100 and 0 <= m["acc_norm"] <= 100
        assert r["bpw"] == pytest.approx(8 * (r["model_bytes"] + r["adapter_bytes"]) / sweep["n_weights"])

    out = tmp_path / "report"
    rep = run_json(capsys, ["report", sweep_file, "-o", out])
    png = Path(rep["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = Path(rep["markdown"]).read_text()
    assert json.loads(Path(rep["json"]).read_text())["rows"] == sweep["rows"]
    for r in sweep["rows"]:  # every row's numbers appear in the Markdown, formatted from the sweep
        assert f"{r['ppl']:.3f}" in md and f"{r['bpw']:.3f}" in md and f"{r['kld']:.4f}" in md
        m = r["tasks"]["arc_easy"]
        assert f"{m['acc']:.2f} / {m['acc_norm']:.2f}" in md
    # evaluation results are cached per configuration: a second sweep re-reads them
    evals = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / hf.name / "eval").iterdir()}
    assert len(evals) == 7
    run_json(capsys, argv)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / hf.name / "eval").iterdir()} == evals


def test_report_rejects_bad_input(tmp_path, capsys):
    from eora_gguf.cli import main

    assert main(["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "r")]) == 2
    assert "run `eora-gguf sweep` first" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(bad), "-o", str(tmp_path / "r")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert not (tmp_path / "r" / "report.md").exists()


def test_eval_cli_bad_input(tmp_path, capsys):
    from eora_gguf.cli import main

    assert main(["eval", "--model", str(tmp_path / "none.gguf"), "--tasks", "arc_easy"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "none.gguf"), "--tasks", "mmlu"]) == 2
    assert "unknown task 'mmlu'" in capsys.readouterr().err
