"""What an engine shows of a guest filesystem: :class:`Entry` and :class:`GuestFS`.

Both engines (the libguestfs appliance and the host kernel) answer the same
four questions about a path inside one mounted guest filesystem: lstat it,
list a directory with every entry's lstat, read a file's bytes, and that
is all.  ``ls``, ``cat``, ``get`` and the path resolver are written once
over this protocol (:mod:`vmafs.guest.paths`, :mod:`vmafs.guest.listing`,
:mod:`vmafs.guest.copy`).

Guest paths are absolute POSIX paths from the filesystem's root, as str
(names that are not UTF-8 arrive as surrogate escapes, like os.fsdecode).
"""

from __future__ import annotations

import stat as st
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

#: ``Entry.kind`` values.
KINDS = ("file", "dir", "symlink", "other")


@dataclass(frozen=True)
class Entry:
    """One name in a guest filesystem, as lstat sees it (symlinks not followed).

    ``mode`` is the full st_mode (type and permission bits); ``target`` is a
    symlink's target, None for everything else.
    """

    path: str
    kind: str
    mode: int
    size: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    target: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1] or "/"

    @property
    def permissions(self) -> int:
        return st.S_IMODE(self.mode)


def kind_of(mode: int) -> str:
    """The :data:`KINDS` value of an st_mode."""
    if st.S_ISREG(mode):
        return "file"
    if st.S_ISDIR(mode):
        return "dir"
    if st.S_ISLNK(mode):
        return "symlink"
    return "other"


class GuestFS(Protocol):
    """One guest filesystem, mounted read-only by an engine.

    Paths are absolute guest paths; none is followed through a symlink by
    these calls (resolving is :func:`vmafs.guest.paths.resolve`'s job, in
    the guest's own root).  Errors are :class:`vmafs.errors.GuestError`
    naming the volume and the path.
    """

    volume: str  # the vmafs volume name, for messages

    def lstat(self, path: str) -> Entry: ...

    def scandir(self, path: str) -> list[Entry]:
        """Every entry of directory *path* but ``.`` and ``..``, sorted by name."""
        ...

    def read(self, path: str, chunk_size: int) -> Iterator[bytes]:
        """The bytes of regular file *path*, in chunks of at most *chunk_size*."""
        ...
