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
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np
import trio

from vmafs.errors import WriteRangeError, WriterError

__all__ = ["Export", "NbdCommandError", "NbdServer", "LatencyStats"]

log = logging.getLogger("writer.nbd")

DEFAULT_MAX_BLOCK = 4 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT = 16
#: options longer than this close the connection (names are <= 4096 bytes)
MAX_OPTION_LENGTH = 65536
#: options per connection before the client is considered hostile
MAX_OPTIONS = 1024
#: seconds a client may take for the whole handshake
HANDSHAKE_TIMEOUT = 30.0
PREFERRED_BLOCK = 65536
#: longest Unix socket path bind() takes on Linux (sun_path is 108 bytes with the NUL)
MAX_SOCKET_PATH = 107
#: reply latencies kept for :meth:`NbdServer.latency` (a ring: the most recent ones)
LATENCY_SAMPLES = 1 << 20

# --- protocol constants (names follow the NBD spec, doc/proto.md) ---------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
#: never advertise NBD_FLAG_SEND_FAST_ZERO: with it, `qemu-img convert -n`
#: first zeroes the whole target and then writes the data again, so every
#: data cluster would arrive twice with different contents.
TRANSMISSION_FLAGS = (
    NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN
)

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_INFO = 6
NBD_OPT_GO = 7

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_ERR_UNSUP = (1 << 31) | 1
NBD_REP_ERR_INVALID = (1 << 31) | 3
NBD_REP_ERR_UNKNOWN = (1 << 31) | 6

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_WRITE_ZEROES = 6

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
_ALLOWED_FLAGS = {
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLUSH: 0,
    NBD_CMD_DISC: 0,
}

_OPT_HEAD = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


class NbdCommandError(Exception):
    """Raise from an export callback to send a specific NBD error (an errno)."""

    def __init__(self, err: int = errno.EIO, message: str = "") -> None:
        self.errno = err
        super().__init__(message or errno.errorcode.get(err, str(err)))


class _Hangup(Exception):
    """Close this connection; the message is the logged reason."""


class _EOF(_Hangup):
    """The client closed its side; ``clean`` when that was between messages."""

    def __init__(self, clean: bool) -> None:
        self.clean = clean
        super().__init__("client closed the connection" if clean else "truncated message")


@dataclass
class Export:
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

    @property
    def min_block(self) -> int:
        return 512 if self.size % 512 == 0 else 1


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


class _Conn:
    """One client connection: handshake, then the transmission phase."""

    def __init__(self, server: NbdServer, sock: trio.socket.SocketType, cid: int) -> None:
        self.server = server
        self.sock = sock
        self.cid = cid
        self.send_lock = trio.Lock()
        self.export_name: str | None = None
        self.export: Export | None = None
        #: receive buffers for WRITE payloads, reused (no fresh pages per request)
        self._buffers: list[bytearray] = []

    def _take_buffer(self, n: int) -> bytearray:
        for i, buf in enumerate(self._buffers):
            if len(buf) >= n:
                return self._buffers.pop(i)
        return bytearray(max(n, PREFERRED_BLOCK))

    def _give_back(self, buf: bytearray, view: memoryview) -> None:
        try:
            view.release()
        except BufferError:  # a callback still holds an export of it: never reuse it
            return
        if len(self._buffers) <= self.server.max_in_flight:
            self._buffers.append(buf)

    # -- raw I/O --

    async def recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = await self.sock.recv_into(view[got:])
            if n == 0:
                raise _EOF(clean=got == 0)
            got += n

    async def recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        if n:
            await self.recv_into(memoryview(buf))
        return buf

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            view = memoryview(data)
            while view:
                n = await self.sock.send(view)
                view = view[n:]

    # -- handshake --

    async def opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        await self.send(_OPT_REPLY.pack(REPLY_MAGIC_OPT, opt, rtype, len(data)) + data)

    async def handshake(self) -> bool:
        """Negotiate; True when the transmission phase begins."""
        srv = self.server
        await self.send(
            struct.pack(">QQH", NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        )
        (cflags,) = struct.unpack(">I", await self.recv(4))
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise _Hangup(f"unknown client flags {cflags:#x}")
        if not cflags & NBD_FLAG_C_FIXED_NEWSTYLE:
            raise _Hangup("client does not speak fixed newstyle")
        no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = _OPT_HEAD.unpack(await self.recv(_OPT_HEAD.size))
            if magic != IHAVEOPT:
                raise _Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise _Hangup(f"option {opt} of {length} bytes is too long")
            data = bytes(await self.recv(length))
            if opt == NBD_OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                export = srv._lookup(name)
                if export is None:
                    raise _Hangup(f"NBD_OPT_EXPORT_NAME: unknown export {name!r}")
                reply = struct.pack(">QH", export.size, TRANSMISSION_FLAGS)
                await self.send(reply if no_zeroes else reply + bytes(124))
                self.export_name, self.export = name, export
                return True
            if opt == NBD_OPT_ABORT:
                try:
                    await self.opt_reply(opt, NBD_REP_ACK)
                except (trio.BrokenResourceError, OSError):
                    pass
                log.debug("conn %d: client aborted the handshake", self.cid)
                return False
            if opt == NBD_OPT_LIST:
                if length:
                    await self.opt_reply(opt, NBD_REP_ERR_INVALID, b"LIST takes no data")
                    continue
                for name in list(srv.exports):
                    raw = name.encode()
                    await self.opt_reply(opt, NBD_REP_SERVER, struct.pack(">I", len(raw)) + raw)
                await self.opt_reply(opt, NBD_REP_ACK)
                continue
            if opt in (NBD_OPT_INFO, NBD_OPT_GO):
                if await self.info_or_go(opt, data):
                    return True
                continue
            await self.opt_reply(opt, NBD_REP_ERR_UNSUP, b"not supported by this write-only server")
        raise _Hangup(f"more than {MAX_OPTIONS} options")

    async def info_or_go(self, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            await self.opt_reply(opt, NBD_REP_ERR_INVALID, b"short request")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            await self.opt_reply(opt, NBD_REP_ERR_INVALID, b"bad name length")
            return False
        raw_name = data[4 : 4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * nreq:
            await self.opt_reply(opt, NBD_REP_ERR_INVALID, b"bad info request count")
            return False
        requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            await self.opt_reply(opt, NBD_REP_ERR_INVALID, b"export name is not UTF-8")
            return False
        export = self.server._lookup(name)
        if export is None:
            await self.opt_reply(opt, NBD_REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return False
        await self.opt_reply(
            opt, NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, export.size, TRANSMISSION_FLAGS)
        )
        await self.opt_reply(
            opt,
            NBD_REP_INFO,
            struct.pack(
                ">HIII",
                NBD_INFO_BLOCK_SIZE,
                export.min_block,
                PREFERRED_BLOCK,
                self.server.max_block,
            ),
        )
        if NBD_INFO_NAME in requests:
            await self.opt_reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_NAME) + raw_name)
        if NBD_INFO_DESCRIPTION in requests and export.description:
            desc = export.description.encode()[:4096]
            await self.opt_reply(opt, NBD_REP_INFO, struct.pack(">H", NBD_INFO_DESCRIPTION) + desc)
        await self.opt_reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            self.export_name, self.export = name, export
            return True
        return False

    # -- transmission --

    async def transmission(self) -> None:
        """Read requests and run them concurrently until DISC, EOF or bad input.

        Requests already received when the client disconnects still run (their
        replies are lost); on bad input the requests in flight are cancelled.
        """
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self.read_requests(nursery)
            except _EOF as e:
                if not e.clean:
                    failure = e
                else:
                    log.debug("conn %d: closed by client without NBD_CMD_DISC", self.cid)
            except (_Hangup, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                failure = e
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def read_requests(self, nursery: trio.Nursery) -> None:
        srv = self.server
        limit = trio.Semaphore(srv.max_in_flight)
        head = bytearray(_REQUEST.size)
        while True:
            await limit.acquire()
            await self.recv_into(memoryview(head))
            magic, flags, cmd, cookie, offset, length = _REQUEST.unpack(head)
            if magic != REQUEST_MAGIC:
                raise _Hangup(f"bad request magic {magic:#x}")
            if cmd == NBD_CMD_DISC:
                log.debug("conn %d: NBD_CMD_DISC", self.cid)
                return  # the nursery waits for the requests in flight
            payload = buf = None
            if cmd == NBD_CMD_WRITE:
                if length > srv.max_block:
                    raise _Hangup(f"WRITE of {length} bytes exceeds max block {srv.max_block}")
                buf = self._take_buffer(length)
                payload = memoryview(buf)[:length]
                await self.recv_into(payload)
            received = time.perf_counter()
            nursery.start_soon(
                self.handle, limit, cmd, flags, cookie, offset, length, payload, buf, received
            )

    async def handle(
        self, limit, cmd, flags, cookie, offset, length, payload, buf, received
    ) -> None:
        try:
            err = await self.execute(cmd, flags, offset, length, payload)
            if err:
                self.server.errors += 1
            try:
                await self.send(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                log.debug("conn %d: reply lost: %s", self.cid, e)
                return
            if cmd in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES):
                self.server._record_latency(time.perf_counter() - received)
            self.server.requests += 1
        finally:
            if buf is not None:
                self._give_back(buf, payload)
            limit.release()

    async def execute(self, cmd, flags, offset, length, payload) -> int:
        """Run one command; return the NBD error (0 = success)."""
        export = self.export
        if cmd == NBD_CMD_READ:
            log.info("conn %d: refused READ (write-only export %r)", self.cid, self.export_name)
            return errno.EPERM
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            log.info("conn %d: refused unsupported command %d", self.cid, cmd)
            return errno.EINVAL
        if flags & ~allowed:
            log.info("conn %d: command %d with unsupported flags %#x", self.cid, cmd, flags)
            return errno.EINVAL
        try:
            if cmd == NBD_CMD_FLUSH:
                if export.on_flush is not None:
                    await export.on_flush()
                return 0
            if length == 0:
                return errno.EINVAL
            if offset + length > export.size:
                log.info(
                    "conn %d: %s [%d, %d) beyond the end of %r (%d bytes)",
                    self.cid,
                    "WRITE" if cmd == NBD_CMD_WRITE else "WRITE_ZEROES",
                    offset,
                    offset + length,
                    self.export_name,
                    export.size,
                )
                return errno.ENOSPC
            if cmd == NBD_CMD_WRITE:
                await export.on_write(offset, payload)
            else:
                await export.on_zero(offset, length)
            return 0
        except Exception as exc:  # every callback failure becomes an NBD error
            err = _errno_for(exc)
            if isinstance(exc, NbdCommandError | WriterError | ValueError):
                log.warning(
                    "conn %d: command %d at %d+%d failed: %s", self.cid, cmd, offset, length, exc
                )
            else:
                log.exception("conn %d: command %d at %d+%d failed", self.cid, cmd, offset, length)
            return err

    async def run(self) -> None:
        srv = self.server
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                started = await self.handshake()
            if started:
                log.debug("conn %d: serving export %r", self.cid, self.export_name)
                await self.transmission()
        except trio.TooSlowError:
            self._closed_for(f"handshake took more than {HANDSHAKE_TIMEOUT:g} s")
        except _EOF as e:
            if e.clean and self.export is None:
                log.debug("conn %d: closed during the handshake", self.cid)
            else:
                self._closed_for(str(e))
        except _Hangup as e:
            self._closed_for(str(e))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("conn %d: connection lost: %s", self.cid, e)
        except Exception:
            log.exception("conn %d: internal error; closing the connection", self.cid)
            srv.closed_reasons.append("internal error")
        finally:
            self.sock.close()

    def _closed_for(self, reason: str) -> None:
        log.warning("conn %d: closing connection: %s", self.cid, reason)
        self.server.closed_reasons.append(reason)


class NbdServer:
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
        socket_path: str,
        exports: Mapping[str, Export],
        *,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        socket_mode: int = 0o600,
    ) -> None:
        if max_block & (max_block - 1) or not 65536 <= max_block <= 32 * 1024 * 1024:
            raise ValueError("max_block must be a power of two in 64 KiB..32 MiB")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.socket_path = os.fspath(socket_path)
        self.exports = exports
        self.max_block = max_block
        self.max_in_flight = max_in_flight
        self.socket_mode = socket_mode
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self.closed_reasons: deque[str] = deque(maxlen=256)
        self._latencies = np.zeros(LATENCY_SAMPLES)
        self._latency_count = 0
        self._next_cid = 0

    def _lookup(self, name: str) -> Export | None:
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return self.exports.get(name)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve clients until cancelled.

        ``task_status.started()`` is called once the socket accepts
        connections, so ``await nursery.start(server.serve)`` returns when QEMU
        can connect.  Cancelling closes the listener and all connections
        (requests in flight are abandoned without replies).
        """
        path = self.socket_path
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        lsock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await lsock.bind(path)
            except OSError as e:
                # Python's "AF_UNIX path too long" names neither the path nor the limit
                size = len(os.fsencode(path))
                if size > MAX_SOCKET_PATH:
                    raise OSError(
                        errno.ENAMETOOLONG,
                        f"NBD socket path is {size} bytes, longer than the {MAX_SOCKET_PATH} "
                        "bytes a Unix socket path may have",
                        path,
                    ) from e
                raise
            os.chmod(path, self.socket_mode)  # before listen(): no one connects before this
            lsock.listen(64)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await lsock.accept()
                    self._next_cid += 1
                    nursery.start_soon(self._serve_conn, sock, self._next_cid)
        finally:
            lsock.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def _serve_conn(self, sock, cid: int) -> None:
        self.connections += 1
        log.debug("conn %d: accepted", cid)
        try:
            await _Conn(self, sock, cid).run()
        finally:
            self.connections -= 1

    def _record_latency(self, seconds: float) -> None:
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
