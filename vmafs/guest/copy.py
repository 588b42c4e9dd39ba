"""``vmafs get``: copy a file or a tree out of a guest filesystem, never outside DEST.

Everything is created relative to an open directory descriptor with
O_NOFOLLOW/O_EXCL, one checked name at a time: a name is never a path, a
symlink in DEST (or one the copy itself just made) is never followed, and
what exists is not overwritten unless asked.  The guest's answers are not
trusted either (a hostile filesystem may have compromised the appliance):
names with ``/``, NUL, ``.`` or ``..`` are refused.

Kept: contents, permission bits, modification and access times, symlinks
(as symlinks, targets unchanged).  Not kept: owners (the files belong to
whoever runs vmafs), setuid/setgid bits (a restored copy must not become a
privileged program on the host), hard links (each name gets its own copy).
Devices, FIFOs and sockets are skipped with a note.
"""

from __future__ import annotations

import errno
import os
import stat as st
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import GuestError
from .entry import Entry, GuestFS

CHUNK = 1 << 20
#: Permission bits a copy keeps (no setuid/setgid).
KEEP_MODE = 0o1777
#: A copy smaller than this shows no progress bar even on a terminal.
PROGRESS_FROM = 32 << 20


def check_name(name: str, where: str) -> str:
    """*name* if it is one plain directory entry name, else GuestError."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise GuestError(f"{where}: refusing the entry name {name!r} (not a plain name)")
    return name


@dataclass
class CopyResult:
    """What a copy made, and what it skipped (one note per entry)."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


@dataclass
class _Node:
    entry: Entry
    children: list[_Node] | None = None  # directories only


def _walk(fs: GuestFS, entry: Entry) -> tuple[_Node, int]:
    """The tree under *entry* (directories listed) and the bytes of its files."""
    node = _Node(entry)
    total = entry.size if entry.kind == "file" else 0
    if entry.kind == "dir":
        node.children = []
        for child in fs.scandir(entry.path):
            check_name(child.name, f"{fs.volume}:{entry.path}")
            sub, size = _walk(fs, child)
            node.children.append(sub)
            total += size
    return node, total


def plan(dest: str, source: Entry) -> tuple[str, str | None]:
    """Where a copy of *source* goes: (parent directory, name), cp-style.

    DEST an existing directory: into it under the source's name, or, for the
    root of the volume, its contents straight into DEST (name None).
    Otherwise DEST is the new name, in its existing parent directory.
    """
    if os.path.isdir(dest):
        return dest, None if source.path == "/" else source.name
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise GuestError(f"{dest}: its directory {parent} does not exist")
    return parent, os.path.basename(os.path.abspath(dest))


def copy_tree(
    fs: GuestFS,
    source: Entry,
    dest: str,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CopyResult:
    """Copy *source* (lstat'ed, maybe a directory) of *fs* to *dest* (see :func:`plan`).

    *on_total(bytes)* is told the size of the whole copy once it is known,
    *progress(n)* each chunk written.  Raises GuestError for a conflict
    (before anything is written when it is at the top) or a bad name.
    """
    parent, name = plan(dest, source)
    tree, total = _walk(fs, source)
    if on_total is not None:
        on_total(total)
    copier = _Copier(fs, overwrite, progress or (lambda n: None))
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if name is None:  # the volume's root into DEST itself
            children = tree.children or []
            if not overwrite:
                for child in children:
                    copier.refuse_existing(dir_fd, child.entry.name, parent)
            for child in children:
                copier.copy(child, dir_fd, child.entry.name, parent)
        else:
            copier.copy(tree, dir_fd, name, parent)
    finally:
        os.close(dir_fd)
    return copier.result


class _Copier:
    def __init__(self, fs: GuestFS, overwrite: bool, progress: Callable[[int], None]) -> None:
        self.fs = fs
        self.overwrite = overwrite
        self.progress = progress
        self.result = CopyResult()

    def refuse_existing(self, dir_fd: int, name: str, where: str) -> None:
        try:
            os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        raise GuestError(
            f"{os.path.join(where, name)} exists; use --force to overwrite (or choose another DEST)"
        )

    def _clear(self, dir_fd: int, name: str, where: str, *, keep_dir: bool) -> bool:
        """Make room for *name*; True when an existing directory is kept (merged into)."""
        try:
            s = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
        if not self.overwrite:
            self.refuse_existing(dir_fd, name, where)
        if st.S_ISDIR(s.st_mode):
            if keep_dir:
                return True
            raise GuestError(f"{os.path.join(where, name)} is a directory: not replaced by a file")
        os.unlink(name, dir_fd=dir_fd)
        return False

    def copy(self, node: _Node, dir_fd: int, name: str, where: str) -> None:
        entry = node.entry
        path = os.path.join(where, name)
        if entry.kind == "file":
            self._clear(dir_fd, name, where, keep_dir=False)
            self._file(entry, dir_fd, name)
            self.result.files += 1
        elif entry.kind == "symlink":
            self._clear(dir_fd, name, where, keep_dir=False)
            os.symlink(entry.target or "", name, dir_fd=dir_fd)
            _set_times(entry, name, dir_fd)
            self.result.symlinks += 1
        elif entry.kind == "dir":
            if not self._clear(dir_fd, name, where, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                for child in node.children or []:
                    self.copy(child, fd, child.entry.name, path)
                os.fchmod(fd, entry.permissions & KEEP_MODE)
                os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            self.result.dirs += 1
        else:
            self.result.skipped.append(
                f"{self.fs.volume}:{entry.path}: skipped ({_special(entry.mode)})"
            )

    def _file(self, entry: Entry, dir_fd: int, name: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        done = False
        try:
            for chunk in self.fs.read(entry.path, CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self.result.bytes += len(chunk)
                self.progress(len(chunk))
            os.fchmod(fd, entry.permissions & KEEP_MODE)
            os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))
            done = True
        finally:
            os.close(fd)
            if not done:  # no half file under the real name
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except OSError:
                    pass


def _set_times(entry: Entry, name: str, dir_fd: int) -> None:
    try:
        os.utime(name, ns=(entry.atime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:  # a filesystem without symlink times: the link itself is what matters
        if e.errno not in (errno.EOPNOTSUPP, errno.EPERM):
            raise


def _special(mode: int) -> str:
    if st.S_ISCHR(mode) or st.S_ISBLK(mode):
        return "a device node"
    if st.S_ISFIFO(mode):
        return "a FIFO"
    if st.S_ISSOCK(mode):
        return "a socket"
    return f"file type {st.S_IFMT(mode):o}"
