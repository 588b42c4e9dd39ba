"""Helpers for the mount tests (test_mount*.py): mount, find the daemon, clean up.

Every mount made through :func:`mounted` is unmounted and its filesystem
process waited for on the way out, whatever the test did.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import is_mounted, unmount, vmafs_cmd

GUARD = 120  # seconds: a command that takes longer is hung, not slow


def run_vmafs(*args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(vmafs_cmd(*args), capture_output=True, text=True, timeout=GUARD)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def mount_helper_cmd(*args) -> list[str]:
    """argv running ``mount.vmafs`` (the console script's function) from this checkout."""
    code = "import sys; from vmafs.mount import mount_helper_main; sys.exit(mount_helper_main())"
    return [sys.executable, "-c", code, *map(str, args)]


def holders(path: str | os.PathLike) -> set[int]:
    """PIDs of other processes holding *path* open (a filesystem process holds its archive)."""
    target = os.path.realpath(path)
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    pids.add(int(entry))
                    break
            except OSError:
                continue
    return pids


def wait_until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_holders(archive: str | os.PathLike) -> None:
    """Last resort in teardown: SIGKILL filesystem processes still holding *archive*."""
    for pid in holders(archive):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mounted(archive: str | os.PathLike, mnt: str | os.PathLike, *options: str) -> Iterator[Path]:
    """``vmafs mount ARCHIVE MNT [-o ...]`` (detached); always unmounted afterwards."""
    argv = ["mount", archive, mnt]
    if options:
        argv += ["-o", ",".join(options)]
    try:
        proc = run_vmafs(*argv)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        yield Path(mnt)
    finally:
        cleanup(archive, mnt)


def cleanup(archive: str | os.PathLike, mnt: str | os.PathLike) -> None:
    """Unmount *mnt* and make sure no filesystem process still holds *archive*."""
    unmount(mnt)  # fusermount3 -u; `vmafs umount` itself is tested in test_mount_lifecycle
    try:
        wait_until(lambda: not holders(archive), 20, "the filesystem process to exit")
    except AssertionError:
        kill_holders(archive)
        raise
    assert not is_mounted(mnt)


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


_MANY = r"""
import contextlib, io, json, sys
from vmafs.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out.append([rc, std.getvalue(), err.getvalue()])
print(json.dumps(out))
"""


def run_vmafs_many(argvs) -> list[subprocess.CompletedProcess]:
    """Run several ``vmafs`` command lines in ONE child process (start-up is ~1 s each).

    For commands that fail before anything detaches; returns one
    CompletedProcess-like result (returncode, stdout, stderr) per command line.
    """
    import json

    argvs = [[str(a) for a in argv] for argv in argvs]
    proc = subprocess.run(
        [sys.executable, "-c", _MANY, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    assert proc.returncode == 0, proc.stderr
    return [
        subprocess.CompletedProcess(argv, rc, out, err)
        for argv, (rc, out, err) in zip(
            argvs, json.loads(proc.stdout.splitlines()[-1]), strict=True
        )
    ]
