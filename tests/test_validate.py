"""`eora-gguf validate`: real activations through the native fused kernel, against gguf-py and torch oracles."""
from __future__ import annotations

import numpy as np
import pytest

from eora_gguf import compensate, llama_tools
from eora_gguf.cli import main

pytestmark = [pytest.mark.llama_cpp, pytest.mark.native]


@pytest.fixture(scope="module")
def setup(tiny_hf, tiny_gguf, llama, tmp_path_factory):
    from eora_gguf import _native

    if not _native.available():
        pytest.skip("the eora_native library is not built: run `pip install -e .`")
    tmp = tmp_path_factory.mktemp("validate")
    hf = tiny_hf("llama")
    q = llama_tools.quantize(llama, tiny_gguf("llama"), tmp / "q2k.gguf", "Q2_K")
    text = tmp / "calib.txt"
    text.write_text(" ".join(["numbers one two three four five the model reads a quantized weight"] * 300))
    ad = tmp / "a.gguf"
    compensate.compensate(hf, q, ad, rank=16, calib=str(text), samples=8, seqlen=64)
    return hf, q, ad, text


def test_adapter_lowers_every_tensors_output_error(setup):
    from eora_gguf.validate import validate

    hf, q, ad, text = setup
    res = validate(hf, q, ad, calib=str(text), samples=4, seqlen=64, max_rows=64)
    rows = res["tensors"]
    assert len(rows) == 14 and res["summary"]["adapted"] == 14
    for name, r in rows.items():
        assert r["rel_err_adapter"] < 0.1 * r["rel_err_quant"], (name, r)


def test_kernel_error_matches_gguf_py_oracle(setup):
    """The quantized-only error from the native kernel equals the one from gguf-py's dequantization (fp64)."""
    import gguf

    from eora_gguf import kernels
    from eora_gguf.gguf_io import open_gguf

    hf, q, ad, text = setup
    rng = np.random.default_rng(0)
    with open_gguf(q) as m:
        for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
            info = m.tensor(name)
            x = rng.standard_normal((32, info.shape[1])).astype(np.float32)
            w = gguf.quants.dequantize(m.raw(name), info.qtype).reshape(info.shape).astype(np.float64)
            y = kernels.fused_matmul(np.ascontiguousarray(m.raw(name)).view(np.uint8), info.qtype, info.shape, x)
            ref = x.astype(np.float64) @ w.T
            assert np.sum((y - ref) ** 2) / np.sum(ref**2) < kernels.QUANTIZED_ACT_NMSE


def test_validate_cli_json(setup, capsys):
    import json

    hf, q, ad, text = setup
    assert main(["validate", "--hf", str(hf), "--gguf", str(q), "--lora", str(ad), "--calib", str(text),
                 "--samples", "2", "--seqlen", "64", "--rows", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["improved"] == out["summary"]["adapted"] == 14
