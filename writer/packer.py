"""Pack clusters, in arrival order, into a VMA archive written strictly sequentially.

A push-mode QEMU backup delivers each disk's clusters in no particular order
(copy-before-write sends a cluster's old data first when the guest is about to
overwrite it).  :class:`Packer` takes them as they come, encodes each cluster
with :func:`vmafs.format.encode_cluster` (all-zero 4 KiB blocks are not
stored), fills extents with :class:`vmafs.format.ExtentPacker` and hands whole
extents to a background task that writes them to the output.  The layout is
entirely :mod:`vmafs.format`'s; nothing here knows a byte offset.

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
  Anything else is a :class:`vmafs.errors.WriterError` (``ValueError`` style:
  the archive is untouched).
- ``data=None`` means ``length`` zero bytes (NBD WRITE_ZEROES).
- Every cluster of every device must be put exactly once.  Re-sending a
  cluster with identical content (QEMU re-sends a range after an error or a
  reconnect) is acknowledged and dropped; a re-send with different content
  raises :class:`vmafs.errors.ConflictingClusterError` and stores nothing of
  that request.  Identity is checked with a 63-bit blake2b digest per cluster
  kept in a numpy array (8 bytes per 64 KiB cluster: 128 MiB per TiB of disk).
- ``put`` returns as soon as the data is encoded into the packer's buffer; it
  waits (backpressure) only while more than ``max_pending_bytes`` of finished
  extents are queued for the output.  So an NBD reply sent after ``put``
  returns means "accepted", not "on disk": durability is :meth:`finish` +
  :meth:`ArchiveOutput.commit`.
- A device named ``vmstate`` (RAM state) must be put in cluster order, as
  Proxmox's reader requires; backups of disks never have one.

Failures are sticky: once the output fails (e.g. ``ENOSPC``) or a put raised a
conflict, every later ``put``/``finish`` raises the same
:class:`vmafs.errors.WriterError` (with the original exception as cause).

The output object needs only ``write(bytes)`` (and optionally ``flush()``).
:class:`Packer` calls ``write`` first with the whole header, then once per batch
of *whole* extents (never a partial extent): this is the hook that lets
:class:`ArchiveOutput` group extents into seekable-zstd frames.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO, Protocol

from vmafs.errors import ConflictingClusterError, IncompleteArchiveError, WriterError
from vmafs.format import PROXMOX_SLOTS_PER_EXTENT

__all__ = [
    "ArchiveOutput",
    "Packer",
    "Sink",
    "ConflictingClusterError",
    "IncompleteArchiveError",
    "WriterError",
]

DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


class Sink(Protocol):
    """What :class:`Packer` writes to: sequential ``write`` calls only."""

    def write(self, data: bytes, /) -> object: ...


class Packer:
    """Accepts clusters in any order and writes a valid VMA archive sequentially.

    :param out: a :class:`Sink` (an :class:`ArchiveOutput`, an open binary file,
        a pipe).  Only ``write`` is used, always sequentially; ``flush`` is called
        by :meth:`finish` when present.
    :param devices: ``(name, size_in_bytes)`` per device; dev_ids are assigned
        1, 2, ... in this order (see :attr:`dev_ids`).  Sizes must be > 0.
    :param configs: ``(name, data)`` per config file; the name is stored as its
        basename (as Proxmox does), data at most 65535 bytes, at most 256.
    :param uuid: 16 bytes; default a random uuid4.
    :param ctime: seconds since the epoch; default now.
    :param slots_per_extent: clusters per extent, 1..59; default 58 like Proxmox.
    :param max_pending_bytes: finished extents queued for the output beyond
        which :meth:`put` waits.

    Use as ``async with packer:`` - entering queues the header and starts the
    background writer task; leaving without :meth:`finish` having succeeded
    stops the writer (the output then holds a truncated archive: abort it).
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
        raise NotImplementedError

    #: name -> dev_id
    dev_ids: dict[str, int]
    #: the header as written (vmafs.format.Header)
    header: object
    #: bytes handed to the output so far
    bytes_written: int

    async def __aenter__(self) -> Packer:
        raise NotImplementedError

    async def __aexit__(self, *exc_info: object) -> None:
        raise NotImplementedError

    async def put(
        self, dev_id: int, offset: int, data: bytes | memoryview | None, length: int | None = None
    ) -> None:
        """Accept ``length`` bytes of device ``dev_id`` at ``offset`` (see module docs).

        ``length`` defaults to ``len(data)``; it is required when ``data`` is None.
        Raises :class:`WriterError` for a bad range, :class:`ConflictingClusterError`
        for a conflicting re-send (nothing of the request is stored then).
        """
        raise NotImplementedError

    async def flush(self) -> None:
        """Wait until every finished extent has been handed to the output.

        Does not close the current partial extent and does not fsync: the
        archive is durable only after :meth:`finish` and ``commit``.
        """
        raise NotImplementedError

    def missing(self) -> dict[int, int]:
        """dev_id -> number of clusters not yet received."""
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        """True when every cluster of every device has been received."""
        raise NotImplementedError

    async def finish(self) -> None:
        """Write the last partial extent, drain the queue and flush the output.

        Raises :class:`IncompleteArchiveError` (writing nothing more) if any
        cluster is missing.  After success no more puts are accepted.
        """
        raise NotImplementedError

    def export(self, name: str):  # -> writer.nbd.Export
        """An NBD :class:`writer.nbd.Export` that feeds device ``name`` into this packer."""
        raise NotImplementedError


class ArchiveOutput:
    """The archive file: a temporary name beside the target until :meth:`commit`.

    ``ArchiveOutput("dir/NAME.vma")`` creates ``dir/.NAME.vma.XXXXXX.tmp``
    (mode 0600 via mkstemp, then chmod to 0644 minus umask); :meth:`commit`
    fsyncs it, renames it to ``dir/NAME.vma`` and fsyncs the directory;
    :meth:`abort` closes and removes it (idempotent, safe after commit).
    ``ArchiveOutput("-")`` streams to stdout: no temp file, no rename, commit
    only flushes.  Existing targets are refused unless ``overwrite=True``.

    Targets ending in ``.zst`` are written as seekable zstd
    (vmafs.source.zstd_seekable.SeekableZstdWriter) when that module exists:
    :meth:`write` receives the header and then whole extents only, and groups
    consecutive extents into frames of about ``frame_bytes`` uncompressed
    bytes so that every frame starts at an extent boundary.  ``compress``
    overrides the choice by name (``"zstd"`` or ``None``).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        compress: str | None | bool = True,
        frame_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        raise NotImplementedError

    #: final path (None for stdout)
    path: str | None
    #: temporary path while writing (None for stdout or after commit/abort)
    temp_path: str | None

    def write(self, data: bytes) -> None:
        """Append ``data`` (the header, or one or more whole extents)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Push buffered bytes to the OS (ends the current zstd frame)."""
        raise NotImplementedError

    def commit(self) -> None:
        """Finish compression, fsync, rename to the final name, fsync the directory."""
        raise NotImplementedError

    def abort(self) -> None:
        """Close and remove the temporary file; never raises for a missing file."""
        raise NotImplementedError

    def __enter__(self) -> ArchiveOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Abort unless committed (commit is always explicit)."""
        raise NotImplementedError
