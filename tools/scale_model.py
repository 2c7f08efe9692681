"""A random-weight model of a real model's shape, as a user would have it: sharded bf16 safetensors + a quantized GGUF.

    python tools/scale_model.py OUT_DIR --shape llama-3-8b [--layers K] [--quant Q4_K_M]

Writes OUT_DIR/hf/ (config.json, the demo model's tokenizer, one bf16 safetensors shard per decoder layer plus
one for the embeddings, and model.safetensors.index.json, as Hugging Face shards big checkpoints), converts it with
llama.cpp's convert_hf_to_gguf.py to OUT_DIR/model-F16.gguf and quantizes that with llama-quantize to
OUT_DIR/model-QUANT.gguf (the F16 file is deleted afterwards unless --keep-f16). Nothing is downloaded: the
decoder layers have the named model's exact shapes (hidden, intermediate, heads, KV heads, head size); the
vocabulary is the demo tokenizer's (49152 entries instead of Llama 3's 128256), which only changes the embedding
and output matrices — outside the layers that calibration and the solve work on. `--layers K` keeps the first K
decoder layers.

Weights are drawn as Hugging Face initialises them (normal, std = initializer_range 0.02; norms 1), one layer at a
time, so writing a 16 GB model needs about one layer of memory. With the same --seed the files are identical.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from eora_gguf import assets, llamacpp
from eora_gguf.errors import EoraError, staged_outputs

log = logging.getLogger("scale_model")

# decoder shapes of released models (config.json fields); the vocabulary comes from the demo tokenizer
SHAPES = {
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                   "rms_norm_eps": 1e-5, "max_position_embeddings": 8192},
    "llama-3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                    "rms_norm_eps": 1e-5, "max_position_embeddings": 8192},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 2048},
}
STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def config(shape: str, layers: int | None, vocab: int) -> dict:
    if shape not in SHAPES:
        raise EoraError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    s = dict(SHAPES[shape])
    if layers is not None:
        if not 1 <= layers <= s["num_hidden_layers"]:
            raise EoraError(f"--layers must be between 1 and {s['num_hidden_layers']} for {shape}, got {layers}")
        s["num_hidden_layers"] = layers
    theta = s.pop("rope_theta")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "vocab_size": vocab,
            "bos_token_id": 1, "eos_token_id": 2, "initializer_range": STD, "dtype": "bfloat16",
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"}, **s,
            "_eora_gguf": f"random weights of {shape}'s decoder shape (tools/scale_model.py)"}


def layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f)}


def _draw(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * STD).to(torch.bfloat16)


def write_hf(folder: Path, cfg: dict, seed: int, tokenizer_from: Path) -> int:
    """The HF folder, one shard per layer (+ one for embeddings, final norm, lm_head); returns its bytes."""
    gen = torch.Generator().manual_seed(seed)
    n = cfg["num_hidden_layers"]
    names = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]
    weight_map, total = {}, 0
    with staged_outputs() as staging:
        tmp = staging.folder(folder, may_hold=())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        for f in TOKENIZER_FILES:
            shutil.copy(tokenizer_from / f, tmp / f)
        for i in range(n + 1):
            if i < n:
                tensors = {f"model.layers.{i}.{k}": _draw(s, gen) for k, s in layer_shapes(cfg).items()}
            else:
                v, h = cfg["vocab_size"], cfg["hidden_size"]
                tensors = {"model.embed_tokens.weight": _draw((v, h), gen), "model.norm.weight": _draw((h,), gen),
                           "lm_head.weight": _draw((v, h), gen)}
            save_file(tensors, str(tmp / names[i]), metadata={"format": "pt"})
            for k, t in tensors.items():
                weight_map[k] = names[i]
                total += t.numel() * t.element_size()
            log.info("wrote shard %d/%d", i + 1, n + 1)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", default="llama-3-8b", help=f"one of {', '.join(SHAPES)}")
    ap.add_argument("--layers", type=int, default=None, help="keep the first K decoder layers")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-f16", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tok = assets.demo_model_dir()
        vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
        cfg = config(args.shape, args.layers, vocab)
        hf, f16, quant = args.out / "hf", args.out / "model-F16.gguf", args.out / f"model-{args.quant.upper()}.gguf"
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (hf / "model.safetensors.index.json").is_file():
            log.info("writing %s (%s, %d layers, bf16)", hf, args.shape, cfg["num_hidden_layers"])
            write_hf(hf, cfg, args.seed, tok)
        t_hf = time.perf_counter() - t0
        llama = llamacpp.locate()
        if not quant.is_file():
            if not f16.is_file():
                log.info("converting -> %s", f16)
                llamacpp.convert(llama, hf, f16, outtype="f16")
            log.info("quantizing -> %s", quant)
            llamacpp.quantize(llama, f16, quant, args.quant, threads=args.threads)
        if not args.keep_f16:
            f16.unlink(missing_ok=True)
        meta = {"shape": args.shape, "config": cfg, "seed": args.seed, "hf": str(hf), "gguf": str(quant),
                "hf_bytes": sum(p.stat().st_size for p in hf.iterdir()), "gguf_bytes": quant.stat().st_size,
                "seconds": {"write_hf": round(t_hf, 1), "total": round(time.perf_counter() - t0, 1)}}
        (args.out / "scale_model.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{hf} ({meta['hf_bytes'] / 1e9:.2f} GB) and {quant} ({meta['gguf_bytes'] / 1e9:.2f} GB)")
    except EoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
