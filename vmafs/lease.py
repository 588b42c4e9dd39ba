"""A read lease on a plain archive, so a mount's spliced reads need no size check.

A read answered as pieces of the archive file (:meth:`Archive.segments
<vmafs.archive.Archive.segments>`) is read by libfuse, which cannot tell a
file that shrank from a file that ended: it would reply short, and the
kernel serves a short read of a disk as zeros or EOF.  So ``segments``
compares each piece with the file's size, one ``lseek`` per read: about a
fiftieth of a 4 KiB read's whole round trip through the mount.

A read lease (``fcntl(F_SETLEASE, F_RDLCK)``) makes the kernel tell this
process (SIGIO) before any other process opens the file for writing or
truncates it, and that process waits until the lease is given up.  While
the lease is held the file's size cannot change, so the check is skipped;
on the signal the check comes back first, then the lease is given up.
The kernel refuses a lease on a file open for writing anywhere (an archive
still being written), on a block device, on most network and FUSE
filesystems, and on another user's file without CAP_LEASE: then every read
checks, as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from collections.abc import Callable

import trio

log = logging.getLogger("vmafs.mount")


def take_read_lease(fd: int) -> str | None:
    """Take a read lease on *fd*; None on success, else why the kernel refused."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return e.strerror or str(e)
    return None


def release_lease(fd: int) -> None:
    """Give up this process's lease on *fd* (none held is fine)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError as e:
        log.debug("releasing the lease on fd %d: %s", fd, e.strerror)


async def hold_archive_size(archive, hold: Callable[[int], None] | None = None) -> None:
    """Hold a read lease on the plain *archive* while this trio task runs.

    Meanwhile the archive skips its per-read size check: *hold* (default
    :meth:`archive.hold_size <vmafs.archive.Archive.hold_size>`) is called
    with the size once the lease is held and with 0 before it is released.  Returns at once if the
    archive is compressed or the kernel refuses the lease.  When another
    process wants to write or truncate the file, and when cancelled, the
    check is back on before the lease is released (so that process cannot
    change the file while a read still relies on its old size).  Must run
    in the main thread's trio loop (it receives SIGIO).
    """
    fd = archive.fd
    if fd is None:
        return
    hold = hold or archive.hold_size
    # The handler first: SIGIO's default action ends the process.
    with trio.open_signal_receiver(signal.SIGIO) as signals:
        why = take_read_lease(fd)
        if why is not None:
            log.debug("%s: no read lease (%s): spliced reads check the size", archive.path, why)
            return
        try:
            # Read after the lease is held: a truncation before it shows here.
            hold(os.lseek(fd, 0, os.SEEK_END))
            async for _ in signals:
                log.info(
                    "%s: another process opens it for writing or truncates it: "
                    "reads check its size again",
                    archive.path,
                )
                break
        finally:
            hold(0)
            release_lease(fd)
