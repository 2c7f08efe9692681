"""Tiny random HF models (llama, qwen2, gemma3) that llama.cpp's converter accepts, and GGUF copy helpers.

Every dimension is a multiple of 256 so K-quants apply; GQA (4 heads, 2 KV heads) so the llama K permutation
differs from the Q one. The tokenizer is a 512-piece sentencepiece BPE model trained here on generated text
(the converter's llama/qwen2/gemma3 paths read `tokenizer.model`); `tokenizer_config.json` lets transformers
load the same file (`load_tokenizer`; AutoTokenizer does too, except for qwen2 — see there).
"""
from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

ARCHS = ("llama", "qwen2", "gemma3")
VOCAB = 512
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256)

_WORDS = ("the model reads a quantized weight and calibration text then writes an adapter that llama runs "
          "with its own kernels while every layer keeps a low rank correction of the error small tokens learn "
          "numbers one two three four five six seven eight nine ten hello world quick brown fox jumps over "
          "lazy dog GGUF tensor matrix eigen value vector sample").split()


def train_tokenizer(out_dir: Path, *, seed: int = 0) -> Path:
    """Write tokenizer.model (sentencepiece BPE, byte fallback, ids unk=0 bos=1 eos=2) + tokenizer_config.json."""
    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
             for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, num_threads=1,
                                   character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(buf.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": DIMS["max_position_embeddings"]}))
    return out_dir / "tokenizer.model"


def load_tokenizer(hf_dir: Path):
    """The tiny model's tokenizer in transformers, with the same pieces and ids llama.cpp reads from the GGUF.

    Use this rather than AutoTokenizer: transformers 5 forces its own byte-level Qwen2Tokenizer on any
    model_type=qwen2 folder (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), whatever tokenizer_config.json says.
    """
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(hf_dir)


def build_tiny_model(arch: str, out_dir: Path, *, seed: int = 0, tied: bool = False) -> Path:
    """Random `arch` model (2 layers, hidden 256, ffn 512) saved with save_pretrained into out_dir; `tied`: the
    output head shares the embedding matrix (no lm_head.weight saved, no output.weight in the GGUF)."""
    import torch
    import transformers as tf

    common = dict(DIMS, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    if arch == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(**common, query_pre_attn_scalar=64, sliding_window=128)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}: choose one of {ARCHS}")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():  # default init leaves norms at 1/0 and is tiny; spread weights so errors are visible
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    train_tokenizer(out_dir, seed=seed)
    return out_dir


def hf_state(hf_dir: Path) -> dict[str, np.ndarray]:
    """The saved model's tensors as float64 numpy arrays, by HF name."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_file(f).items()})
    return out


def write_gguf_copy(src: Path, dst: Path, replace: Mapping[str, np.ndarray]) -> Path:
    """Copy a GGUF (all key/values, all tensors in order) replacing the data of the named tensors.

    Replacements are float arrays in numpy order and are stored as F32; other tensors keep their type and bytes.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name in replace:
            writer.add_tensor(t.name, np.ascontiguousarray(replace[t.name], dtype=np.float32))
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.array(t.data))
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    write_out(writer)
    return dst


def model_writer(path: Path, dims, arch: str | None = None) -> gguf.GGUFWriter:
    """A GGUFWriter for a model GGUF with the size keys llama.cpp's loader reads (naming.ModelDims `dims`)."""
    writer = gguf.GGUFWriter(path, arch or dims.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(dims.n_layers)
    writer.add_embedding_length(dims.hidden)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_feed_forward_length(dims.ffn)
    return writer


def write_out(writer: gguf.GGUFWriter) -> None:
    """Header, key-values and tensors to the file, then close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SYNTH = dict(model_type="llama", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=128)


def write_synthetic_gguf(path: Path, config: Mapping[str, object] = SYNTH, *, seed: int = 0,
                         arch: str | None = None, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                         hf_dir: Path | None = None) -> dict[str, np.ndarray]:
    """A small model GGUF (no vocabulary; enough for name/shape checks) with random linear weights, or with the
    linear weights of the HF model in `hf_dir` (in GGUF row order: a lossless "quantization" of it).

    Returns the float32 weights written, by GGUF name (before quantization when qtype is not F32/F16).
    """
    from eora_gguf.naming import LINEAR_MODULES, NameMap, model_dims

    dims = model_dims(dict(config))
    names = NameMap(dims)
    rng = np.random.default_rng(seed)
    writer = model_writer(path, dims, arch)
    weights: dict[str, np.ndarray] = {}
    for bid in range(dims.n_layers):
        for module in LINEAR_MODULES:
            name = names.to_gguf(f"model.layers.{bid}.{module}")
            w = rng.standard_normal(dims.linear_shape(module)).astype(np.float32)
            if hf_dir is not None:
                hf_name = f"model.layers.{bid}.{module}"
                w = np.asarray(names.hf_to_gguf_rows(hf_name, hf_state(hf_dir)[hf_name + ".weight"]), np.float32)
            weights[name] = w
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, w)
            else:
                data = gguf.quants.quantize(w, qtype)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.add_tensor(f"blk.{bid}.attn_norm.weight", np.ones(dims.hidden, np.float32))
    write_out(writer)
    return weights


# Streaming models: six small architectures whose layers change the hidden state a lot (calibration and
# walker tests), with 5 x 24 token ids from a 96-token vocabulary.
STREAM_VOCAB, SAMPLES, SEQLEN = 96, 5, 24
STREAM_ARCHS = ("llama", "qwen2", "gemma3", "mistral", "qwen3", "gemma2")
STREAM_DIMS = dict(vocab_size=STREAM_VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def stream_config(arch: str, **over):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**STREAM_DIMS, tie_word_embeddings=False, **over)
    if arch == "qwen2":  # q/k/v with bias, tied embeddings
        return Qwen2Config(**STREAM_DIMS, tie_word_embeddings=True, **over)
    if arch == "mistral":  # sliding window on every layer
        return MistralConfig(**STREAM_DIMS, sliding_window=8, **over)
    if arch == "qwen3":  # q/k norms
        return Qwen3Config(**STREAM_DIMS, head_dim=12, **over)
    if arch == "gemma2":  # alternating sliding/global, logit soft-capping
        return Gemma2Config(**STREAM_DIMS, head_dim=12, sliding_window=6, query_pre_attn_scalar=12, **over)
    if arch == "gemma3":  # sliding + global layers, per-type rotary, q/k norms, scaled embeddings
        kw = dict(head_dim=12, sliding_window=6, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"], query_pre_attn_scalar=12)
        kw.update(over)
        return Gemma3TextConfig(**STREAM_DIMS, **kw)
    raise ValueError(arch)


def make_stream_model(arch: str, seed: int = 0, **over):
    """A tiny random model whose layers change the hidden state a lot (std 0.15 weights, not 0.02)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(stream_config(arch, **over), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "proj" in name:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if not arch.startswith("gemma") else p.uniform_(-0.5, 0.5)
    return model


def full_forward(model_dir, ids, overrides=None):
    """Oracle: the plain full model; last decoder layer output and float64 Σxxᵀ of every linear's input."""
    import torch
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


def random_factors(base_weights: dict[str, np.ndarray], rank,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (B, A) per weight: B ~ 0.1 N(0, 1) (n_out, r), A ~ 0.01 N(0, 1) (r, n_in); rank: one int or a list
    cycled over the weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (name, w) in enumerate(base_weights.items()):
        r = rank[i % len(rank)] if isinstance(rank, list) else rank
        out[name] = (rng.standard_normal((w.shape[0], r)) * 0.1, rng.standard_normal((r, w.shape[1])) * 0.01)
    return out
