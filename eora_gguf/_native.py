"""cffi (ABI mode) binding to the eora_native C library.

The declarations come from the one public header, native/include/eora_native.h (installed beside the
library as eora_gguf/eora_native.h): the text between its cffi markers, with preprocessor lines and the
EORA_API macro removed. Nothing is loaded at import time; the first native call loads the library and,
if that fails, raises NativeUnavailable naming every path tried and how to rebuild.

Search order: $EORA_GGUF_LIB, the installed package directory, then build/ folders of a source checkout.
The header is the one source of truth for the ABI: its constants (EORA_ABI_VERSION, the eora_status codes, the
flags, the eora_type numbers) are read through `lib` (`const`), never copied here, and a library whose
eora_abi_version() differs from the header's EORA_ABI_VERSION is refused.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import EoraError

log = logging.getLogger(__name__)

_LIB_NAMES = {"linux": "libeora_native.so", "darwin": "libeora_native.dylib", "win32": "eora_native.dll"}
LIB_NAME = _LIB_NAMES.get(sys.platform, "libeora_native.so")
HEADER_NAME = "eora_native.h"
_CHECKOUT = Path(__file__).resolve().parent.parent


class NativeError(EoraError):
    """A call into eora_native failed; the message is the library's own one-line explanation."""


class NativeUnavailable(NativeError):
    """The library could not be found or loaded."""


class NativeArgumentError(NativeError, ValueError):
    """A NULL pointer, a bad flag or thread count."""


class NativeTypeError(NativeError, TypeError):
    """A tensor type the operation does not support."""


class NativeShapeError(NativeError, ValueError):
    """A size that does not fit: zero rows, a row not a multiple of the block, a rank too large."""


class NativeBufferError(NativeError, ValueError):
    """A buffer shorter than its shape needs."""


class NativeMemoryError(NativeError, MemoryError):
    """Scratch allocation failed."""


class NativeInternalError(NativeError, RuntimeError):
    """A thread failed to start, or a bug in the library."""


class NativeCudaError(NativeError, RuntimeError):
    """CUDA not built into the library, no usable device, or a CUDA runtime error."""


# eora_status member (by name: the numbers come from the header) -> exception
STATUS_ERRORS: dict[str, type[NativeError]] = {
    "EORA_ERR_ARGUMENT": NativeArgumentError, "EORA_ERR_TYPE": NativeTypeError, "EORA_ERR_SHAPE": NativeShapeError,
    "EORA_ERR_BUFFER": NativeBufferError, "EORA_ERR_MEMORY": NativeMemoryError,
    "EORA_ERR_INTERNAL": NativeInternalError, "EORA_ERR_CUDA": NativeCudaError,
}


def _package_dir_candidates() -> list[Path]:
    out = []
    try:
        root = resources.files("eora_gguf")
        out.append(Path(str(root.joinpath(LIB_NAME))))
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    here = Path(__file__).resolve().parent / LIB_NAME
    if here not in out:
        out.append(here)
    return out


def _checkout_candidates() -> list[Path]:
    build = _CHECKOUT / "build"
    if not build.is_dir():
        return []
    found = sorted(build.glob(f"*/native/{LIB_NAME}")) + sorted(build.glob(f"native/{LIB_NAME}"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def candidate_paths() -> list[Path]:
    """Every place the library is looked for, in order."""
    env = os.environ.get("EORA_GGUF_LIB")
    paths = [Path(env)] if env else []
    return paths + _package_dir_candidates() + _checkout_candidates()


def header_path(lib_path: Path | None = None) -> Path:
    """The header shipped beside the library, else the checkout's."""
    options = ([lib_path.parent / HEADER_NAME] if lib_path else []) + [
        Path(__file__).resolve().parent / HEADER_NAME, _CHECKOUT / "native" / "include" / HEADER_NAME]
    for p in options:
        if p.is_file():
            return p
    raise NativeUnavailable(f"{HEADER_NAME} not found (looked in {', '.join(map(str, options))}): "
                            "reinstall with `pip install -e .`")


def cdef_from_header(text: str) -> str:
    """The declarations between the cffi markers, without preprocessor lines or EORA_API."""
    m = re.search(r"/\* cffi-begin \*/(.*?)/\* cffi-end \*/", text, re.S)
    if not m:
        raise NativeUnavailable("eora_native.h has no cffi markers: the header and binding are out of sync")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\bEORA_API\b", "", "\n".join(lines))


class _Library:
    """Loads on first use; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Path] | None = None
        self._error: str | None = None

    def _load(self) -> tuple[Any, Any, Path]:
        import cffi

        tried = []
        for path in candidate_paths():
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            ffi = cffi.FFI()
            ffi.cdef(cdef_from_header(header_path(path).read_text()))
            try:
                lib = ffi.dlopen(str(path))
            except OSError as exc:
                tried.append(f"{path} ({exc})")
                continue
            version, want = lib.eora_abi_version(), lib.EORA_ABI_VERSION
            if version != want:
                tried.append(f"{path} (ABI version {version}, its header {header_path(path)} declares {want})")
                continue
            log.debug("loaded %s (cpu path %s)", path, ffi.string(lib.eora_cpu_path()).decode())
            return ffi, lib, path
        raise NativeUnavailable("eora_native library not usable; tried: " + "; ".join(tried or ["nothing"])
                                + ". Rebuild it with `pip install -e .` (or set EORA_GGUF_LIB to the .so)")

    def get(self) -> tuple[Any, Any, Path]:
        with self._lock:
            if self._loaded is None:
                if self._error is not None:
                    raise NativeUnavailable(self._error)
                try:
                    self._loaded = self._load()
                except NativeUnavailable as exc:
                    self._error = str(exc)
                    raise
            return self._loaded


_library = _Library()


def ffi_lib() -> tuple[Any, Any]:
    """(ffi, lib), loading the library on first call."""
    ffi, lib, _ = _library.get()
    return ffi, lib


def library_path() -> Path:
    return _library.get()[2]


def available() -> bool:
    """True if the library loads (and has the right ABI version)."""
    try:
        _library.get()
        return True
    except NativeUnavailable:
        return False


def const(name: str) -> int:
    """A constant of the header (EORA_ABI_VERSION, EORA_FLAG_*, EORA_ERR_*, EORA_TYPE_*, EORA_ORDER_*)."""
    _, lib = ffi_lib()
    return int(getattr(lib, name))


def status_names() -> dict[int, str]:
    """Every eora_status of the header: value -> name."""
    ffi, _ = ffi_lib()
    return dict(ffi.typeof("eora_status").elements)


def check(status: int, what: str = "") -> None:
    """Raise the typed exception for a non-zero status, with the library's message."""
    if status == 0:
        return
    ffi, lib = ffi_lib()
    msg = ffi.string(lib.eora_last_error()).decode(errors="replace") or f"status {status}"
    cls = STATUS_ERRORS.get(status_names().get(status, ""), NativeError)
    raise cls(f"{what}: {msg}" if what and not msg.startswith(what) else msg)


def matrix(ffi: Any, type_: int, data: Any, nbytes: int, rows: int, cols: int) -> Any:
    """An `eora_matrix *` descriptor (the caller keeps `data` alive for the call)."""
    return ffi.new("eora_matrix *", {"type": int(type_), "data": data, "bytes": nbytes, "rows": rows, "cols": cols})


def cpu_path() -> str:
    ffi, lib = ffi_lib()
    return ffi.string(lib.eora_cpu_path()).decode()


def cuda_available() -> bool:
    """True if the library loads, was built with CUDA, and a CUDA device is usable (never raises)."""
    if not available():
        return False
    _, lib = ffi_lib()
    return bool(lib.eora_cuda_available())


def cuda_describe() -> str:
    """One line: CUDA runtime, architectures built for, device (or why there is none)."""
    ffi, lib = ffi_lib()
    return ffi.string(lib.eora_cuda_describe()).decode(errors="replace")


def build_helper(target: str, build_dir: Path, *, llama_source: Path | None = None,
                 llama_lib: Path | None = None) -> Path:
    """Build one C/C++ helper of the source tree (a target of tools/CMakeLists.txt: decode_lab, eora_cuda_emu,
    ggml_lora_oracle, ggml_bench, vec_dot_stream, lora_speed) against this library; returns the built file.

    tools/ is configured on its own in `build_dir` (CMake rebuilds only what changed); the ggml-based helpers need
    a llama.cpp source tree and the folder of its shared libraries.
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise EoraError("cmake not found: install it (`pip install cmake` or your package manager) to build "
                        f"the {target} helper")
    src = _CHECKOUT / "tools"
    if not (src / "CMakeLists.txt").is_file():
        raise EoraError(f"{src}/CMakeLists.txt not found: the helpers build from a source checkout of eora-gguf")
    flags = [f"-DEORA_NATIVE_LIB={library_path()}", "-DCMAKE_BUILD_TYPE=Release"]
    if llama_source is not None and llama_lib is not None:
        flags += [f"-DEORA_LLAMA_CPP_SRC={llama_source}", f"-DEORA_LLAMA_CPP_LIB={llama_lib}"]
    for cmd in ([cmake, "-S", str(src), "-B", str(build_dir), *flags],
                [cmake, "--build", str(build_dir), "--target", target, "-j", "2"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-12:]
            raise EoraError(f"building the {target} helper failed ({' '.join(cmd[:3])}): " + " | ".join(tail))
    for name in (target, f"lib{target}.so", f"lib{target}.dylib"):
        if (build_dir / "bin" / name).is_file():
            return build_dir / "bin" / name
    raise EoraError(f"cmake built {target} but {build_dir}/bin holds no such file")
