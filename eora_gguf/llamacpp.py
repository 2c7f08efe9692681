"""The pinned llama.cpp: locate or build it once per machine, and patch it (our runtime patch).

Running its tools (convert, quantize, perplexity) is llama_tools.py.

eora-gguf drives the real llama.cpp tools, never imitations. The pin is the copy vendored in the PyPI sdist
`llama-cpp-python==0.3.36` (llama.cpp commit 0c1e57098). It is fetched with pip, unpacked under the cache and
built with CMake into `<cache>/llama.cpp-<commit>/build`; a stamp file marks a finished build so it is reused.
`LLAMA_CPP_DIR` points at a user's own llama.cpp (a source tree with a build, or a folder of binaries) instead.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .cache import cache_dir, locked, pip_download
from .errors import EoraError

log = logging.getLogger(__name__)

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e57098"

# What we build by default. llama-cli in this llama.cpp is the chat client built on the server code, so the
# server targets are configured too (llama-server is one more link step); llama-completion is the classic one-shot
# generator.
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench", "llama-cli", "llama-completion",
         "llama-server")

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download web assets at build time
    "-DLLAMA_OPENSSL=OFF",
    f"-DLLAMA_BUILD_COMMIT={COMMIT}",  # the sdist has no git history to read it from
)

# GGML_NATIVE compiles ggml's AMX kernels when the compiler sees AMX on this CPU, and ggml then routes quantized
# matmuls through them. On the development VM (Sapphire-Rapids-class CPU advertising amx_tile/amx_int8) those kernels
# die with SIGILL on `tilezero` in every quantized llama-perplexity run, although a stand-alone probe of the same
# tile configuration runs fine there, so no cheap check can tell a working AMX from this one. The pinned build
# therefore leaves AMX out (AVX-512/VNNI kernels are used instead; ggml uses AMX only for prompt batches anyway);
# EORA_LLAMA_AMX=1 keeps it, and LLAMA_CPP_DIR takes any build of your own.
_AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def c_compiler() -> str | None:
    """The C compiler CMake will pick: $CC, else cc, gcc or clang on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.lru_cache(maxsize=None)
def host_flags() -> tuple[str, ...]:
    """CMake flags this machine needs on top of CMAKE_FLAGS: AMX off where -march=native would turn it on."""
    if os.environ.get("EORA_LLAMA_AMX") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return ()
    cc = c_compiler()
    if not cc:
        return ()
    try:
        macros = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", "-"], input="", capture_output=True,
                                text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    if "__AMX_TILE__" not in macros:
        return ()
    return (f"-DCMAKE_C_FLAGS={_AMX_OFF}", f"-DCMAKE_CXX_FLAGS={_AMX_OFF}")




@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp: where its binaries are and where its source (converter, gguf-py) is."""

    bin_dir: Path
    source_dir: Path
    origin: str = "pinned"  # "pinned" or "LLAMA_CPP_DIR"
    env: dict[str, str] = field(default_factory=dict, compare=False)

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise EoraError(f"{name} not found in {self.bin_dir}: rebuild with `eora-gguf setup-llama-cpp`"
                            + (" or build it in your LLAMA_CPP_DIR" if self.origin != "pinned" else ""))
        return path

    @property
    def converter(self) -> Path:
        path = self.source_dir / "convert_hf_to_gguf.py"
        if not path.is_file():
            raise EoraError(f"convert_hf_to_gguf.py not found in {self.source_dir}")
        return path


# --------------------------------------------------------------------------------------------------------------
# locate / fetch / build


def pinned_root() -> Path:
    return cache_dir() / f"llama.cpp-{COMMIT}"


def locate(*, build: bool = True, tools: Sequence[str] | None = None, progress: bool = True,
           patched: bool = False) -> LlamaCpp:
    """Return the llama.cpp to use: LLAMA_CPP_DIR if set, else the pinned build (built now if `build`).

    patched: the pinned llama.cpp with eora-gguf's fused-LoRA patch (`build_patched`); LLAMA_CPP_DIR does not
    apply to it.
    """
    if patched:
        return locate_patched(build=build, tools=PATCHED_TOOLS if tools is None else tools, progress=progress)
    tools = TOOLS if tools is None else tools
    user = os.environ.get("LLAMA_CPP_DIR")
    if user:
        return _from_user_dir(Path(user).expanduser(), tools)
    root = pinned_root()
    found = _finished_build(root, tools)
    if found:
        return found
    if not build:
        raise EoraError(f"the pinned llama.cpp is not built yet: run `eora-gguf setup-llama-cpp` (builds into {root})")
    with locked(f"llama.cpp-{COMMIT}"):
        return _finished_build(root, tools) or build_pinned(tools=tools, progress=progress)


def _from_user_dir(path: Path, tools: Sequence[str]) -> LlamaCpp:
    if not path.is_dir():
        raise EoraError(f"LLAMA_CPP_DIR={path} is not a directory: point it at a llama.cpp checkout or its bin/ folder")
    candidates = [path / "build" / "bin", path / "bin", path]
    bin_dir = next((c for c in candidates if (c / "llama-quantize").is_file()), None)
    if bin_dir is None:
        raise EoraError(f"no llama-quantize under LLAMA_CPP_DIR={path} (looked in "
                        f"{', '.join(str(c) for c in candidates)}): build llama.cpp there or unset LLAMA_CPP_DIR")
    missing = [t for t in tools if not (bin_dir / t).is_file()]
    if missing:
        log.warning("LLAMA_CPP_DIR=%s lacks %s; commands that need them will fail", path, ", ".join(missing))
    # The converter comes from the user's tree when it has one, else from the pinned source.
    source = path if (path / "convert_hf_to_gguf.py").is_file() else fetch_source()
    return LlamaCpp(bin_dir=bin_dir, source_dir=source, origin="LLAMA_CPP_DIR")


def _finished_build(root: Path, tools: Sequence[str], origin: str = "pinned") -> LlamaCpp | None:
    stamp = root / "build" / "eora-gguf-build.json"
    if not stamp.is_file():
        return None
    info = json.loads(stamp.read_text())
    bin_dir = root / "build" / "bin"
    if info.get("commit") != COMMIT or any(not (bin_dir / t).is_file() for t in tools):
        return None
    if info.get("host_flags", []) != list(host_flags()):  # built for another machine's needs: rebuild
        return None
    return LlamaCpp(bin_dir=bin_dir, source_dir=root / "src", origin=origin)


def fetch_source() -> Path:
    """Unpack the pinned llama.cpp source from the llama-cpp-python sdist into the cache (once)."""
    src = pinned_root() / "src"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    with locked(f"llama.cpp-{COMMIT}-src"):
        if (src / "convert_hf_to_gguf.py").is_file():
            return src
        sdist = pip_download(SDIST_NAME, SDIST_VERSION, SDIST_FILE, SDIST_SHA256, source=True)
        src.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".src.", dir=src.parent))
        try:
            prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = []
                for m in tar.getmembers():
                    # the sdist's `.git` is a submodule pointer to a repository that is not there
                    if m.name.startswith(prefix) and len(m.name) > len(prefix) and m.name != prefix + ".git":
                        m.name = m.name[len(prefix):]
                        members.append(m)
                if not members:
                    raise EoraError(f"{sdist} holds no vendor/llama.cpp: delete it and run again")
                tar.extractall(tmp, members=members, filter="tar")
            if src.exists():
                shutil.rmtree(src)
            os.replace(tmp, src)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return src


def _check_toolchain() -> tuple[str, str | None]:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise EoraError("cmake not found: install it (`apt-get install cmake` or `pip install cmake`), "
                        "or set LLAMA_CPP_DIR to an existing llama.cpp build")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not c_compiler() or not cxx:
        raise EoraError("no C/C++ compiler found: install one (`apt-get install build-essential`), "
                        "or set LLAMA_CPP_DIR to an existing llama.cpp build")
    return cmake, shutil.which("ninja")


def build_pinned(*, tools: Sequence[str] = TOOLS, progress: bool = True, extra_flags: Sequence[str] = ()) -> LlamaCpp:
    """Configure and build the pinned llama.cpp's tools; the log goes to `<build>/eora-gguf-build.log`."""
    return _build_tree(pinned_root(), fetch_source(), tools=tools, progress=progress, extra_flags=extra_flags)


def _build_tree(root: Path, src: Path, *, tools: Sequence[str], progress: bool, extra_flags: Sequence[str] = (),
                origin: str = "pinned", stamp_extra: dict[str, str] | None = None, nice: bool = False) -> LlamaCpp:
    """Configure and build llama.cpp from `src` into `<root>/build`; a stamp file marks it finished."""
    cmake, ninja = _check_toolchain()
    build = root / "build"
    build.mkdir(parents=True, exist_ok=True)
    stamp = build / "eora-gguf-build.json"
    stamp.unlink(missing_ok=True)
    log_path = build / "eora-gguf-build.log"
    gen = ["-G", "Ninja"] if ninja and not (build / "Makefile").exists() else []
    jobs = str(os.cpu_count() or 2)
    configure = [cmake, "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS, *host_flags(), *extra_flags]
    compile_ = [cmake, "--build", str(build), "-j", jobs, "--target", *tools]
    if nice and shutil.which("nice"):  # long builds on a shared machine
        compile_ = ["nice", "-n", "10", *compile_]
    with open(log_path, "w", buffering=1) as logf:  # line-buffered: the log can be followed while it builds
        log.info("building llama.cpp %s into %s (log: %s)", COMMIT, build, log_path)
        _run_logged(configure, logf, "configure llama.cpp", log_path, progress=False)
        _run_logged(compile_, logf, "build llama.cpp", log_path, progress=progress)
    stamp.write_text(json.dumps({"commit": COMMIT, "tools": list(tools), "flags": list(CMAKE_FLAGS) + list(extra_flags),
                                 "host_flags": list(host_flags()),
                                 **(stamp_extra or {})}))
    found = _finished_build(root, tools, origin)
    if found is None:
        raise EoraError(f"llama.cpp built but tools are missing in {build / 'bin'}: see {log_path}")
    return found


# --------------------------------------------------------------------------------------------------------------
# the patched build: pinned llama.cpp + native/llama.cpp/eora.patch, linking libeora_native built from native/

PATCHED_TOOLS = ("llama-perplexity", "llama-completion", "llama-cli", "llama-server", "llama-bench")
_NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
PATCH_FILE = _NATIVE_DIR / "llama.cpp" / "eora.patch"


def _native_sources() -> list[Path]:
    if not PATCH_FILE.is_file() or not (_NATIVE_DIR / "CMakeLists.txt").is_file():
        raise EoraError(f"the patched llama.cpp needs eora-gguf's source tree ({PATCH_FILE} and {_NATIVE_DIR}/"
                        "CMakeLists.txt not found): install eora-gguf from a checkout (`pip install -e .`)")
    keep = {".c", ".h", ".cpp", ".cu", ".cuh", ".patch", ".txt", ".cmake", ".in"}  # not the docs
    return sorted(p for p in _NATIVE_DIR.rglob("*") if p.is_file() and p.suffix in keep)


def patch_hash() -> str:
    """Short hash of the patch and the native sources: names the patched build's cache folder."""
    h = hashlib.sha256()
    for p in _native_sources():
        h.update(str(p.relative_to(_NATIVE_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:10]


def patched_root() -> Path:
    return cache_dir() / f"llama.cpp-{COMMIT}-eora-{patch_hash()}"


def locate_patched(*, build: bool = True, tools: Sequence[str] = PATCHED_TOOLS, progress: bool = True) -> LlamaCpp:
    """The patched build for the current patch + native sources (built now if `build`).

    EORA_GGUF_PATCHED_DIR points at another patched build instead (a folder with build/bin or bin).
    """
    user = os.environ.get("EORA_GGUF_PATCHED_DIR")
    if user:
        path = Path(user).expanduser()
        bin_dir = next((c for c in (path / "build" / "bin", path / "bin", path) if (c / tools[0]).is_file()), None)
        if bin_dir is None:
            raise EoraError(f"EORA_GGUF_PATCHED_DIR={path} holds no {tools[0]} (looked in build/bin, bin and "
                            "the folder itself): point it at a patched llama.cpp build")
        return LlamaCpp(bin_dir=bin_dir, source_dir=path / "src" if (path / "src").is_dir() else fetch_source(),
                        origin="patched")
    root = patched_root()
    found = _finished_build(root, tools, "patched")
    if found:
        return found
    if not build:
        raise EoraError(f"the patched llama.cpp is not built yet: run `eora-gguf setup-llama-cpp --patched` "
                        f"(builds into {root})")
    with locked(root.name):
        return _finished_build(root, tools, "patched") or build_patched(tools=tools, progress=progress)


def build_patched(*, tools: Sequence[str] = PATCHED_TOOLS, progress: bool = True) -> LlamaCpp:
    """Copy the pinned source, apply native/llama.cpp/eora.patch, copy native/ beside it, build (niced).

    The stock build and its source are never modified. The folder name carries `patch_hash()`, so editing the
    patch or the kernels gives a new build; the log goes to `<root>/build/eora-gguf-build.log`.
    """
    root = patched_root()
    stock_src = fetch_source()
    src, native = root / "src", root / "eora-native"
    if not (src / ".eora-patched").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".src.", dir=root))
        try:
            shutil.copytree(stock_src, tmp / "src", symlinks=True)
            _apply_patch(PATCH_FILE, tmp / "src")
            (tmp / "src" / ".eora-patched").write_text(patch_hash() + "\n")
            shutil.rmtree(src, ignore_errors=True)
            os.replace(tmp / "src", src)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # a private copy of native/ so the build does not follow later edits of the checkout
    shutil.rmtree(native, ignore_errors=True)
    shutil.copytree(_NATIVE_DIR, native, ignore=shutil.ignore_patterns("llama.cpp", "__pycache__"))
    return _build_tree(root, src, tools=tools, progress=progress, origin="patched", nice=True,
                       extra_flags=[f"-DLLAMA_EORA_NATIVE_DIR={native}"], stamp_extra={"eora": patch_hash()})


def _apply_patch(patch: Path, tree: Path) -> None:
    """Apply a -p1 diff to `tree` (checked with a dry run first, so a failure leaves nothing half-applied)."""
    tool = shutil.which("patch")
    if tool:
        dry = [tool, "-p1", "--dry-run", "--batch", "--forward", "-d", str(tree), "-i", str(patch)]
        real = dry[:2] + dry[3:]
    elif shutil.which("git"):
        dry = ["git", "apply", "--check", "-p1", str(patch)]
        real = ["git", "apply", "-p1", str(patch)]
    else:
        raise EoraError("neither `patch` nor `git` found: install one (`apt-get install patch`) to build the "
                        "patched llama.cpp")
    for cmd in (dry, real):
        res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if res.returncode != 0:
            raise EoraError(f"{patch.name} does not apply to llama.cpp {COMMIT} in {tree}: "
                            f"{last_error_line(res.stdout + res.stderr)}")


_STEP = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")


def _run_logged(cmd: Sequence[str], logf, what: str, log_path: Path, *, progress: bool) -> None:
    """Run `cmd`, append its output to `logf`, and turn ninja's [n/N] or make's [p%] into a progress bar."""
    logf.write("$ " + " ".join(cmd) + "\n")
    logf.flush()
    bar = tqdm(total=100, desc=what, unit="%", disable=not progress or None, leave=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                m = _STEP.match(line)
                if m:
                    pct = 100 * int(m[1]) / int(m[2]) if m[1] else int(m[3])
                    bar.update(pct - bar.n)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            bar.close()
    if rc != 0:
        raise EoraError(f"{what} failed (exit {rc}): see the log {log_path}")


_CAUSES = (
    # llama.cpp's own causes, and the hints it gives with them
    re.compile(r"GGML_ASSERT|hint:|is disabled|not within the file bounds|incorrect shape|wrong base model|mismatch|"
               r"unknown (model )?architecture|invalid magic|unsupported|not supported|out of memory|"
               r"tensor '[^']*' has|expected .* got|corrupted|incomplete", re.IGNORECASE),
    # a Python exception line (convert_hf_to_gguf.py)
    re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S"),
    # "...: error: <cause>" / "failed to <x>: <cause>"
    re.compile(r"(error|failed to \w+( \w+)?|exception)\s*:\s*\S", re.IGNORECASE),
    re.compile(r"error|failed|invalid|unknown|cannot|not ", re.IGNORECASE),
)


def last_error_line(text: str) -> str:
    """The most specific error line a tool printed: its stated cause rather than the generic last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for rank, pattern in enumerate(_CAUSES):
        hits = [ln for ln in lines if pattern.search(ln)]
        if hits:
            line = hits[-1] if rank == 1 else hits[0]  # the last exception of a traceback; the first cause
            # a progress table without a newline can precede the message on its line: start at "<fn>: failed"
            start = re.search(r"[\w.]+: (failed|error)\b[^|]*$", line)
            return (line[start.start():] if start else line)[:400]
    return lines[-1][:400] if lines else "no output"
