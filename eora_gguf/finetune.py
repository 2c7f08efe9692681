"""LoRA fine-tuning of the adapter on top of the frozen, dequantized GGUF base, from EoRA or the standard init.

The base is the HF model rebuilt from the GGUF's own weights (`reconstruct.build_model`: what llama.cpp computes,
dequantized to float32, every parameter frozen). A PEFT LoRA of rank r with lora_alpha = r (scale 1, as our
adapters) sits on every decoder-layer linear (q, k, v, o, gate, up, down). Its initial factors are
  - "eora": the EoRA solution, solved here on `calib` (default: compensate's general text) — B A ≈ W − Wq;
  - an adapter file: the factors of a GGUF LoRA written by `compensate` (rank uniform, scale 1);
  - "lora": PEFT's standard initialisation (A Kaiming-uniform, B = 0: the adapter starts as a no-op),
so that the comparison changes the initial point only. Training minimises the cross-entropy of the answer tokens
given the prompt (prompt tokens carry no loss) with AdamW at a constant learning rate; batches are drawn in one
seeded order, the same for every init. The loss is logged every step, and on a held-out part of the data every
`eval_every` steps. The result is written as a GGUF LoRA (GGUF row order, stock llama.cpp loads it with `--lora`)
and, optionally, a PEFT folder.

Training data (`data`): a multiple-choice task we ship (`arc_easy_val`, `arc_challenge_val`: the ARC validation
splits; the test splits stay for evaluation — no package we use ships the ARC or GSM8K train splits, and our GSM8K
file is its test split, so it is refused), or a JSON-lines file of ARC-style rows (query, choices, gold) or of
prompt/completion pairs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import adapter as adapter_io
from . import peft, tasks
from .compensate import compensate
from .errors import EoraError, staged_outputs
from .gguf_io import open_gguf
from .hf_model import load_config, load_tokenizer
from .naming import LINEAR_MODULES, NameMap
from .reconstruct import build_model

log = logging.getLogger(__name__)

INITS = ("eora", "lora")
TRAIN_TASKS = ("arc_easy_val", "arc_challenge_val")
_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def load_examples(data: str) -> list[Example]:
    """(prompt, answer) pairs of a training spec (see the module docstring)."""
    if data in tasks.TASKS:
        if data not in TRAIN_TASKS:
            raise EoraError(f"--data {data}: that file is an evaluation (test) split; train on one of "
                            f"{', '.join(TRAIN_TASKS)} or a .jsonl file of your own")
        items = tasks.load_items(data)
        return [Example(it.context, it.choices[it.gold]) for it in items]
    path = Path(data)
    if not path.is_file():
        raise EoraError(f"--data {data} is neither a training task ({', '.join(TRAIN_TASKS)}) nor a file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EoraError(f"{path}:{n} is not JSON ({exc.msg}): one JSON object per line") from None
        if isinstance(row, dict) and {"choices", "gold"} <= row.keys():
            it = tasks.mc_item(row)
            out.append(Example(it.context, it.choices[it.gold]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.append(Example(row["prompt"], row["completion"]))
        else:
            raise EoraError(f"{path}:{n} has neither ARC fields (query, choices, gold) nor prompt/completion")
    if not out:
        raise EoraError(f"{path} holds no examples")
    return out


def encode(examples: list[Example], tokenizer, seqlen: int) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer (cut to `seqlen` from the left) and how many of the last ids are the answer."""
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        full = tokenizer(ex.prompt + ex.answer)["input_ids"]
        n_answer = max(1, len(full) - len(p))
        out.append((full[-seqlen:], min(n_answer, seqlen - 1)))
    return out


def _batch(rows: list[tuple[list[int], int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch (no query sees only padding, so no NaN rows); labels on the answer tokens only."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, n_answer) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(seq) - n_answer: len(seq)] = torch.tensor(seq[len(seq) - n_answer:])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the answer tokens of the batch, and their number. The output head runs on the
    answer positions only (its vocabulary-wide matmul is a fifth of a small model's work)."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers are injected in it
    hidden = core.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != -100
    logits = core.get_output_embeddings()(hidden[:, :-1][keep])  # (n answer tokens, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    cap = getattr(core.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    n = int(keep.sum())
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="mean"), n


@torch.no_grad()
def _heldout_loss(model, rows: list[tuple[list[int], int]], pad: int, device: torch.device, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        loss, n = _loss(model, _batch(rows[i: i + batch_size], pad, device))
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def _init_factors(init: str, hf_dir: Path, gguf_path: Path, *, rank: int, calib: str, samples: int, seqlen: int,
                  tokenizer) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """GGUF name -> (B, A) in GGUF row order for "eora" or an adapter file; None for "lora"."""
    if init == "lora":
        return None
    if init == "eora":
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "eora.gguf"
            compensate(hf_dir, gguf_path, path, rank=rank, method="eora", calib=calib, samples=samples,
                       seqlen=seqlen, adapter_type="f32", tokenizer=tokenizer)
            return adapter_io.read_gguf_lora(path)[1]
    path = Path(init)
    if not path.is_file():
        raise EoraError(f"--init {init} is neither {' nor '.join(INITS)} nor an adapter file")
    adapter_io.check_gguf_lora(path, gguf_path)  # EoraError unless it fits the base and applies with scale 1
    return adapter_io.read_gguf_lora(path)[1]


def finetune(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
             init: str, data: str, rank: int = 64, steps: int = 200, lr: float = 1e-4, batch_size: int = 8,
             seqlen: int = 128, heldout: int = 64, eval_every: int = 25, seed: int = 0,
             calib: str = "demo,stories", calib_samples: int = 64, calib_seqlen: int = 512,
             log_path: str | os.PathLike[str] | None = None, peft_dir: str | os.PathLike[str] | None = None,
             adapter_type: str = "f16", tokenizer=None, device: str | None = None) -> dict[str, Any]:
    """Train a rank-`rank` LoRA on the dequantized GGUF base (see the module docstring); write the GGUF adapter
    `out` (+ the PEFT folder `peft_dir`, + the per-step log `log_path` as JSON). Returns the log.

    init: "eora", "lora" or a GGUF LoRA file (its rank is used). calib: the EoRA init's calibration spec (default:
    the general text `compensate` uses; not the task's, whose held-out part would leak into the init).
    device: torch device (default: CUDA if present).
    """
    from peft import LoraConfig, get_peft_model

    hf, base_path = Path(hf_dir), Path(gguf_path)
    for name, value, lo in (("steps", steps, 1), ("rank", rank, 1), ("batch size", batch_size, 1),
                            ("seqlen", seqlen, 8), ("eval every", eval_every, 1)):
        if value < lo:
            raise EoraError(f"{name} must be at least {lo}, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise EoraError(f"the learning rate must be positive, got {lr}")
    if adapter_type not in adapter_io.ADAPTER_DTYPES:
        raise EoraError(f"unknown adapter type {adapter_type!r}: choose one of {', '.join(adapter_io.ADAPTER_DTYPES)}")
    config = load_config(hf)
    names = NameMap.from_config(config)
    examples = load_examples(data)
    if len(examples) < heldout + batch_size:
        raise EoraError(f"--data {data} has {len(examples)} examples: fewer than {heldout} held out + one batch")
    tok = tokenizer if tokenizer is not None else load_tokenizer(hf)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    inputs = [hf, base_path, init if init not in INITS else None]
    with staged_outputs() as staging, open_gguf(base_path) as base:
        out_tmp = staging.file(out, suffix=".gguf", inputs=inputs)
        peft_tmp = (staging.folder(peft_dir, may_hold=peft.PEFT_FILES, inputs=[*inputs, out])
                    if peft_dir is not None else None)
        log_tmp = staging.file(log_path, suffix=".json", inputs=[*inputs, out]) if log_path is not None else None
        t0 = time.perf_counter()
        factors = _init_factors(init, hf, base_path, rank=rank, calib=calib, samples=calib_samples,
                                seqlen=calib_seqlen, tokenizer=tok)
        if factors is not None:
            ranks = {a.shape[0] for _, a in factors.values()}
            if len(ranks) != 1:
                raise EoraError(f"--init {init} has mixed ranks {sorted(ranks)}: fine-tune an adapter of one rank "
                                "(compensate --rank)")
            rank = ranks.pop()
        torch.manual_seed(seed)
        model = build_model(hf, base_path, dtype=torch.float32)
        lcfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=list(_LEAVES),
                          init_lora_weights=True)
        model = get_peft_model(model, lcfg)
        if factors is not None:
            _load_factors(model, factors, names)
        model.to(dev)
        t_init = time.perf_counter() - t0

        rng = np.random.default_rng(seed)
        order = rng.permutation(len(examples))
        held = encode([examples[i] for i in order[:heldout]], tok, seqlen)
        train = encode([examples[i] for i in order[heldout:]], tok, seqlen)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        record: dict[str, Any] = {"init": init if init in INITS else str(init), "data": data, "rank": rank,
                                  "steps": steps, "lr": lr, "batch_size": batch_size, "seqlen": seqlen, "seed": seed,
                                  "train_examples": len(train), "heldout_examples": len(held), "calib": calib,
                                  "base": str(base_path), "device": str(dev), "log": []}
        model.eval()  # no dropout anywhere; gradients flow regardless
        record["log"].append({"step": 0, "heldout_loss": _heldout_loss(model, held, pad, dev, batch_size)})
        batches = _batch_order(len(train), batch_size, steps, rng)
        t1 = time.perf_counter()
        bar = _progress(steps)
        for step, idx in enumerate(batches, 1):
            loss, _ = _loss(model, _batch([train[i] for i in idx], pad, dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise EoraError(f"the training loss became {value} at step {step}: lower --lr")
            entry: dict[str, float] = {"step": step, "loss": value}
            if step % eval_every == 0 or step == steps:
                entry["heldout_loss"] = _heldout_loss(model, held, pad, dev, batch_size)
                log.info("step %d/%d: loss %.4f, held-out loss %.4f (%.0f s)", step, steps, value,
                         entry["heldout_loss"], time.perf_counter() - t1)
            record["log"].append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
        bar.close()
        record["seconds"] = {"init": round(t_init, 2), "train": round(time.perf_counter() - t1, 2)}
        trained = _read_factors(model, names)
        metadata = {"eora.method": f"finetune-{record['init'] if init in INITS else 'adapter'}", "eora.rank": rank,
                    "eora.base_model": base_path.name, "eora.finetune_data": data, "eora.finetune_steps": steps}
        adapter_io.write_gguf_lora(out_tmp, trained, arch=str(base.meta.arch), dtype=adapter_type, metadata=metadata)
        adapter_io.check_gguf_lora(out_tmp, base)
        if peft_tmp is not None:
            peft.write_peft(peft_tmp, trained, names, base_model_name_or_path=str(hf))
        if log_tmp is not None:
            log_tmp.write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s (rank %d, %d steps from %s init; final held-out loss %.4f)", out, rank, steps,
             record["init"], record["log"][-1]["heldout_loss"])
    return record


def _batch_order(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` batches of indices: epochs in seeded shuffled order, each epoch cut into full batches."""
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n)
        out += [perm[i: i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps]


def _lora_modules(model, names: NameMap) -> dict[str, Any]:
    """HF module name (model.layers.N.self_attn.q_proj ...) -> its PEFT LoRA layer."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            hf_name = name.removeprefix("base_model.model.")
            if hf_name.rsplit(".", 1)[-1] in _LEAVES:
                out[hf_name] = mod
    if len(out) != len(LINEAR_MODULES) * names.dims.n_layers:
        raise EoraError(f"PEFT wrapped {len(out)} linears, expected {len(LINEAR_MODULES) * names.dims.n_layers}: "
                        "this architecture's module names are not supported")
    return out


def _load_factors(model, factors: dict[str, tuple[np.ndarray, np.ndarray]], names: NameMap) -> None:
    mods = _lora_modules(model, names)
    for gname, (b, a) in factors.items():
        module = names.to_hf(gname)  # EoraError for an adapter on embeddings or other tensors
        b_hf = names.gguf_to_hf_rows(module, torch.from_numpy(np.asarray(b, dtype=np.float32)))
        mod = mods[module]
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))
            mod.lora_B["default"].weight.copy_(b_hf)
    missing = set(mods) - {names.to_hf(g) for g in factors}
    if missing:
        log.warning("the initial adapter covers %d of %d linears; the rest start from B = 0 (e.g. %s)",
                    len(factors), len(mods), sorted(missing)[0])


def _read_factors(model, names: NameMap) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for module, mod in _lora_modules(model, names).items():
        scale = float(mod.scaling["default"])
        a = mod.lora_A["default"].weight.detach().to("cpu", torch.float32)
        b = mod.lora_B["default"].weight.detach().to("cpu", torch.float32) * scale
        out[names.to_gguf(module)] = (names.hf_to_gguf_rows(module, b).numpy(), a.numpy())
    return out


def _progress(total: int):
    return tqdm(total=total, desc="finetune", unit="step", disable=not sys.stderr.isatty())


__all__ = ["INITS", "TRAIN_TASKS", "Example", "encode", "finetune", "load_examples"]
