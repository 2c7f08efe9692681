"""The statistics file: save/load round trip, the model check, refusals of foreign or broken files."""
from __future__ import annotations

import json

import pytest
import torch

from eora_gguf.calibration import collect_stats
from eora_gguf.errors import EoraError
from eora_gguf.hf_model import model_identity
from eora_gguf.stats import CalibrationStats

from tiny_models import SAMPLES, SEQLEN, make_stream_model


def test_save_load_roundtrip_and_model_check(tmp_path, models, ids):
    stats = collect_stats(models["llama"], ids, calib_fingerprint="abc123")
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = CalibrationStats.load(path)
    assert back.meta == json.loads(json.dumps(stats.meta))
    assert back.meta["calibration"] == "abc123" and back.meta["tokens"] == SAMPLES * SEQLEN
    assert back.module_sites == stats.module_sites and back.n_tokens == stats.n_tokens
    for site, cov in stats.covariances.items():
        assert back.covariances[site].dtype == torch.float64
        assert torch.equal(back.covariances[site], cov)
    back.check_model(models["llama"])
    with pytest.raises(EoraError, match="another model"):
        back.check_model(models["qwen2"])
    # same config, different weights
    make_stream_model("llama", seed=7).save_pretrained(tmp_path / "retrained")
    assert model_identity(tmp_path / "retrained")["config_sha256"] == model_identity(models["llama"])["config_sha256"]
    with pytest.raises(EoraError, match="weights_sha256"):
        back.check_model(tmp_path / "retrained")


def test_load_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(EoraError, match="do not exist"):
        CalibrationStats.load(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EoraError, match="not an eora-gguf"):
        CalibrationStats.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(EoraError, match="cannot read"):
        CalibrationStats.load(tmp_path / "junk.safetensors")
