"""A write-only NBD server (trio, Unix socket) that receives QEMU's backup writes.

The data end only: the protocol (handshake, request parsing and validation,
replies, hostile input) is :mod:`vmafs.nbd`, shared with ``vmafs serve``.

One :class:`NbdServer` serves several named exports, one per disk, named after
the drive (``drive-scsi0``); QEMU's ``blockdev-backup`` target is an ``nbd``
blockdev pointing at ``nbd+unix:///<name>?socket=<path>``.

Protocol subset (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):

- Handshake: fixed newstyle only (``NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES``
  offered; a client that does not set FIXED_NEWSTYLE is disconnected).
  Options: ``NBD_OPT_GO`` and ``NBD_OPT_INFO`` (reply ``NBD_INFO_EXPORT`` and
  ``NBD_INFO_BLOCK_SIZE``, plus ``NBD_INFO_NAME``/``DESCRIPTION`` if asked),
  ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_LIST``, ``NBD_OPT_ABORT``.  Every other
  option (STARTTLS, STRUCTURED_REPLY, META_CONTEXT, EXTENDED_HEADERS, ...) gets
  ``NBD_REP_ERR_UNSUP``; an unknown export name gets ``NBD_REP_ERR_UNKNOWN``
  (or a disconnect for EXPORT_NAME, which has no error reply).
- Transmission flags: ``HAS_FLAGS | SEND_FLUSH | SEND_WRITE_ZEROES | CAN_MULTI_CONN``.
  Never ``SEND_FAST_ZERO``: with it ``qemu-img convert -n`` pre-zeroes the whole
  target and then writes the data again, i.e. every data cluster twice with
  different contents.  Not ``READ_ONLY`` either: the export takes writes.
  Block sizes: minimum 512 (1 if the export size is not a multiple of 512),
  preferred 65536, maximum ``max_block``.  QEMU's backup job only sends whole
  64 KiB clusters (plus a disk's final partial one); ``qemu-img convert`` does
  too with ``-S 0`` (its default 4 KiB sparse detection splits clusters, which
  a packer export refuses with ``EINVAL``).
- Replies are simple replies, sent as each request completes: requests on one
  connection run concurrently (up to ``max_in_flight``) and replies may come
  out of order, matched by the client's cookie (handle).

Commands, what they mean here and what an error does to the client:

``NBD_CMD_WRITE`` (flags: FUA accepted and ignored; any other flag -> ``EINVAL``)
    Calls ``export.on_write(offset, data)`` (``data`` is a view of a reused
    receive buffer, valid during the call).  Success means the data is
    accepted into the packer's buffer (not on disk).  A range beyond the export
    end gets ``ENOSPC`` (payload read and discarded); length 0 gets ``EINVAL``;
    a payload longer than ``max_block`` cannot be trusted and closes the
    connection.  An exception from the callback becomes an error reply:
    :class:`NbdCommandError` carries its errno;
    :class:`vmafs.errors.WriteRangeError` (not whole clusters) and
    ``ValueError`` become ``EINVAL``; :class:`vmafs.errors.ConflictingClusterError`
    and other :class:`vmafs.errors.WriterError` become ``EIO``, or ``ENOSPC``
    when caused by a full disk; anything else ``EIO``, logged with its
    traceback.  QEMU fails the backup job on an error reply - and, for a
    copy-before-write triggered by a guest write, that guest write - so
    callbacks must only fail for unrecoverable conditions.
``NBD_CMD_WRITE_ZEROES`` (flags: NO_HOLE, FAST_ZERO, FUA accepted and ignored:
zeros are zeros, and they are always fast here)
    Calls ``export.on_zero(offset, length)``; errors as for WRITE.  ``length``
    may exceed ``max_block`` (no payload), up to the export end.
``NBD_CMD_FLUSH``
    Calls ``export.on_flush()`` (if set) after the writes that were *replied
    to* before it; the packer's flush waits until its finished extents reach
    the output.  It does not make the archive durable: only finishing does.
``NBD_CMD_DISC``
    Stops reading; in-flight requests complete and are replied to; then the
    connection closes.  No reply.
``NBD_CMD_READ``
    Refused with ``EPERM``: the export is write-only (QEMU's backup never
    reads its target; ``qemu-io -c read`` shows the error).
anything else (TRIM, CACHE, BLOCK_STATUS, RESIZE, unknown types)
    Refused with ``EINVAL``; the connection stays open.

Malformed or hostile input - a bad option or request magic, a WRITE longer
than ``max_block``, an option longer than 64 KiB, more than 1024 options, a
handshake slower than 30 s, a truncated request, unknown client flags, an
unknown name in EXPORT_NAME - closes *that* connection with a logged reason
(logger ``writer.nbd``, also kept in ``NbdServer.closed_reasons``); requests of
that connection still in flight are cancelled (a cancelled request stores
nothing or all of its clusters).  Nothing a client sends can raise out of
:meth:`NbdServer.serve` or reach the archive other than through a well-formed,
in-range callback.  The socket is created mode 0600 (``socket_mode``).

Reply latency (request fully received -> reply sent) of WRITE and
WRITE_ZEROES is recorded; :meth:`NbdServer.latency` gives p50/p99/max.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vmafs.errors import WriteRangeError, WriterError
from vmafs.nbd import server as _core
from vmafs.nbd.protocol import *  # noqa: F403 - the wire constants, for callers and tests
from vmafs.nbd.protocol import (
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from vmafs.nbd.server import (
    DEFAULT_MAX_BLOCK,
    DEFAULT_MAX_IN_FLIGHT,
    HANDSHAKE_TIMEOUT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_SOCKET_PATH,
    PREFERRED_BLOCK,
    NbdCommandError,
)

__all__ = [
    "Export",
    "NbdCommandError",
    "NbdServer",
    "LatencyStats",
    "DEFAULT_MAX_BLOCK",
    "DEFAULT_MAX_IN_FLIGHT",
    "HANDSHAKE_TIMEOUT",
    "MAX_OPTION_LENGTH",
    "MAX_OPTIONS",
    "MAX_SOCKET_PATH",
    "PREFERRED_BLOCK",
]

log = logging.getLogger("writer.nbd")

#: reply latencies kept for :meth:`NbdServer.latency` (a ring: the most recent ones)
LATENCY_SAMPLES = 1 << 20

#: never advertise NBD_FLAG_SEND_FAST_ZERO: with it, `qemu-img convert -n`
#: first zeroes the whole target and then writes the data again, so every
#: data cluster would arrive twice with different contents.
TRANSMISSION_FLAGS = (
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN
)


@dataclass
class Export(_core.Export):
    """One named export: its size and the callbacks that receive its writes.

    ``on_write(offset, data)`` receives a ``memoryview`` payload already
    checked to lie inside ``[0, size)``.  It is a view of a receive buffer
    the server reuses for a later request once the callback has returned (and
    releases then): copy what you keep.  ``on_zero(offset, length)``
    likewise; ``on_flush()`` is optional.  All are awaited in the server's trio
    task for that request; they may raise (see the module docs for how
    exceptions map to NBD errors).  ``description`` is returned for
    ``NBD_INFO_DESCRIPTION``.
    """

    size: int
    on_write: Callable[[int, bytes | memoryview], Awaitable[None]]
    on_zero: Callable[[int, int], Awaitable[None]]
    on_flush: Callable[[], Awaitable[None]] | None = None
    description: str = ""

    read_only = False
    can_flush = True
    can_zero = True
    #: the packer refuses what is not whole clusters itself, with its own message
    enforce_alignment = False

    def transmission_flags(self) -> int:
        return TRANSMISSION_FLAGS

    async def read(self, offset: int, length: int, *, file_ranges: bool = False):
        raise NbdCommandError(errno.EPERM, "write-only export (a backup target is never read)")

    async def write(self, offset: int, data: memoryview, flags: int) -> None:
        await self.on_write(offset, data)

    async def zero(self, offset: int, length: int, flags: int) -> None:
        await self.on_zero(offset, length)

    async def flush(self) -> None:
        if self.on_flush is not None:
            await self.on_flush()

    def error_for(self, exc: BaseException) -> tuple[int, bool]:
        return _errno_for(exc), isinstance(exc, NbdCommandError | WriterError | ValueError)


@dataclass(frozen=True)
class LatencyStats:
    """Reply latency (request fully received -> reply sent), in seconds."""

    count: int
    p50: float
    p99: float
    max: float


def _errno_for(exc: BaseException) -> int:
    """The NBD error for an exception raised by an export callback."""
    if isinstance(exc, NbdCommandError):
        return exc.errno
    if isinstance(exc, WriteRangeError | ValueError):
        return errno.EINVAL
    cause = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return errno.ENOSPC
        cause = cause.__cause__
    return errno.EIO


class NbdServer(_core.NbdServer):
    """Serve ``exports`` on the Unix socket ``socket_path``.

    :param socket_path: created by :meth:`serve` (an existing socket file is
        replaced; any other existing file is an error) and removed when it returns.
    :param exports: export name -> :class:`Export`.  May be mutated before a
        client asks for a name (e.g. to add exports as drives are set up).
        The empty name (NBD's default export) selects the only export when
        there is exactly one.
    :param max_block: largest WRITE payload accepted and the advertised maximum
        block size (a power of two, 64 KiB..32 MiB).
    :param max_in_flight: requests handled concurrently per connection; the
        server stops reading from a connection while that many are in flight.
    :param socket_mode: permissions of the socket file, set before it accepts
        connections.  Anyone who can connect can write into the archive, so the
        default 0600 admits only this user (and root); widen it, or use a group,
        when QEMU runs as another user.

    Attributes: ``connections`` (currently open), ``requests`` (total handled),
    ``errors`` (error replies sent), ``closed_reasons`` (the logged reasons of
    the last 256 connections closed for bad input, oldest first).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        exports: Mapping[str, Export],
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        socket_mode: int = 0o600,
    ) -> None:
        # No structured replies: nothing here is ever read.
        super().__init__(
            exports,
            unix=socket_path,
            structured=False,
            max_block=max_block,
            max_in_flight=max_in_flight,
            socket_mode=socket_mode,
            logger=log,
        )
        self._latencies = np.zeros(LATENCY_SAMPLES)
        self._latency_count = 0

    def request_done(self, cmd: int, seconds: float) -> None:
        super().request_done(cmd, seconds)
        if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES):
            self._latencies[self._latency_count % LATENCY_SAMPLES] = seconds
            self._latency_count += 1

    def latency(self) -> LatencyStats:
        """Reply latency of WRITE/WRITE_ZEROES requests (the last 2**20 of them).

        ``count`` is the number of requests measured since the start (or the
        last :meth:`reset_latency`); the percentiles cover the most recent
        ``LATENCY_SAMPLES`` of them.
        """
        n = min(self._latency_count, LATENCY_SAMPLES)
        if not n:
            return LatencyStats(0, 0.0, 0.0, 0.0)
        arr = self._latencies[:n]
        p50, p99 = np.percentile(arr, [50, 99])
        return LatencyStats(self._latency_count, float(p50), float(p99), float(arr.max()))

    def reset_latency(self) -> None:
        self._latency_count = 0
