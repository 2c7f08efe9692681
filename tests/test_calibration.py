from __future__ import annotations

import json

import pytest
import torch

from eora_gguf.calibration import collect_stats, stream
from eora_gguf.errors import EoraError
from eora_gguf.hf_model import model_identity
from eora_gguf.stats import CalibrationStats
from eora_gguf.walker import StreamedModel

VOCAB, SAMPLES, SEQLEN = 96, 5, 24
ARCHS = ("llama", "qwen2", "gemma3", "mistral", "qwen3", "gemma2")
COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _config(arch: str, **over):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=False, **over)
    if arch == "qwen2":  # q/k/v with bias, tied embeddings
        return Qwen2Config(**COMMON, tie_word_embeddings=True, **over)
    if arch == "mistral":  # sliding window on every layer
        return MistralConfig(**COMMON, sliding_window=8, **over)
    if arch == "qwen3":  # q/k norms
        return Qwen3Config(**COMMON, head_dim=12, **over)
    if arch == "gemma2":  # alternating sliding/global, logit soft-capping
        return Gemma2Config(**COMMON, head_dim=12, sliding_window=6, query_pre_attn_scalar=12, **over)
    if arch == "gemma3":  # sliding + global layers, per-type rotary, q/k norms, scaled embeddings
        kw = dict(head_dim=12, sliding_window=6, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"], query_pre_attn_scalar=12)
        kw.update(over)
        return Gemma3TextConfig(**COMMON, **kw)
    raise ValueError(arch)


def _make_model(arch: str, seed: int = 0, **over):
    """A tiny random model whose layers change the hidden state a lot (std 0.15 weights, not 0.02)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, **over), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "proj" in name:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if not arch.startswith("gemma") else p.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        d = root / arch
        _make_model(arch).save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))


def _full_forward(model_dir, ids, overrides=None):
    """Oracle: the plain full model; last decoder layer output and float64 Σxxᵀ of every linear's input."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if overrides:
        with torch.no_grad():
            for name, w in overrides.items():
                model.get_submodule(name).weight.copy_(w)
    covs, last, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            def hook(m, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                covs[name] = covs.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_hook(hook))
    hooks.append(model.model.layers[-1].register_forward_hook(
        lambda m, a, o: last.__setitem__("h", o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(ids)
    return last["h"], covs


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_hidden_and_covariances_match_full_model(models, ids, arch):
    h_full, covs = _full_forward(models[arch], ids)
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
    assert len(stats.covariances) == 4 * COMMON["num_hidden_layers"]
    assert stats.module_sites["model.layers.1.self_attn.k_proj"] == "model.layers.1.attn_in"
    assert stats.module_sites["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp_in"
    assert set(stats.n_tokens.values()) == {SAMPLES * SEQLEN}


def test_gemma3_masks_matter_in_this_setup(tmp_path, models, ids):
    """The gemma3 check above can fail: the same weights with a window covering the whole sequence (so all
    layers attend globally) give clearly different hidden states."""
    wide = _make_model("gemma3", sliding_window=SEQLEN * 2)
    wide.save_pretrained(tmp_path / "wide")
    h_wide = stream(tmp_path / "wide", ids)[1]
    h_ref = stream(models["gemma3"], ids)[1]
    assert (h_wide - h_ref).abs().max() > 1e-2 * h_ref.abs().max()


def test_sharded_bf16_checkpoint(tmp_path, ids):
    model = _make_model("llama", seed=3)
    model.save_pretrained(tmp_path / "single")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    h_bf16, covs = _full_forward(tmp_path / "sharded", ids)
    stats, h = stream(tmp_path / "sharded", ids, batch_size=3)
    torch.testing.assert_close(h, h_bf16, atol=1e-5, rtol=1e-5)  # bf16 weights upcast to float32
    single = stream(tmp_path / "single", ids, batch_size=3)[1]
    assert not torch.equal(h, single)


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
    h_full, covs = _full_forward(d, ids, {k.removesuffix(".weight"): v for k, v in new.items()})
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
    _make_model("llama", seed=7).save_pretrained(tmp_path / "retrained")
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


def test_nan_names_the_layer(tmp_path, ids):
    model = _make_model("llama", seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(EoraError, match="decoder layer 1"):
        collect_stats(tmp_path / "bad", ids)


def test_bad_inputs(tmp_path, models, ids):
    with pytest.raises(EoraError, match="no config.json"):
        collect_stats(tmp_path, ids)
    with pytest.raises(EoraError, match="vocabulary"):
        collect_stats(models["llama"], ids + VOCAB)
    with pytest.raises(EoraError, match=r"\(samples, seqlen\)"):
        collect_stats(models["llama"], ids[0])
    (tmp_path / "config.json").write_text((models["llama"] / "config.json").read_text())
    with pytest.raises(EoraError, match="no model.safetensors"):
        collect_stats(tmp_path, ids)


def test_only_one_layer_is_real_at_a_time(models, ids, monkeypatch):
    real_counts = []
    orig = StreamedModel.load_layer

    def spy(self, i):
        layer = orig(self, i)
        real_counts.append(sum(p.device.type != "meta" for layer in self.layers for p in layer.parameters()))
        return layer

    monkeypatch.setattr(StreamedModel, "load_layer", spy)
    collect_stats(models["gemma3"], ids)
    per_layer = real_counts[0]
    assert per_layer > 0 and real_counts == [per_layer] * COMMON["num_hidden_layers"]


@pytest.mark.slow
def test_smollm2_streamed_matches_full_forward():
    from eora_gguf.cache import cache_dir

    d = cache_dir() / "demo" / "SmolLM2-135M-Instruct"
    if not (d / "model.safetensors").is_file():
        pytest.skip("demo model not fetched (eora-gguf fetch-demo)")
    ids = torch.randint(0, 49152, (3, 128), generator=torch.Generator().manual_seed(0))
    h_full, covs = _full_forward(d, ids)
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
