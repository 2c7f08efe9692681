"""The `eora-gguf` command line: --help, --json for every verb, one-line errors, and `run` end to end."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from eora_gguf.cli import main

from tiny_models import _WORDS


def words(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(_WORDS) for _ in range(n)))
    return path


def run_json(capsys, argv: list) -> dict:
    rc = main([str(a) for a in argv] + ["--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out)


def test_module_help():
    res = subprocess.run([sys.executable, "-m", "eora_gguf", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for verb in ("setup-llama-cpp", "fetch-demo", "convert", "quantize", "perplexity", "calibrate", "compensate", "run",
                 "make", "info"):
        assert verb in res.stdout
    res = subprocess.run([sys.executable, "-m", "eora_gguf", "compensate", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--rank" in res.stdout and "--peft" in res.stdout


def test_user_error_is_one_stderr_line_in_a_real_process(tiny_hf, tmp_path):
    res = subprocess.run([sys.executable, "-m", "eora_gguf", "calibrate", "--hf", str(tiny_hf("llama")),
                          "-o", str(tmp_path / "missing" / "stats.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eora-gguf: error: output directory "), res.stderr
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.llama_cpp
def test_every_verb_prints_json(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf("llama")
    text = words(tmp_path / "text.txt", 2000, seed=5)
    res = run_json(capsys, ["setup-llama-cpp"])
    assert Path(res["bin_dir"], "llama-quantize").is_file()
    res = run_json(capsys, ["convert", hf, "-o", tmp_path / "f16.gguf"])
    assert res["output"] == str(tmp_path / "f16.gguf") and res["bytes"] == (tmp_path / "f16.gguf").stat().st_size
    res = run_json(capsys, ["quantize", tmp_path / "f16.gguf", tmp_path / "q.gguf", "q4_k_m", "--threads", "2"])
    assert res["type"] == "Q4_K_M" and (tmp_path / "q.gguf").is_file()
    res = run_json(capsys, ["calibrate", "--hf", hf, "--calib", text, "--samples", "2", "--seqlen", "64",
                            "-o", tmp_path / "stats.safetensors"])
    assert res["tokens"] == 128 and res["sites"] == 8  # 4 input sites x 2 layers
    res = run_json(capsys, ["compensate", "--hf", hf, "--gguf", tmp_path / "q.gguf", "--stats",
                            tmp_path / "stats.safetensors", "--rank", "4", "-o", tmp_path / "a.gguf"])
    assert res["method"] == "eora" and res["rank"] == 4 and res["tensors"] == 14 and res["calib_tokens"] == 128
    res = run_json(capsys, ["perplexity", tmp_path / "q.gguf", "--lora", tmp_path / "a.gguf", "--text", text,
                            "--ctx", "64", "--chunks", "2", "--threads", "2"])
    assert res["lora"] == [str(tmp_path / "a.gguf")] and res["ppl"] > 1 and res["tokens"] == 128


@pytest.mark.llama_cpp
def test_run_end_to_end_then_reuses_its_files(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf("llama")
    calib = words(tmp_path / "calib.txt", 3000, seed=6)
    text = words(tmp_path / "eval.txt", 1500, seed=7)
    argv = ["run", hf, "--quant", "Q2_K", "--rank", "8", "--method", "eora,svd", "--chunks", "2", "--ctx", "64",
            "--samples", "4", "--seqlen", "64", "--calib", calib, "--text", text, "--workdir", tmp_path / "work",
            "--threads", "2"]
    res = run_json(capsys, argv)
    work = tmp_path / "work" / hf.name
    summary = json.loads((work / "summary.json").read_text())
    assert res["summary_file"] == str(work / "summary.json") and res["rows"] == summary["rows"]
    got = [(r["quant"], r["method"], r["rank"]) for r in summary["rows"]]
    assert got == [("F16", "-", 0), ("Q2_K", "-", 0), ("Q2_K", "eora", 8), ("Q2_K", "svd", 8)]
    for r in summary["rows"]:
        assert 1 < r["ppl"] < 1e4 and Path(r["model"]).is_file()
        assert (r["adapter"] is None) == (r["rank"] == 0) and (r["adapter_bytes"] > 0) == (r["rank"] > 0)
        assert (r["gap_recovered_pct"] is None) == (r["rank"] == 0)
        assert (r["kld"] == 0.0) == (r["quant"] == "F16") and r["kld"] >= 0 and 0 < r["top1"] <= 1
    assert summary["calib_tokens"] == 4 * 64 and summary["chunks"] == 2 and summary["ctx"] == 64
    made = {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.suffix in (".gguf", ".safetensors")}
    assert len(made) == 6  # F16, Q2_K (with the imatrix), calibration statistics, imatrix, two adapters
    assert len(list(work.glob("model-Q2_K-imatrix-*.gguf"))) == 1 and summary["imatrix"]
    res2 = run_json(capsys, argv)
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir() if p.suffix in (".gguf", ".safetensors")} == made
    assert [r["ppl"] for r in res2["rows"]] == [r["ppl"] for r in summary["rows"]]
    # other calibration (here other --samples): new statistics, imatrix, quantization and adapters, not the old
    # files (the names carry the calibration's key; --solver exact also renames the adapters)
    res3 = run_json(capsys, [*argv[:argv.index("--samples") + 1], "3", *argv[argv.index("--samples") + 2:],
                             "--method", "eora", "--solver", "exact"])
    new = {p.name for p in work.iterdir() if p.suffix in (".gguf", ".safetensors")} - set(made)
    assert len(new) == 4, new  # statistics, imatrix, Q2_K, one eora adapter
    assert {r["adapter"] for r in res3["rows"] if r["adapter"]} <= {str(work / n) for n in new}
