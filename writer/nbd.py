"""A write-only NBD server (trio, Unix socket) that receives QEMU's backup writes.

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
  Block sizes: minimum 512 (1 if the export size is not a multiple of 512),
  preferred 65536, maximum ``max_block``.
- Replies are simple replies, sent as each request completes: requests on one
  connection run concurrently (up to ``max_in_flight``) and replies may come
  out of order, matched by the client's cookie (handle).

Commands, what they mean here and what an error does to the client:

``NBD_CMD_WRITE`` (flags: FUA accepted and ignored)
    Calls ``export.on_write(offset, data)``.  Success means the data is
    accepted into the packer's buffer (not on disk).  A range beyond the export
    end gets ``ENOSPC`` (payload read and discarded); a payload longer than
    ``max_block`` cannot be trusted and closes the connection.  An exception
    from the callback becomes an error reply: :class:`NbdCommandError` carries
    its errno, :class:`vmafs.errors.ConflictingClusterError` and other
    :class:`vmafs.errors.WriterError` become ``EIO`` (``ENOSPC`` if caused by a
    full disk), a bad alignment (``ValueError``) ``EINVAL``.  QEMU fails the
    backup job on an error reply - and, for a copy-before-write triggered by a
    guest write, that guest write - so callbacks must only fail for
    unrecoverable conditions.
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

Malformed or hostile input - a bad request magic, a WRITE longer than
``max_block``, an option longer than 64 KiB, a truncated request, unknown
client flags - closes *that* connection with a logged reason (logger
``writer.nbd``).  Nothing a client sends can raise out of :meth:`NbdServer.serve`
or reach the archive other than through a well-formed, in-range callback.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

__all__ = ["Export", "NbdCommandError", "NbdServer", "LatencyStats"]

log = logging.getLogger("writer.nbd")

DEFAULT_MAX_BLOCK = 4 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 16


class NbdCommandError(Exception):
    """Raise from an export callback to send a specific NBD error (an errno)."""

    def __init__(self, err: int = errno.EIO, message: str = "") -> None:
        self.errno = err
        super().__init__(message or errno.errorcode.get(err, str(err)))


@dataclass
class Export:
    """One named export: its size and the callbacks that receive its writes.

    ``on_write(offset, data)`` receives a ``bytes``/``memoryview`` payload
    already checked to lie inside ``[0, size)``; ``on_zero(offset, length)``
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


@dataclass(frozen=True)
class LatencyStats:
    """Reply latency (request fully received -> reply sent), in seconds."""

    count: int
    p50: float
    p99: float
    max: float


class NbdServer:
    """Serve ``exports`` on the Unix socket ``socket_path``.

    :param socket_path: created by :meth:`serve` (an existing socket file is
        replaced; any other existing file is an error) and removed when it returns.
    :param exports: export name -> :class:`Export`.  May be mutated before a
        client asks for a name (e.g. to add exports as drives are set up).
    :param max_block: largest WRITE payload accepted and the advertised maximum
        block size (a power of two, 64 KiB..32 MiB).
    :param max_in_flight: requests handled concurrently per connection; the
        server stops reading from a connection while that many are in flight.

    Attributes: ``connections`` (currently open), ``requests`` (total handled),
    ``errors`` (error replies sent), ``closed_reasons`` (list of str, the
    logged reasons of connections closed for bad input).
    """

    def __init__(
        self,
        socket_path: str,
        exports: Mapping[str, Export],
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        raise NotImplementedError

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve clients until cancelled.

        ``task_status.started()`` is called once the socket accepts
        connections, so ``await nursery.start(server.serve)`` returns when QEMU
        can connect.  Cancelling closes the listener and all connections
        (requests in flight are abandoned without replies).
        """
        raise NotImplementedError

    def latency(self) -> LatencyStats:
        """Reply latency of WRITE/WRITE_ZEROES requests since the start."""
        raise NotImplementedError
