"""``VOLUME:/path`` arguments and resolving guest paths inside the guest's own root.

A guest's symlinks are the guest's: ``/root/notes-link -> /home/alice/notes.txt``
means the guest's ``/home``, never the host's.  :func:`resolve` follows
symlinks the way the guest's kernel would with the filesystem as its root:
an absolute target restarts at the guest root, ``..`` stops at it, and a
loop ends after :data:`MAX_SYMLINKS` links (ELOOP).  Both engines resolve
through it, so neither ever looks outside the guest filesystem.
"""

from __future__ import annotations

import errno
import posixpath
from dataclasses import dataclass

from ..errors import GuestError
from .entry import Entry, GuestFS

#: Symlinks followed in one resolution before ELOOP (Linux's limit).
MAX_SYMLINKS = 40


@dataclass(frozen=True)
class GuestPath:
    """A parsed ``VOLUME:/path`` argument."""

    volume: str
    path: str

    def __str__(self) -> str:
        return f"{self.volume}:{self.path}"


def parse_guest_path(text: str) -> GuestPath:
    """``drive-scsi0/p1:/etc/fstab`` -> GuestPath; the path defaults to ``/``.

    The volume is everything before the first ``:`` (volume names hold
    none); the path must be absolute and is normalised (``//``, ``.``
    removed; ``..`` is kept for :func:`resolve`, which stops it at the root).
    """
    volume, colon, path = text.partition(":")
    if not colon or not volume:
        raise GuestError(
            f"{text!r}: expected VOLUME:/PATH, e.g. drive-scsi0/p1:/etc/fstab "
            "('vmafs volumes ARCHIVE' lists the volumes)"
        )
    path = path or "/"
    if not path.startswith("/"):
        raise GuestError(f"{text!r}: the path inside the volume must start with '/'")
    if "\0" in path:
        raise GuestError(f"{text!r}: the path holds a NUL byte")
    return GuestPath(volume, normalise(path))


def normalise(path: str) -> str:
    """*path* with empty and ``.`` components removed (``..`` kept), absolute."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def resolve(fs: GuestFS, path: str, *, follow_last: bool = True) -> Entry:
    """The entry *path* names in *fs*, symlinks followed inside the guest root.

    With ``follow_last=False`` a final symlink is returned itself (lstat),
    as ``ls -l`` and ``cp -a`` treat their arguments.  Raises GuestError
    (ENOENT, ENOTDIR, ELOOP) naming the path asked for.
    """
    todo = [p for p in path.split("/") if p not in ("", ".")]
    todo.reverse()  # a stack: the next component is todo[-1]
    current = "/"
    entry = fs.lstat("/")
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            current = posixpath.dirname(current)  # "/" stays "/": the root's parent is itself
            entry = fs.lstat(current)
            continue
        if entry.kind != "dir":
            raise GuestError(
                f"{fs.volume}:{path}: {current} is not a directory", errno_=errno.ENOTDIR
            )
        candidate = join(current, name)
        entry = fs.lstat(candidate)
        if entry.kind == "symlink" and (todo or follow_last):
            links += 1
            if links > MAX_SYMLINKS:
                raise GuestError(
                    f"{fs.volume}:{path}: too many levels of symbolic links", errno_=errno.ELOOP
                )
            target = entry.target or ""
            rest = [p for p in target.split("/") if p not in ("", ".")]
            todo.extend(reversed(rest))
            if target.startswith("/"):
                current = "/"
            entry = fs.lstat(current)
            continue
        current = candidate
    return entry
