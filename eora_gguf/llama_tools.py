"""Running the llama.cpp tools: convert_hf_to_gguf.py, llama-quantize, llama-perplexity (KL-divergence logits).

A `llamacpp.LlamaCpp` (located or built by llamacpp.py) says where the binaries are; `run_tool` runs one and turns
a failure into one EoraError line with the tool's last meaningful output line.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EoraError, atomic_output
from .llamacpp import LlamaCpp, last_error_line

log = logging.getLogger(__name__)

# Quantization types llama-quantize accepts by name (llama.cpp's own table at the pinned commit).
QUANT_TYPES = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S",
    "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS", "Q3_K_S",
    "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K",
    "Q8_0", "F16", "BF16", "F32", "COPY",
)
# Types whose quality depends on an importance matrix; llama-quantize refuses some of them without one.
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
CONVERT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def run_tool(cmd: Sequence[str | os.PathLike[str]], what: str, *, env: dict[str, str] | None = None,
             verbose: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a llama.cpp program; on failure raise EoraError with its last meaningful line of output."""
    argv = [str(c) for c in cmd]
    log.debug("$ %s", " ".join(argv))
    full_env = {**os.environ, **(env or {})}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          errors="replace") as proc:
        try:
            out, err = proc.communicate()
        except BaseException:  # Ctrl-C / SIGTERM: stop the child too, the caller cleans its outputs
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if verbose:
        sys.stderr.write(err)
    if proc.returncode != 0:
        raise EoraError(f"{what} failed (exit {proc.returncode}): {last_error_line(err + chr(10) + out)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# llama.cpp states a failure's cause once, deep down, then each caller adds a generic line ("failed to load
# model", "main: error: unable to load model"); keep the cause. Most specific first:


def convert(llama: LlamaCpp, hf_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
            outtype: str = "f16", verbose: bool = False) -> Path:
    """HF folder -> GGUF with llama.cpp's own convert_hf_to_gguf.py (and its own gguf-py)."""
    from .hf_model import check_model_folder

    hf = Path(hf_dir)
    if outtype not in CONVERT_OUTTYPES:
        raise EoraError(f"unknown --outtype {outtype!r}: choose one of {', '.join(CONVERT_OUTTYPES)}")
    check_model_folder(hf)  # the converter writes a GGUF of 0 tensors for a folder without safetensors
    out = Path(out)
    with atomic_output(out, suffix=".gguf", inputs=[hf]) as tmp:
        run_tool([sys.executable, llama.converter, hf, "--outfile", tmp, "--outtype", outtype],
                 f"convert_hf_to_gguf.py on {hf}", verbose=verbose)
    return out


def quantize(llama: LlamaCpp, src: str | os.PathLike[str], out: str | os.PathLike[str], qtype: str, *,
             imatrix: str | os.PathLike[str] | None = None, threads: int | None = None,
             extra_args: Sequence[str] = (), verbose: bool = False) -> Path:
    """GGUF -> quantized GGUF with llama-quantize (any type or mix it knows)."""
    qtype_u = qtype.upper()
    if qtype_u not in QUANT_TYPES:
        raise EoraError(f"unknown quantization type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    src = Path(src)
    require_gguf(src)
    if imatrix is not None and not Path(imatrix).is_file():
        raise EoraError(f"imatrix file {imatrix} does not exist")
    if qtype_u in NEEDS_IMATRIX and imatrix is None:
        raise EoraError(f"{qtype_u} needs an importance matrix: pass --imatrix FILE (make one with llama-imatrix)")
    out = Path(out)
    args: list[str | os.PathLike[str]] = [llama.tool("llama-quantize"), *extra_args]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    with atomic_output(out, suffix=".gguf", inputs=[src, imatrix]) as tmp:
        args += [src, tmp, qtype_u]
        if threads:
            args.append(str(threads))
        run_tool(args, f"llama-quantize {src.name} -> {qtype_u}", verbose=verbose)
    return out


GGUF_MAGIC = b"GGUF"


def require_gguf(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EoraError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise EoraError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf made by llama.cpp")
    return path


def _perplexity_args(llama: LlamaCpp, model: str | os.PathLike[str], text_file: str | os.PathLike[str], *,
                     lora: Sequence[str | os.PathLike[str]], ctx: int, chunks: int | None,
                     threads: int | None) -> list[str | os.PathLike[str]]:
    """llama-perplexity's command line for a model (+ adapters) over a text file, inputs checked first."""
    require_gguf(model)
    if not Path(text_file).is_file():
        raise EoraError(f"perplexity text {text_file} does not exist")
    args: list[str | os.PathLike[str]] = [llama.tool("llama-perplexity"), "-m", model, "-f", text_file,
                                          "-c", str(ctx), "--no-warmup"]
    for adapter in lora:
        require_gguf(adapter)
        args += ["--lora", adapter]
    if chunks:
        args += ["--chunks", str(chunks)]
    if threads:
        args += ["-t", str(threads)]
    return args


def read_logprobs_file(path: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Read the file `llama-perplexity --kl-divergence-base FILE` writes: (tokens, logprobs).

    Layout (tools/perplexity/perplexity.cpp): "_logits_", int32 n_ctx, int32 n_vocab, int32 n_chunk, the
    n_chunk*n_ctx evaluated token ids (int32, as tokenized: the BOS swapped into each chunk's first position at
    decode time is not stored), then per chunk n_ctx-1-n_ctx//2 rows (positions n_ctx//2 .. n_ctx-2, each
    predicting the next token) of 2*((n_vocab+1)/2)+4 uint16: a float32 scale, a float32 minimum log-prob,
    then the log-probs coded as min + scale*q (clamped below at the row's max logit - 16).
    tokens: (n_chunk, n_ctx) int64; logprobs: (n_chunk*(n_ctx-1-n_ctx//2), n_vocab) float64.
    """
    raw = Path(path).read_bytes()
    if raw[:8] != b"_logits_" or len(raw) < 20:
        raise EoraError(f"{path} is not a llama-perplexity --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(raw[8:20], np.int32))
    head = 20 + 4 * n_chunk * n_ctx
    tokens = np.frombuffer(raw[20:head], np.int32).astype(np.int64).reshape(n_chunk, n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    per_chunk = n_ctx - 1 - n_ctx // 2
    body = np.frombuffer(raw[head:], np.uint16)
    if body.size != n_chunk * per_chunk * nv:
        raise EoraError(f"{path} is truncated: {body.size} log-prob values, expected {n_chunk * per_chunk * nv}")
    rows = body.reshape(-1, nv)
    scale_min = rows[:, :4].copy().view(np.float32).astype(np.float64)  # (n, 2): scale, min log-prob
    logprobs = scale_min[:, 1:2] + scale_min[:, 0:1] * rows[:, 4:4 + n_vocab].astype(np.float64)
    return tokens, logprobs


def token_logprobs(llama: LlamaCpp, model: str | os.PathLike[str], text_file: str | os.PathLike[str],
                   out_file: str | os.PathLike[str], *, lora: Sequence[str | os.PathLike[str]] = (),
                   ctx: int = 128, chunks: int = 3, threads: int | None = None) -> tuple[Any, Any]:
    """llama.cpp's next-token log-probabilities over `text_file`, read from the data file (the log is unreliable).

    Runs `llama-perplexity --kl-divergence-base out_file`; returns `read_logprobs_file(out_file)`:
    tokens (chunks, ctx) and logprobs (chunks*(ctx-1-ctx//2), n_vocab).
    """
    args = _perplexity_args(llama, model, text_file, lora=lora, ctx=ctx, chunks=chunks, threads=threads)
    with atomic_output(out_file, suffix=".bin") as tmp:
        run_tool([*args, "--kl-divergence-base", tmp], f"llama-perplexity --kl-divergence-base on {Path(model).name}")
        result = read_logprobs_file(tmp)
    return result
