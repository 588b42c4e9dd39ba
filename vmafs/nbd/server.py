"""A trio NBD server core: sockets, TLS, fixed-newstyle negotiation, requests, replies.

The data ends (:class:`Export` subclasses) say what an export can do; this
module does everything on the wire.  What a client sees:

Handshake (fixed newstyle only; a client that does not set FIXED_NEWSTYLE, or
sets unknown flags, is disconnected):

``NBD_OPT_EXPORT_NAME``
    Enter transmission on the named export; an unknown name closes the
    connection (the option has no error reply).
``NBD_OPT_LIST``
    One ``NBD_REP_SERVER`` per export (name and description), aliases not
    listed; data in the request is ``NBD_REP_ERR_INVALID``.
``NBD_OPT_INFO`` / ``NBD_OPT_GO``
    ``NBD_INFO_EXPORT`` (size, transmission flags), ``NBD_INFO_BLOCK_SIZE``
    always, ``NBD_INFO_NAME``/``DESCRIPTION`` when asked; unknown name
    ``NBD_REP_ERR_UNKNOWN``, malformed ``NBD_REP_ERR_INVALID``.
``NBD_OPT_STRUCTURED_REPLY``
    ``NBD_REP_ACK`` when the server has ``structured=True`` (else
    ``NBD_REP_ERR_UNSUP``); reads then answer with chunks and holes.
``NBD_OPT_LIST_META_CONTEXT`` / ``NBD_OPT_SET_META_CONTEXT``
    ``base:allocation`` for an export that has :meth:`Export.block_status`;
    needs structured replies first (``NBD_REP_ERR_INVALID``).  Other
    namespaces are answered with no context (the spec's "not found").
``NBD_OPT_STARTTLS``
    With TLS configured: ``NBD_REP_ACK``, then a TLS handshake; every option
    but STARTTLS and ABORT is refused with ``NBD_REP_ERR_TLS_REQD`` until
    then.  Without: ``NBD_REP_ERR_UNSUP``.
``NBD_OPT_ABORT``
    ``NBD_REP_ACK`` and close.
anything else
    ``NBD_REP_ERR_UNSUP``; the negotiation goes on.

Transmission: requests run concurrently (up to ``max_in_flight`` per
connection), replies are matched by cookie.  A request the export cannot
serve gets an error reply and the connection stays open: an unknown command
or flag, length 0, a range that is misaligned to the advertised minimum block
size, or beyond the end (``EINVAL``; writes ``ENOSPC``), a READ longer than the
maximum block size (``EINVAL``, ``EOVERFLOW`` with structured replies); a
write, trim or zeroing on a read-only export (``EPERM``); BLOCK_STATUS without
a negotiated context (``EINVAL``).  ``NBD_CMD_DISC`` stops reading, lets
requests in flight finish, and closes.

Hostile or malformed input - a bad magic, an option over 64 KiB, more than
1024 options, a handshake slower than ``handshake_timeout``, a WRITE payload
over the maximum block size, a truncated message, a failed TLS handshake -
closes *that* connection with a logged reason (also kept in
``NbdServer.closed_reasons``).  Nothing a client sends raises out of
:meth:`NbdServer.serve`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

import vmafs.nbd.protocol as p
from vmafs.nbd.buffers import BufferPool
from vmafs.nbd.filesend import (
    IOV_MAX,
    FileEnded,
    FileRange,
    Part,
    advance,
    cached,
    send_parts,
    send_step,
)

__all__ = [
    "Export",
    "FileRange",
    "NbdCommandError",
    "NbdServer",
    "ReadChunk",
    "WouldWait",
    "MAX_SOCKET_PATH",
]

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
#: receive buffer of the transmission phase (request headers, many per recv)
RECV_AHEAD = 65536
#: bytes of corked replies after which they are sent without waiting for the flush
CORK_LIMIT = 256 * 1024
#: seconds a worker thread sending file ranges waits for a full socket before
#: it hands the wait to the event loop (see vmafs.nbd.filesend)
SEND_PATIENCE = 0.05
#: requests a connection's reader handles before it lets other tasks run
READER_TURN = 16
#: the context id this server gives base:allocation
BASE_ALLOCATION_ID = 1
#: longest query list of a META_CONTEXT option
MAX_QUERIES = 128

#: flags each command accepts (anything else: EINVAL)
_ALLOWED_FLAGS = {
    p.NBD_CMD_READ: p.NBD_CMD_FLAG_DF,
    p.NBD_CMD_WRITE: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_CMD_FLAG_FUA | p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO,
    p.NBD_CMD_TRIM: p.NBD_CMD_FLAG_FUA,
    p.NBD_CMD_FLUSH: 0,
    p.NBD_CMD_CACHE: 0,
    p.NBD_CMD_BLOCK_STATUS: p.NBD_CMD_FLAG_REQ_ONE,
}
_WRITING = (p.NBD_CMD_WRITE, p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_TRIM)


class WouldWait(Exception):
    """Raise from :meth:`Export.read_inline` when the answer would wait (for
    storage): the server runs the request again, through :meth:`Export.read`
    in a task of its own, and the connection's reader goes on."""


class NbdCommandError(Exception):
    """Raise from an export method to send a specific NBD error (an errno)."""

    def __init__(self, err: int = errno.EIO, message: str = "") -> None:
        self.errno = err
        super().__init__(message or errno.errorcode.get(err, str(err)))


Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ReadChunk:
    """Part of a READ's answer: *data* at *offset*, or a hole of *length* when data is None.

    *data* is the bytes, or (when :meth:`Export.read` was allowed file ranges)
    a tuple of parts back to back: buffers and :class:`FileRange` pieces of an
    open file, which the server sends with sendfile, never copying them.
    The server may hold *data* back to send several replies at once: it must
    stay unchanged (and a file range's file open) until
    :meth:`Export.reply_sent` is called with it.
    """

    offset: int
    length: int
    data: Buffer | tuple[Buffer | FileRange, ...] | None = None

    def parts(self) -> tuple[Buffer | FileRange, ...]:
        """*data* as parts (a data chunk only)."""
        return self.data if isinstance(self.data, tuple) else (self.data,)


class Export:
    """One export, the data end: override what it can do.

    Everything the server calls is already validated: in range, aligned to
    :attr:`min_block`, non-empty, only advertised commands.  Methods may
    raise :class:`NbdCommandError` (that errno is sent) or anything else
    (:meth:`error_for` says which errno, and whether to log a traceback).
    """

    size: int
    description: str = ""
    #: refuse WRITE, WRITE_ZEROES and TRIM with EPERM (and say so in the flags)
    read_only = True
    can_flush = False
    can_zero = False
    can_cache = False
    can_multi_conn = True
    #: answers NBD_CMD_BLOCK_STATUS for base:allocation
    can_block_status = False
    #: refuse (EINVAL) requests not aligned to :attr:`min_block`, except a range
    #: that ends at the export's end; False leaves alignment to the data end
    enforce_alignment = True
    #: the worker threads that send the :class:`FileRange` parts of its replies
    #: (None: trio's default limiter)
    limiter: trio.CapacityLimiter | None = None

    @property
    def min_block(self) -> int:
        return 512 if self.size % 512 == 0 else 1

    def transmission_flags(self) -> int:
        flags = p.NBD_FLAG_HAS_FLAGS | p.NBD_FLAG_SEND_DF
        if self.read_only:
            flags |= p.NBD_FLAG_READ_ONLY
        if self.can_flush:
            flags |= p.NBD_FLAG_SEND_FLUSH
        if self.can_zero and not self.read_only:
            flags |= p.NBD_FLAG_SEND_WRITE_ZEROES
        if self.can_cache:
            flags |= p.NBD_FLAG_SEND_CACHE
        if self.can_multi_conn:
            flags |= p.NBD_FLAG_CAN_MULTI_CONN
        return flags

    async def read(
        self, offset: int, length: int, *, file_ranges: bool = False
    ) -> Sequence[ReadChunk]:
        """The bytes of [offset, offset+length) as chunks in order, covering it exactly.

        *file_ranges*: the connection can send :class:`FileRange` parts (a plain
        socket: no TLS), so data chunks may be made of them.
        """
        raise NbdCommandError(errno.EPERM, "this export cannot be read")

    def read_inline(self, offset: int, length: int) -> Sequence[ReadChunk]:
        """:meth:`read` at once, called by the connection's reader for a READ
        that :meth:`runs_inline` accepts; raise :class:`WouldWait` to have it
        go through :meth:`read` in a task instead."""
        raise WouldWait

    def reply_sent(self, chunks: Sequence[ReadChunk]) -> None:
        """The reply made of *chunks* (from :meth:`read`) is sent, or lost with
        its connection: the server holds none of their data any more, so its
        buffers may be reused (the default: nothing to do)."""

    async def block_status(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        """(length, NBD_STATE_* flags) extents from *offset*, at least one, within *length*."""
        raise NbdCommandError(errno.EINVAL, "no block status")

    async def write(self, offset: int, data: memoryview, flags: int) -> None:
        """Store *data* (a view of a reused buffer: valid during the call only)."""
        raise NbdCommandError(errno.EPERM, "read-only export")

    async def zero(self, offset: int, length: int, flags: int) -> None:
        raise NbdCommandError(errno.EPERM, "read-only export")

    async def flush(self) -> None:
        """Make replied writes durable (the default: nothing to do)."""

    async def cache(self, offset: int, length: int) -> None:
        """Prefetch [offset, offset+length) (the default: nothing to do)."""

    def runs_inline(self, cmd: int, length: int) -> bool:
        """True when the request is so cheap that the connection's reader runs it
        itself instead of starting a task (the next request waits for it); a
        READ then goes through :meth:`read_inline`."""
        return False

    def error_for(self, exc: BaseException) -> tuple[int, bool]:
        """(errno, expected) for an exception from a method; unexpected ones log a traceback."""
        if isinstance(exc, NbdCommandError):
            return exc.errno, True
        return errno.EIO, False


class _Hangup(Exception):
    """Close this connection; the message is the logged reason."""


class _EOF(_Hangup):
    """The client closed its side; ``clean`` when that was between messages."""

    def __init__(self, clean: bool) -> None:
        self.clean = clean
        super().__init__("client closed the connection" if clean else "truncated message")


_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Transport:
    """Exact-size receives and whole sends, over a trio socket or, after STARTTLS, TLS.

    Plain sockets are called directly and only wait (trio's ``wait_readable``
    / ``wait_writable``) when the kernel says so: a receive that finds bytes
    or a send the socket buffer takes costs no scheduler round.  Callers
    that must let other tasks run checkpoint themselves.

    A message may hold :class:`FileRange` parts (plain sockets only), sent
    with sendfile under the same lock, so messages still never interleave:
    by the event loop while the range is in the page cache, else the rest of
    the message from a worker thread (sendfile would wait for the disk; the
    event loop never does).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.raw: socket.socket = sock._sock  # trio keeps the stdlib socket here
        self.tls: trio.SSLStream | None = None
        #: bytes received beyond what was asked for (TLS records; buffered requests)
        self._pending = memoryview(b"")
        #: read ahead of small receives into this buffer (the transmission phase:
        #: request headers arrive back to back, one syscall fetches many of them)
        self._ahead: memoryview | None = None
        #: while True, :meth:`send` queues whole messages instead of sending them;
        #: :meth:`flush` sends the queue with one ``sendmsg``
        self.corked = False
        self._out: list[Part] = []
        self._out_bytes = 0
        self._out_files = False  # a FileRange among them
        #: what to call once the queued messages are sent
        self._after: list[tuple[Callable, object]] = []
        self.lock = trio.Lock()
        #: worker threads that send messages with file ranges (None: trio's default)
        self.limiter: trio.CapacityLimiter | None = None
        #: why nothing more may be sent (a message was cut short), else None
        self.broken: str | None = None

    @property
    def buffered(self) -> bool:
        return self._ahead is not None

    @buffered.setter
    def buffered(self, on: bool) -> None:
        self._ahead = memoryview(bytearray(RECV_AHEAD)) if on else None

    @property
    def pending(self) -> int:
        """Bytes received and not yet asked for (whole requests may be among them)."""
        return len(self._pending)

    async def _raw_recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self.raw.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)

    async def recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            if not self._pending:
                want = len(view) - got
                if self.tls is not None:
                    self._pending = memoryview(await self.tls.receive_some(1 << 20))
                elif self._ahead is not None and want < 4096:
                    self._pending = self._ahead[: await self._raw_recv_into(self._ahead)]
                else:
                    n = await self._raw_recv_into(view[got:])
                    if n == 0:
                        raise _EOF(clean=got == 0)
                    got += n
                    continue
                if not self._pending:
                    raise _EOF(clean=got == 0)
            n = min(len(self._pending), len(view) - got)
            view[got : got + n] = self._pending[:n]
            self._pending = self._pending[n:]
            got += n

    async def recv(self, n: int) -> bytearray:
        buf = bytearray(n)
        if n:
            await self.recv_into(memoryview(buf))
        return buf

    @property
    def file_ranges(self) -> bool:
        """Whether messages may hold :class:`FileRange` parts: not over TLS
        (the ssl module encrypts bytes it is given; a file range has to be
        read into memory for it anyway)."""
        return self.tls is None

    async def send(self, *parts: Buffer | FileRange) -> None:
        """Send *parts* back to back (one message); messages never interleave.

        Corked, the message is queued (its parts must stay unchanged until
        the next :meth:`flush`), and sent at once only past ``CORK_LIMIT``.
        Raises :class:`FileEnded` when a file range's file ended early: the
        message is cut short, so the connection is shut down.
        """
        if self.corked:
            self.queue(*parts)
            if self._out_bytes >= CORK_LIMIT:
                await self.flush()
            return
        files = any(type(x) is FileRange for x in parts)
        await self._send_parts([_part(x) for x in parts if len(x)], files)

    def queue(self, *parts: Buffer | FileRange) -> None:
        """Add a whole message to what :meth:`flush` sends (parts unchanged until then)."""
        for x in parts:
            if len(x):
                part = _part(x)
                self._out.append(part)
                self._out_bytes += len(part)
                self._out_files |= type(part) is FileRange

    @property
    def queued(self) -> int:
        """Bytes queued for :meth:`flush`."""
        return self._out_bytes

    async def flush(self) -> None:
        """Send what :meth:`send` queued while corked, then run what :meth:`after_sent` queued."""
        if self._out:
            views, self._out, self._out_bytes = self._out, [], 0
            files, self._out_files = self._out_files, False
            after, self._after = self._after, []
            await self._send_parts(views, files)
            for fn, arg in after:
                fn(arg)

    def after_sent(self, fn: Callable, arg: object) -> None:
        """``fn(arg)`` once the messages sent so far are on the wire: now,
        unless some are still queued (corked)."""
        if self._out:
            self._after.append((fn, arg))
        else:
            fn(arg)

    async def _send_parts(self, views: list[Part], files: bool) -> None:
        """Send *views* (*files*: some are file ranges) back to back."""
        try:
            self.lock.acquire_nowait()  # no scheduler round when nobody else sends
        except trio.WouldBlock:
            await self.lock.acquire()
        try:
            if self.broken is not None:
                raise trio.ClosedResourceError(self.broken)
            if files:
                await self._send_with_files(views)
                return
            if self.tls is not None:
                await self.tls.send_all(b"".join(views))
                return
            raw = self.raw
            while views:
                try:
                    # most replies fit the socket buffer: send without yielding
                    n = raw.sendmsg(views[:IOV_MAX])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
                    continue
                advance(views, n)
        finally:
            self.lock.release()

    async def _send_with_files(self, parts: list[Part]) -> None:
        """Send a message with file ranges (lock held): from the loop while the
        next range is in the page cache, else the rest from a worker thread."""
        if self.tls is not None:
            raise ValueError("file ranges cannot be sent over TLS")
        raw = self.raw
        fd = raw.fileno()
        # A thread is not abandoned when this task is cancelled: it returns
        # within SEND_PATIENCE (or when its sendfile is done), so the socket and
        # the files stay open while it runs; the loop then waits for a socket
        # that stays full, and stops there at once when cancelled.
        try:
            while parts:
                first = parts[0]
                if type(first) is FileRange and not cached(first):
                    # sendfile would wait for the disk: not in the event loop
                    await trio.to_thread.run_sync(
                        send_parts, fd, parts, SEND_PATIENCE, limiter=self.limiter
                    )
                    if parts:
                        await trio.lowlevel.wait_writable(raw)
                    continue
                try:
                    send_step(fd, parts)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)
        except FileEnded as e:
            # Part of the message is out and the rest cannot be: any later byte
            # would be read as the missing ones.  No more sends; the client sees EOF.
            self.broken = f"a reply was cut short: {e}"
            with contextlib.suppress(OSError):
                self.raw.shutdown(socket.SHUT_RDWR)
            raise

    async def start_tls(self, context: ssl.SSLContext) -> None:
        self.tls = trio.SSLStream(trio.SocketStream(self.sock), context, server_side=True)
        await self.tls.do_handshake()

    async def aclose(self) -> None:
        if self.tls is not None:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await self.tls.aclose()
                except _LOST + (trio.BusyResourceError,):
                    pass
        self.sock.close()


def _part(x: Buffer | FileRange) -> Part:
    return x if type(x) is FileRange else memoryview(x).cast("B")


class _Conn:
    """One client connection: handshake, then the transmission phase."""

    def __init__(self, server: NbdServer, sock: trio.socket.SocketType, cid: int) -> None:
        self.server = server
        self.log = server.log
        self.io = _Transport(sock)
        self.cid = cid
        self.export_name: str | None = None
        self.export: Export | None = None
        self.structured = False
        self.tls_done = server.tls is None
        #: (export name, contexts selected) from SET_META_CONTEXT
        self.meta: tuple[str, bool] | None = None
        self.block_status_ok = False
        #: receive buffers for WRITE payloads, reused (no fresh pages per request)
        self._buffers = BufferPool(server.max_in_flight + 1, min_size=PREFERRED_BLOCK)
        #: the transmission phase's requests, and why a request closed the connection
        self._requests: trio.CancelScope | None = None
        self._failure: _Hangup | None = None

    # -- handshake --

    async def opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        await self.io.send(p.OPT_REPLY.pack(p.REPLY_MAGIC_OPT, opt, rtype, len(data)), data)

    async def handshake(self) -> bool:
        """Negotiate; True when the transmission phase begins."""
        srv = self.server
        await self.io.send(
            struct.pack(
                ">QQH", p.NBDMAGIC, p.IHAVEOPT, p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
            )
        )
        (cflags,) = struct.unpack(">I", await self.io.recv(4))
        if cflags & ~(p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES):
            raise _Hangup(f"unknown client flags {cflags:#x}")
        if not cflags & p.NBD_FLAG_C_FIXED_NEWSTYLE:
            raise _Hangup("client does not speak fixed newstyle")
        no_zeroes = bool(cflags & p.NBD_FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = p.OPT_HEAD.unpack(await self.io.recv(p.OPT_HEAD.size))
            if magic != p.IHAVEOPT:
                raise _Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise _Hangup(f"option {opt} of {length} bytes is too long")
            data = bytes(await self.io.recv(length))
            if opt == p.NBD_OPT_ABORT:
                try:
                    await self.opt_reply(opt, p.NBD_REP_ACK)
                except _LOST:
                    pass
                self.log.debug("conn %d: client aborted the handshake", self.cid)
                return False
            if not self.tls_done and opt != p.NBD_OPT_STARTTLS:
                if opt == p.NBD_OPT_EXPORT_NAME:
                    raise _Hangup("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (TLS is required)")
                await self.opt_reply(opt, p.NBD_REP_ERR_TLS_REQD, b"TLS is required: STARTTLS")
                continue
            if opt == p.NBD_OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                export = srv.lookup(name)
                if export is None:
                    raise _Hangup(f"NBD_OPT_EXPORT_NAME: unknown export {name!r}")
                reply = struct.pack(">QH", export.size, export.transmission_flags())
                await self.io.send(reply if no_zeroes else reply + bytes(124))
                self._enter(name, export)
                return True
            if opt in (p.NBD_OPT_INFO, p.NBD_OPT_GO):
                if await self.info_or_go(opt, data):
                    return True
            elif opt == p.NBD_OPT_LIST:
                await self.list_exports(opt, data)
            elif opt == p.NBD_OPT_STARTTLS:
                await self.starttls(opt, data)
            elif opt == p.NBD_OPT_STRUCTURED_REPLY and srv.structured:
                if data:
                    await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, b"takes no data")
                else:
                    self.structured = True
                    await self.opt_reply(opt, p.NBD_REP_ACK)
            elif opt in (p.NBD_OPT_LIST_META_CONTEXT, p.NBD_OPT_SET_META_CONTEXT) and (
                srv.structured and srv.block_status
            ):
                await self.meta_context(opt, data)
            else:
                name = p.OPTION_NAMES.get(opt, str(opt))
                self.log.debug("conn %d: unsupported option %s", self.cid, name)
                await self.opt_reply(opt, p.NBD_REP_ERR_UNSUP, f"{name}: not supported".encode())
        raise _Hangup(f"more than {MAX_OPTIONS} options")

    def _enter(self, name: str, export: Export) -> None:
        self.export_name, self.export = name, export
        self.io.limiter = export.limiter
        # contexts set for another export (or none at all) do not carry over
        self.block_status_ok = (
            self.structured
            and export.can_block_status
            and self.meta is not None
            and self.meta[1]
            and self.server.lookup(self.meta[0]) is export
        )

    async def list_exports(self, opt: int, data: bytes) -> None:
        if data:
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, b"LIST takes no data")
            return
        for name, export in list(self.server.exports.items()):
            raw = name.encode()
            desc = export.description.encode()[:4096]
            await self.opt_reply(opt, p.NBD_REP_SERVER, struct.pack(">I", len(raw)) + raw + desc)
        await self.opt_reply(opt, p.NBD_REP_ACK)

    async def starttls(self, opt: int, data: bytes) -> None:
        if self.server.tls is None:
            await self.opt_reply(opt, p.NBD_REP_ERR_UNSUP, b"TLS is not configured")
            return
        if data or self.io.tls is not None:
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, b"TLS already started, or data")
            return
        await self.opt_reply(opt, p.NBD_REP_ACK)
        try:
            await self.io.start_tls(self.server.tls)
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            cause = e.__cause__ or e
            raise _Hangup(f"TLS handshake failed: {cause}") from None
        self.tls_done = True
        self.log.debug("conn %d: TLS established (%s)", self.cid, self.io.tls.version())

    def _parse_name_and_list(self, data: bytes, item: str) -> tuple[bytes, list[bytes]] | str:
        """(export name, [items]) from ``u32 len, name, u32/u16 count, items``; else why not."""
        if len(data) < 4:
            return "short request"
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen > len(data):
            return "bad name length"
        name, pos = data[4 : 4 + nlen], 4 + nlen
        items: list[bytes] = []
        if item == "info":
            if pos + 2 > len(data):
                return "short request"
            (count,) = struct.unpack_from(">H", data, pos)
            if len(data) != pos + 2 + 2 * count:
                return "bad info request count"
            items = [data[pos + 2 + 2 * i : pos + 4 + 2 * i] for i in range(count)]
            return name, items
        if pos + 4 > len(data):
            return "short request"
        (count,) = struct.unpack_from(">I", data, pos)
        if count > MAX_QUERIES:
            return f"more than {MAX_QUERIES} queries"
        pos += 4
        for _ in range(count):
            if pos + 4 > len(data):
                return "short query"
            (qlen,) = struct.unpack_from(">I", data, pos)
            if pos + 4 + qlen > len(data):
                return "bad query length"
            items.append(data[pos + 4 : pos + 4 + qlen])
            pos += 4 + qlen
        if pos != len(data):
            return "trailing data"
        return name, items

    async def info_or_go(self, opt: int, data: bytes) -> bool:
        parsed = self._parse_name_and_list(data, "info")
        if isinstance(parsed, str):
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, parsed.encode())
            return False
        raw_name, items = parsed
        requests = {struct.unpack(">H", x)[0] for x in items}
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, b"export name is not UTF-8")
            return False
        export = self.server.lookup(name)
        if export is None:
            self.log.info("conn %d: no export %r", self.cid, name)
            await self.opt_reply(opt, p.NBD_REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return False
        info = struct.pack(">HQH", p.NBD_INFO_EXPORT, export.size, export.transmission_flags())
        await self.opt_reply(opt, p.NBD_REP_INFO, info)
        sizes = (export.min_block, PREFERRED_BLOCK, self.server.max_block)
        block_info = struct.pack(">HIII", p.NBD_INFO_BLOCK_SIZE, *sizes)
        await self.opt_reply(opt, p.NBD_REP_INFO, block_info)
        if p.NBD_INFO_NAME in requests:
            await self.opt_reply(opt, p.NBD_REP_INFO, struct.pack(">H", p.NBD_INFO_NAME) + raw_name)
        if p.NBD_INFO_DESCRIPTION in requests and export.description:
            desc = struct.pack(">H", p.NBD_INFO_DESCRIPTION) + export.description.encode()[:4096]
            await self.opt_reply(opt, p.NBD_REP_INFO, desc)
        await self.opt_reply(opt, p.NBD_REP_ACK)
        if opt == p.NBD_OPT_GO:
            self._enter(name, export)
            return True
        return False

    async def meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, b"negotiate structured replies first")
            return
        parsed = self._parse_name_and_list(data, "query")
        if isinstance(parsed, str):
            await self.opt_reply(opt, p.NBD_REP_ERR_INVALID, parsed.encode())
            return
        raw_name, queries = parsed
        name = raw_name.decode("utf-8", "replace")
        export = self.server.lookup(name)
        if export is None:
            await self.opt_reply(opt, p.NBD_REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        listing = opt == p.NBD_OPT_LIST_META_CONTEXT
        if listing and not queries:
            queries = [b"base:"]  # an empty list asks for every context
        chosen = export.can_block_status and any(
            q == p.BASE_ALLOCATION.encode() or (listing and q == b"base:") for q in queries
        )
        if chosen:
            ctx = struct.pack(">I", BASE_ALLOCATION_ID if not listing else 0)
            await self.opt_reply(opt, p.NBD_REP_META_CONTEXT, ctx + p.BASE_ALLOCATION.encode())
        if not listing:
            self.meta = (name, chosen)
        await self.opt_reply(opt, p.NBD_REP_ACK)

    # -- transmission --

    def _give_back(self, buf: bytearray, view: memoryview) -> None:
        try:
            view.release()
        except BufferError:  # a callback still holds an export of it: never reuse it
            return
        self._buffers.give(buf)

    async def transmission(self) -> None:
        """Read requests and run them concurrently until DISC, EOF or bad input.

        Requests already received when the client disconnects still run (their
        replies are lost); on bad input the requests in flight are cancelled.
        """
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            self._requests = nursery.cancel_scope
            try:
                await self.read_requests(nursery)
            except _EOF as e:
                if not e.clean:
                    failure = e
                else:
                    self.log.debug("conn %d: closed by client without NBD_CMD_DISC", self.cid)
            except (_Hangup, *_LOST) as e:
                failure = e
                nursery.cancel_scope.cancel()
        failure = self._failure or failure
        if failure is not None:
            raise failure

    def _hang_up(self, why: _Hangup) -> None:
        """Close the connection for *why* (from a request's task): the reader and
        the other requests are cancelled, :meth:`run` logs it."""
        if self._failure is None:
            self._failure = why
        self._requests.cancel()

    async def read_requests(self, nursery: trio.Nursery) -> None:
        srv, io = self.server, self.io
        limit = trio.Semaphore(srv.max_in_flight)
        head = memoryview(bytearray(p.REQUEST.size))
        io.buffered = True
        handled = 0
        while True:
            # Replies of inline requests are corked while more requests are
            # already in: one sendmsg (and one wake-up of the client) answers
            # all of them.  They go out before the reader can wait for anything.
            if io.pending < p.REQUEST.size or io.queued >= CORK_LIMIT:
                await self._flush()
            try:
                limit.acquire_nowait()
            except trio.WouldBlock:
                await self._flush()
                await limit.acquire()
            try:
                await io.recv_into(head)
            except _EOF:
                await self._flush()  # a half-closed client still reads its replies
                raise
            magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(head)
            if magic != p.REQUEST_MAGIC:
                raise _Hangup(f"bad request magic {magic:#x}")
            if cmd == p.NBD_CMD_DISC:
                self.log.debug("conn %d: NBD_CMD_DISC", self.cid)
                await self._flush()
                return  # the nursery waits for the requests in flight
            payload = buf = None
            if cmd == p.NBD_CMD_WRITE:
                if length > srv.max_block:
                    raise _Hangup(f"WRITE of {length} bytes exceeds max block {srv.max_block}")
                buf = self._buffers.take(length)
                payload = memoryview(buf)[:length]
                await io.recv_into(payload)
            received = time.perf_counter()
            args = (limit, cmd, flags, cookie, offset, length, payload, buf, received)
            if self.export.runs_inline(cmd, length):
                answered = cmd == p.NBD_CMD_READ and self._read_at_once(*args[1:])
                if answered:
                    limit.release()
                elif answered is None:  # it would wait: a task of its own
                    nursery.start_soon(self.handle, *args)
                else:
                    io.corked = True
                    try:
                        await self.handle(*args, nursery)  # cheaper than a task
                    finally:
                        io.corked = False
            else:
                nursery.start_soon(self.handle, *args)
            handled += 1
            if handled % READER_TURN == 0:
                await self._flush()
                await trio.lowlevel.checkpoint()  # other clients and tasks get their turn

    def _read_at_once(
        self, cmd, flags, cookie, offset, length, payload, buf, received
    ) -> bool | None:
        """Answer an inline READ without a scheduler round (the reply queued
        for the next flush).  None: the read would wait (WouldWait); False:
        the general path must reply (a refusal, or an error: it reads again)."""
        if self._refusal(cmd, flags, offset, length) is not None:
            return False
        export = self.export
        try:
            chunks = export.read_inline(offset, length)
        except WouldWait:
            return None
        except Exception:  # noqa: BLE001 - the general path reads again and replies the error
            return False
        for message in self._read_messages(cookie, chunks, offset, flags):
            self.io.queue(*message)
        self.io.after_sent(export.reply_sent, chunks)
        self.server.request_done(cmd, time.perf_counter() - received)
        return True

    async def _flush(self) -> None:
        """Send the corked replies; a client gone meanwhile loses them (as in :meth:`handle`)."""
        try:
            await self.io.flush()
        except _LOST as e:
            self.log.debug("conn %d: replies lost: %s", self.cid, e)
        except FileEnded as e:
            raise _Hangup(
                f"export {self.export_name!r}: a corked reply was cut short: {e}"
            ) from None

    async def handle(
        self, limit, cmd, flags, cookie, offset, length, payload, buf, received, nursery=None
    ) -> None:
        """Run one request; *nursery*: run by the reader itself, where a READ
        that would wait moves to a task of its own in *nursery*."""
        try:
            try:
                ok = await self.execute(cmd, flags, cookie, offset, length, payload, nursery)
            except _LOST as e:
                self.log.debug("conn %d: reply lost: %s", self.cid, e)
                return
            except _Hangup as e:
                self._hang_up(e)
                return
            except WouldWait:
                args = (limit, cmd, flags, cookie, offset, length, payload, buf, received)
                nursery.start_soon(self.handle, *args)
                limit = buf = None  # the task releases them
                return
            if not ok:
                self.server.errors += 1
            self.server.request_done(cmd, time.perf_counter() - received)
        finally:
            if buf is not None:
                self._give_back(buf, payload)
            if limit is not None:
                limit.release()

    def _refusal(self, cmd: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """(errno, why) when the request is invalid for this export, else None."""
        export = self.export
        name = p.COMMAND_NAMES.get(cmd)
        allowed = _ALLOWED_FLAGS.get(cmd)
        if name is None or allowed is None:
            return errno.EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return errno.EINVAL, f"{name} with unsupported flags {flags:#x}"
        if cmd in _WRITING and export.read_only:
            return errno.EPERM, f"{name} refused: read-only export"
        if (
            (cmd == p.NBD_CMD_WRITE_ZEROES and not export.can_zero)
            or (cmd == p.NBD_CMD_TRIM)
            or (cmd == p.NBD_CMD_CACHE and not export.can_cache)
            or (cmd == p.NBD_CMD_BLOCK_STATUS and not self.block_status_ok)
        ):
            return errno.EINVAL, f"{name} not negotiated"
        if cmd == p.NBD_CMD_FLUSH:
            return None
        if length == 0:
            return errno.EINVAL, f"{name} of length 0"
        if cmd == p.NBD_CMD_READ and length > self.server.max_block:
            err = errno.EOVERFLOW if self.structured else errno.EINVAL
            return err, f"READ of {length} bytes exceeds max block {self.server.max_block}"
        if offset + length > export.size:
            err = errno.ENOSPC if cmd in _WRITING else errno.EINVAL
            return err, f"{name} [{offset}, {offset + length}) beyond the end ({export.size})"
        align = export.min_block
        if export.enforce_alignment and (
            offset % align or (length % align and offset + length != export.size)
        ):
            return errno.EINVAL, f"{name} at {offset}+{length} not aligned to {align} bytes"
        return None

    async def execute(self, cmd, flags, cookie, offset, length, payload, inline=None) -> bool:
        """Run one request and send its reply; False when the reply is an error.

        *inline* (not None): a READ goes through :meth:`Export.read_inline`,
        whose :class:`WouldWait` is raised on.
        """
        export = self.export
        refused = self._refusal(cmd, flags, offset, length)
        if refused is not None:
            err, why = refused
            self.log.info("conn %d: %r: %s", self.cid, self.export_name, why)
            await self.error_reply(cmd, cookie, err, why)
            return False
        try:
            if cmd == p.NBD_CMD_READ:
                if inline is None:
                    chunks = await export.read(offset, length, file_ranges=self.io.file_ranges)
                else:
                    chunks = export.read_inline(offset, length)
            elif cmd == p.NBD_CMD_BLOCK_STATUS:
                extents = await export.block_status(
                    offset, length, bool(flags & p.NBD_CMD_FLAG_REQ_ONE)
                )
            elif cmd == p.NBD_CMD_WRITE:
                await export.write(offset, payload, flags)
            elif cmd == p.NBD_CMD_WRITE_ZEROES:
                await export.zero(offset, length, flags)
            elif cmd == p.NBD_CMD_FLUSH:
                await export.flush()
            elif cmd == p.NBD_CMD_CACHE:
                await export.cache(offset, length)
        except Exception as exc:
            if inline is not None and isinstance(exc, WouldWait):
                raise
            err, expected = export.error_for(exc)
            name = p.COMMAND_NAMES[cmd]
            if expected:
                self.log.warning(
                    "conn %d: %s at %d+%d failed: %s", self.cid, name, offset, length, exc
                )
            else:
                self.log.exception("conn %d: %s at %d+%d failed", self.cid, name, offset, length)
            await self.error_reply(cmd, cookie, err, str(exc))
            return False
        if cmd == p.NBD_CMD_READ:
            try:
                await self.read_reply(cookie, chunks, offset, length, flags)
            except FileEnded as e:
                raise _Hangup(
                    f"export {self.export_name!r}: READ at {offset}+{length}: its file ended at "
                    f"offset {e.at} while the reply was being sent (it shrank?); the part sent "
                    "cannot be taken back"
                ) from None
            finally:
                self.io.after_sent(export.reply_sent, chunks)
        elif cmd == p.NBD_CMD_BLOCK_STATUS:
            desc = b"".join(struct.pack(">II", n, f) for n, f in extents)
            await self.chunk(
                cookie, p.NBD_REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", BASE_ALLOCATION_ID), desc
            )
        else:
            await self.io.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))
        return True

    async def chunk(self, cookie: int, rtype: int, *parts, done: bool = True) -> None:
        await self.io.send(*self._chunk(cookie, rtype, *parts, done=done))

    @staticmethod
    def _chunk(cookie: int, rtype: int, *parts, done: bool = True) -> tuple:
        """A structured reply chunk: its header, then *parts*."""
        size = sum(len(x) for x in parts)
        flags = p.NBD_REPLY_FLAG_DONE if done else 0
        head = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, size)
        return (head, *parts)

    async def error_reply(self, cmd: int, cookie: int, err: int, message: str) -> None:
        if err not in p.NBD_ERRNOS:
            err = errno.EIO
        if self.structured and cmd in (p.NBD_CMD_READ, p.NBD_CMD_BLOCK_STATUS):
            msg = message.encode("utf-8", "replace")[:4096]
            body = struct.pack(">IH", err, len(msg)) + msg
            await self.chunk(cookie, p.NBD_REPLY_TYPE_ERROR, body)
        else:
            await self.io.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, err, cookie))

    async def read_reply(self, cookie, chunks, offset, length, flags) -> None:
        # The reply's chunks back to back, sent as one: one lock, one sendmsg, or
        # one worker thread for the whole reply when it holds file ranges.
        parts = [
            x for message in self._read_messages(cookie, chunks, offset, flags) for x in message
        ]
        files = [x for x in parts if type(x) is FileRange]
        if files:
            self.server.sent_from_files += sum(map(len, files))
        await self.io.send(*parts)

    def _read_messages(self, cookie, chunks, offset, flags) -> list[tuple]:
        """A READ's reply: its messages, each a tuple of parts."""
        if not self.structured or flags & p.NBD_CMD_FLAG_DF:
            parts = [
                x for c in chunks for x in (c.parts() if c.data is not None else (bytes(c.length),))
            ]
            if self.structured:
                head = struct.pack(">Q", offset)
                return [self._chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, head, *parts)]
            return [(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie), *parts)]
        last = len(chunks) - 1
        out = []
        for i, c in enumerate(chunks):
            if c.data is None:
                body = struct.pack(">QI", c.offset, c.length)
                out.append(self._chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, body, done=i == last))
            else:
                head = struct.pack(">Q", c.offset)
                out.append(
                    self._chunk(
                        cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, head, *c.parts(), done=i == last
                    )
                )
        return out

    async def run(self) -> None:
        srv = self.server
        try:
            with trio.fail_after(srv.handshake_timeout):
                started = await self.handshake()
            if started:
                self.log.debug("conn %d: serving export %r", self.cid, self.export_name)
                await self.transmission()
        except trio.TooSlowError:
            self._closed_for(f"handshake took more than {srv.handshake_timeout:g} s")
        except _EOF as e:
            if e.clean and self.export is None:
                self.log.debug("conn %d: closed during the handshake", self.cid)
            elif not e.clean:
                self._closed_for(str(e))
        except _Hangup as e:
            self._closed_for(str(e))
        except _LOST as e:
            self.log.info("conn %d: connection lost: %s", self.cid, e)
        except Exception:
            self.log.exception("conn %d: internal error; closing the connection", self.cid)
            srv.closed_reasons.append("internal error")
        finally:
            await self.io.aclose()

    def _closed_for(self, reason: str) -> None:
        self.log.warning("conn %d: closing connection: %s", self.cid, reason)
        self.server.closed_reasons.append(reason)


class NbdServer:
    """Serve ``exports`` on a Unix socket (``unix=PATH``) or TCP (``tcp=(HOST, PORT)``).

    :param exports: export name -> :class:`Export`, in the order NBD_OPT_LIST
        shows them.  May be mutated before a client asks for a name.  The
        empty name selects the only export when there is exactly one.
    :param aliases: other names -> export names (found, never listed).
    :param unix: socket path, created by :meth:`serve` (an existing socket file
        is replaced, any other file is an error), mode ``socket_mode`` before
        it accepts, removed when :meth:`serve` returns.
    :param tcp: (host, port) to listen on; port 0 picks one (:attr:`port`).
    :param tls: an SSL server context: TLS becomes required (NBD_OPT_STARTTLS).
    :param structured: offer structured replies and, when an export has
        block status, base:allocation.
    :param max_block: the advertised maximum block size: the longest READ
        answered, the longest WRITE payload accepted (a power of two,
        64 KiB..32 MiB).
    :param max_in_flight: requests handled concurrently per connection.
    :param logger: where connection events go.

    Attributes: ``connections`` (open now), ``requests`` (handled),
    ``errors`` (error replies sent), ``sent_from_files`` (READ bytes sent
    with sendfile), ``closed_reasons`` (the logged reasons of the last 256
    connections closed for bad input or a reply cut short, oldest first).
    """

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        unix: str | os.PathLike[str] | None = None,
        tcp: tuple[str, int] | None = None,
        aliases: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        structured: bool = True,
        max_block: int = DEFAULT_MAX_BLOCK,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        socket_mode: int = 0o600,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_block & (max_block - 1) or not 65536 <= max_block <= 32 * 1024 * 1024:
            raise ValueError("max_block must be a power of two in 64 KiB..32 MiB")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if (unix is None) == (tcp is None):
            raise ValueError("give exactly one of unix= and tcp=")
        self.socket_path = os.fspath(unix) if unix is not None else None
        self.tcp = tcp
        self.port: int | None = None
        self.exports = exports
        self.aliases = dict(aliases or {})
        self.tls = tls
        self.structured = structured
        self.max_block = max_block
        self.max_in_flight = max_in_flight
        self.socket_mode = socket_mode
        self.handshake_timeout = handshake_timeout
        self.log = logger or logging.getLogger("vmafs.nbd")
        self.connections = 0
        self.requests = 0
        self.errors = 0
        #: bytes of READ replies sent (or being sent) from files with sendfile
        self.sent_from_files = 0
        self.closed_reasons: deque[str] = deque(maxlen=256)
        self._next_cid = 0

    @property
    def block_status(self) -> bool:
        return any(e.can_block_status for e in self.exports.values())

    def lookup(self, name: str) -> Export | None:
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return self.exports.get(self.aliases.get(name, name))

    def request_done(self, cmd: int, seconds: float) -> None:
        """Called after each reply was sent (*seconds* since the request was in)."""
        self.requests += 1

    async def _listen_unix(self) -> trio.socket.SocketType:
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
        except BaseException:
            lsock.close()
            raise
        return lsock

    async def _listen_tcp(self) -> trio.socket.SocketType:
        host, port = self.tcp
        infos = await trio.socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        if not infos:
            raise OSError(errno.EADDRNOTAVAIL, f"{host}: no address to listen on")
        family, stype, proto, _, addr = infos[0]
        lsock = trio.socket.socket(family, stype, proto)
        try:
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await lsock.bind(addr)
        except BaseException:
            lsock.close()
            raise
        self.port = lsock.getsockname()[1]
        return lsock

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve clients until cancelled.

        ``task_status.started()`` is called once the socket accepts
        connections, so ``await nursery.start(server.serve)`` returns when a
        client can connect.  Cancelling closes the listener and all
        connections (requests in flight are abandoned without replies).
        """
        lsock = await (self._listen_unix() if self.socket_path else self._listen_tcp())
        try:
            lsock.listen(64)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        sock, _ = await lsock.accept()
                    except OSError as e:  # EMFILE and friends: keep serving who is there
                        self.log.warning("accept failed: %s", e)
                        await trio.sleep(0.1)
                        continue
                    if self.tcp is not None:
                        # a reply goes out at once: Nagle would hold a small one back
                        # until the previous is acknowledged (a delayed ACK: 40 ms)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._next_cid += 1
                    nursery.start_soon(self._serve_conn, sock, self._next_cid)
        finally:
            lsock.close()
            if self.socket_path:
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass

    async def _serve_conn(self, sock, cid: int) -> None:
        self.connections += 1
        self.log.debug("conn %d: accepted", cid)
        try:
            await _Conn(self, sock, cid).run()
        finally:
            self.connections -= 1


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server context from PEM files; with *ca*, clients must show a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
