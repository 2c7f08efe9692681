"""Joint base + adapter: alternate llama-quantize and the EoRA solve so the base and the adapter fit each other.

The plain pair quantizes W, then fits B A to the error W − Q(W). Here the quantizer sees the adapter too:

    Wq_0 = Q(W);  (B, A)_k = EoRA(W − Wq_k, C);  Wq_{k+1} = Q(W − B_k A_k)

where Q is llama-quantize with the same type mix and importance matrix as the stock base, applied to a copy of the
F16 GGUF whose adapted weights are replaced by W − B_k A_k. The adapter then models the directions the quantizer
cannot represent, and the quantizer spends its levels on the rest. Each step lowers neither objective for sure
(llama-quantize minimises an imatrix-weighted block error, not the EoRA objective), so every iterate is measured
(KL divergence to F16 on the evaluation text) and the best pair is kept. Both files of every iterate are a plain
GGUF and a plain GGUF LoRA: stock llama.cpp loads them unchanged.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np

from . import adapter as adapter_io
from . import llama_tools, llamacpp
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)

# Metadata the writer sets itself, or that describes the file layout rather than the model.
_SKIP_KEYS = ("GGUF.", "general.architecture")


def write_shifted(src: str | os.PathLike[str], out: str | os.PathLike[str],
                  shifts: Mapping[str, np.ndarray]) -> Path:
    """Copy the (F16/BF16/F32) GGUF `src` to `out` with each tensor `name` in `shifts` replaced by W − shift
    (shift: numpy (n_out, n_in) in GGUF row order, e.g. B A of an adapter); stored in the tensor's own type."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields.get("general.architecture")
    if arch is None:
        raise EoraError(f"{src} has no general.architecture: not a llama.cpp model GGUF")
    names = {t.name for t in reader.tensors}
    missing = sorted(set(shifts) - names)
    if missing:
        raise EoraError(f"{src} has no tensor {missing[0]}: the adapter does not belong to this model")
    out = Path(out)
    with atomic_output(out, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, str(arch.contents()))
        for key, field in reader.fields.items():
            if key.startswith(_SKIP_KEYS):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            data = np.asarray(t.data)
            if t.name in shifts:
                if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                    raise EoraError(f"{t.name} in {src} is {t.tensor_type.name}: give the F16 or F32 GGUF "
                                    "(`eora-gguf convert`), not a quantized one")
                w = data.astype(np.float32) - np.asarray(shifts[t.name], dtype=np.float32).reshape(data.shape)
                data = w.astype(data.dtype)
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def adapter_shifts(adapters: Sequence[str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """Σ over adapters of scale · B A per base tensor (scale as llama.cpp applies it with user scale 1)."""
    out: dict[str, np.ndarray] = {}
    for path in adapters:
        info, factors = adapter_io.read_gguf_lora(path)
        for name, (b, a) in factors.items():
            if name.startswith("token_embd"):
                continue  # get_rows layout: not a W − B A shift of a matmul weight
            d = info.scale(name) * (b.astype(np.float64) @ a.astype(np.float64))
            out[name] = out[name] + d if name in out else d
    return out


def refine(llama: llamacpp.LlamaCpp, f16: Path, qtype: str, imatrix: Path | None, out_dir: Path, *,
           make_adapter: Callable[[Path, Path], list[Path]], measure: Callable[[Path, list[Path]], dict],
           iterations: int = 3, start: Path | None = None, stem: str | None = None, threads: int | None = None,
           extra_args: Sequence[str] = (), verbose: bool = False) -> dict:
    """Alternate quantize ↔ solve for `iterations` rounds after the plain pair; keep the pair of lowest KLD.

    make_adapter(base, stem) -> adapter files for that base; measure(base, adapters) -> {"kld", "ppl", ...}.
    start: the plain base (quantized from `f16` with `qtype` and `imatrix`) when it already exists.
    stem: names the files of the iterates (default: the type); extra_args: more llama-quantize options (the same
    for every iterate, e.g. --token-embedding-type), so the refined bases keep the plain base's type mix.
    Returns {"best": index, "iterations": [{"base", "adapters", "kld", "ppl", "seconds", ...}, ...]}.
    """
    if iterations < 0:
        raise EoraError(f"refinement iterations must be >= 0, got {iterations}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{qtype}{'-imatrix' if imatrix else ''}"
    base = start or out_dir / f"model-{stem}.gguf"
    history: list[dict] = []
    for k in range(iterations + 1):
        t0 = time.perf_counter()
        if k > 0:
            shifted = out_dir / f".refine-{stem}-f16-{k}.gguf"
            base = out_dir / f"model-{stem}-refined{k}.gguf"
            if not base.is_file():
                try:
                    write_shifted(f16, shifted, adapter_shifts(history[-1]["adapters"]))
                    llama_tools.quantize(llama, shifted, base, qtype, imatrix=imatrix, threads=threads,
                                      extra_args=extra_args, verbose=verbose)
                finally:
                    shifted.unlink(missing_ok=True)
        elif not base.is_file():
            llama_tools.quantize(llama, f16, base, qtype, imatrix=imatrix, threads=threads, extra_args=extra_args,
                              verbose=verbose)
        t_quant = time.perf_counter() - t0
        adapters = make_adapter(base, out_dir / f"adapter-{stem}-it{k}")
        t_solve = time.perf_counter() - t0 - t_quant
        m = measure(base, adapters)
        history.append({"iteration": k, "base": base, "adapters": adapters, "kld": m["kld"], "ppl": m["ppl"],
                        "top1": m.get("top1"), "bytes": base.stat().st_size + sum(a.stat().st_size for a in adapters),
                        "seconds": {"quantize": round(t_quant, 2), "solve": round(t_solve, 2),
                                    "measure": round(time.perf_counter() - t0 - t_quant - t_solve, 2)}})
        log.info("refinement %s, iteration %d: KLD %.5f, perplexity %.3f", stem, k, m["kld"], m["ppl"])
    best = min(range(len(history)), key=lambda i: history[i]["kld"])
    return {"best": best, "iterations": history}
