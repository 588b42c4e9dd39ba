"""``-o`` mount options: parsing them, and the options handed to libfuse."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import UsageError

#: Readahead of the mount's backing device, KiB.  The kernel's default for a
#: FUSE mount is 128 KiB, so buffered reads reach us as 128 KiB requests and a
#: Python server spends its time per request; at 1024 KiB, dd bs=1M ran 3-4x
#: faster, dd bs=4k 6x, random 4 KiB reads no slower (docs/benchmarks.md,
#: "Tuning"), while keeping the page cache and shared mmap that direct_io loses.
DEFAULT_READAHEAD_KB = 1024

#: Options mount(8) passes to a helper that mean nothing here (the mount is
#: always read-only, nosuid and nodev).  Also ignored: ``x-*`` and ``comment=*``.
GENERIC_OPTIONS = frozenset(
    "defaults auto noauto user users nouser owner group nofail _netdev ro rw "
    "suid nosuid dev nodev exec noexec atime noatime relatime norelatime strictatime "
    "nostrictatime lazytime nolazytime diratime nodiratime sync async dirsync "
    "loud silent iversion noiversion mand nomand".split()
)


#: The ``-o`` options that take no value (attributes of :class:`MountOptions`).
FLAG_OPTIONS = (
    "allow_other",
    "allow_incomplete",
    "direct_io",
    "threads",
    "nonempty",
    "debug",
    "index_beside",
)


@dataclass
class MountOptions:
    """What ``-o`` asked for.  See docs/mount.md for each option."""

    allow_other: bool = False
    allow_incomplete: bool = False
    uid: int | None = None
    gid: int | None = None
    fsname: str | None = None
    direct_io: bool = False
    threads: bool = False
    readahead: int = DEFAULT_READAHEAD_KB
    logfile: str | None = None
    nonempty: bool = False
    debug: bool = False
    index_beside: bool = False
    ignored: list[str] = field(default_factory=list)


def parse_options(values: Sequence[str], *, sloppy: bool = False) -> MountOptions:
    """Parse ``-o`` values (each comma-separated) into :class:`MountOptions`.

    Generic mount(8) options are ignored (recorded in ``ignored``); an
    unknown option is a :class:`UsageError` unless *sloppy* (mount -s).
    """
    opts = MountOptions()
    for value in values:
        for item in value.split(","):
            key, eq, arg = item.strip().partition("=")
            if not key:
                continue
            if key in FLAG_OPTIONS and not eq:
                setattr(opts, key, True)
            elif key in ("uid", "gid") and eq:
                setattr(opts, key, _id_value(key, arg))
            elif key == "readahead" and eq:
                if not arg.isdigit() or int(arg) > 65536:
                    raise UsageError(f"readahead={arg}: expected KiB from 0 to 65536")
                opts.readahead = int(arg)
            elif key in ("fsname", "logfile") and eq and arg:
                setattr(opts, key, arg)
            elif key in GENERIC_OPTIONS or key.startswith("x-") or key == "comment":
                opts.ignored.append(item)
            elif sloppy:
                opts.ignored.append(item)
            else:
                raise UsageError(f"unknown mount option {item!r}")
    return opts


def _id_value(key: str, arg: str) -> int:
    if arg.isdigit():
        return int(arg)
    try:
        return pwd.getpwnam(arg).pw_uid if key == "uid" else grp.getgrnam(arg).gr_gid
    except KeyError:
        what = "user" if key == "uid" else "group"
        raise UsageError(f"{key}={arg}: no such {what}") from None


def fuse_options(opts: MountOptions, archive_path: str) -> set[str]:
    """The options handed to libfuse (never ``max_read=``: it breaks pyfuse3's mount)."""
    out = {"ro", "nosuid", "nodev", "default_permissions", "subtype=vmafs"}
    out.add("fsname=" + _fsname(opts.fsname or os.path.abspath(archive_path)))
    if opts.debug:
        out.add("debug")  # libfuse prints every request to stderr
    if opts.allow_other:
        out.add("allow_other")  # default_permissions above makes the 0400 modes count
    return out


def _fsname(name: str) -> str:
    """*name* made safe for libfuse's option parser (ASCII only, commas escaped)."""
    name = "".join(c if " " < c < "\x7f" else "?" for c in name)
    return name.replace("\\", "\\\\").replace(",", "\\,") or "vmafs"
