"""`eora-gguf ladder` end to end on a tiny model: the file it writes, its byte accounting, its reuse of finished work,
and the joint base + adapter refinement."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from eora_gguf import ladder, ladder_report, refine
from eora_gguf.cli import main

pytestmark = pytest.mark.llama_cpp


def _words(path: Path, n: int, seed: int) -> Path:
    from tiny_models import _WORDS

    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(_WORDS, n)))
    return path


def test_ladder_end_to_end(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf("llama")
    calib = _words(tmp_path / "calib.txt", 3000, 1)
    text = _words(tmp_path / "eval.txt", 1500, 2)
    out = tmp_path / "ladder"
    argv = ["ladder", str(hf), "-o", str(out), "--calib", str(calib), "--samples", "4", "--seqlen", "64",
            "--text", str(text), "--types", "Q2_K,Q4_K_M", "--ctx", "64", "--chunks", "2", "--threads", "2",
            "--embedding-types", "q4_0", "--refine", "1", "--json"]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    res = json.loads(capsys.readouterr().out)
    data = json.loads((out / "ladder.json").read_text())
    assert data["rows"] == res["rows"]
    keys = {"name", "kind", "imatrix", "files", "bytes", "kld", "ppl", "top1"}
    for r in data["rows"]:
        assert keys <= set(r)
        files = [out / f for f in r["files"]]
        assert all(f.is_file() for f in files) and not any(Path(f).is_absolute() for f in r["files"])
        assert r["bytes"] == sum(f.stat().st_size for f in files)
        assert r["kld"] >= 0 and r["ppl"] > 1 and 0 < r["top1"] <= 1
    kinds = [(r["kind"], r.get("type"), r["imatrix"]) for r in data["rows"]]
    assert kinds[0] == ("f16", "F16", False) and data["rows"][0]["kld"] == 0.0
    for t in ("Q2_K", "Q4_K_M"):
        assert ("stock", t, False) in kinds and ("stock", t, True) in kinds
    # the imatrix changes the quantization (and the files record which one each row is)
    q, qi = (gguf.GGUFReader(out / f"model-Q2_K{s}.gguf") for s in ("", "-imatrix"))
    a = next(t for t in q.tensors if t.name == "blk.0.ffn_gate.weight").data
    b = next(t for t in qi.tensors if t.name == "blk.0.ffn_gate.weight").data
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    variant = [r for r in data["rows"] if r.get("token_embd") == "q4_0" and r["kind"] == "stock"]
    assert len(variant) == 2 and all(not r["rung"] and r["imatrix"] for r in variant)
    pairs = [r for r in data["rows"] if r["kind"] == "eora"]
    assert pairs, "no pair fitted below the largest rung"
    assert data["refinement"] and all([it["iteration"] for it in ref["iterations"]] == [0, 1]
                                      for ref in data["refinement"])
    assert any(r.get("refined") == 1 for r in pairs)
    for p in pairs:
        assert len(p["files"]) == 2 and p["bytes"] <= p["budget"]
    for v in data["verdicts"]:
        fit = [p for p in pairs if p["bytes"] <= v["bytes"]]
        if fit:
            assert v["pair_kld"] == min(p["kld"] for p in fit)
    md = (out / "ladder.md").read_text()
    for r in data["rows"]:
        assert f"{r['kld']:.4f}" in md and f"{r['ppl']:.3f}" in md
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every model, adapter and measurement
    made = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    assert main(argv) == 0
    capsys.readouterr()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == made
    # both invocations' step seconds are kept; the totals are their sums
    again = json.loads((out / "ladder.json").read_text())
    runs = again["invocations"]
    assert len(runs) == 2 and runs[0]["seconds"] == data["seconds"]
    for step in ("convert", "calibrate", "quantize", "measure_stock", "pairs", "total"):
        assert again["seconds_all_invocations"][step] == round(sum(r["seconds"][step] for r in runs), 2)
    assert runs[1]["seconds"]["calibrate"] < runs[0]["seconds"]["calibrate"]  # the second one reused it
    assert "over 2 invocation(s)" in (out / "ladder.md").read_text()


def test_write_shifted_subtracts_the_adapter(tiny_gguf, tmp_path):
    f16 = tiny_gguf("llama")
    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(f16)
    w = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    shift = rng.standard_normal(np.asarray(w.data).shape).astype(np.float32) * 0.01
    out = refine.write_shifted(f16, tmp_path / "shifted.gguf", {"blk.1.attn_q.weight": shift})
    new = gguf.GGUFReader(out)
    got = {t.name: np.asarray(t.data) for t in new.tensors}
    old = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(got) == set(old)
    expect = (old["blk.1.attn_q.weight"].astype(np.float32) - shift).astype(np.float16)
    assert np.array_equal(got["blk.1.attn_q.weight"], expect)
    assert all(np.array_equal(got[n], old[n]) for n in old if n != "blk.1.attn_q.weight")
    for key, field in reader.fields.items():  # every model key survives with its value
        if not key.startswith("GGUF."):
            assert new.fields[key].contents() == field.contents(), key
    with pytest.raises(Exception, match="no tensor"):
        refine.write_shifted(f16, tmp_path / "bad.gguf", {"blk.9.attn_q.weight": shift})
    assert not (tmp_path / "bad.gguf").exists()


def test_best_per_rung_picks_lowest_kld_that_fits():
    rows = [ladder_report.Row("Q2", "stock", False, ["a"], 100, 0.3, 30, 0.8, {"type": "Q2"}),
            ladder_report.Row("Q2 +im", "stock", True, ["b"], 100, 0.2, 25, 0.85, {"type": "Q2"}),
            ladder_report.Row("Q3 +im", "stock", True, ["c"], 120, 0.1, 20, 0.9, {"type": "Q3"}),
            ladder_report.Row("p1", "eora", True, ["b", "x"], 119, 0.09, 19, 0.9, {"type": "Q2"}),
            ladder_report.Row("p2", "eora", True, ["b", "y"], 121, 0.01, 15, 0.95, {"type": "Q2"})]
    v = {e["rung"]: e for e in ladder_report.best_per_rung(rows)}
    assert v["Q3"]["best_pair"] == "p1" and v["Q3"]["wins_imatrix"] is True
    assert v["Q2"]["best_pair"] is None and v["Q2"]["wins_imatrix"] is False


def test_pair_bases_are_the_measured_front_per_embedding_kind(tmp_path):
    """Sizes and KLDs shaped like SmolLM2's ladder: dominated bases (Q4_0 behind the smaller IQ4_XS, Q2_K behind
    IQ3_S of equal size, an identical Q3_K_S file) are never offered; a base that leaves no room for an adapter is
    skipped for the next smaller one; each embedding kind has its own front."""
    table = {("IQ3_XXS", ""): (860, 0.17), ("Q2_K", ""): (880, 0.26), ("Q3_K_S", ""): (880, 0.26),
             ("IQ3_S", ""): (880, 0.13), ("IQ4_XS", ""): (900, 0.087), ("Q4_0", ""): (910, 0.156),
             ("Q3_K_M", ""): (930, 0.081), ("Q3_K_M", "q5_0"): (820, 0.106), ("Q3_K_L", "q5_0"): (869, 0.087),
             ("Q4_K_S", "q5_0"): (914, 0.064), ("Q5_K_M", "q5_0"): (901, 0.03)}
    quants, kld = {}, {}
    for (t, emb), (size, k) in table.items():
        q = tmp_path / f"model-{t}-imatrix{'-embd-' + emb if emb else ''}.gguf"
        q.write_bytes(b"\0" * size)
        quants[(t, True, emb)], kld[q] = q, k
    quants[("Q4_0", False, "")] = tmp_path / "plain-not-a-base.gguf"  # plain quants are never bases

    def names(emb: str, size: int, n: int = 5) -> list[str]:
        return [t for t, _ in ladder.pair_bases(quants, kld, emb, size, n)]

    assert names("", 935) == ["Q3_K_M", "IQ4_XS", "IQ3_S", "IQ3_XXS"]
    assert names("", 935, 1) == ["Q3_K_M"]
    assert names("", 912) == ["IQ4_XS", "IQ3_S", "IQ3_XXS"]  # Q4_0 (910): a smaller base is better
    # 870 - 869 leaves less than MIN_ADAPTER_SHARE of the rung: the next smaller base of that kind
    assert names("q5_0", 870) == ["Q3_K_M"]
    # the Q5_K_M base with a Q5_0 embedding beats Q4_K_S's embedding variant; other kinds are not compared
    assert names("q5_0", 930) == ["Q5_K_M", "Q3_K_L", "Q3_K_M"]
    assert names("", 850) == []
