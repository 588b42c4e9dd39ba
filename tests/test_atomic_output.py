"""vmafs.common.atomic.AtomicOutput: how vmafs writes whole files (archives, side indexes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _unavailable, loop_device

from vmafs.common.atomic import AtomicOutput

REPO = Path(__file__).resolve().parent.parent


def _hidden(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_target_appears_only_at_commit_with_the_mode_open_would_give(tmp_path):
    target = tmp_path / "out.bin"
    with _umask(0o002):  # a group-writable umask: 0644 would be wrong here
        out = AtomicOutput(target)
    (temp,) = _hidden(tmp_path)
    assert temp.startswith(".out.bin.") and out.temp_path == str(tmp_path / temp)
    assert out.write(b"hello ") == 6 and out.write(memoryview(b"world")) == 5
    assert not target.exists() and not out.committed
    out.commit()
    assert out.committed and target.read_bytes() == b"hello world" and out.size == 11
    assert _hidden(tmp_path) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o664
    assert target.stat().st_nlink == 1  # the temporary name is gone, not just hidden
    out.abort()  # a no-op after commit
    assert target.read_bytes() == b"hello world"


def test_mode_overrides_the_umask(tmp_path):
    with _umask(0o077):
        out = AtomicOutput(tmp_path / "side-index", mode=0o644)
    out.commit()
    assert stat.S_IMODE((tmp_path / "side-index").stat().st_mode) == 0o644


def test_abort_and_with_remove_the_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    with AtomicOutput(target) as out:
        out.write(b"x")
    assert _hidden(tmp_path) == [] and not target.exists()
    out.abort()  # idempotent
    with pytest.raises(RuntimeError), AtomicOutput(target) as out:
        raise RuntimeError
    assert os.listdir(tmp_path) == []


def test_an_existing_target_is_refused_up_front_and_at_commit(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError) as info:
        AtomicOutput(target)
    assert info.value.filename == str(target) and "refusing to overwrite" in str(info.value)
    assert _hidden(tmp_path) == []

    other = tmp_path / "raced.bin"
    out = AtomicOutput(other)
    out.write(b"mine")
    other.write_bytes(b"made meanwhile")
    with pytest.raises(FileExistsError) as info:
        out.commit()
    assert info.value.filename == str(other)  # the user's name, not the temporary file
    assert other.read_bytes() == b"made meanwhile" and not out.committed
    out.abort()
    assert _hidden(tmp_path) == []


def test_overwrite_replaces_the_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    out = AtomicOutput(target, overwrite=True)
    out.write(b"new")
    assert target.read_bytes() == b"old"
    out.commit()
    assert target.read_bytes() == b"new" and _hidden(tmp_path) == []


def test_unusable_targets_are_named_as_written(tmp_path):
    cases = [
        (tmp_path, IsADirectoryError, "is a directory"),
        (tmp_path / "nodir" / "f", FileNotFoundError, f"{tmp_path / 'nodir'} does not exist"),
    ]
    (tmp_path / "file").write_bytes(b"")
    cases.append((tmp_path / "file" / "f", FileNotFoundError, "is not a directory"))
    for target, error, text in cases:
        with pytest.raises(error) as info:
            AtomicOutput(target)
        assert info.value.filename == str(target) and text in str(info.value), info.value
    assert _hidden(tmp_path) == []


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    # A spy on the real fsync: which descriptors were synced, and was the
    # target's name already there when the directory was.
    target = tmp_path / "out.bin"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        return real_fsync(fd)

    out = AtomicOutput(target)
    out.write(b"data")
    monkeypatch.setattr(os, "fsync", spy)
    out.commit()
    assert synced == [(False, False), (True, True)]


def test_stdout_is_written_directly():
    code = (
        "from vmafs.common.atomic import AtomicOutput\n"
        "out = AtomicOutput('-'); out.write(b'streamed'); out.commit()\n"
        "assert out.committed and out.temp_path is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"streamed"


def test_stdout_refuses_a_terminal():
    code = (
        "import os, pty\n"
        "from vmafs.common.atomic import AtomicOutput\n"
        "parent, child = pty.openpty(); os.dup2(child, 1)\n"
        "try:\n"
        "    AtomicOutput('-')\n"
        "except OSError as e:\n"
        "    os.write(2, str(e).encode())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert b"refusing to write binary data to a terminal" in proc.stderr, proc.stderr


def test_a_file_system_without_hard_links_gets_a_checked_rename(
    tmp_path, require_loop, require_fuse
):
    """exFAT has no link(2) (EPERM): commit checks that the name is free, then renames."""
    for tool in ("mkfs.exfat", "mount.exfat-fuse"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not installed (Debian: exfatprogs, exfat-fuse)")
    image = tmp_path / "exfat.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with loop_device(image, read_only=False) as dev:
        subprocess.run(["mount.exfat-fuse", dev, str(mnt)], check=True, capture_output=True)
        try:
            (mnt / "probe").write_bytes(b"")
            with pytest.raises(PermissionError):  # the premise: no hard links here
                os.link(mnt / "probe", mnt / "probe2")
            os.unlink(mnt / "probe")
            out = AtomicOutput(mnt / "out.bin")
            out.write(b"on exfat")
            out.commit()
            assert (mnt / "out.bin").read_bytes() == b"on exfat" and _hidden(mnt) == []

            raced = AtomicOutput(mnt / "raced.bin")
            (mnt / "raced.bin").write_bytes(b"made meanwhile")
            with pytest.raises(FileExistsError):
                raced.commit()
            raced.abort()
            assert (mnt / "raced.bin").read_bytes() == b"made meanwhile" and _hidden(mnt) == []
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
