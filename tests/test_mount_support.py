"""Helpers for the mount tests (test_mount*.py): mount, find the daemon, clean up.

Every mount made through :func:`mounted` is unmounted and its filesystem
process waited for on the way out, whatever the test did.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
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


def leases_on(path: str | os.PathLike) -> list[str]:
    """The /proc/locks lines of leases on *path*'s inode."""
    st = os.stat(path)
    inode = f":{st.st_ino} "
    with open("/proc/locks") as f:
        return [line for line in f if "LEASE" in line and inode in line]


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


def check_reads(disk: str | os.PathLike, content: bytes, seed: int) -> None:
    """Read *disk* whole, then at 300 random offsets in sizes from 1 byte to
    1 MiB (some past the end): every read must equal *content*."""
    with open(disk, "rb") as f:
        assert f.read() == content  # readahead-sized (or 1 MiB direct) requests
    fd = os.open(disk, os.O_RDONLY)
    try:
        rng = random.Random(seed)
        for _ in range(300):
            off = rng.randrange(0, len(content) + 100)
            n = rng.choice([1, 511, 4096, 65536 + 7, 3 * 65536, 1 << 20])
            assert os.pread(fd, n, off) == content[off : off + n], (off, n)
    finally:
        os.close(fd)


def start_fs(script: str, *args) -> subprocess.Popen:
    """Run the Python *script* (a filesystem served in the foreground, which
    prints ``ready`` once mounted) with *args*; returns once it is ready."""
    argv = [sys.executable, "-c", script, *map(str, args)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(f"filesystem did not come up: {line} {proc.stderr.read()}")
    return proc


def stop_fs(proc: subprocess.Popen, mnt: str | os.PathLike) -> str:
    """Unmount the filesystem of :func:`start_fs`; the last line it printed
    (it must exit 0, without a traceback)."""
    unmount(mnt)
    try:
        out, err = proc.communicate(timeout=GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    return out.strip().splitlines()[-1]
