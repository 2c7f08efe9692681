"""Layer-streaming calibration: covariances and hidden states against the full model, propagation modes."""
from __future__ import annotations

import pytest
import torch

from eora_gguf import walker
from eora_gguf.calibration import collect_stats, stream
from eora_gguf.errors import EoraError
from eora_gguf.walker import StreamedModel

from tiny_models import SAMPLES, SEQLEN, STREAM_ARCHS, STREAM_DIMS, STREAM_VOCAB, full_forward, make_stream_model


@pytest.mark.parametrize("arch", STREAM_ARCHS)
def test_streamed_hidden_and_covariances_match_full_model(models, ids, arch):
    h_full, covs = full_forward(models[arch], ids)
    stats, h = stream(models[arch], ids, batch_size=2)  # 5 samples: batches of 2, 2, 1
    assert h.shape == h_full.shape
    torch.testing.assert_close(h, h_full, atol=1e-5, rtol=1e-5)
    assert sorted(stats.module_sites) == sorted(covs)
    for name, ref in covs.items():
        mean = stats.covariance(name)
        assert mean.dtype == torch.float64
        torch.testing.assert_close(mean, ref / (SAMPLES * SEQLEN),
                                   atol=1e-5 * ref.abs().max().item() / SAMPLES / SEQLEN,
                                   rtol=1e-5)
    assert len(stats.covariances) == 4 * STREAM_DIMS["num_hidden_layers"]
    assert stats.module_sites["model.layers.1.self_attn.k_proj"] == "model.layers.1.attn_in"
    assert stats.module_sites["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp_in"
    assert set(stats.n_tokens.values()) == {SAMPLES * SEQLEN}


def test_sharded_bf16_checkpoint(tmp_path, ids):
    model = make_stream_model("llama", seed=3)
    model.save_pretrained(tmp_path / "single")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    h_bf16, covs = full_forward(tmp_path / "sharded", ids)
    stats, h = stream(tmp_path / "sharded", ids, batch_size=3, forward_dtype=torch.float32)
    torch.testing.assert_close(h, h_bf16, atol=1e-5, rtol=1e-5)  # bf16 weights upcast to float32
    single = stream(tmp_path / "single", ids, batch_size=3)[1]
    assert not torch.equal(h, single)


def test_forward_in_the_checkpoint_dtype(tmp_path, ids):
    """A bf16 checkpoint run in bf16 (what the default picks on a GPU, and on a CPU with native bf16) gives the
    float32 forward's covariances within bf16 rounding; the statistics say which dtype made them."""
    model = make_stream_model("llama", seed=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = collect_stats(tmp_path / "bf16", ids, forward_dtype=torch.float32)
    low = collect_stats(tmp_path / "bf16", ids, forward_dtype=torch.bfloat16)
    assert "forward_dtype" not in ref.meta and low.meta["forward_dtype"] == "bfloat16"
    worst = 0.0
    for site, cov in ref.covariances.items():
        assert low.covariances[site].dtype == torch.float64
        worst = max(worst, float((low.covariances[site] - cov).abs().max() / cov.abs().max()))
    assert 0.0 < worst < 0.02  # bf16 activations: ~3 significant digits (0.9% measured on this model)
    # the default policy: the checkpoint's dtype on a GPU; on the CPU bf16 only where it is native; else float32
    assert walker.stored_dtype(walker.tensor_files(tmp_path / "bf16")) == torch.bfloat16
    cuda = torch.device("cuda")
    assert walker.forward_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert walker.forward_dtype(torch.float16, cuda) == torch.float16
    assert walker.forward_dtype(torch.float16, None) == torch.float32
    assert walker.forward_dtype(torch.float32, None) == torch.float32
    native = torch.bfloat16 if walker.cpu_has_bf16() else torch.float32
    assert walker.forward_dtype(torch.bfloat16, torch.device("cpu")) == native
    auto = collect_stats(tmp_path / "bf16", ids)
    assert auto.meta.get("forward_dtype", "float32") == str(native)[6:]


def test_compensated_with_original_weights_equals_original(models, ids):
    d = models["llama"]
    calls = []

    def same(i, layer_stats):
        calls.append((i, sorted(layer_stats.modules())))
        sm_layer = StreamedModel(d)
        layer = sm_layer.load_layer(i)
        return {f"model.layers.{i}.{n}": m.weight.clone() for n, m in layer.named_modules()
                if isinstance(m, torch.nn.Linear)}

    ref, h_ref = stream(d, ids, batch_size=2)
    comp, h_comp = stream(d, ids, batch_size=2, propagate="compensated", compensate=same)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert calls[0][1] == sorted(ref.modules(layer=0))
    torch.testing.assert_close(h_comp, h_ref, atol=1e-6, rtol=1e-6)
    for site in ref.covariances:
        torch.testing.assert_close(comp.covariances[site], ref.covariances[site], rtol=1e-9, atol=1e-9)
    assert comp.meta["propagate"] == "compensated"


def test_compensated_with_modified_weights_feeds_forward(models, ids):
    d = models["llama"]
    gen = torch.Generator().manual_seed(5)
    new = {"model.layers.0.self_attn.o_proj": torch.randn(48, 48, generator=gen) * 0.15,
           "model.layers.0.mlp.down_proj.weight": torch.randn(48, 80, generator=gen) * 0.15}
    ref = collect_stats(d, ids)
    comp, h = stream(d, ids, propagate="compensated", compensate=lambda i, s: new if i == 0 else {})
    # layer 0 saw the original inputs; everything downstream saw the modified layer 0
    for site in ("attn_in", "o_in", "mlp_in", "down_in"):
        key = f"model.layers.0.{site}"
        torch.testing.assert_close(comp.covariances[key], ref.covariances[key])
        assert not torch.allclose(comp.covariances[f"model.layers.1.{site}"], ref.covariances[f"model.layers.1.{site}"])
    # oracle: the full model with those weights replaced
    h_full, covs = full_forward(d, ids, {k.removesuffix(".weight"): v for k, v in new.items()})
    torch.testing.assert_close(h, h_full, atol=1e-5, rtol=1e-5)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        torch.testing.assert_close(comp.covariance(name), covs[name] / (SAMPLES * SEQLEN), rtol=1e-5, atol=1e-6)


def test_compensate_errors(models, ids):
    d = models["llama"]
    with pytest.raises(EoraError, match="needs a compensate"):
        stream(d, ids, propagate="compensated")
    with pytest.raises(EoraError, match="propagate must be"):
        stream(d, ids, propagate="sequential")
    with pytest.raises(EoraError, match="shape"):
        stream(d, ids, propagate="compensated",
               compensate=lambda i, s: {f"model.layers.{i}.self_attn.q_proj": torch.zeros(3, 3)})
    with pytest.raises(EoraError, match="not a linear"):
        stream(d, ids, propagate="compensated", compensate=lambda i, s: {"model.layers.9.mlp.up_proj": torch.zeros(1)})
    with pytest.raises(EoraError, match="propagate='original'"):
        stream(d, ids, compensate=lambda i, s: {f"model.layers.{i}.self_attn.q_proj": torch.zeros(48, 48)})


def test_streaming_consumer_without_keeping(models, ids):
    seen = {}
    stats = collect_stats(models["qwen2"], ids, keep=False,
                          compensate=lambda i, s: seen.update(s.covariances))
    assert stats.covariances == {} and len(seen) == 12
    ref = collect_stats(models["qwen2"], ids)
    for site, cov in ref.covariances.items():
        torch.testing.assert_close(seen[site], cov)


def test_float64_blocks_agree(models, ids):
    a = collect_stats(models["gemma3"], ids, accumulate_dtype=torch.float32)
    b = collect_stats(models["gemma3"], ids, accumulate_dtype=torch.float64)
    for site in a.covariances:
        torch.testing.assert_close(a.covariances[site], b.covariances[site], rtol=1e-5,
                                   atol=1e-6 * b.covariances[site].abs().max().item())


def test_nan_names_the_layer(tmp_path, ids):
    model = make_stream_model("llama", seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(EoraError, match="decoder layer 1"):
        collect_stats(tmp_path / "bad", ids)


def test_bad_inputs(tmp_path, models, ids):
    with pytest.raises(EoraError, match="no config.json"):
        collect_stats(tmp_path, ids)
    with pytest.raises(EoraError, match="vocabulary"):
        collect_stats(models["llama"], ids + STREAM_VOCAB)
    with pytest.raises(EoraError, match=r"\(samples, seqlen\)"):
        collect_stats(models["llama"], ids[0])
    (tmp_path / "config.json").write_text((models["llama"] / "config.json").read_text())
    with pytest.raises(EoraError, match="no model.safetensors"):
        collect_stats(tmp_path, ids)


@pytest.mark.slow
def test_smollm2_streamed_matches_full_forward():
    from eora_gguf.cache import cache_dir

    d = cache_dir() / "demo" / "SmolLM2-135M-Instruct"
    if not (d / "model.safetensors").is_file():
        pytest.skip("demo model not fetched (eora-gguf fetch-demo)")
    ids = torch.randint(0, 49152, (3, 128), generator=torch.Generator().manual_seed(0))
    h_full, covs = full_forward(d, ids)
    stats, h = stream(d, ids, batch_size=2)
    torch.testing.assert_close(h, h_full, atol=1e-4, rtol=1e-4)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        ref = covs[name] / ids.numel()
        torch.testing.assert_close(stats.covariance(name), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_calib_text_to_stats_with_shared_tiny_model(tiny_hf, tmp_path):
    """End to end on the shared tiny model + its sentencepiece tokenizer (which adds BOS)."""
    from transformers import AutoTokenizer

    from eora_gguf.calib_data import build_calibration, calibration_fingerprint

    d = tiny_hf("llama")
    tok = AutoTokenizer.from_pretrained(d)
    text = tmp_path / "c.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 60))
    ids = build_calibration(str(text), tok, samples=3, seqlen=32)
    assert (ids[:, 0] == tok.bos_token_id).all()
    stats = collect_stats(d, ids, calib_fingerprint=calibration_fingerprint(str(text), ids))
    assert set(stats.n_tokens.values()) == {ids.numel()}
    assert stats.meta["calibration"] == calibration_fingerprint(str(text), ids)
    stats.check_model(d)
