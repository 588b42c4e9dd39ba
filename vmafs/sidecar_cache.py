"""The side-index cache directory: where it is, its size cap, listing and pruning.

Side indexes (:mod:`vmafs.sidecar`) go here by default, never beside the
archive unless asked (``vmafs index --beside``, ``-o index_beside``): a
backup directory belongs to vzdump, whose pruning knows nothing of extra
files.  The cache is ``$VMAFS_CACHE_DIR`` if set, else ``/var/cache/vmafs``
for root, else ``$XDG_CACHE_HOME/vmafs`` (``~/.cache/vmafs``).

Its size is capped (``$VMAFS_CACHE_MAX_MIB``, default :data:`DEFAULT_MAX_MIB`):
after each write the least recently used side indexes are removed until
the rest fits.  "Used" is the file's mtime, which :func:`touch` moves
forward whenever a side index is loaded (atime is unreliable under
relatime).  The side index just written is never removed, even if alone
it exceeds the cap (a cap too small for one archive would otherwise make
every mount scan again).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

SUFFIX = ".vmafs-index"
#: Default cap of the cache, MiB: room for the offset maps of ~8 TiB of disks.
DEFAULT_MAX_MIB = 1024
_FIXED = struct.Struct("<8sIQ")  # magic, version, JSON length (see vmafs.sidecar)
#: The JSON description of a side index is a few KiB; more is not one of ours.
_MAX_JSON = 1 << 20


def cache_dir() -> str:
    """The directory side indexes go to (and are looked up in) by default."""
    d = os.environ.get("VMAFS_CACHE_DIR")
    if d:
        return d
    if os.geteuid() == 0:
        return "/var/cache/vmafs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vmafs")


def max_bytes() -> int:
    """The cache's size cap in bytes (``$VMAFS_CACHE_MAX_MIB``)."""
    raw = os.environ.get("VMAFS_CACHE_MAX_MIB", "")
    mib = int(raw) if raw.isdigit() else DEFAULT_MAX_MIB
    return mib << 20


@dataclass(frozen=True)
class CacheEntry:
    """One side index in the cache directory."""

    path: str
    size: int
    last_used_ns: int
    #: The archive it was made for (None: made by an older vmafs, or unreadable).
    archive: str | None
    #: The archive's size and mtime (ns) when it was indexed, if recorded.
    archive_size: int | None
    archive_mtime_ns: int | None

    def stale(self) -> str | None:
        """Why this side index can never be used again, or None."""
        if self.archive is None:
            return None  # unknown archive: only the size cap removes it
        try:
            st = os.stat(self.archive)
        except FileNotFoundError:
            return "archive gone"
        except OSError:
            return None
        if self.archive_size is not None and st.st_size != self.archive_size:
            return "archive changed"
        if self.archive_mtime_ns is not None and st.st_mtime_ns != self.archive_mtime_ns:
            return "archive changed"
        return None


def entries(directory: str | None = None) -> list[CacheEntry]:
    """The side indexes in the cache, least recently used first."""
    directory = directory or cache_dir()
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        ident = _identity(path)
        out.append(
            CacheEntry(
                path=path,
                size=st.st_size,
                last_used_ns=st.st_mtime_ns,
                archive=ident.get("path") if isinstance(ident.get("path"), str) else None,
                archive_size=_int_or_none(ident.get("size")),
                archive_mtime_ns=_int_or_none(ident.get("mtime_ns")),
            )
        )
    out.sort(key=lambda e: (e.last_used_ns, e.path))
    return out


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) else None


def _identity(path: str) -> dict:
    """The ``identity`` record of the side index at *path* ({} if unreadable).

    Reads only the fixed header and the JSON description (bounded), not the
    arrays, and trusts nothing: this is for listing and pruning only.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        head = os.pread(fd, _FIXED.size, 0)
        if len(head) < _FIXED.size:
            return {}
        _magic, _version, jlen = _FIXED.unpack(head)
        if jlen > _MAX_JSON:
            return {}
        meta = json.loads(os.pread(fd, jlen, _FIXED.size))
        ident = meta.get("identity") if isinstance(meta, dict) else None
        return ident if isinstance(ident, dict) else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)


def touch(path: str) -> None:
    """Mark the side index at *path* as just used (for the LRU eviction)."""
    try:
        os.utime(path)
    except OSError:
        pass  # not ours to touch (root's cache read by a user): it only ages sooner


def evict(directory: str | None = None, *, cap: int | None = None, keep: str = "") -> list[str]:
    """Remove the least recently used side indexes until the cache fits *cap*.

    *keep* (the side index just written) is never removed.  Returns the
    removed paths.
    """
    cap = max_bytes() if cap is None else cap
    found = entries(directory)
    total = sum(e.size for e in found)
    removed = []
    for e in found:
        if total <= cap:
            break
        if e.path == keep:
            continue
        try:
            os.unlink(e.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot remove %s from the side-index cache: %s", e.path, err.strerror)
            continue
        total -= e.size
        removed.append(e.path)
        log.info("side-index cache over %d MiB: removed %s", cap >> 20, e.path)
    return removed


def prune(directory: str | None = None, *, cap: int | None = None) -> list[tuple[str, str]]:
    """Remove side indexes that can never be used again, then apply the cap.

    Returns [(path, why)] of what was removed.
    """
    removed = []
    for e in entries(directory):
        why = e.stale()
        if why is None:
            continue
        try:
            os.unlink(e.path)
        except FileNotFoundError:
            continue
        removed.append((e.path, why))
    removed += [(p, "least recently used, over the cap") for p in evict(directory, cap=cap)]
    return removed
