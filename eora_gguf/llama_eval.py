"""Log-likelihood scoring and greedy generation through llama.cpp (libllama), for `eora-gguf eval`.

llama.cpp's own tools print aggregates only, so a small client (`eora_gguf/cpp/eora_eval.cpp`) is compiled once
against the llama.cpp build in use and cached beside it; this module writes its request files, runs it, and reads
its per-request results. The client batches many requests into each llama_decode call and evaluates a shared
context once for all its continuations (see the .cpp's header for the file formats).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import llamacpp
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
    llamacpp.require_gguf(model)
    for a in lora:
        llamacpp.require_gguf(a)
    exe = client(llama)
    with tempfile.TemporaryDirectory(prefix="eora-eval-") as tmp:
        req, res = Path(tmp) / "requests", Path(tmp) / "results"
        _write_records(req, records)
        cmd: list[str | os.PathLike[str]] = [exe, mode, "-m", model, "-i", req, "-o", res, *options]
        for a in lora:
            cmd += ["--lora", a]
        llamacpp.run_tool(cmd, f"eora-eval {mode} on {Path(model).name}", verbose=verbose)
        return res.read_text().splitlines()


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
