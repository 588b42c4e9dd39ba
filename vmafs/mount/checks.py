"""Checks made before the filesystem process detaches.

Everything here fails on the terminal of ``vmafs mount``, with one line,
before anything runs in the background.
"""

from __future__ import annotations

import os
import re

from ..errors import offering_read_anyway
from .errors import MountError


def mount_table() -> dict[str, str]:
    """{mount point: fstype} from /proc/self/mountinfo (stale FUSE mounts included)."""
    table = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            table[point] = fields[sep + 1]
    return table


def mountpoint_path(path: str) -> str:
    """*path* as the mount table shows it: absolute, symlinks resolved.

    The kernel mounts on the directory a symlink points to, and
    /proc/self/mountinfo lists that; comparing anything else would miss it.
    (Non-strict: a dead FUSE mount's ENOTCONN leaves the path as it is.)
    """
    return os.path.realpath(path)


def check_mountpoint(path: str, *, nonempty: bool = False) -> str:
    """Return *path* made absolute (symlinks resolved) after checking it can take a mount.

    A directory that holds files is refused unless *nonempty* (``-o
    nonempty``): the mount would hide them for as long as it lasts.
    """
    mp = mountpoint_path(path)
    if mp in mount_table() or os.path.ismount(mp):
        raise MountError(f"{mp}: already a mount point (busy); unmount it first")
    try:
        os.stat(mp)
    except OSError as e:
        raise MountError(f"{mp}: {e.strerror}") from None
    if not os.path.isdir(mp):
        raise MountError(f"{mp}: not a directory")
    if not nonempty:
        try:
            entries = len(os.listdir(mp))
        except OSError:
            entries = 0  # unreadable for us: fusermount3 decides whether we may mount there
        if entries:
            raise MountError(
                f"{mp}: not empty ({entries} entr{'y' if entries == 1 else 'ies'}), and the "
                "mount would hide what is there: use an empty directory, or -o nonempty "
                "to mount over it anyway"
            )
    # Whether this user may mount there (write access, sticky directories) is
    # fusermount3's decision; its message reaches the terminal before we detach.
    return mp


def check_logfile(path: str) -> str:
    """Return *path* made absolute after making sure the detached process can log there.

    Resolved here, in the caller's working directory (the filesystem process
    changes to /); created (with its directory) and opened for appending now,
    so a path that cannot work is reported on the terminal, not after detaching.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    except FileExistsError:  # makedirs: a component of the directory is a file
        raise MountError(f"logfile={path}: {os.path.dirname(path)}: not a directory") from None
    except OSError as e:
        raise MountError(f"logfile={path}: {e.strerror or e}") from None
    return path


def open_archive(path: str, allow_incomplete: bool, index_beside: bool = False):
    """Open *path*; an incomplete archive's error says how to mount it anyway.

    A side index made by this open goes beside the archive with *index_beside*.
    """
    from ..archive import Archive  # noqa: PLC0415 - keep `vmafs -h` light
    from ..common.progress import Progress, want_progress  # noqa: PLC0415

    # A compressed archive is decompressed once to index it: show how far
    # that got when stderr is a terminal (nothing otherwise).
    with (
        offering_read_anyway(None if allow_incomplete else "mount -o allow_incomplete"),
        Progress("indexing", enabled=want_progress(None)) as bar,
    ):
        return Archive.open(
            path, allow_incomplete=allow_incomplete, progress=bar, index_beside=index_beside
        )
