"""One disk of an opened archive as an NBD export (the reader's data end)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from ..archive import Archive
from ..errors import VmaError
from ..format import CLUSTER_SIZE, Device
from ..nbd.buffers import BufferPool
from ..nbd.protocol import NBD_CMD_BLOCK_STATUS, NBD_CMD_READ, NBD_STATE_HOLE, NBD_STATE_ZERO
from ..nbd.server import Export, FileRange, ReadChunk, WouldWait

#: extents per BLOCK_STATUS reply at most (a client asks again from where it stopped)
MAX_EXTENTS = 1024
#: CACHE reads the data in steps this large (into one scratch buffer per request)
CACHE_STEP = 4 * 1024 * 1024
#: archive reads running in worker threads at once, all clients together: a
#: compressed archive's (decoding: CPU-bound), a plain archive's (waiting for the
#: disk: as many as one connection has in flight, as nbdkit's 16 threads; these
#: also send the replies whose archive bytes are not in the page cache)
READ_THREADS = 8
DISK_READ_THREADS = 16
#: reads up to this size are served by the connection's reader itself (their
#: reply fits a Unix socket's buffer: sending it never waits for the client)
INLINE_REPLY = 128 * 1024
#: read reply buffers kept for reuse, per export, and the largest kept
#: (qemu-img convert reads 2 MiB at a time, nbdcopy 256 KiB, QEMU's guest I/O less)
REPLY_BUFFERS = 32
REPLY_BUFFER_MAX = 8 * 1024 * 1024

log = logging.getLogger("vmafs.serve")

_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
_CLUSTER_BITS = CLUSTER_SIZE.bit_length() - 1


def read_threads(archive: Archive) -> int:
    """Worker threads for the reads of *archive*'s exports."""
    return READ_THREADS if archive.compressed else DISK_READ_THREADS


def export_names(device: Device) -> tuple[str, str | None]:
    """(export name, alias) of a disk: its device name (``drive-scsi0``) and,
    when that starts with ``drive-``, the bare drive (``scsi0``)."""
    name = device.name
    alias = name.removeprefix("drive-")
    return name, (alias if alias != name and alias else None)


class ArchiveExport(Export):
    """Device *dev_id* of *archive*, read-only, holes and block status from its offset map.

    Archive reads run in trio worker threads (shared :class:`trio.CapacityLimiter`),
    so a slow compressed read never stalls other requests or clients.

    A plain archive's data goes out as ranges of the archive file
    (:class:`FileRange`, sent with sendfile) on connections that allow it
    (not TLS) for every read but the small inline ones: those stay copies
    from the page cache (``preadv2`` with RWF_NOWAIT), so that a batch of
    their replies still goes out with one ``sendmsg``.
    """

    read_only = True
    can_flush = True  # a no-op: nothing is ever written
    can_cache = True
    can_block_status = True
    can_multi_conn = True

    def __init__(
        self,
        archive: Archive,
        dev_id: int,
        limiter: trio.CapacityLimiter | None = None,
        *,
        threads: bool = False,
    ) -> None:
        self.archive = archive
        self.dev_id = dev_id
        device = archive.device(dev_id)
        self.size = device.size
        self.description = (
            f"{device.name} of {os.path.basename(archive.path)} ({device.size} bytes, read-only)"
        )
        self.limiter = limiter or trio.CapacityLimiter(read_threads(archive))
        #: small reads of an uncompressed archive are a pread: done in the trio loop
        #: (a thread hand-off costs more than a cached read, as in the mount), anything
        #: else in a thread; *threads* (slow or network storage) sends all to threads
        self.inline = not threads and not archive.compressed
        #: inline reads only what the page cache holds (False once the file system
        #: says it cannot tell)
        self.cached_only = True
        self._buffers = BufferPool(REPLY_BUFFERS, max_size=REPLY_BUFFER_MAX)

    async def _in_thread(self, fn: Callable, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- what the server calls --

    def runs_inline(self, cmd: int, length: int) -> bool:
        # Block status reads only the in-memory index.  Under load a hop to a
        # worker thread and back costs more than either (qemu-img convert asks
        # both for every chunk it copies).
        # A larger read gets a task of its own (still no thread): while its
        # reply drains into the socket, the next requests are read and served.
        return cmd == NBD_CMD_BLOCK_STATUS or (
            self.inline and cmd == NBD_CMD_READ and length <= INLINE_REPLY
        )

    def read_inline(self, offset: int, length: int) -> list[ReadChunk]:
        # Only from the page cache: a read that would wait for storage goes to a
        # worker thread instead, so the event loop never waits for a disk.
        try:
            return self.read_chunks(offset, length, cached_only=self.cached_only)
        except BlockingIOError:
            raise WouldWait from None
        except OSError as e:
            if not self.cached_only or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # the file system cannot tell what is cached: read in the loop, as the mount does
            log.info("%s: cannot ask the page cache (%s); reading inline", self.archive.path, e)
            self.cached_only = False
            return self.read_chunks(offset, length)

    async def read(self, offset: int, length: int, *, file_ranges: bool = False) -> list[ReadChunk]:
        if file_ranges and self.archive.fd is not None:
            # Plain archive, plain socket: the data goes out as ranges of the
            # archive file (sendfile: from the event loop when the pages are
            # cached, else from a worker thread): no copy at all.
            if self.inline:
                return self.file_chunks(offset, length)
            return await self._in_thread(self.file_chunks, offset, length)
        if self.inline:
            try:
                return self.read_inline(offset, length)
            except WouldWait:
                pass
        return await self._in_thread(self.read_chunks, offset, length)

    def reply_sent(self, chunks: list[ReadChunk]) -> None:
        for c in chunks:
            if type(c.data) is memoryview:
                # one buffer per request: every data chunk is a view of it
                self._buffers.give(c.data.obj)
                return

    async def block_status(self, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
        return self.extents(offset, length, 1 if one else MAX_EXTENTS)

    async def cache(self, offset: int, length: int) -> None:
        await self._in_thread(self.prefetch, offset, length)

    def error_for(self, exc: BaseException) -> tuple[int, bool]:
        if isinstance(exc, VmaError | OSError):
            return errno.EIO, True  # a missing cluster, a damaged stream, a failing disk
        return super().error_for(exc)

    # -- the work, in a worker thread --

    def spans(self, offset: int, length: int, limit: int | None = None):
        """(start, stop, is_hole) runs of [offset, offset+length), holes as the mount's lseek."""
        a, dev = self.archive, self.dev_id
        end = offset + length
        if offset >> _CLUSTER_BITS == (end - 1) >> _CLUSTER_BITS:
            # holes are whole clusters: one cluster is all hole or all data
            yield offset, end, a.is_hole(dev, offset)
            return
        pos = offset
        count = 0
        while pos < end and (limit is None or count < limit):
            data = a.next_data(dev, pos)
            if data != pos:
                stop = end if data is None else min(end, data)
                yield pos, stop, True
            else:
                stop = min(end, a.next_hole(dev, pos))
                yield pos, stop, False
            pos = stop
            count += 1

    def read_chunks(
        self, offset: int, length: int, *, cached_only: bool = False
    ) -> list[ReadChunk]:
        """Holes as hole chunks (no bytes), data read from the archive into
        views of one pooled buffer (given back by :meth:`reply_sent`).
        *cached_only*: BlockingIOError when some of it is not in the page cache."""
        out = []
        buf = None
        try:
            for start, stop, hole in self.spans(offset, length):
                if hole:
                    out.append(ReadChunk(start, stop - start))
                    continue
                if buf is None:
                    buf = memoryview(self._buffers.take(length))
                view = buf[start - offset : stop - offset]
                self.archive.readinto(self.dev_id, start, view, cached_only=cached_only)
                out.append(ReadChunk(start, stop - start, view))
        except BaseException:
            if buf is not None:
                self._buffers.give(buf.obj)
            raise
        return out

    def file_chunks(self, offset: int, length: int) -> list[ReadChunk]:
        """Holes as hole chunks, data as parts: ranges of the archive file
        (:meth:`Archive.segments`) and zeros (the unstored blocks of partly
        stored clusters).  No device byte is read; the archive's size is
        checked (TruncatedError: the file is shorter than a range)."""
        out = []
        for start, stop, hole in self.spans(offset, length):
            if hole:
                out.append(ReadChunk(start, stop - start))
                continue
            parts = tuple(
                FileRange(*piece) if type(piece) is tuple else piece
                for piece in self.archive.segments(self.dev_id, start, stop - start)
            )
            out.append(ReadChunk(start, stop - start, parts))
        return out

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """base:allocation: (length, HOLE|ZERO) for holes, (length, 0) for data."""
        return [
            (stop - start, _HOLE if hole else 0)
            for start, stop, hole in self.spans(offset, length, limit)
        ]

    def prefetch(self, offset: int, length: int) -> None:
        """Read the data of the range once (fills the source's caches), holes skipped."""
        scratch = bytearray(min(length, CACHE_STEP))
        for start, stop, hole in self.spans(offset, length):
            pos = start
            while not hole and pos < stop:
                n = min(stop - pos, len(scratch))
                self.archive.readinto(self.dev_id, pos, memoryview(scratch)[:n])
                pos += n


def exports_for(
    archive: Archive, limiter: trio.CapacityLimiter | None = None, *, threads: bool = False
) -> tuple[dict[str, ArchiveExport], dict[str, str]]:
    """({export name: export} for every disk, {alias: export name}).

    The vmstate (RAM) device is not a disk and gets no export.  An alias
    that is also another disk's name is left out (the name wins).
    """
    limiter = limiter or trio.CapacityLimiter(read_threads(archive))
    exports: dict[str, ArchiveExport] = {}
    aliases: dict[str, str] = {}
    for dev in archive.devices:
        if dev.is_vmstate:
            continue
        name, alias = export_names(dev)
        exports[name] = ArchiveExport(archive, dev.dev_id, limiter, threads=threads)
        if alias is not None:
            aliases[alias] = name
    for alias in [a for a in aliases if a in exports]:
        del aliases[alias]
    return exports, aliases
