"""The other readers of the same bytes that the data-path figures measure vmafs against.

Each is a context manager that mounts (fresh) and yields the path of the
disk to read, so a figure can treat them alike:

- :func:`page_cache`: the extracted raw disk itself (no FUSE: the reference
  no FUSE filesystem reaches);
- :func:`bindfs`: bindfs over the directory holding the extracted raw (a
  C libfuse filesystem, multithreaded: the ceiling of FUSE);
- :func:`minimal_pyfuse3`: :mod:`bench.minimalfs` over that raw (pyfuse3 and
  trio with one ``os.pread`` per read: the floor of any pyfuse3 filesystem);
- :func:`vmafs`: ``vmafs mount`` of the archive.

Every FUSE mount gets the readahead ``vmafs mount`` sets for itself (1024
KiB on its bdi), so the request sizes match.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from .ctx import DISK, mounted_disk
from .util import need, run, set_read_ahead, umount, vmafs_mount

#: read_ahead_kb of every baseline FUSE mount: vmafs mount's own default
READ_AHEAD_KB = 1024

#: a reader: mountpoint -> context manager yielding the disk's path
Reader = Callable[[str], AbstractContextManager[str]]


@contextlib.contextmanager
def page_cache(raw: str, mnt: str) -> Iterator[str]:
    yield raw


@contextlib.contextmanager
def bindfs(raw: str, mnt: str) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    run([need("bindfs"), "-r", "-o", "fsname=bench-bindfs", os.path.dirname(raw), mnt])
    try:
        set_read_ahead(mnt, READ_AHEAD_KB)
        yield os.path.join(mnt, os.path.basename(raw))
    finally:
        umount(mnt)


@contextlib.contextmanager
def minimal_pyfuse3(raw: str, mnt: str) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.minimalfs", raw, mnt],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(
                f"minimal pyfuse3 mount failed: {proc.stderr.read().decode()[-300:]}"
            )
        path = os.path.join(mnt, os.path.basename(raw))
        os.stat(path)  # answers once its loop runs
        set_read_ahead(mnt, READ_AHEAD_KB)
        yield path
    finally:
        umount(mnt)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vmafs(archive: str, options: tuple[str, ...] = ()) -> Reader:
    @contextlib.contextmanager
    def reader(mnt: str) -> Iterator[str]:
        with vmafs_mount(archive, mnt, options):
            yield mounted_disk(mnt)

    return reader


def readers(archive: str, raw: str) -> dict[str, Reader]:
    """The readers of one disk: *archive* through vmafs, its extracted *raw* otherwise."""
    if os.path.basename(raw) != DISK:
        raise ValueError(f"{raw}: the extracted disk should be named {DISK}")
    return {
        "page cache": lambda mnt: page_cache(raw, mnt),
        "bindfs": lambda mnt: bindfs(raw, mnt),
        "minimal pyfuse3": lambda mnt: minimal_pyfuse3(raw, mnt),
        "vmafs": vmafs(archive),
        "vmafs -o direct_io": vmafs(archive, ("direct_io",)),
    }
