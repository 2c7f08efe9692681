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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


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
    writer = gguf.GGUFWriter(path, arch or dims.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(dims.n_layers)
    writer.add_embedding_length(dims.hidden)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_feed_forward_length(dims.ffn)
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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights

