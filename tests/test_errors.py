"""errors.py: output checks before work, all-or-nothing staged outputs, stale temporaries, one-line OS errors."""
from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from eora_gguf.errors import EoraError, atomic_output, check_output, staged_outputs


def test_refuses_an_output_that_is_an_input(tmp_path):
    src = tmp_path / "in.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(EoraError, match="also an input"):
        check_output(src, inputs=[src])
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    with pytest.raises(EoraError, match="also an input"):  # through a symlink
        check_output(link, inputs=[src])
    hard = tmp_path / "hard.gguf"
    os.link(src, hard)
    with pytest.raises(EoraError, match="also an input"):  # a hard link is the same file
        check_output(hard, inputs=[src])
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(EoraError, match="inside the input folder"):
        check_output(model / "stats.safetensors", inputs=[model])
    assert src.read_bytes() == b"GGUF"


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket", "dir"])
def test_refuses_special_files_and_directories(tmp_path, kind):
    path = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null node of our own
    elif kind == "socket":
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    else:
        path.mkdir()
    mode = os.lstat(path).st_mode
    with pytest.raises(EoraError, match="not a regular file|is a directory"):
        with atomic_output(path) as tmp:
            tmp.write_text("x")
    assert os.lstat(path).st_mode == mode  # still the special file it was
    assert list(tmp_path.iterdir()) == [path]


def test_refuses_a_folder_that_takes_no_files(tmp_path):
    with pytest.raises(EoraError, match="does not take new files"):
        check_output("/proc/eora-gguf-test.json")
    with pytest.raises(EoraError, match="does not exist"):
        check_output(tmp_path / "missing" / "x.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EoraError, match="is not a directory"):
        check_output(tmp_path / "file" / "x.json")


def test_refuses_an_immutable_target(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    if subprocess.run(["chattr", "+i", str(target)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        with pytest.raises(EoraError, match="immutable"):
            check_output(target)
    finally:
        subprocess.run(["chattr", "-i", str(target)], capture_output=True)
    assert target.read_text() == "old"


def test_symlink_output_replaces_its_target(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with atomic_output(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and target.read_text() == "new"


def test_staged_outputs_are_all_or_nothing(tmp_path):
    a, peft = tmp_path / "a.gguf", tmp_path / "peft"
    with pytest.raises(KeyboardInterrupt):
        with staged_outputs() as st:
            st.file(a).write_text("adapter")
            d = st.folder(peft, may_hold=("w.safetensors",))
            (d / "w.safetensors").write_text("weights")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with staged_outputs() as st:
        st.file(a).write_text("adapter")
        (st.folder(peft, may_hold=("w.safetensors",)) / "w.safetensors").write_text("weights")
    assert a.read_text() == "adapter" and (peft / "w.safetensors").read_text() == "weights"
    with staged_outputs() as st:  # a re-run replaces a folder of ours
        (st.folder(peft, may_hold=("w.safetensors",)) / "w.safetensors").write_text("v2")
    assert (peft / "w.safetensors").read_text() == "v2"
    (peft / "notes.txt").write_text("user's")
    with pytest.raises(EoraError, match="not ours"):
        with staged_outputs() as st:
            st.folder(peft, may_hold=("w.safetensors",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "peft"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.gguf.{dead.pid}.abcd1234.gguf.partial"
    stale.write_text("half")
    stale_dir = tmp_path / f".peft.{dead.pid}.abcd1234.partial"
    stale_dir.mkdir()
    alive = tmp_path / f".a.gguf.{os.getppid()}.efgh5678.gguf.partial"  # a running process: left alone
    alive.write_text("busy")
    with atomic_output(tmp_path / "a.gguf") as tmp:
        tmp.write_text("ok")
    check_output(tmp_path / "peft")
    assert not stale.exists() and not stale_dir.exists() and alive.exists()


def test_a_full_disk_is_one_line(tmp_path):
    with pytest.raises(EoraError, match="no space left on device"):
        with atomic_output(tmp_path / "a.bin") as tmp:
            tmp.write_text("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
