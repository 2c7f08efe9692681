"""`eora-gguf make`: HF folder -> base + one adapter per calibration spec + model card; reuse; card commands run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from test_cli import run_json, words

from eora_gguf import serve
from eora_gguf.cli import main
from eora_gguf.errors import EoraError
from eora_gguf.info import check_fit, describe
from eora_gguf.make import CalibSpec, parse_calibs


def test_calib_spec_names():
    assert CalibSpec.parse("arc=arc_challenge:1,demo:1") == CalibSpec("arc", "arc_challenge:1,demo:1")
    assert CalibSpec.parse("arc_challenge:1,demo:1").name == "arc_challenge-demo"
    assert CalibSpec.parse("/data/my notes.txt").name == "my_notes"
    with pytest.raises(EoraError, match="names no calibration data"):
        CalibSpec.parse("x=")
    with pytest.raises(EoraError, match="adapter name 'a/b'"):
        CalibSpec.parse("a/b=demo")
    with pytest.raises(EoraError, match="two --calib specs are named 'demo'"):
        parse_calibs(["demo", "demo=demo:1,stories:1"])


def card_blocks(readme: str) -> list[str]:
    """The shell lines of the model card's ```sh blocks, in order (comments kept: bash ignores them)."""
    return [ln for block in re.findall(r"```sh\n(.*?)```", readme, re.S) for ln in block.splitlines() if ln.strip()]


def run_card(out: Path, readme: str, timeout: float = 300) -> list[str]:
    """Run the card's commands as written, from the output folder: llama-server in the background (killed at the
    end), every other line in one bash session; returns the stdout of each request line."""
    lines = card_blocks(readme)
    path = next(ln for ln in lines if ln.startswith("export PATH="))
    server = next(ln for ln in lines if ln.startswith("llama-server "))
    proc = subprocess.Popen(["bash", "-c", f"{path} && exec {server}"], cwd=out, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        outputs = []
        for ln in lines:
            if ln is server:
                continue
            res = subprocess.run(["bash", "-c", f"{path} && {ln}"], cwd=out, capture_output=True, text=True,
                                 errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, f"{ln}\n{res.stderr[-2000:]}"
            outputs.append(res.stdout)
        return outputs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.llama_cpp
def test_make_two_adapters_card_and_reuse(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf("llama")
    calib_a = words(tmp_path / "a.txt", 3000, seed=11)
    calib_b = words(tmp_path / "b.txt", 3000, seed=12)
    text = words(tmp_path / "eval.txt", 1500, seed=13)
    out = tmp_path / "out"
    port = serve.free_port()
    argv = ["make", hf, "-o", out, "--quant", "Q2_K", "--rank", "8", "--calib", f"first={calib_a}",
            "--calib", f"second={calib_b}", "--samples", "4", "--seqlen", "64", "--text", text, "--ctx", "64",
            "--chunks", "4", "--peft", "--threads", "2", "--port", port, "--prompt", "the quick brown fox"]
    res = run_json(capsys, argv)
    stem = hf.name
    base, a, b = out / f"{stem}-Q2_K.gguf", out / f"{stem}-Q2_K-first.gguf", out / f"{stem}-Q2_K-second.gguf"
    for p in (base, a, b, out / "README.md", out / "make.json", out / "peft-first" / "adapter_config.json",
              out / "peft-second" / "adapter_model.safetensors", out / "work" / "imatrix.gguf"):
        assert p.is_file(), p
    made = json.loads((out / "make.json").read_text())
    assert [x["name"] for x in made["adapters"]] == ["first", "second"] and made["imatrix_calib"] == str(calib_a)
    assert res["adapters"] == made["adapters"]
    # each adapter records its own calibration and the one base; both fit it
    for adapter, calib in ((a, calib_a), (b, calib_b)):
        e = describe(adapter)["eora"]
        assert e["eora.calibration"] == str(calib) and e["eora.calibration_tokens"] == 4 * 64
        assert e["eora.rank"] == 8 and e["eora.base_model"] == base.name
        assert check_fit(adapter, base)["same_base"] is True
    assert describe(a)["eora"]["eora.name"] == "first"
    # the measurements: base alone and with each adapter, over the same tokens, in make.json and the card
    rows = made["measured"]["rows"]
    assert [r["adapter"] for r in rows] == [None, None, "first", "second"] and rows[0]["model"] == "F16"
    assert rows[1]["kld"] > 0 and len({r["kld"] for r in rows[1:]}) == 3
    readme = (out / "README.md").read_text()
    for r in rows[1:]:
        assert f"| {r['kld']:.4g} |" in readme

    # the card's commands run as written; each request answers, the adapter list names both
    outputs = run_card(out, readme)
    completions = [json.loads(o) for o in outputs if o.lstrip().startswith("{") and '"content"' in o]
    assert len(completions) == 3 and all(1 <= c["tokens_predicted"] <= 32 for c in completions)
    listed = json.loads(outputs[-1])
    assert [x["task_name"] for x in listed] == ["first", "second"] and {x["scale"] for x in listed} == {0.0}

    # a second run reuses every file; a changed spec redoes only its adapter
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".gguf", ".safetensors")}
    run_json(capsys, argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    calib_c = words(tmp_path / "c.txt", 3000, seed=14)
    run_json(capsys, [str(x).replace(str(calib_b), str(calib_c)) for x in argv])
    changed = {p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert changed == {"calib-second.safetensors", b.name, "adapter_model.safetensors"}


@pytest.mark.llama_cpp
def test_make_with_a_budget(tiny_hf, llama, tmp_path, capsys):
    hf = tiny_hf("llama")
    calib = words(tmp_path / "a.txt", 3000, seed=15)
    out = tmp_path / "out"
    res = run_json(capsys, ["make", hf, "-o", out, "--quant", "Q4_K_M", "--budget", "adapter:60KB", "--calib",
                            f"x={calib}", "--samples", "8", "--seqlen", "64", "--no-imatrix", "--threads", "2"])
    (a,) = res["adapters"]
    assert a["bytes"] <= 60_000 and a["recorded"]["eora.budget"] == "adapter:60KB" and a["pairs"] >= 1
    assert res["imatrix"] is False and not (out / "work" / "imatrix.gguf").exists() and res["measured"] is None
    assert "Nothing was measured" in (out / "README.md").read_text()


@pytest.mark.llama_cpp
def test_make_refuses_bad_input_before_work(tiny_hf, tmp_path, capsys):
    hf = tiny_hf("llama")
    for extra, msg in ((["--rank", "8", "--budget", "adapter:1MB"], "not both"),
                       (["--rank", "8", "--quant", "Q9_Z"], "unknown --quant"),
                       (["--rank", "8", "--calib", "a=demo", "--calib", "a=stories"], "two --calib specs"),
                       (["--rank", "100000"], "exceeds min")):
        argv = ["make", str(hf), "-o", str(tmp_path / "o"), "--quant", "Q2_K", *extra]
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
    assert main(["make", str(hf), "-o", str(hf / "inside"), "--quant", "Q2_K", "--rank", "8"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_make_smollm2_card_runs_as_written(smol_made):
    out, made = smol_made
    rows = made["measured"]["rows"]
    assert [r["adapter"] for r in rows] == [None, None, "general", "arc"]
    assert all(r["kld"] < rows[1]["kld"] for r in rows[2:])  # each adapter brings the base closer to F16
    readme = (out / "README.md").read_text()
    outputs = run_card(out, readme, timeout=600)
    completions = [json.loads(o) for o in outputs if o.lstrip().startswith("{") and '"content"' in o]
    assert len(completions) == 3 and all(c["content"] for c in completions)
    assert [x["task_name"] for x in json.loads(outputs[-1])] == ["general", "arc"]
