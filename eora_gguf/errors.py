"""User-facing errors and crash-safe output files.

An EoraError carries one line that says what is wrong and what to do; the CLI prints it and exits 2.
Every file the package writes goes through `atomic_output`, so a failure never leaves a partial file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class EoraError(Exception):
    """An error the user can act on; its message is one line."""


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Refuse early (before long work) an output path whose directory is missing or not writable."""
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise EoraError(f"cannot write {dest}: {parent} is not a directory")
    if not parent.is_dir():
        raise EoraError(f"output directory {parent} does not exist: create it or choose another -o path")
    if not os.access(parent, os.W_OK) or dest.is_dir():
        raise EoraError(f"cannot write {dest}: choose another -o path")
    return parent


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary lives in the destination directory so the final rename is atomic on one file system.
    """
    dest = Path(path)
    parent = check_writable(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".partial", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise EoraError(f"nothing was written for {dest}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

