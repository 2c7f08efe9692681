"""Perplexity, KL divergence, log-likelihood scoring and greedy generation through llama.cpp (libllama).

llama.cpp's own tools print aggregates only, and the pinned llama.cpp's asynchronous logger sometimes loses the last
lines of what they print, so a small client (`eora_gguf/cpp/eora_eval.cpp`) is compiled once against the llama.cpp
build in use and cached beside it; this module writes its request files, runs it, and reads its per-item results
from files. Nothing here parses a log line.

- `text_eval`: perplexity over a text, evaluated exactly as llama-perplexity does (same chunks, same batches, so
  the same logits), and with a base file, the KL divergence to the base model and top-1 agreement as
  `llama-perplexity --kl-divergence` reports them. `kld_base` writes (and caches) the F16 model's base file.
- `score` / `generate`: multiple-choice log-likelihoods (lm-eval's split) and greedy generation, batched.
See the .cpp's header for the file formats.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import llama_tools, llamacpp
from .cache import cache_dir, locked
from .errors import EoraError, atomic_output

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpp") / "eora_eval.cpp"
LIB_NAMES = ("libllama.so", "libllama.dylib")


@dataclass(frozen=True)
class Score:
    """log p(continuation | context) summed over its tokens; `greedy`: every token was the argmax."""

    logprob: float
    n_tokens: int
    greedy: bool


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextEval:
    """Perplexity of a model over a text and, when measured against a base, its divergence from the base model.

    ppl = exp(mean nll) with llama-perplexity's standard error; kld: mean KL(base ‖ model) per scored token, nats;
    top1: share of tokens where both models' most likely next token agree; ppl_base: the base model's perplexity
    read from the base file (None without a base). chunks × ctx tokens, of which `tokens` were scored.
    """

    ppl: float
    ppl_stderr: float
    tokens: int
    chunks: int
    ctx: int
    kld: float | None = None
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    top1_stderr: float | None = None
    ppl_base: float | None = None
    rms_dp: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _link_dirs(llama: llamacpp.LlamaCpp) -> tuple[Path, Path]:
    """(directory holding libllama, the llama.cpp source with include/llama.h) for this llama.cpp."""
    lib_candidates = [llama.bin_dir, llama.bin_dir.parent / "lib", llama.bin_dir.parent / "src",
                      llama.bin_dir.parent / "lib64"]
    lib_dir = next((d for d in lib_candidates if any((d / n).is_file() for n in LIB_NAMES)), None)
    if lib_dir is None:
        raise EoraError(f"no shared libllama next to {llama.bin_dir}: eval needs llama.cpp built with "
                        "-DBUILD_SHARED_LIBS=ON (the pinned build is; rebuild yours or unset LLAMA_CPP_DIR)")
    for src in (llama.source_dir, llama.bin_dir.parent.parent, llama.bin_dir.parent):
        if (src / "include" / "llama.h").is_file() and (src / "ggml" / "include" / "ggml.h").is_file():
            return lib_dir, src
    raise EoraError(f"llama.h not found for the llama.cpp in {llama.bin_dir}: point LLAMA_CPP_DIR at a source checkout "
                    "with its build inside")


def client(llama: llamacpp.LlamaCpp) -> Path:
    """Path of the eora-eval client for this llama.cpp, compiled on first use (a few seconds)."""
    return compile_against(llama, SOURCE, "eora-eval")


def compile_against(llama: llamacpp.LlamaCpp, source: Path, name: str) -> Path:
    """`source` (a C++17 libllama client) compiled against this llama.cpp, cached as <cache>/tools/<name>-<key>
    (the key covers the source, the library and llama.h, so a rebuilt llama.cpp gets a fresh binary)."""
    lib_dir, src = _link_dirs(llama)
    lib = next(lib_dir / n for n in LIB_NAMES if (lib_dir / n).is_file())
    key = hashlib.sha256(source.read_bytes() + str(lib.resolve()).encode() + str(lib.stat().st_mtime_ns).encode()
                         + (src / "include" / "llama.h").read_bytes()).hexdigest()[:16]
    exe = cache_dir() / "tools" / f"{name}-{key}"
    if os.access(exe, os.X_OK):
        return exe
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise EoraError("no C++ compiler found (c++, g++ or clang++): install one (e.g. apt install g++) or set CXX")
    exe.parent.mkdir(parents=True, exist_ok=True)
    with locked(name):
        if os.access(exe, os.X_OK):
            return exe
        with atomic_output(exe) as tmp:
            cmd = [cxx, "-O2", "-std=c++17", str(source), "-o", str(tmp), f"-I{src / 'include'}",
                   f"-I{src / 'ggml' / 'include'}", f"-L{lib_dir}", "-lllama", f"-Wl,-rpath,{lib_dir}"]
            log.info("compiling %s against %s", source.name, lib_dir)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:300])
                raise EoraError(f"compiling {source.name} failed: {first}")
        exe.chmod(0o755)
    return exe


def _write_records(path: Path, records: Sequence[Sequence[str]]) -> None:
    with open(path, "wb") as fh:
        for rec in records:
            fh.write(f"{len(rec)}\n".encode())
            for s in rec:
                b = s.encode("utf-8")
                fh.write(f"{len(b)}\n".encode() + b + b"\n")


def _run(llama: llamacpp.LlamaCpp, mode: str, model: str | os.PathLike[str], lora: Sequence[str | os.PathLike[str]],
         records: Sequence[Sequence[str]], options: Sequence[str], verbose: bool) -> list[str]:
    llama_tools.require_gguf(model)
    for a in lora:
        llama_tools.require_gguf(a)
    exe = client(llama)
    with tempfile.TemporaryDirectory(prefix="eora-eval-") as tmp:
        req, res = Path(tmp) / "requests", Path(tmp) / "results"
        _write_records(req, records)
        cmd: list[str | os.PathLike[str]] = [exe, mode, "-m", model, "-i", req, "-o", res, *options]
        for a in lora:
            cmd += ["--lora", a]
        llama_tools.run_tool(cmd, f"eora-eval {mode} on {Path(model).name}", verbose=verbose)
        return res.read_text().splitlines()


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (0 below 11 values)."""
    n = values.size
    mean = float(values.mean())
    var = float((values * values).mean()) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def read_text_results(path: str | os.PathLike[str]) -> TextEval:
    """Aggregate the per-position lines the client's text mode writes (see eora_eval.cpp) into a TextEval."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise EoraError(f"eora-eval wrote an empty result file {path}")
    n_ctx, n_chunk, _, with_base = (int(x) for x in lines[0].split())
    rows = np.array([[float(x) for x in ln.split("\t")] for ln in lines[1:]], dtype=np.float64)
    expected = n_chunk * (n_ctx - 1 - n_ctx // 2)
    if rows.shape[0] != expected:
        raise EoraError(f"eora-eval returned {rows.shape[0]} scored tokens, expected {expected}")
    if not np.isfinite(rows).all():
        raise EoraError("the model produced NaN/Inf logits: the model or adapter file is broken")
    log_ppl, log_ppl_se = _mean_stderr(rows[:, 0])
    ppl = math.exp(log_ppl)
    res = {"ppl": ppl, "ppl_stderr": ppl * log_ppl_se, "tokens": int(rows.shape[0]), "chunks": n_chunk, "ctx": n_ctx}
    if with_base:
        kld, kld_se = _mean_stderr(rows[:, 2])
        top1 = float(rows[:, 3].mean())
        n = rows.shape[0]
        res.update(kld=kld, kld_stderr=kld_se, kld_median=float(np.median(rows[:, 2])),
                   kld_p99=float(np.quantile(rows[:, 2], 0.99)), top1=top1,
                   top1_stderr=math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
                   ppl_base=math.exp(float(rows[:, 1].mean())), rms_dp=math.sqrt(float((rows[:, 4] ** 2).mean())))
    return TextEval(**res)


def text_eval(llama: llamacpp.LlamaCpp, model: str | os.PathLike[str], *, text: str | os.PathLike[str] | None = None,
              base: str | os.PathLike[str] | None = None, lora: Sequence[str | os.PathLike[str]] = (),
              ctx: int = 512, chunks: int | None = None, threads: int | None = None, batch: int = 2048,
              save_base: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
              verbose: bool = False) -> TextEval:
    """Perplexity over `text` (chunks of `ctx` tokens), or with `base` (a file from `kld_base` or from
    llama-perplexity --kl-divergence-base) perplexity and KL divergence over the base's tokens.

    save_base: also write this model's log-probabilities there (atomically), for later `base=` comparisons.
    batch: llama-perplexity's -b (tokens per llama_decode; below ctx, a chunk is decoded in pieces).
    """
    if (text is None) == (base is None):
        raise EoraError("text_eval takes a text or a base file, not both")
    if ctx < 8:
        raise EoraError(f"--ctx must be >= 8, got {ctx}")
    if chunks is not None and chunks < 1:
        raise EoraError(f"--chunks must be >= 1, got {chunks}")
    llama_tools.require_gguf(model)
    for a in lora:
        llama_tools.require_gguf(a)
    opts: list[str | os.PathLike[str]] = ["-t", str(threads or os.cpu_count() or 1), "-b", str(batch)]
    if text is not None:
        if not Path(text).is_file():
            raise EoraError(f"text file {text} does not exist")
        opts += ["-f", text, "-c", str(ctx)]
    else:
        if not Path(base).is_file():
            raise EoraError(f"base log-probability file {base} does not exist: make it with `kld_base`")
        opts += ["--base", base]
    if chunks:
        opts += ["--chunks", str(chunks)]
    exe = client(llama)
    with tempfile.TemporaryDirectory(prefix="eora-eval-") as tmp:
        res = Path(tmp) / "results"
        cmd: list[str | os.PathLike[str]] = [exe, "text", "-m", model, "-o", res, *opts]
        for a in lora:
            cmd += ["--lora", a]
        if save_base is None:
            llama_tools.run_tool(cmd, f"eora-eval text on {Path(model).name}", env=env, verbose=verbose)
        else:
            with atomic_output(save_base, suffix=".kld") as part:
                llama_tools.run_tool([*cmd, "--save-base", part], f"eora-eval text on {Path(model).name}", env=env,
                                  verbose=verbose)
        return read_text_results(res)


def kld_base(llama: llamacpp.LlamaCpp, model: str | os.PathLike[str], text: str | os.PathLike[str], *,
             ctx: int = 512, chunks: int | None = None, threads: int | None = None,
             cache: str | os.PathLike[str] | None = None, verbose: bool = False) -> tuple[Path, TextEval]:
    """The reference model's log-probabilities over `text` (llama-perplexity's --kl-divergence-base layout), made
    once and reused while the model, text and settings are unchanged; returns (file, the reference's TextEval).

    cache: the folder for the file (default: <eora-gguf cache>/kld). Files are keyed by the model file's path,
    size and mtime, the text's content, ctx and chunks.
    """
    llama_tools.require_gguf(model)
    if not Path(text).is_file():
        raise EoraError(f"text file {text} does not exist")
    st = Path(model).stat()
    key = hashlib.sha256(json.dumps([str(Path(model).resolve()), st.st_size, st.st_mtime_ns, ctx, chunks,
                                     hashlib.sha256(Path(text).read_bytes()).hexdigest(),
                                     hashlib.sha256(SOURCE.read_bytes()).hexdigest()]).encode()).hexdigest()[:16]
    folder = Path(cache) if cache is not None else cache_dir() / "kld"
    folder.mkdir(parents=True, exist_ok=True)
    path, meta = folder / f"{Path(model).stem}-{key}.kld", folder / f"{Path(model).stem}-{key}.json"
    with locked(f"kld-{key}"):
        if path.is_file() and meta.is_file():
            return path, TextEval(**json.loads(meta.read_text()))
        log.info("computing the reference log-probabilities of %s over %s", Path(model).name, Path(text).name)
        ref = text_eval(llama, model, text=text, ctx=ctx, chunks=chunks, threads=threads, save_base=path,
                        verbose=verbose)
        with atomic_output(meta) as tmp:
            tmp.write_text(json.dumps(ref.as_dict()))
    return path, ref


def score(llama: llamacpp.LlamaCpp, model: str | os.PathLike[str], requests: Sequence[tuple[str, Sequence[str]]], *,
          lora: Sequence[str | os.PathLike[str]] = (), threads: int | None = None, ctx: int = 1024,
          verbose: bool = False) -> list[list[Score]]:
    """For each (context, continuations): the Score of every continuation given the context (lm-eval's split)."""
    if not requests:
        return []
    opts = ["-t", str(threads or os.cpu_count() or 1), "-c", str(ctx)]
    lines = _run(llama, "score", model, lora, [[c, *conts] for c, conts in requests], opts, verbose)
    out: list[list[Score | None]] = [[None] * len(conts) for _, conts in requests]
    for ln in lines:
        r, j, lp, n, g = ln.split("\t")
        out[int(r)][int(j)] = Score(float(lp), int(n), g == "1")
    if any(s is None for row in out for s in row):
        raise EoraError("eora-eval returned fewer scores than requested")
    return out  # type: ignore[return-value]


def generate(llama: llamacpp.LlamaCpp, model: str | os.PathLike[str], prompts: Sequence[str], *,
             stop: Sequence[str] = (), max_new: int = 256, lora: Sequence[str | os.PathLike[str]] = (),
             threads: int | None = None, parallel: int = 8, ctx_per_seq: int = 2048,
             verbose: bool = False) -> list[Generation]:
    """Greedy continuation of each prompt until an end token, a stop string (removed) or `max_new` tokens."""
    if not prompts:
        return []
    parallel = max(1, min(parallel, len(prompts)))
    opts = ["-t", str(threads or os.cpu_count() or 1), "--seqs", str(parallel), "-c", str(parallel * ctx_per_seq),
            "-n", str(max_new)]
    lines = _run(llama, "generate", model, lora, [[p, *stop] for p in prompts], opts, verbose)
    out: list[Generation | None] = [None] * len(prompts)
    for ln in lines:
        r, n, text, ids = (ln.split("\t") + ["", ""])[:4]
        out[int(r)] = Generation(bytes.fromhex(text).decode("utf-8", errors="replace"), int(n),
                                 tuple(int(t) for t in ids.split(",") if t))
    if any(g is None for g in out):
        raise EoraError("eora-eval returned fewer generations than requested")
    return out  # type: ignore[return-value]
