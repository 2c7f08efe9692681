"""Hostile-but-fair use of the command line (issue 16), through `main(argv)` on tiny models.

Every refusal is one stderr line, exit 2, comes before the work it would waste, and leaves inputs and output
folders as they were. GGUFs here are written with gguf-py from the tiny HF model's own weights (quantized to Q4_0:
a real quantization of that model), so only the cases that run llama.cpp need the pinned build.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from eora_gguf import calibration
from eora_gguf.cli import main

from tiny_models import _WORDS, build_tiny_model, write_gguf_copy, write_synthetic_gguf

Q = gguf.GGMLQuantizationType


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refused(capsys, argv: list, fragment: str) -> str:
    """Run main(argv); assert exit 2 with one stderr line holding `fragment`; return that line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-5:]
    assert len(err) == 1 and err[0].startswith("eora-gguf: error: "), err[-5:]
    assert fragment in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def m(tiny_hf, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("hostile")
    hf = tiny_hf("llama")
    cfg = json.loads((hf / "config.json").read_text())
    rng = random.Random(5)
    calib = d / "calib.txt"
    calib.write_text(" ".join(rng.choice(_WORDS) for _ in range(3000)))
    q4 = d / "q4.gguf"
    write_synthetic_gguf(q4, cfg, hf_dir=hf, qtype=Q.Q4_0)
    other_hf = build_tiny_model("llama", d / "other-hf", seed=1)  # same architecture and shapes, other weights
    other = d / "other-q8.gguf"
    write_synthetic_gguf(other, cfg, hf_dir=other_hf, qtype=Q.Q8_0)
    return {"d": d, "hf": hf, "cfg": cfg, "calib": calib, "q4": q4, "other": other}


def comp_argv(m: dict, out, *extra) -> list:
    return ["compensate", "--hf", m["hf"], "--gguf", m["q4"], "--rank", "4", "--calib", m["calib"], "--samples", "2",
            "--seqlen", "32", "-o", out, *extra]


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if a calibration starts: refusals must come before the work."""
    def boom(*a, **k):
        raise AssertionError("the calibration ran before the refusal")
    monkeypatch.setattr(calibration, "stream", boom)


# ------------------------------------------------------------------------------------------------ outputs


def test_compensate_output_equal_to_its_gguf_is_refused(m, capsys, no_calibration):
    before = sha(m["q4"])
    refused(capsys, comp_argv(m, m["q4"]), "also an input")
    assert sha(m["q4"]) == before


def test_compensate_output_symlinked_to_its_gguf_is_refused(m, tmp_path, capsys, no_calibration):
    link = tmp_path / "adapter.gguf"
    link.symlink_to(m["q4"])
    refused(capsys, comp_argv(m, link), "also an input")
    assert link.is_symlink()


def test_calibrate_into_the_model_folder_is_refused(m, tmp_path, capsys, no_calibration):
    hf = tmp_path / "hf"
    shutil.copytree(m["hf"], hf)
    before = sha(hf / "model.safetensors")
    refused(capsys, ["calibrate", "--hf", hf, "--calib", m["calib"], "--samples", "2", "--seqlen", "32",
                     "-o", hf / "model.safetensors"], "input folder")
    assert sha(hf / "model.safetensors") == before


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_special_file_output_is_refused_and_kept(m, tmp_path, capsys, no_calibration, kind):
    out = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a /dev/full node of our own
    refused(capsys, ["calibrate", "--hf", m["hf"], "--calib", m["calib"], "--samples", "2", "--seqlen", "32",
                     "-o", out], "not a regular file")
    assert (stat.S_ISFIFO if kind == "fifo" else stat.S_ISCHR)(os.lstat(out).st_mode)


def test_proc_output_is_refused_before_work(m, capsys, no_calibration):
    refused(capsys, ["calibrate", "--hf", m["hf"], "--calib", m["calib"], "--samples", "2", "--seqlen", "32",
                     "-o", "/proc/eora-gguf-stats.safetensors"], "does not take new files")


def test_immutable_output_is_refused_before_work(m, tmp_path, capsys, no_calibration):
    out = tmp_path / "a.gguf"
    out.write_bytes(b"old")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        refused(capsys, comp_argv(m, out), "immutable")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


def test_full_disk_is_one_line_and_leaves_nothing(m, tmp_path):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the stats write fail like a full disk would."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "stats.safetensors"
    code = ("import sys; from eora_gguf.cli import main; sys.exit(main(sys.argv[1:]))")
    res = subprocess.run([sys.executable, "-c", code, "calibrate", "--hf", str(m["hf"]), "--calib", str(m["calib"]),
                          "--samples", "2", "--seqlen", "32", "-o", str(out)], capture_output=True, text=True,
                         preexec_fn=limit, timeout=600, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("eora-gguf: error")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and len(lines) == 1 and "too large" in lines[0], res.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["calibrate", "compensate"])
def test_too_little_free_space_is_refused_before_work(m, tmp_path, capsys, monkeypatch, no_calibration, verb):
    """The file system reports 1 MiB free (os.statvfs): the stats (~6 MiB) or the adapter (F32 upper bound
    ~2 MiB at rank 64 with its PEFT copy) cannot fit, so the command stops before calibrating."""
    real = os.statvfs

    class Small:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, (1 << 20) // st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Small(real(p)))
    if verb == "calibrate":
        argv = ["calibrate", "--hf", m["hf"], "--calib", m["calib"], "-o", tmp_path / "s.safetensors"]
    else:
        argv = comp_argv(m, tmp_path / "a.gguf", "--peft", tmp_path / "peft")
        argv[argv.index("--rank") + 1] = "64"
    refused(capsys, argv, "MiB free")


def test_eval_output_checked_before_the_evaluation(m, tmp_path, capsys, monkeypatch):
    from eora_gguf import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking -o"))
    refused(capsys, ["eval", "--model", m["q4"], "--ppl", m["calib"], "-o", tmp_path / "nodir" / "r.json"],
            "does not exist")


def test_run_samples_zero_refused_before_convert(m, tmp_path, capsys, monkeypatch):
    from eora_gguf import llama_tools

    monkeypatch.setattr(llama_tools, "convert", lambda *a, **k: pytest.fail("converted before checking --samples"))
    refused(capsys, ["run", m["hf"], "--samples", "0", "--workdir", tmp_path / "w"], "--samples must lie in")


def test_quantize_in_place_is_refused(m, tmp_path, capsys):
    x = tmp_path / "x.gguf"
    shutil.copy(m["q4"], x)
    before = sha(x)
    refused(capsys, ["quantize", x, x, "Q4_0"], "also an input")
    assert sha(x) == before


def test_peft_is_all_or_nothing_and_rerunnable(m, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the PEFT folder is half written leaves neither output; the same command then succeeds."""
    from eora_gguf import peft as peft_mod

    out, peft = tmp_path / "a.gguf", tmp_path / "peft"
    real = peft_mod.write_peft

    def interrupted(out_dir, *a, **k):
        Path(out_dir, "adapter_model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(peft_mod, "write_peft", interrupted)
    assert main([str(a) for a in comp_argv(m, out, "--peft", peft)]) == 130
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(peft_mod, "write_peft", real)
    assert main([str(a) for a in comp_argv(m, out, "--peft", peft)]) == 0
    assert out.is_file() and sorted(p.name for p in peft.iterdir()) == sorted(peft_mod.PEFT_FILES)
    assert main([str(a) for a in comp_argv(m, out, "--peft", peft)]) == 0  # and again over its own outputs
    capsys.readouterr()


def test_stale_partials_of_a_killed_run_are_cleaned(m, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.gguf.{dead.pid}.k1lled00.gguf.partial"
    stale.write_bytes(b"half an adapter")
    assert main([str(a) for a in comp_argv(m, tmp_path / "a.gguf")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("argv,fragment", [
    (["perplexity", "{q4}", "--ctx", "0"], "--ctx must lie in"),
    (["perplexity", "{q4}", "--chunks", "-1"], "--chunks must lie in"),
    (["eval", "--model", "{q4}", "--tasks", "gsm8k", "--max-new", "0"], "--max-new must lie in"),
    (["eval", "--model", "{q4}", "--tasks", "arc_easy", "--limit", "0"], "--limit must lie in"),
    (["calibrate", "--hf", "{hf}", "--samples", "0", "-o", "{tmp}/s.safetensors"], "--samples must lie in"),
    (["calibrate", "--hf", "{hf}", "--seqlen", "1", "-o", "{tmp}/s.safetensors"], "--seqlen must lie in"),
    (["validate", "--hf", "{hf}", "--gguf", "{q4}", "--lora", "{q4}", "--rows", "0"], "--rows must lie in"),
    (["compensate", "--hf", "{hf}", "--gguf", "{q4}", "--rank", "4", "--eig-floor", "nan", "-o", "{tmp}/a.gguf"],
     "--eig-floor must lie in"),
    (["quantize", "{q4}", "{tmp}/o.gguf", "Q4_0", "--threads", "0"], "--threads must lie in"),
])
def test_numeric_options_are_checked_up_front(m, tmp_path, capsys, monkeypatch, argv, fragment):
    from eora_gguf import llamacpp

    monkeypatch.setattr(llamacpp, "locate", lambda *a, **k: pytest.fail("started work before checking numbers"))
    refused(capsys, [a.format(q4=m["q4"], hf=m["hf"], tmp=tmp_path) for a in argv], fragment)


def test_huge_samples_is_one_line_before_work(m, tmp_path, capsys, no_calibration):
    refused(capsys, ["calibrate", "--hf", m["hf"], "--calib", m["calib"], "--samples", "10000000", "--seqlen", "4096",
                     "-o", tmp_path / "s.safetensors"], "lower --samples or --seqlen")


def _broken_hf(src: Path, dst: Path, what: str) -> Path:
    shutil.copytree(src, dst)
    if what == "config not JSON":
        (dst / "config.json").write_text("{ not json")
    elif what == "config not an object":
        (dst / "config.json").write_text("[1, 2]")
    elif what == "truncated safetensors":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "no safetensors":
        (dst / "model.safetensors").unlink()
    elif what == "sizes contradict":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(cfg, hidden_size=512)))
    elif what == "no tokenizer":
        for f in ("tokenizer.model", "tokenizer_config.json"):
            (dst / f).unlink()
    elif what == "empty":
        shutil.rmtree(dst)
        dst.mkdir()
    return dst


HF_CASES = {"config not JSON": "is not valid JSON", "config not an object": "not an object",
            "truncated safetensors": "truncated", "no safetensors": "no model.safetensors",
            "sizes contradict": "hidden_size = 512 but the weights have 256", "no tokenizer": "has no tokenizer",
            "empty": "is empty"}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_folder_problems_are_one_line_naming_the_file(m, tmp_path, capsys, no_calibration, case):
    hf = _broken_hf(m["hf"], tmp_path / "hf", case)
    line = refused(capsys, ["calibrate", "--hf", hf, "--calib", m["calib"], "--samples", "2", "--seqlen", "32",
                            "-o", tmp_path / "s.safetensors"], HF_CASES[case])
    assert str(hf) in line


@pytest.mark.parametrize("case", ["no safetensors", "sizes contradict"])
def test_convert_refuses_a_folder_it_would_convert_wrongly(m, tmp_path, capsys, case):
    hf = _broken_hf(m["hf"], tmp_path / "hf", case)
    refused(capsys, ["convert", hf, "-o", tmp_path / "m.gguf"], HF_CASES[case])
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_of_another_model_is_refused_unless_allowed(m, tmp_path, capsys):
    argv = comp_argv(m, tmp_path / "a.gguf")
    argv[argv.index(m["q4"])] = m["other"]
    refused(capsys, argv, "is not a quantization of")
    assert not (tmp_path / "a.gguf").exists()
    assert main([str(a) for a in argv + ["--allow-mismatch"]]) == 0
    assert (tmp_path / "a.gguf").is_file()
    capsys.readouterr()


def test_validate_refuses_nan_weights_instead_of_a_nan_table(m, tmp_path, capsys):
    adapter = tmp_path / "a.gguf"
    assert main([str(a) for a in comp_argv(m, adapter)]) == 0
    reader = gguf.GGUFReader(m["q4"])
    name = "blk.1.ffn_up.weight"
    w = gguf.quants.dequantize(reader.get_tensor(
        [t.name for t in reader.tensors].index(name)).data, Q.Q4_0).astype(np.float32)
    w[7, 3] = np.inf
    nan_gguf = write_gguf_copy(m["q4"], tmp_path / "inf.gguf", {name: w})
    capsys.readouterr()
    refused(capsys, ["validate", "--hf", m["hf"], "--gguf", nan_gguf, "--lora", adapter, "--calib", m["calib"],
                     "--samples", "2", "--seqlen", "32"], "NaN/Inf")


@pytest.mark.parametrize("content,fragment", [(b"", "is empty"), (b"caf\xe9 au lait " * 50, "not UTF-8")])
def test_perplexity_text_checked_up_front(m, tmp_path, capsys, monkeypatch, content, fragment):
    from eora_gguf import llamacpp

    monkeypatch.setattr(llamacpp, "locate", lambda *a, **k: pytest.fail("ran llama.cpp on a bad text"))
    text = tmp_path / "t.txt"
    text.write_bytes(content)
    refused(capsys, ["perplexity", m["q4"], "--text", text], fragment)


def test_rebuild_holds_the_build_lock(monkeypatch, tmp_path, capsys):
    """`setup-llama-cpp --rebuild` builds under the lock every other build step takes."""
    import fcntl

    from eora_gguf import cache, llamacpp

    monkeypatch.setenv("EORA_GGUF_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    held = []

    def fake_build(**kw):
        with open(cache.cache_dir() / f"llama.cpp-{llamacpp.COMMIT}.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
                fcntl.flock(fh, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(True)
        return llamacpp.LlamaCpp(bin_dir=tmp_path, source_dir=tmp_path)

    monkeypatch.setattr(llamacpp, "build_pinned", fake_build)
    assert main(["setup-llama-cpp", "--rebuild", "--json"]) == 0
    assert held == [True]
    capsys.readouterr()


# ------------------------------------------------------------------------------------------ readable output


def test_ridge_warnings_are_summed_into_one_line(m, tmp_path):
    """64 calibration tokens for 256/512 inputs: every covariance needs the ridge. One line says so; --verbose
    lists each tensor."""
    code = "import sys; from eora_gguf.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [str(a) for a in comp_argv(m, tmp_path / "a.gguf")]

    def stderr(*extra: str) -> str:
        res = subprocess.run([sys.executable, "-c", code, *argv, *extra], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stderr

    quiet = [ln for ln in stderr().splitlines() if "covariance" in ln]
    assert len(quiet) == 1 and quiet[0].startswith("14 calibration covariances"), quiet
    assert "the largest: blk." in quiet[0]
    verbose = [ln for ln in stderr("--verbose").splitlines() if "covariance has eigenvalues below" in ln]
    assert len(verbose) == 14
