"""Pack clusters, in arrival order, into a VMA archive written strictly sequentially.

A push-mode QEMU backup delivers each disk's clusters in no particular order
(copy-before-write sends a cluster's old data first when the guest is about to
overwrite it).  :class:`Packer` takes them as they come, encodes each cluster
with :func:`vmafs.format.encode_cluster` (all-zero 4 KiB blocks are not
stored), fills extents with :class:`vmafs.format.ExtentPacker` (58 slots, as Proxmox)
and hands whole extents to a background thread that writes them to the output.
The layout is entirely :mod:`vmafs.format`'s; nothing here knows a byte offset.
Fed a Proxmox archive's clusters in that archive's order, with its uuid, ctime,
configs and devices, the Packer reproduces the archive byte for byte
(tests/test_packer.py does this for every fixture).

Usage (inside a trio task)::

    out = ArchiveOutput("vzdump-qemu-100-....vma")        # temp file beside it
    try:
        async with Packer(out, [("drive-scsi0", size0), ("drive-efidisk0", size1)],
                          [("qemu-server.conf", conf_bytes)]) as packer:
            ... await packer.put(dev_id, offset, data) from the NBD callbacks ...
            await packer.finish()      # every cluster of every disk, or IncompleteArchiveError
        out.commit()                   # fsync + rename to the final name
    except BaseException:
        out.abort()                    # removes the temp file
        raise

Contract of :meth:`Packer.put`:

- ``offset`` is a multiple of 65536; ``length`` is a multiple of 65536 or the
  range ends exactly at the end of the device (the final partial cluster).
  Anything else is a :class:`vmafs.errors.WriteRangeError` (the archive is
  untouched; the NBD layer answers ``EINVAL``).
- ``data=None`` means ``length`` zero bytes (NBD WRITE_ZEROES).
- Every cluster of every device must be put exactly once.  Re-sending a
  cluster with identical content (QEMU re-sends a range after an error or a
  reconnect) is acknowledged and dropped; a re-send with different content
  raises :class:`vmafs.errors.ConflictingClusterError` and stores nothing of
  that request.  Identity is checked with a 63-bit digest (sha256 of the
  encoded cluster, truncated; 0 = "not yet received") per cluster, kept in a
  numpy array: 8 bytes per 64 KiB cluster, 128 MiB per TiB of disk.
- ``put`` returns as soon as the data is encoded into the packer's buffer; it
  waits (backpressure) only while more than ``max_pending_bytes`` of finished
  extents are queued for the output.  Encoding and hashing run in the event
  loop (about 1-2 ms per MiB); the check-and-store step has no await inside,
  so a put - even a cancelled one - stores all of its new clusters or none.
  An NBD reply sent after ``put`` returns means "accepted", not "on disk":
  durability is :meth:`finish` + :meth:`ArchiveOutput.commit`.
- A device named ``vmstate`` (RAM state) must be put in cluster order, as
  Proxmox's reader requires; backups of disks never have one.

Failures are sticky: once the output fails (e.g. ``ENOSPC``) or a put raised a
conflict, every later ``put``/``finish`` raises a
:class:`vmafs.errors.WriterError` whose ``__cause__`` is the first failure
(whose own cause is the ``OSError``, if any).

The output object needs only ``write(bytes)`` (and optionally ``flush()``).
:class:`Packer` calls ``write`` first with the whole header, then once per batch
of *whole* extents (never a partial extent): this is the hook that lets
:class:`ArchiveOutput` group extents into seekable-zstd frames.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np
import trio

from vmafs.errors import (
    ConflictingClusterError,
    IncompleteArchiveError,
    WriteRangeError,
    WriterError,
)
from vmafs.format import (
    CLUSTER_SIZE,
    MAX_DEV_ID,
    MIN_DEV_ID,
    PROXMOX_SLOTS_PER_EXTENT,
    Config,
    Device,
    ExtentHeader,
    ExtentPacker,
    Header,
    encode_cluster,
)

if TYPE_CHECKING:
    from .nbd import Export

__all__ = [
    "ArchiveOutput",
    "Packer",
    "Sink",
    "ConflictingClusterError",
    "IncompleteArchiveError",
    "WriteRangeError",
    "WriterError",
]

log = logging.getLogger("writer.packer")

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024

_ZERO_CLUSTER = bytes(CLUSTER_SIZE)
_NO_HARDLINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _digest(mask: int, stored: bytes) -> int:
    """63-bit digest of an encoded cluster; never 0 (0 marks "not received")."""
    h = hashlib.sha256(mask.to_bytes(2, "big"))
    h.update(stored)
    return int.from_bytes(h.digest()[:8], "big") | 1


_ZERO_DIGEST = _digest(0, b"")


def _encode_range(first_cluster: int, data: memoryview | None, length: int):
    """[(cluster, mask, stored, digest)] for a cluster-aligned range.

    Pure function of its arguments.
    """
    out = []
    n = (length + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    for i in range(n):
        if data is None:
            out.append((first_cluster + i, 0, b"", _ZERO_DIGEST))
            continue
        chunk = bytes(data[i * CLUSTER_SIZE : (i + 1) * CLUSTER_SIZE])
        if chunk == _ZERO_CLUSTER or (len(chunk) < CLUSTER_SIZE and chunk == bytes(len(chunk))):
            mask, stored = encode_cluster(None)
        else:
            mask, stored = encode_cluster(chunk)
        digest = _ZERO_DIGEST if not mask else _digest(mask, stored)
        out.append((first_cluster + i, mask, stored, digest))
    return out


class Sink(Protocol):
    """What :class:`Packer` writes to: sequential ``write`` calls only."""

    def write(self, data: bytes, /) -> object: ...


class Packer:
    """Accepts clusters in any order and writes a valid VMA archive sequentially.

    :param out: a :class:`Sink` (an :class:`ArchiveOutput`, an open binary file,
        a pipe).  Only ``write`` is used, always sequentially and from one
        background thread; ``flush`` is called by :meth:`finish` when present.
    :param devices: ``(name, size_in_bytes)`` per device; dev_ids are assigned
        1, 2, ... in this order (see :attr:`dev_ids`).  Sizes must be > 0.
    :param configs: ``(name, data)`` per config file; the name is stored as its
        basename (as Proxmox does), data at most 65535 bytes, at most 256.
    :param uuid: 16 bytes; default a random uuid4.
    :param ctime: seconds since the epoch; default now.
    :param slots_per_extent: clusters per extent, 1..59; default 58 like Proxmox.
    :param max_pending_bytes: finished extents queued for the output beyond
        which :meth:`put` waits.  Memory use is about this plus one extent
        being filled (<= 3.7 MiB) plus 8 bytes per cluster of every device.

    Use as ``async with packer:`` - entering queues the header and starts the
    background writer thread; leaving stops it.  Leaving without
    :meth:`finish` having succeeded drops whatever is still queued (the output
    then holds a truncated archive: abort it).
    """

    def __init__(
        self,
        out: Sink | BinaryIO,
        devices: Iterable[tuple[str, int]],
        configs: Iterable[tuple[str, bytes]] = (),
        *,
        uuid: bytes | None = None,
        ctime: int | None = None,
        slots_per_extent: int = PROXMOX_SLOTS_PER_EXTENT,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        devs: dict[int, Device] = {}
        self.dev_ids: dict[str, int] = {}
        for i, (name, size) in enumerate(devices):
            dev_id = MIN_DEV_ID + i
            if dev_id > MAX_DEV_ID:
                raise WriterError(f"at most {MAX_DEV_ID - MIN_DEV_ID + 1} devices")
            if not name or "\0" in name:
                raise WriterError(f"bad device name {name!r}")
            if name in self.dev_ids:
                raise WriterError(f"device name {name!r} given twice")
            if size <= 0:
                raise WriterError(f"device {name!r} has size {size}; must be > 0")
            self.dev_ids[name] = dev_id
            devs[dev_id] = Device(dev_id, name, int(size))
        if sum(d.is_vmstate for d in devs.values()) > 1:
            raise WriterError("more than one vmstate device")
        cfgs = []
        seen = set()
        for name, data in configs:
            base = os.path.basename(os.fsdecode(name))
            if not base or base in (".", ".."):
                raise WriterError(f"bad config name {name!r}")
            if base in seen:
                raise WriterError(f"config name {base!r} given twice")
            seen.add(base)
            cfgs.append(Config(base, bytes(data)))
        if not 1 <= slots_per_extent <= 59:
            raise ValueError("slots_per_extent must be in 1..59")
        self.header = Header(
            uuid if uuid is not None else uuidlib.uuid4().bytes,
            int(time.time()) if ctime is None else int(ctime),
            cfgs,
            devs,
        )
        self._header_bytes = self.header.pack()  # validates sizes, names, counts
        self._out = out
        self._devices = devs
        self._digests = {d: np.zeros(dev.clusters, dtype=np.uint64) for d, dev in devs.items()}
        self._missing = {d: dev.clusters for d, dev in devs.items()}
        self._vmstate_next = 0
        self._extents_written = 0
        self._extents = ExtentPacker(self.header.uuid, slots_per_extent)
        self._max_pending = max_pending_bytes
        self._queued_bytes = 0
        self._progress = trio.lowlevel.ParkingLot()
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = False
        self._failure: WriterError | None = None
        self._finished = False
        self._closed = False
        #: bytes the output has accepted so far
        self.bytes_written = 0
        #: clusters stored / identical re-sends dropped
        self.clusters_stored = 0
        self.duplicates_dropped = 0

    # -- lifecycle --

    async def __aenter__(self) -> Packer:
        if self._thread is not None:
            raise RuntimeError("Packer can be entered only once")
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._writer_main, name="vma-writer", daemon=True)
        self._thread.start()
        self._enqueue(self._header_bytes)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the writer thread (after the write in progress, if any)."""
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self._stop = True
            if self._failure is None:
                self._failure = WriterError("the packer was closed before finish()")
        self._q.put(None)
        if self._thread is not None:
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)

    # -- the background writer thread --

    def _writer_main(self) -> None:
        failed = False
        while True:
            item = self._q.get()
            if item is None:
                return
            if not failed and not self._stop:
                try:
                    self._out.write(item)
                except BaseException as exc:  # noqa: BLE001 - reported to the trio side
                    failed = True
                    self._report(self._on_error, exc)
            self._report(self._on_written, len(item), not failed and not self._stop)

    def _report(self, fn, *args) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _on_written(self, n: int, ok: bool) -> None:
        self._queued_bytes -= n
        if ok:
            self.bytes_written += n
        self._progress.unpark_all()

    def _on_error(self, exc: BaseException) -> None:
        err = WriterError(f"writing the archive failed: {exc}")
        err.__cause__ = exc
        self._fail(err)

    def _fail(self, err: WriterError) -> None:
        if self._failure is None:
            self._failure = err
            log.error("%s", err)
        self._progress.unpark_all()

    def _enqueue(self, buf: bytes) -> None:
        self._queued_bytes += len(buf)
        self._q.put(buf)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise WriterError(f"archive writer failed earlier: {self._failure}") from self._failure
        if self._thread is None:
            raise RuntimeError("use the Packer as 'async with packer:'")

    # -- data path --

    async def put(
        self, dev_id: int, offset: int, data: bytes | memoryview | None, length: int | None = None
    ) -> None:
        """Accept ``length`` bytes of device ``dev_id`` at ``offset`` (see module docs).

        ``length`` defaults to ``len(data)``; it is required when ``data`` is None.
        Raises :class:`WriteRangeError` for a bad range (nothing stored),
        :class:`ConflictingClusterError` for a conflicting re-send (nothing of
        the request stored; the packer is failed from then on), and
        :class:`WriterError` when the output failed earlier.
        """
        self._check_usable()
        dev = self._devices.get(dev_id)
        if dev is None:
            raise WriteRangeError("write to an unknown device", dev_id=dev_id)
        if data is not None:
            data = memoryview(data).cast("B")
            if length is None:
                length = len(data)
            elif length != len(data):
                raise WriteRangeError(
                    f"length {length} differs from the {len(data)} bytes given", dev_id=dev_id
                )
        elif length is None:
            raise TypeError("length is required when data is None")
        end = offset + length
        if offset < 0 or length < 0 or end > dev.size:
            raise WriteRangeError(
                f"write [{offset}, {end}) outside device {dev.name!r} of {dev.size} bytes",
                dev_id=dev_id,
            )
        if offset % CLUSTER_SIZE or (length % CLUSTER_SIZE and end != dev.size):
            raise WriteRangeError(
                f"write [{offset}, {end}) is not whole 64 KiB clusters of {dev.name!r} "
                f"(only the device's final cluster may be short)",
                dev_id=dev_id,
            )
        if length == 0:
            return
        while self._queued_bytes > self._max_pending and self._failure is None:
            await self._progress.park()
        self._check_usable()
        # Encoding and hashing run inline, in the event loop: measured under a
        # real blockdev-backup, worker threads (GIL contention with the loop)
        # gave lower throughput and 5-10x worse reply latency.
        encoded = _encode_range(offset // CLUSTER_SIZE, data, length)
        self._store(dev, encoded)

    def _store(self, dev: Device, encoded) -> None:
        """Check the whole request, then store its new clusters (no awaits here)."""
        digests = self._digests[dev.dev_id]
        new = []
        for item in encoded:
            cluster, _, _, digest = item
            old = int(digests[cluster])
            if old == 0:
                new.append(item)
            elif old != digest:
                err = ConflictingClusterError(
                    f"cluster of {dev.name!r} re-sent with different contents",
                    dev_id=dev.dev_id,
                    cluster=cluster,
                )
                self._fail(err)
                raise err
        if dev.is_vmstate and new:
            expect = self._vmstate_next
            for cluster, *_ in new:
                if cluster != expect:
                    raise WriteRangeError(
                        f"vmstate clusters must arrive in order: got {cluster}, expected {expect}",
                        dev_id=dev.dev_id,
                        cluster=cluster,
                    )
                expect += 1
            self._vmstate_next = expect
        self.duplicates_dropped += len(encoded) - len(new)
        for cluster, mask, stored, digest in new:
            digests[cluster] = digest
            self._missing[dev.dev_id] -= 1
            self.clusters_stored += 1
            extent = self._extents.add(dev.dev_id, cluster, mask, stored)
            if extent:
                self._enqueue(extent)
                self._extents_written += 1

    async def flush(self) -> None:
        """Wait until every finished extent has been handed to the output.

        Does not close the current partial extent and does not fsync: the
        archive is durable only after :meth:`finish` and ``commit``.
        """
        self._check_usable()
        await self._drain()

    async def _drain(self) -> None:
        while self._queued_bytes > 0 and self._failure is None:
            await self._progress.park()
        self._check_usable()

    def missing(self) -> dict[int, int]:
        """dev_id -> number of clusters not yet received."""
        return dict(self._missing)

    @property
    def complete(self) -> bool:
        """True when every cluster of every device has been received."""
        return not any(self._missing.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes of finished extents queued for the output."""
        return self._queued_bytes

    async def finish(self) -> None:
        """Write the last partial extent, drain the queue and flush the output.

        Raises :class:`IncompleteArchiveError` (writing nothing more; more puts
        may follow and ``finish`` may be called again) if any cluster is
        missing.  After success the archive is complete; later puts can only
        be identical re-sends (dropped) or conflicts (errors).
        """
        self._check_usable()
        if self._finished:
            return
        if not self.complete:
            parts = [
                f"{self._devices[d].name}: {n} of {self._devices[d].clusters}"
                for d, n in self._missing.items()
                if n
            ]
            raise IncompleteArchiveError(
                f"{sum(self._missing.values())} clusters never arrived ({', '.join(parts)})"
            )
        extent = self._extents.flush()
        if extent:
            self._enqueue(extent)
            self._extents_written += 1
        elif not self._extents_written:
            # Proxmox's writer always emits at least one extent: an archive
            # without devices ends with one empty extent header (no-disks.vma).
            self._enqueue(ExtentHeader(self.header.uuid, 0, []).pack())
            self._extents_written += 1
        await self._drain()
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            try:
                await trio.to_thread.run_sync(flush)
            except OSError as exc:
                self._on_error(exc)
                self._check_usable()
        self._finished = True

    def export(self, name: str) -> Export:
        """An NBD :class:`writer.nbd.Export` that feeds device ``name`` into this packer."""
        from .nbd import Export

        dev_id = self.dev_ids[name]

        async def on_write(offset: int, data: bytes | memoryview) -> None:
            await self.put(dev_id, offset, data)

        async def on_zero(offset: int, length: int) -> None:
            await self.put(dev_id, offset, None, length)

        return Export(
            size=self._devices[dev_id].size,
            on_write=on_write,
            on_zero=on_zero,
            on_flush=self.flush,
            description=f"vmafs writer: {name} (dev_id {dev_id}, write-only)",
        )


class ArchiveOutput:
    """The archive file: a temporary name beside the target until :meth:`commit`.

    ``ArchiveOutput("dir/NAME.vma")`` creates ``dir/.NAME.vma.XXXXXXXX.tmp``
    (mkstemp, then chmod to 0666 minus umask); :meth:`commit` fsyncs it,
    moves it to ``dir/NAME.vma`` and fsyncs the directory; :meth:`abort`
    closes and removes it (idempotent, a no-op after commit).
    ``ArchiveOutput("-")`` streams to stdout: no temp file, no rename, commit
    only flushes.  An existing target is refused (``FileExistsError``, both
    up front and atomically at commit via link(2)) unless ``overwrite=True``.

    Targets ending in ``.zst`` are written as zstd: seekable zstd
    (vmafs.source.zstd_seekable.SeekableZstdWriter) when that module exists,
    else one plain zstd frame (what ``vzdump`` writes).  :meth:`write`
    receives the header and then whole extents only; in seekable mode it
    groups consecutive extents into frames of at least ``frame_bytes``
    uncompressed bytes, so every frame starts at an extent boundary.
    ``compress`` overrides the choice: ``"zstd"``, ``None``/``False`` (plain),
    ``True`` (by suffix).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        compress: str | None | bool = True,
        frame_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        target = os.fspath(target)
        if compress is True:
            compress = "zstd" if target.endswith(".zst") else None
        if compress not in (None, False, "zstd"):
            raise ValueError(f"unknown compression {compress!r}")
        self.compress = compress or None
        self.overwrite = overwrite
        self._committed = False
        self._frame_bytes = frame_bytes
        self._frame: list[bytes] = []
        self._frame_len = 0
        self._zw = None  # zstd writer (seekable or streaming)
        self._seekable = False
        if target == "-":
            self.path = None
            self.temp_path = None
            self._f = open(sys.stdout.fileno(), "wb", closefd=False)  # noqa: SIM115
        else:
            self.path = os.path.abspath(target)
            if not overwrite and os.path.lexists(self.path):
                raise FileExistsError(f"{self.path} already exists")
            directory, base = os.path.split(self.path)
            fd, self.temp_path = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            self._f = os.fdopen(fd, "wb")
        if self.compress == "zstd":
            self._open_zstd()

    def _open_zstd(self) -> None:
        try:
            from vmafs.source.zstd_seekable import SeekableZstdWriter
        except ImportError:
            import zstandard

            log.info("seekable zstd writer not available; writing one plain zstd frame")
            self._zw = zstandard.ZstdCompressor(threads=-1).stream_writer(self._f, closefd=False)
        else:
            self._zw = SeekableZstdWriter(self._f)
            self._seekable = True

    def write(self, data: bytes) -> None:
        """Append ``data`` (the header, or one or more whole extents)."""
        if self._zw is None:
            self._f.write(data)
        elif not self._seekable:
            self._zw.write(data)
        else:
            self._frame.append(data)
            self._frame_len += len(data)
            if self._frame_len >= self._frame_bytes:
                self._end_frame()

    def _end_frame(self) -> None:
        if self._frame:
            self._zw.write_frame(b"".join(self._frame))
            self._frame, self._frame_len = [], 0

    def flush(self) -> None:
        """Push buffered bytes to the OS (ends the current seekable zstd frame)."""
        if self._zw is not None:
            if self._seekable:
                self._end_frame()
            else:
                import zstandard

                self._zw.flush(zstandard.FLUSH_BLOCK)
        self._f.flush()

    def commit(self) -> None:
        """Finish compression, fsync, move to the final name, fsync the directory."""
        if self._committed:
            return
        if self._zw is not None:
            if self._seekable:
                self._end_frame()
            self._zw.close()
        if not self._f.closed:
            self._f.flush()
        if self.path is None:
            self._committed = True
            return
        # fsync through our own descriptor: the zstd writer may have closed self._f
        fd = os.open(self.temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._f.close()
        if self.overwrite:
            os.replace(self.temp_path, self.path)
        else:
            try:
                os.link(self.temp_path, self.path)  # FileExistsError if someone took the name
            except OSError as e:
                if isinstance(e, FileExistsError) or e.errno not in _NO_HARDLINKS:
                    raise
                # no hard links here (vfat, some CIFS/FUSE): check, then rename
                if os.path.lexists(self.path):
                    raise FileExistsError(errno.EEXIST, "archive exists", self.path) from None
                os.rename(self.temp_path, self.path)
            else:
                os.unlink(self.temp_path)
        self.temp_path = None
        self._committed = True
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        """Close and remove the temporary file; never raises for a missing file."""
        try:
            self._f.close()
        except OSError:
            pass
        if self.temp_path is not None:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass
            self.temp_path = None

    def __enter__(self) -> ArchiveOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Abort unless committed (commit is always explicit)."""
        if not self._committed:
            self.abort()
