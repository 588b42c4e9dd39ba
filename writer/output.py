"""Where a written archive goes: :class:`ArchiveOutput`, a plain or seekable-zstd file, or stdout.

The file itself is an :class:`vmafs.common.atomic.AtomicOutput` (a hidden
temporary file beside the target until :meth:`ArchiveOutput.commit`); this
module adds what is particular to archives: the compression the name asks
for, frames that start at extents, ``O_DIRECT`` for a plain file on a local
disk, and reading back what was written (:class:`~vmafs.writer.packer.Packer`
compares re-sent clusters with it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Callable

from vmafs.common.atomic import AtomicOutput
from vmafs.errors import WriterError
from vmafs.zstd_seekable import SeekableZstdWriter

__all__ = ["ArchiveOutput"]

log = logging.getLogger("writer.packer")

#: compressed-looking archive suffixes the writer does not produce (only ``.zst`` is)
_FOREIGN_COMPRESSION = tuple(".gz .gzip .tgz .lzo .zstd .xz .lzma .bz2 .lz4 .lz .br .z".split())


class ArchiveOutput:
    """The archive file: a temporary name beside the target until :meth:`commit`.

    ``ArchiveOutput("dir/NAME.vma")`` creates ``dir/.NAME.vma.XXXXXXXX.tmp``
    (mode 0666 minus umask); :meth:`commit` fsyncs it, moves it to
    ``dir/NAME.vma`` and fsyncs the directory; :meth:`abort` closes and
    removes it (idempotent, a no-op after commit): see
    :class:`~vmafs.common.atomic.AtomicOutput`, which also says which
    OSErrors name the target.  ``ArchiveOutput("-")`` streams to stdout: no
    temp file, no rename.  An existing target is refused
    (``FileExistsError``, both up front and atomically at commit) unless
    ``overwrite=True``.

    Targets ending in ``.zst`` are written as seekable zstd
    (:class:`vmafs.zstd_seekable.SeekableZstdWriter`).  :meth:`write`
    receives the header and then whole extents only; each write is one unit
    of the zstd writer, which groups consecutive extents into frames
    (``FRAME_TARGET``/``FRAME_LIMIT`` in zstd_seekable, shared with
    ``vmafs recompress``; ``frame_bytes`` overrides the target), so a frame
    starts at an extent boundary, or between the 4 KiB blocks of an extent
    too big for one frame.  ``compress`` overrides the choice: ``"zstd"``,
    ``None``/``False`` (plain), ``True`` (by suffix).

    :attr:`read_back` is ``read_back(offset, n) -> bytes`` for a plain archive
    file (what :class:`~vmafs.writer.packer.Packer` compares re-sent clusters
    with), None for stdout and zstd.  Plain files are written unbuffered, so
    everything :meth:`write` was given is in the file when it returns.

    ``direct``: write a plain archive file with ``O_DIRECT`` (no page cache:
    no copy into it, no dirty gigabytes for the final fsync, and a backup
    does not evict everyone else's cache).  None (default) = when the file
    lives on a local block device (``/sys/dev/block/MAJ:MIN`` exists: ext4,
    xfs, ... on a disk, LV or loop device), not on NFS/CIFS/FUSE/tmpfs, where
    O_DIRECT is slow or unsupported.  Every O_DIRECT write covers whole file
    system blocks at block offsets, from an aligned bounce buffer: extents
    are 512-byte granular, and a direct write that starts or ends inside a
    block makes ext4 serialise and zero-fill it (measured: 540 writes of
    3,801,600 bytes, one extent's size, took 22.5 s where 540 writes of
    3,801,088 took 5.0 s).  So the last partial block of what was written is
    kept (:attr:`_tail`) and written again, completed, by the next write; the
    file may end in zeros past what was written until :meth:`commit` cuts it.  If
    the device refuses a write (``EINVAL``: a file system without O_DIRECT)
    the rest is written buffered.  :attr:`direct` says whether O_DIRECT is
    (still) on.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        compress: str | None | bool = True,
        frame_bytes: int | None = None,
        direct: bool | None = None,
    ) -> None:
        target = os.fspath(target)
        if compress is True:
            lower = target.lower()
            if lower.endswith(_FOREIGN_COMPRESSION):
                # the reader would open it, but the name promises compression it does not have
                raise WriterError(
                    f"{target}: vmafs writes plain (.vma) or zstd (.vma.zst) archives only; "
                    "for another compressor write to stdout ('-') and pipe: ... | gzip > FILE"
                )
            compress = "zstd" if lower.endswith(".zst") else None
        if compress not in (None, False, "zstd"):
            raise ValueError(f"unknown compression {compress!r}")
        self.compress = compress or None
        self.overwrite = overwrite
        self.read_back: Callable[[int, int], bytes] | None = None
        self.direct = False
        self._rfd: int | None = None  # read_back's own (buffered) descriptor
        self._bounce: mmap.mmap | None = None
        #: O_DIRECT: the file system block, and the bytes written after the last
        #: whole block (in the file too, padded with zeros to a whole block)
        self._block = _DIRECT_BLOCK
        self._tail = b""
        self._zw: SeekableZstdWriter | None = None
        # Checked and created here, before any copy starts, naming the user's
        # path: otherwise (-f onto a directory) the whole backup runs only for
        # the rename to fail.
        self._file = AtomicOutput(target, overwrite=overwrite)
        self.path = self._file.path
        if self.compress == "zstd":
            kw = {} if frame_bytes is None else {"frame_target": frame_bytes}
            self._zw = SeekableZstdWriter(self._file, **kw)
        elif not self._file.stdout:
            self.read_back = self._pread
            if direct is None:
                direct = _on_local_block_device(self._file.fd)
            if direct:
                self.direct = _set_direct(self._file.fd, True)
                self._block = max(_DIRECT_BLOCK, _fs_block(self._file.fd))

    @property
    def temp_path(self) -> str | None:
        """The hidden temporary file (None for stdout, and after commit or abort)."""
        return self._file.temp_path

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (the header, or one or more whole extents); keeps no reference."""
        if self._zw is not None:
            self._zw.write(data)  # one unit, copied (see SeekableZstdWriter.unit)
        elif self.direct:
            self._write_direct(memoryview(data).cast("B"))
        else:
            self._file.write(data)

    def _write_direct(self, view: memoryview) -> None:
        """Write all of *view* with O_DIRECT while the device takes it, then without."""
        try:
            self._write_blocks(view)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._stop_direct(f"the device refused an O_DIRECT write ({e.strerror})")
            self._file.write(view)

    def _write_blocks(self, view: memoryview) -> None:
        """*view* appended as whole blocks at block offsets: the kept tail, then
        *view*, padded with zeros to the next block (the padding is written
        again by the next call, or cut by :meth:`commit`)."""
        block, tail = self._block, self._tail
        n = len(tail) + len(view)
        padded = -(-n // block) * block
        if self._bounce is None or len(self._bounce) < padded:
            self._bounce = mmap.mmap(-1, max(padded, mmap.PAGESIZE))
        buf = memoryview(self._bounce)
        buf[: len(tail)] = tail
        buf[len(tail) : n] = view
        buf[n:padded] = bytes(padded - n)
        at = self._file.size - len(tail)  # a block offset
        done = 0
        while done < padded:
            done += os.pwrite(self._file.fd, buf[done:padded], at + done)
        self._tail = bytes(buf[n - n % block : n])
        self._file.size += len(view)

    def _stop_direct(self, why: str) -> None:
        log.info("writing %s without O_DIRECT from here on: %s", self.temp_path, why)
        _set_direct(self._file.fd, False)
        self.direct = False
        self._cut_padding()

    def _cut_padding(self) -> None:
        """Make the file end where what was written ends (O_DIRECT writes pad the
        last block), with the file position there for appending writes."""
        fd = self._file.fd
        os.ftruncate(fd, self._file.size)
        os.lseek(fd, self._file.size, os.SEEK_SET)

    def _pread(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset+n) of what was written (a plain archive file)."""
        parts = []
        if self._rfd is None:  # not the write descriptor: that one may be O_DIRECT
            self._rfd = os.open(self.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        fd = self._rfd
        while n:
            chunk = os.pread(fd, n, offset)
            if not chunk:
                raise OSError(errno.EIO, f"archive is shorter than offset {offset}")
            parts.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def flush(self) -> None:
        """End the current seekable zstd frame (plain files are unbuffered)."""
        if self._zw is not None:
            self._zw.end_frame()

    def commit(self) -> None:
        """Finish compression, fsync, move to the final name, fsync the directory."""
        if self._file.committed:
            return
        if self._zw is not None:
            self._zw.close()  # the last frame and the seek table
        elif self.direct:
            self._cut_padding()
        self._close_rfd()
        self._file.commit()

    @property
    def committed(self) -> bool:
        """True once the complete archive is under its final name (or stdout has it all).

        Set by :meth:`commit` at the rename itself, so a signal handler can
        tell "the archive exists" from "it never will" at any moment.
        """
        return self._file.committed

    def _close_rfd(self) -> None:
        if self._rfd is not None:
            os.close(self._rfd)
            self._rfd = None

    def abort(self) -> None:
        """Close and remove the temporary file; never raises for a missing file."""
        self._close_rfd()
        self._file.abort()

    def __enter__(self) -> ArchiveOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Abort unless committed (commit is always explicit)."""
        if not self.committed:
            self.abort()


def _on_local_block_device(fd: int) -> bool:
    """Is the file system of *fd* on a local block device (not NFS, FUSE, tmpfs, ...)?"""
    dev = os.fstat(fd).st_dev
    return os.path.exists(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")


#: O_DIRECT writes cover whole blocks of at least this size
_DIRECT_BLOCK = 4096


def _fs_block(fd: int) -> int:
    """The block size of *fd*'s file system (0 when it does not say)."""
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return 0
    # a power of two up to 64 KiB, or nothing (some file systems report odd sizes)
    return bsize if 0 < bsize <= 65536 and bsize & (bsize - 1) == 0 else 0


def _set_direct(fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for *fd*; False if the file system refuses it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    flags = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    except OSError:
        return False
    return on
