"""`eora-gguf info`: what a file records, and the adapter-fits-base verdict (synthetic GGUFs, no llama.cpp)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from eora_gguf import __version__
from eora_gguf.adapter import header_bytes, write_gguf_lora
from eora_gguf.cli import main
from eora_gguf.errors import EoraError
from eora_gguf.info import check_fit, describe, provenance

from tiny_models import SYNTH, write_synthetic_gguf


def factors(weights: dict[str, np.ndarray], rank: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal((w.shape[0], rank)), rng.standard_normal((rank, w.shape[1]))) for n, w in
            weights.items()}


@pytest.fixture
def pair(tmp_path):
    base = tmp_path / "base.gguf"
    weights = write_synthetic_gguf(base)
    adapter = tmp_path / "adapter.gguf"
    meta = {"eora.method": "eora", "eora.rank": 8, "eora.calibration": "arc_challenge:1,demo:1",
            **provenance(base, calib_tokens=4096, name="arc")}
    write_gguf_lora(adapter, factors(weights, 8), arch="llama", metadata=meta)
    return base, adapter, weights


def test_adapter_records_what_it_is(pair):
    base, adapter, weights = pair
    d = describe(adapter)
    assert d["kind"] == "adapter" and d["architecture"] == "llama" and d["pairs"] == len(weights)
    assert d["rank_min"] == d["rank_max"] == 8 and d["alpha"] == 8 and d["runtime_scale"] == 1
    e = d["eora"]
    assert e["eora.version"] == __version__ and e["eora.calibration"] == "arc_challenge:1,demo:1"
    assert e["eora.calibration_tokens"] == 4096 and e["eora.name"] == "arc" and e["eora.method"] == "eora"
    assert e["eora.base_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert describe(base)["kind"] == "model" and describe(base)["tensor_types"] == {"F32": len(weights) + 1}


def test_header_accounting_includes_the_new_keys(pair, tmp_path):
    base, _, weights = pair
    meta = provenance(base, calib_tokens=1, name="x")
    out = write_gguf_lora(tmp_path / "a.gguf", factors(weights, 4), arch="llama", dtype="f32", metadata=meta)
    data = sum(4 * (w.shape[0] * 4 + 4 * w.shape[1]) for w in weights.values())  # all rows 32-byte aligned here
    assert out.stat().st_size == header_bytes("llama", list(weights), meta) + data


def test_fit_verdicts(pair, tmp_path):
    base, adapter, _ = pair
    same = check_fit(adapter, base)
    assert same["fits"] and same["same_base"] is True and same["verdict"].startswith("fits: ")
    other = tmp_path / "other.gguf"  # same names and shapes, other weights: loads, but not its base
    write_synthetic_gguf(other, seed=1)
    res = check_fit(adapter, other)
    assert res["fits"] and res["same_base"] is False and "another base (base.gguf)" in res["verdict"]
    wider = tmp_path / "wider.gguf"
    write_synthetic_gguf(wider, dict(SYNTH, hidden_size=128))
    with pytest.raises(EoraError, match=r"^does not fit: adapter.gguf: blk\.0\.\S+ has incorrect shape"):
        check_fit(adapter, wider)
    qwen = tmp_path / "qwen.gguf"
    write_synthetic_gguf(qwen, arch="qwen2")
    with pytest.raises(EoraError, match="does not fit: .*architecture 'llama' != base 'qwen2'"):
        check_fit(adapter, qwen)


def test_fit_without_recorded_identity(pair, tmp_path):
    base, _, weights = pair
    plain = write_gguf_lora(tmp_path / "plain.gguf", factors(weights, 4), arch="llama")
    assert describe(plain)["eora"] == {}
    assert check_fit(plain, base)["same_base"] is None


def test_cli_info(pair, tmp_path, capsys):
    base, adapter, _ = pair
    assert main(["info", str(adapter), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "adapter, architecture llama" in out and "eora.calibration: arc_challenge:1,demo:1" in out
    assert "verdict: fits: adapter.gguf was solved against this very file base.gguf" in out
    assert main(["info", str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["eora"]["eora.rank"] == 8
    wider = tmp_path / "wider.gguf"
    write_synthetic_gguf(wider, dict(SYNTH, hidden_size=128))
    assert main(["info", str(adapter), "--base", str(wider)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eora-gguf: error: does not fit: ")
    assert main(["info", str(base), "--base", str(base)]) == 2
    assert "is a model" in capsys.readouterr().err
