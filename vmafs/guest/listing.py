"""``vmafs ls``: the entries under a guest path, as lines or JSON records.

Pure formatting over :class:`~vmafs.guest.entry.Entry`; the walking is
:func:`listing`.  Names are untrusted guest data: human output escapes
control characters (one entry, one line); JSON carries them exactly.
"""

from __future__ import annotations

import datetime as dt
import stat as st
from collections.abc import Iterator

from ..commands._common import printable
from .entry import Entry, GuestFS
from .paths import resolve


def listing(fs: GuestFS, path: str, *, recursive: bool = False) -> Iterator[Entry]:
    """What ``ls PATH`` shows: a directory's entries (all below, depth first, with
    *recursive*), or the entry itself when PATH is not a directory.

    A symlink argument that leads to a directory lists that directory, as ls does.
    """
    entry = resolve(fs, path, follow_last=False)
    if entry.kind == "symlink":
        target = resolve(fs, path)  # GuestError for a dangling link: ls says so too
        if target.kind == "dir":
            entry = target
    if entry.kind != "dir":
        yield entry
        return
    yield from _below(fs, entry.path, recursive)


def _below(fs: GuestFS, path: str, recursive: bool) -> Iterator[Entry]:
    for child in fs.scandir(path):
        yield child
        if recursive and child.kind == "dir":
            yield from _below(fs, child.path, recursive)


def _time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M")


def format_line(entry: Entry, *, long: bool, full_path: bool) -> str:
    """One line: the name (or path), with ``-l`` mode, links, owner, size, mtime (UTC)."""
    name = printable(entry.path if full_path else entry.name)
    if not long:
        return name
    line = (
        f"{st.filemode(entry.mode)} {entry.nlink:>3} {entry.uid:>5} {entry.gid:>5} "
        f"{entry.size:>12} {_time(entry.mtime_ns)} {name}"
    )
    if entry.target is not None:
        line += " -> " + printable(entry.target)
    return line


def record(entry: Entry, volume: str) -> dict:
    """The ``--json`` record of *entry*."""
    return {
        "volume": volume,
        "path": entry.path,
        "type": entry.kind,
        "mode": f"{entry.permissions:04o}",
        "size": entry.size,
        "uid": entry.uid,
        "gid": entry.gid,
        "nlink": entry.nlink,
        "mtime": entry.mtime_ns / 1e9,
        "target": entry.target,
    }
