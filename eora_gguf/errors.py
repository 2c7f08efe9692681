"""User-facing errors and crash-safe output files.

An EoraError carries one line that says what is wrong and what to do; the CLI prints it and exits 2.
Every file the package writes goes through `atomic_output` (or `staged_outputs` for several outputs that belong
together), so a failure never leaves a partial file and never half of a set.

Output paths are checked before any work (`check_output`):
- a symlink is followed deliberately: the file it points to is what gets replaced (the link stays a link), and
  every other check applies to that target;
- an output may not be one of the command's inputs, nor lie inside an input folder (a model folder);
- it may not be a directory (unless the output is a folder of ours), a device node, a FIFO or a socket: the
  temp-then-rename step would replace such a file by a regular one (as root, `-o /dev/null` would break the
  machine);
- its folder must take a new file: a sibling temporary is created and removed (`os.access` says yes to root even
  on read-only, immutable or /proc folders), and an existing immutable target is refused.
Temporaries are named `.<name>.<pid>.<random>.partial` beside the target; those of processes that no longer run
(a SIGKILL, a power cut) are removed the next time the same output is written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


class EoraError(Exception):
    """An error the user can act on; its message is one line."""


def _kind(mode: int) -> str | None:
    """A name for a file type we must never replace, or None for a regular file / folder."""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_output(path: PathLike, *, inputs: Iterable[PathLike | None] = (), what: str = "output",
                 folder: bool = False, folder_may_hold: Iterable[str] = (), need_bytes: int = 0) -> Path:
    """Refuse (EoraError) an output path that would destroy something or cannot be written; return the path
    to write (symlinks resolved).

    inputs: the command's input files and folders. folder: the output is a folder of ours; an existing one is
    replaced only when it holds nothing but `folder_may_hold` names (so a re-run replaces its own result but never
    a user's folder). need_bytes: the output's expected size; refused when its file system has less free space.
    """
    given = Path(path)
    if str(path) == "" or given.name in ("", ".", ".."):
        raise EoraError(f"{what} path {str(path)!r} names no file: give a file name")
    dest = given.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).resolve()
        same = dest == src
        if not same and dest.exists() and src.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(dest, src)  # hard links
        if same:
            raise EoraError(f"{what} {given} is also an input of this command ({inp}): writing it would destroy "
                            "the input, choose another path")
        if src.is_dir() and src in dest.parents:
            raise EoraError(f"{what} {given} lies inside the input folder {inp}: write it elsewhere")
        if folder and dest in src.parents:
            raise EoraError(f"{what} folder {given} holds the input {inp}: choose another folder")
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise EoraError(f"cannot write {given}: {given.parent} is not a directory") from None
    except OSError as exc:
        raise EoraError(f"cannot write {what} {given}: {_os_reason(exc)}") from None
    if st is not None:
        kind = _kind(st.st_mode)
        if kind:
            raise EoraError(f"cannot write {what} {given}: it is {kind}, not a regular file: give a file path")
        if stat.S_ISDIR(st.st_mode):
            if not folder:
                raise EoraError(f"cannot write {what} {given}: it is a directory: give a file path")
            foreign = sorted(p.name for p in dest.iterdir() if p.name not in set(folder_may_hold))
            if foreign:
                raise EoraError(f"{what} folder {given} exists and holds {foreign[0]!r}, which is not ours: "
                                "choose a new or empty folder")
        elif folder:
            raise EoraError(f"{what} {given} is a file, not a folder: give a folder path")
        else:
            _check_replaceable(dest, given, what)
    parent = dest.parent
    if not parent.exists():
        raise EoraError(f"{what} directory {given.parent} does not exist: create it or choose another path")
    if not parent.is_dir():
        raise EoraError(f"cannot write {given}: {given.parent} is not a directory")
    _probe(parent, given, what)
    _clean_stale(parent, dest.name)
    if need_bytes > 0:
        check_free_space(parent, need_bytes, f"{what} {given}")
    return dest


def check_free_space(folder: PathLike, need_bytes: int, what: str) -> None:
    """Refuse before the work an output that cannot fit on its file system (a full disk found at the end wastes
    the whole computation)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise EoraError(f"cannot write {what}: it needs about {need_bytes / 2**20:.1f} MiB and {folder} has "
                        f"{free / 2**20:.1f} MiB free: free space or choose another path")


def check_writable(path: PathLike) -> Path:
    """Refuse early (before long work) an output path that cannot be written; see `check_output`."""
    return check_output(path).parent


def _check_replaceable(dest: Path, given: Path, what: str) -> None:
    """An immutable or append-only file cannot be renamed over, even by root: find out before the work."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0))
    except PermissionError as exc:
        if exc.errno == errno.EPERM:
            raise EoraError(f"cannot replace {what} {given}: {_os_reason(exc)} (immutable or append-only file?): "
                            "choose another path") from None
        return  # EACCES: a read-only file in a writable folder is still replaced by the rename
    except OSError:
        return
    os.close(fd)


def _probe(parent: Path, given: Path, what: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{given.name}.probe.", dir=parent)
    except OSError as exc:
        raise EoraError(f"cannot write {what} {given}: {given.parent} does not take new files "
                        f"({_os_reason(exc)}): choose another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+(?:\.[^.]+)?\.partial$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporaries of `name` left by processes that no longer run."""
    with contextlib.suppress(OSError):
        for p in parent.iterdir():
            m = _PARTIAL.match(p.name)
            if m and m["name"] == name and not _alive(int(m["pid"])):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()


def _tmp_name(dest: Path, suffix: str) -> str:
    return f".{dest.name}.{os.getpid()}."


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _one_line_os_error(exc: OSError, dest: Path) -> EoraError:
    if exc.errno == errno.ENOSPC:
        return EoraError(f"cannot write {dest}: no space left on device: free space or choose another path")
    if exc.errno == errno.EDQUOT:
        return EoraError(f"cannot write {dest}: disk quota exceeded: free space or choose another path")
    if exc.errno == errno.EFBIG:
        return EoraError(f"cannot write {dest}: file too large for this file system or limit: choose another path")
    return EoraError(f"cannot write {dest}: {_os_reason(exc)}")


class Staging:
    """Temporaries for a set of outputs that are committed together (see `staged_outputs`)."""

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []
        self._dirs: list[tuple[Path, Path]] = []

    def file(self, path: PathLike, *, suffix: str = "", inputs: Iterable[PathLike | None] = ()) -> Path:
        """A temporary file beside `path` that becomes `path` on commit."""
        dest = check_output(path, inputs=inputs)
        fd, name = tempfile.mkstemp(prefix=_tmp_name(dest, suffix), suffix=suffix + ".partial", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        self._files.append((tmp, dest))
        return tmp

    def folder(self, path: PathLike, *, may_hold: Iterable[str], inputs: Iterable[PathLike | None] = ()) -> Path:
        """An empty temporary folder beside `path` that replaces `path` on commit (see check_output's folder)."""
        dest = check_output(path, inputs=inputs, folder=True, folder_may_hold=may_hold)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(dest, ""), suffix=".partial", dir=dest.parent))
        self._dirs.append((tmp, dest))
        return tmp

    def commit(self) -> None:
        for tmp, dest in self._files:
            if not tmp.exists() or tmp.stat().st_size == 0:
                raise EoraError(f"nothing was written for {dest}")
        umask = os.umask(0)
        os.umask(umask)
        for tmp, _ in self._files:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        for tmp, _ in self._dirs:
            os.chmod(tmp, 0o777 & ~umask)
        for tmp, dest in self._dirs:
            old = None
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=_tmp_name(dest, ""), suffix=".old.partial", dir=dest.parent))
                os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        for tmp, dest in self._files:
            os.replace(tmp, dest)

    def discard(self) -> None:
        for tmp, _ in self._files:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for tmp, _ in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_outputs() -> Iterator[Staging]:
    """Several outputs, all or nothing: each is written to a temporary; all are renamed into place only when the
    block succeeds, and every temporary is removed when it fails or is interrupted (Ctrl-C, SIGTERM).

    Paths are checked (`check_output`) when they are staged: stage every output before the long work.
    """
    staging = Staging()
    committing = False
    try:
        yield staging
        committing = True
        staging.commit()
    except OSError as exc:
        targets = staging._files + staging._dirs
        if targets and (committing or exc.errno in _WRITE_ERRNOS):
            raise _one_line_os_error(exc, targets[0][1]) from None
        raise
    finally:
        staging.discard()


@contextlib.contextmanager
def atomic_output(path: PathLike, *, suffix: str = "", inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary lives in the destination directory so the final rename is atomic on one file system.
    An OSError while writing (a full disk, a quota) becomes a one-line EoraError.
    """
    with staged_outputs() as staging:
        yield staging.file(path, suffix=suffix, inputs=inputs)


def write_json(path: PathLike, obj: object) -> None:
    """`obj` as indented JSON with a final newline at `path`, written atomically (see `atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
