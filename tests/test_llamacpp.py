"""The pinned llama.cpp toolchain: convert and quantize tiny models with the real tools, read back with gguf-py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from eora_gguf import llama_eval, llama_tools, llamacpp
from eora_gguf.cli import main
from eora_gguf.errors import EoraError, atomic_output

pytestmark = pytest.mark.llama_cpp

ARCH_NAMES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}


def _hf_tensor(hf_dir: Path, name: str) -> np.ndarray:
    from safetensors.numpy import load_file

    for f in hf_dir.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            return tensors[name].astype(np.float64)
    raise KeyError(name)


def _nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum((a - b) ** 2) / np.sum(b**2))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_convert_and_quantize_read_back(arch, tiny_hf, tiny_gguf, tmp_path, capsys):
    f16 = tiny_gguf(arch)
    reader = gguf.GGUFReader(f16)
    assert reader.get_field("general.architecture").contents() == ARCH_NAMES[arch]
    assert reader.get_field(f"{ARCH_NAMES[arch]}.block_count").contents() == 2

    out = tmp_path / "q4km.gguf"
    assert main(["quantize", str(f16), str(out), "Q4_K_M", "--json"]) == 0
    q = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in q.tensors}
    # Hidden 256 is a multiple of 256, so the 2-D weights really are K-quantized (Q4_K, with Q6_K in the mix).
    assert types["blk.0.attn_v.weight"] in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
    assert types["blk.1.ffn_down.weight"] in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K)
    assert types["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q4_K

    # Dequantized by gguf-py, the weights are the HF ones up to 4-bit error (v and down are never permuted).
    hf = tiny_hf(arch)
    for gname, hname in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                         ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")):
        t = next(t for t in q.tensors if t.name == gname)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(_hf_tensor(hf, hname).shape)
        err = _nmse(w.astype(np.float64), _hf_tensor(hf, hname))
        assert 1e-5 < err < 2e-2, (gname, err)  # quantized (not a copy), and close


def test_quantize_q2_k_and_legacy_types(tiny_gguf, llama, tmp_path):
    f16 = tiny_gguf("llama")
    for qtype, expect in (("Q2_K", gguf.GGMLQuantizationType.Q2_K), ("Q4_0", gguf.GGMLQuantizationType.Q4_0),
                          ("IQ4_XS", gguf.GGMLQuantizationType.IQ4_XS)):
        out = llama_tools.quantize(llama, f16, tmp_path / f"{qtype}.gguf", qtype)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.ffn_gate.weight"] == expect


def test_perplexity_runs_on_tiny_model(tiny_gguf, llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    res = llama_eval.text_eval(llama, tiny_gguf("llama"), text=text, ctx=128, chunks=2, threads=2)
    assert np.isfinite(res.ppl) and res.ppl > 1
    assert res.chunks == 2


def test_perplexity_runs_on_quantized_tiny_model(tiny_gguf, llama, tmp_path):
    """Prompt batches of Q4_0/Q4_K weights: where ggml's AMX kernels were compiled in, this died with SIGILL on
    the development VM (see llamacpp.host_flags)."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    for qtype in ("Q4_0", "Q4_K_M"):
        q = llama_tools.quantize(llama, tiny_gguf("llama"), tmp_path / f"{qtype}.gguf", qtype)
        res = llama_eval.text_eval(llama, q, text=text, ctx=128, chunks=2, threads=2)
        assert np.isfinite(res.ppl) and res.ppl > 1, qtype


def test_pinned_build_leaves_out_amx_where_native_would_enable_it():
    flags = llamacpp.host_flags()
    cc = llamacpp.c_compiler()
    macros = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                            text=True).stdout
    wants_off = "__AMX_TILE__" in macros and os.environ.get("EORA_LLAMA_AMX") != "1"
    assert any("-mno-amx-int8" in f for f in flags) == wants_off
    if wants_off:  # and the flags really turn it off under -march=native
        off = subprocess.run([cc, *flags[0].split("=", 1)[1].split(), "-march=native", "-dM", "-E", "-x", "c",
                              "-"], input="", capture_output=True, text=True).stdout
        assert "__AMX_TILE__" not in off and "__AMX_INT8__" not in off


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no output file


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eora-gguf: error: "), err
    return err[0]


def test_convert_missing_hf_dir(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["convert", str(tmp_path / "nope"), "-o", str(out)]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_convert_folder_without_config(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    assert main(["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "config.json" in _one_line_error(capsys)
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_unknown_type(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(tiny_gguf("llama")), str(out), "Q3_XYZ"]) == 2
    assert "unknown quantization type" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_quantize_non_gguf_input(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 100)
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(bad), str(out), "Q4_K_M"]) == 2
    assert "not a GGUF file" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_quantize_truncated_gguf_fails_cleanly(tiny_gguf, tmp_path, capsys):
    """A GGUF cut short passes the magic check; llama-quantize itself must refuse it, and we leave nothing."""
    src = tiny_gguf("llama")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(bad), str(out), "Q4_K_M"]) == 2
    assert "llama-quantize" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_interrupted_quantize_leaves_no_file(tiny_gguf, tmp_path):
    """SIGTERM while llama-quantize writes: the CLI stops the tool and removes the partial file."""
    src = tiny_gguf("llama", "f32")
    out = tmp_path / "out.gguf"
    import eora_gguf

    env = {**os.environ, "PYTHONPATH": str(Path(eora_gguf.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "eora_gguf", "quantize", str(src), str(out), "Q2_K",
                             "--threads", "1"], stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None, "quantize finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], err


def test_atomic_output_keeps_nothing_on_failure(tmp_path):
    dest = tmp_path / "a.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"whole")
    assert dest.read_bytes() == b"whole"
    assert oct(dest.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_atomic_output_missing_directory(tmp_path):
    with pytest.raises(EoraError, match="does not exist"):
        with atomic_output(tmp_path / "no" / "x.gguf"):
            pass


def test_llama_cpp_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "missing"))
    with pytest.raises(EoraError, match="not a directory"):
        llamacpp.locate()
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(EoraError, match="no llama-quantize"):
        llamacpp.locate()


def test_llama_cpp_dir_uses_user_binaries(llama, tmp_path, monkeypatch):
    """A folder of binaries (like a user's build/bin) is used as is; the converter comes from the pinned source."""
    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama.bin_dir))
    found = llamacpp.locate()
    assert found.bin_dir == llama.bin_dir and found.origin == "LLAMA_CPP_DIR"
    assert found.converter.is_file()


def test_missing_cmake_is_one_line(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EoraError, match="cmake not found: install it"):
        llamacpp._check_toolchain()
