"""The read-only FUSE filesystem that shows one VMA archive as a directory.

Nothing here knows how the process was started or how the mount is made
(that is :mod:`vmafs.mount`); nothing here knows the archive layout (that
is :class:`vmafs.archive.Archive`).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, FUSEError, InodeT, StatvfsData

from .errors import MissingClusterError, VmaError
from .index import PACKED_LAYOUT
from .lease import hold_archive_size
from .names import VOLUMES_DIR, Entry, drive_dir_names, safe_entry_names, volume_paths

log = logging.getLogger(__name__)

FILE_MODE = stat.S_IFREG | 0o400  # backups hold secrets: owner read only
DIR_MODE = stat.S_IFDIR | 0o500
FIRST_FILE_INODE = pyfuse3.ROOT_INODE + 1
# Nothing in an archive ever changes: let the kernel cache names and
# attributes for as long as it likes (a day).
CACHE_TIMEOUT = 86400.0

# --- how reads are served (decided by measurement) -----------------------------
#
# Measured 2026-11-25 on the dev VM (2 vCPUs, Debian 12, libfuse 3.14, pyfuse3
# 3.5.0, trio 0.35): `dd of=/dev/null` over a 2 GiB incompressible disk in a
# plain .vma built with ExtentPacker, fresh mount per run (empty FUSE page
# cache), MB/s, ranges over 2-5 runs (this VM is noisy: first-touch of page
# cache memory is expensive here):
#
#   archive hot in page cache     bs=1M        bs=4k      requests the fs sees
#   buffered, inline              163-776      433-664    128 KiB (readahead)
#   buffered, worker threads      160-246      294-343    128 KiB
#   direct_io, inline             1900-2100    29-30      exactly the caller's size
#   direct_io, worker threads     1500-1600    8-9
#   archive cold (drop_caches), 1 GiB at bs=1M: buffered inline 184-266,
#   threads 155-201; direct_io inline 360-736, threads 529-616.
#   two readers at once, cold, 2 x 512 MiB: buffered inline 3.2-12.3 s,
#   threads 9.1-17.0 s; direct_io inline 4.8-6.3 s, threads 5.1-13.3 s.
#   compressed, 512 MiB disk (~4:1), bs=1M, side index present: .vma.zst
#   buffered inline 52-86, threads 62-129, direct_io inline 182, threads 147;
#   .vma.gz buffered inline 56, threads 57, direct_io inline 112, threads 89.
#   Archive.readinto alone (2026-11-26, after its plain-int fast paths):
#   ~25 us per 128 KiB (mostly the copy), ~3 us per 4 KiB; VmaFS.read adds
#   ~2 us.  A pyfuse3/trio round trip is ~100 us, so the fs is bound by the
#   number of requests, not by this code.
#
# Buffered: the handler is a small part of a buffered 2 GiB run, the rest is
# FUSE round trips of 128 KiB and kernel page-cache work (vmafs.mount raises
# the mount's readahead to 1024 KiB, which makes the requests bigger); direct_io's 1 MiB
# requests are 3-5x faster for big sequential reads but every small read
# becomes a round trip (30 MB/s at 4 KiB), nothing is cached between opens,
# and MAP_SHARED mmap fails.  Buffered is what every consumer copes with
# (loop devices issuing 4 KiB metadata reads, mmap, file(1), repeated reads),
# so it is the default, with FOPEN_KEEP_CACHE because the content never
# changes; `-o direct_io` is there for bulk copies (qemu-img convert, dd
# bs=1M and the like; a loop device over a direct_io file works too).  A
# single bulk reader gets the same on the default mount by opening with
# O_DIRECT (qemu-img convert -T none): the kernel reads such opens around the
# page cache, so open() leaves them buffered-mode files (FOPEN_DIRECT_IO would
# add nothing measurable and take away shared mmap; docs/mount.md, "One-off
# copies").
#
# Threads: handing a read to trio.to_thread costs more than the pread it
# wraps when the data is in the page cache, and never won clearly here, not
# cold, not with two readers (virtio readahead keeps single preads short),
# not on compressed sources (within the noise).  Reads run inline; `-o
# threads` exists for storage where a single read really blocks for long.
#
# Since 2026-12-07 a plain archive's disk reads go out as pieces of the archive
# file that libfuse splices (READ_SEGMENTS_SUPPORTED, SplicePipe): no bytearray
# and one copy fewer per request; docs/mount.md, "Spliced replies".
DEFAULT_DIRECT_IO = False
DEFAULT_THREADED = False

#: Whether this pyfuse3 passes lseek(SEEK_DATA/SEEK_HOLE) to the filesystem.
#: Stock pyfuse3 (3.5) has no such handler, so the kernel sees every disk as
#: all data and `qemu-img convert` reads the holes too; scripts/setup builds
#: pyfuse3 with contrib/pyfuse3/lseek.patch, which adds it.
SEEK_HOLE_SUPPORTED: bool = hasattr(pyfuse3.Operations, "lseek")

#: Whether this pyfuse3 lets a read answer with (fd, offset, length) pieces
#: that libfuse splices from the archive into the kernel (contrib/pyfuse3/
#: read-segments.patch).  Stock pyfuse3 needs the bytes: read into a
#: bytearray in Python, then copied again into /dev/fuse.
READ_SEGMENTS_SUPPORTED: bool = bool(getattr(pyfuse3, "READ_SEGMENTS", False))

#: Whether this pyfuse3 answers reads from a block map in C, with no Python
#: call (``pyfuse3.set_read_map``, contrib/pyfuse3/read-maps.patch).  VmaFS
#: hands it a plain archive's offset map while the read lease holds the
#: archive's size: a read of whole stored clusters then costs pyfuse3's loop
#: and libfuse, not this module (docs/mount.md, "Reads answered in C").
READ_MAPS_SUPPORTED: bool = bool(getattr(pyfuse3, "READ_MAPS", False))


_PAGE = os.sysconf("SC_PAGESIZE")
_MAX_PAGES = 256  # the kernel's largest request (FUSE_MAX_MAX_PAGES), libfuse's default
#: Pieces a reply of the largest request may have and still be spliced: the
#: request size is capped this many pages below the pipe (libfuse counts one
#: page per piece plus two besides the data).
_SPLICE_PIECES = 13


@dataclass(frozen=True)
class SplicePipe:
    """What libfuse's pipe allows, for replies made of archive pieces.

    libfuse splices a reply only when the whole of it fits one pipe, sized
    by its own estimate: ``page * (pieces + 2) + 16 + length``; otherwise it
    copies the pieces into a fresh malloc'ed buffer, which for large replies
    costs more than the plain bytes path (measured: 1.7x the daemon CPU of
    bytes for ``dd bs=1M``, while splicing took 0.7x).  A pipe grows past
    /proc/sys/fs/pipe-max-size (1 MiB) only with CAP_SYS_RESOURCE, and a
    1 MiB request never fits 1 MiB, so without it requests are capped at
    *max_pages* (960 KiB by default; 0: no cap, libfuse's 1 MiB).
    *pipe_bytes*: the pipe's limit, None when it can grow as needed.
    """

    max_pages: int
    pipe_bytes: int | None

    def max_pieces(self) -> int:
        """Pieces a reply of the largest request may have and still splice."""
        return _SPLICE_PIECES if self.pipe_bytes is not None else _MAX_PAGES

    def fits(self, length: int, pieces: int) -> bool:
        """Whether a reply of *length* bytes in *pieces* is worth answering as
        pieces: small ones (libfuse's small copy is cheap) or ones that splice."""
        if length < 2 * _PAGE or self.pipe_bytes is None:
            return True
        return _PAGE * (pieces + 2) + 16 + length <= self.pipe_bytes

    @classmethod
    def probe(cls) -> SplicePipe | None:
        """The limits of this process; None when a large reply can never splice
        (no /proc, or a pipe-max-size too small for even 128 KiB requests)."""
        try:
            with open("/proc/sys/fs/pipe-max-size") as f:
                pipe_bytes = int(f.read())
            with open("/proc/self/status") as f:
                cap_eff = next(int(x.split()[1], 16) for x in f if x.startswith("CapEff:"))
        except (OSError, ValueError, StopIteration):
            return None
        if cap_eff >> 24 & 1:  # CAP_SYS_RESOURCE: libfuse grows its pipe as needed
            return cls(0, None)
        pages = pipe_bytes // _PAGE - _SPLICE_PIECES - 3
        if pages >= _MAX_PAGES:
            return cls(0, pipe_bytes)
        if pages < 32:
            return None
        return cls(pages, pipe_bytes)


class _ErrorLog:
    """Log failed reads, at most *burst* lines per *window* seconds.

    A reader walking through a damaged region (``qemu-img convert`` of an
    incomplete archive) fails thousands of reads a second; the log gets the
    first ones in full and then one line saying how many were left out.
    """

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self._start = -window
        self._count = 0
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                log.warning(
                    "%d more failed reads not logged in the last %.0f s",
                    self._suppressed,
                    now - self._start,
                )
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.log(level, msg, *args)
        else:
            self._suppressed += 1


def _guard(handler: Callable) -> Callable:
    """Let only FUSEError leave a handler: anything else becomes EIO plus a log line.

    An exception escaping a pyfuse3 handler ends the main loop, i.e. the
    whole mount; a damaged archive must cost one failed read, not the fs.
    """

    @functools.wraps(handler)
    async def wrapper(self, *args):
        try:
            return await handler(self, *args)
        except FUSEError:
            raise
        except MissingClusterError as e:
            self._error_log(logging.WARNING, "%s: %s", self._describe(handler.__name__, args), e)
            raise FUSEError(errno.EIO) from None
        except (VmaError, OSError) as e:
            self._error_log(logging.ERROR, "%s: %s", self._describe(handler.__name__, args), e)
            raise FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s: internal error (answered EIO)", handler.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


def _read_only(*_args) -> None:
    raise FUSEError(errno.EROFS)


@dataclass
class _Dir:
    """A directory: its children by name (in readdir order) and, for a disk's
    volume directory, the scan that fills it on first use."""

    children: dict[bytes, InodeT] = field(default_factory=dict)
    load: Callable[[], None] | None = None


class VmaFS(pyfuse3.Operations):
    """One archive as a read-only directory of files, plus its volumes.

    Holds: the opened :class:`~vmafs.archive.Archive` (not owned: the
    caller closes it after the main loop ends) and the table of
    :class:`~vmafs.names.Entry` from :func:`~vmafs.names.safe_entry_names`.
    Inode numbers are fixed up front: ``ROOT_INODE`` is the directory,
    entries follow in ``safe_entry_names`` order, then ``volumes/`` and
    one directory per disk under it (:func:`~vmafs.names.drive_dir_names`).
    A disk's directory is filled the first time it is looked into: its
    volumes are scanned then (:func:`vmafs.volumes.scan_drive`, a few
    small reads), so a mount is ready as fast as without them; the volume
    files and VG directories get the next free inode numbers and keep
    them.  ``forget`` needs no bookkeeping and file handles are the inode
    numbers.  A disk whose layout is damaged shows an empty directory and
    logs the error once.

    Attributes: sizes are exact; ``st_blocks`` counts the bytes the archive
    stores (``du`` shows the backed-up data, holes cost nothing); all times
    are the archive's ctime; owner is *uid*/*gid*; files 0400, directory
    0500.  The mount must use ``default_permissions`` (the kernel checks
    those modes; mandatory with ``allow_other``) and ``ro``; write requests
    that still arrive are answered EROFS.

    Reads: holes and zero blocks are filled in memory, stored blocks come
    from the archive.  A cluster an incomplete archive lacks answers EIO
    (logged as a warning); any other archive or I/O error answers EIO with
    an error log line; the filesystem keeps serving everything else.  The
    handlers keep no mutable state, so concurrent readers are fine; with
    *threaded* each disk read runs in a trio worker thread (Archive reads
    are thread-safe), otherwise inline in the event loop.  *direct_io*
    chooses FOPEN_DIRECT_IO for disk files instead of the page cache with
    FOPEN_KEEP_CACHE (see the measurement above).  With *read_segments*
    (default: when pyfuse3 has them) disk reads of a plain archive return
    :meth:`~vmafs.archive.Archive.segments` and libfuse moves the bytes.
    """

    def __init__(
        self,
        archive,
        *,
        uid: int | None = None,
        gid: int | None = None,
        direct_io: bool = DEFAULT_DIRECT_IO,
        threaded: bool = DEFAULT_THREADED,
        read_segments: bool = READ_SEGMENTS_SUPPORTED,
        read_maps: bool = READ_MAPS_SUPPORTED,
    ) -> None:
        super().__init__()
        self.archive = archive
        self._error_log = _ErrorLog()
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.direct_io = direct_io
        self.threaded = threaded
        # Disk reads of a plain archive answered as pieces of the archive file
        # (Archive.segments): libfuse reads or splices them, no bytes in Python.
        # A worker thread would have nothing left to do, so -o threads keeps bytes.
        self._pipe = SplicePipe.probe() if read_segments and not threaded else None
        self._segments = self._pipe is not None and archive.fd is not None
        if self._segments:
            self.max_pages = self._pipe.max_pages  # read by pyfuse3 at FUSE_INIT
        #: answer whole-cluster reads in pyfuse3 (C) while the lease holds (hold_size)
        self._maps = self._segments and read_maps
        self.entries: dict[InodeT, Entry] = {}
        #: Volume files: inode -> VolumeReader (vmafs.volumes), added as disks are scanned.
        self.volumes: dict[InodeT, object] = {}
        root = _Dir()
        self.dirs: dict[InodeT, _Dir] = {InodeT(pyfuse3.ROOT_INODE): root}
        for i, entry in enumerate(safe_entry_names(archive).values()):
            inode = InodeT(FIRST_FILE_INODE + i)
            self.entries[inode] = entry
            root.children[os.fsencode(entry.name)] = inode
        self._next_inode = FIRST_FILE_INODE + len(self.entries)
        drives = drive_dir_names(archive)
        if drives:
            top = _Dir()
            root.children[os.fsencode(VOLUMES_DIR)] = self._add_dir(top)
            for dev_id, name in drives.items():
                d = _Dir()
                inode = self._add_dir(d)
                d.load = functools.partial(self._load_drive, inode, dev_id)
                top.children[os.fsencode(name)] = inode
        self._time_ns = archive.header.ctime * 1_000_000_000
        self._attrs = {inode: self._make_attr(inode) for inode in self._all_inodes()}

    def background_tasks(self) -> list[Callable[[], Awaitable[None]]]:
        """Tasks for the main loop beside the handlers: with spliced reads, the
        archive's read lease (:func:`vmafs.lease.hold_archive_size`), which
        spares each read a system call and lets pyfuse3 answer reads itself
        (:meth:`hold_size`)."""
        if not self._segments:
            return []
        return [functools.partial(hold_archive_size, self.archive, self.hold_size)]

    @property
    def worker_tasks(self) -> int:
        """pyfuse3 worker tasks to run (``pyfuse3.main(1, worker_tasks)``).

        Handlers that never wait (every read inline, the default) gain
        nothing from more than one: each runs to its end before the loop
        reads the next request, and a second worker only adds a hand-off of
        pyfuse3's read lock, a trio round per request (docs/mount.md, "Reads
        answered in C").  With *threaded* reads a handler waits for its
        thread, and the other workers keep serving meanwhile.
        """
        return 99 if self.threaded else 1

    def hold_size(self, size: int) -> None:
        """The archive stays at least *size* bytes long until the next call
        (0: no promise any more); see :meth:`Archive.hold_size
        <vmafs.archive.Archive.hold_size>`.

        While it is held, and this pyfuse3 has read maps, every disk's offset
        map is handed to pyfuse3 (``set_read_map``): a read whose clusters are
        all stored whole, below *size* in the archive, is answered in C from
        the archive file; the rest still comes to :meth:`read`.  The maps are
        withdrawn before the promise is.
        """
        if not size:
            if self._maps:
                pyfuse3.clear_read_maps()
            self.archive.hold_size(0)
            return
        self.archive.hold_size(size)
        if not self._maps:
            return
        pieces = self._pipe.max_pieces()
        for inode, entry in self.entries.items():
            if entry.dev_id is None:
                continue
            packed = self.archive.index.maps[entry.dev_id].packed
            try:
                pyfuse3.set_read_map(
                    FileHandleT(inode), self.archive.fd, packed, entry.size, size,
                    **PACKED_LAYOUT, max_pieces=pieces,
                )  # fmt: skip
            except (ValueError, BufferError) as e:  # a map numpy laid out otherwise
                log.warning("%s: every read goes through Python: %s", entry.name, e)

    @property
    def by_name(self) -> dict[bytes, InodeT]:
        """The root directory's names (archive files and ``volumes``)."""
        return self.dirs[InodeT(pyfuse3.ROOT_INODE)].children

    def _new_inode(self) -> InodeT:
        inode = InodeT(self._next_inode)
        self._next_inode += 1
        return inode

    def _add_dir(self, d: _Dir) -> InodeT:
        inode = self._new_inode()
        self.dirs[inode] = d
        return inode

    def _load_drive(self, inode: InodeT, dev_id: int) -> None:
        """Scan disk *dev_id* and fill its volume directory *inode* (once)."""
        from .volumes import VolumeReader, scan_drive  # noqa: PLC0415  (only when looked at)

        d = self.dirs[inode]
        d.load = None
        try:
            volumes = scan_drive(self.archive, dev_id)
            readers = [(v, VolumeReader(self.archive, v)) for v in volumes if v.readable]
        except (VmaError, OSError) as e:
            log.error("volumes of %s not shown: %s", self.archive.header.devices[dev_id].name, e)
            return
        paths = volume_paths(volumes)
        for volume, reader in readers:
            *dirs, leaf = paths[volume.name]
            parent = d
            for part in dirs:
                key = os.fsencode(part)
                if key not in parent.children:
                    parent.children[key] = self._add_dir(_Dir())
                    self._attrs[parent.children[key]] = self._make_attr(parent.children[key])
                parent = self.dirs[parent.children[key]]
            file_inode = self._new_inode()
            self.volumes[file_inode] = reader
            parent.children[os.fsencode(leaf)] = file_inode
            self._attrs[file_inode] = self._make_attr(file_inode)

    def _dir(self, inode: InodeT) -> _Dir:
        d = self.dirs.get(inode)
        if d is None:
            raise FUSEError(errno.ENOTDIR if inode in self._attrs else errno.ENOENT)
        if d.load is not None:
            d.load()
        return d

    def _describe(self, op: str, args: tuple) -> str:
        """``read disk-x.raw [offset, +size)`` for log lines (names as shown, escaped)."""
        entry = self.entries.get(args[0]) if args else None
        name = entry.name if entry is not None else None
        if entry is None and args and args[0] in self.volumes:
            name = self.volumes[args[0]].volume.name
        if name is None:
            return op
        where = f" [{args[1]}, +{args[2]})" if op == "read" else ""
        return f"{op} {name!r}{where}"

    # -- attributes --

    def _all_inodes(self) -> list[InodeT]:
        return [*self.dirs, *self.entries, *self.volumes]

    def _make_attr(self, inode: InodeT) -> EntryAttributes:
        attr = EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = 65536
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._time_ns
        if inode in self.dirs:
            attr.st_mode = DIR_MODE
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_blocks = 0
            return attr
        attr.st_mode = FILE_MODE
        attr.st_nlink = 1
        if inode in self.volumes:
            reader = self.volumes[inode]
            attr.st_size = reader.size
            attr.st_blocks = reader.stored_bytes() // 512
            return attr
        entry = self.entries[inode]
        attr.st_size = entry.size
        if entry.dev_id is not None:
            attr.st_blocks = self.archive.stored_bytes(entry.dev_id) // 512
        else:
            attr.st_blocks = (entry.size + 511) // 512
        return attr

    def _attr(self, inode: InodeT) -> EntryAttributes:
        try:
            return self._attrs[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    @_guard
    async def lookup(self, parent_inode: InodeT, name: bytes, ctx=None) -> EntryAttributes:
        d = self._dir(parent_inode)
        if name == b".":
            return self._attrs[parent_inode]
        if name == b"..":  # the kernel answers these itself; the root is a safe answer
            return self._attrs[pyfuse3.ROOT_INODE]
        inode = d.children.get(name)
        if inode is None:
            raise FUSEError(errno.ENOENT)
        return self._attrs[inode]

    @_guard
    async def getattr(self, inode: InodeT, ctx=None) -> EntryAttributes:
        return self._attr(inode)

    # -- the directory --

    @_guard
    async def opendir(self, inode: InodeT, ctx) -> FileHandleT:
        self._dir(inode)
        return FileHandleT(inode)

    @_guard
    async def readdir(self, fh: FileHandleT, start_id: int, token) -> None:
        # start_id = number of entries already returned; a loaded directory never changes.
        items = list(self._dir(InodeT(fh)).children.items())
        for i in range(start_id, len(items)):
            name, inode = items[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs[inode], i + 1):
                break

    async def releasedir(self, fh: FileHandleT) -> None:
        pass

    # -- files --

    @_guard
    async def open(self, inode: InodeT, flags: int, ctx) -> FileInfo:
        if inode in self.dirs:
            raise FUSEError(errno.EISDIR)
        self._attr(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise FUSEError(errno.EROFS)
        is_device = inode in self.volumes or self.entries[inode].dev_id is not None
        # Configs are tiny: always through the page cache.  The content of
        # every file is immutable, so cached pages stay valid across opens.
        return FileInfo(
            fh=FileHandleT(inode),
            direct_io=self.direct_io and is_device,
            keep_cache=True,
        )

    @_guard
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes | list:
        entry = self.entries.get(InodeT(fh))
        if entry is None:
            return await self._read_volume(fh, off, size)
        if entry.data is not None:
            return entry.data[off : off + size]
        if self._segments:
            pieces = self.archive.segments(entry.dev_id, off, size)
            if len(pieces) == 1 and type(pieces[0]) is not tuple:
                # Zeros alone go out in one write (spliced, they would be copied twice).
                return pieces[0]
            if self._pipe.fits(size, len(pieces)):
                return pieces
            # Too many pieces to splice (blocks and holes interleaved): the bytes path.
        n = max(0, min(size, entry.size - off))
        if n == 0:
            return b""
        buf = bytearray(n)
        if self.threaded:
            got = await trio.to_thread.run_sync(self.archive.readinto, entry.dev_id, off, buf)
        else:
            got = self.archive.readinto(entry.dev_id, off, buf)
        return buf if got == n else buf[:got]

    async def _read_volume(self, fh: FileHandleT, off: int, size: int) -> bytes:
        reader = self.volumes.get(InodeT(fh))
        if reader is None:
            raise FUSEError(errno.EBADF)
        n = max(0, min(size, reader.size - off))
        if n == 0:
            return b""
        buf = bytearray(n)
        if self.threaded:
            got = await trio.to_thread.run_sync(reader.readinto, off, buf)
        else:
            got = reader.readinto(off, buf)
        return buf if got == n else buf[:got]

    @_guard
    async def lseek(self, fh: FileHandleT, off: int, whence: int) -> int:
        # SEEK_DATA/SEEK_HOLE from the offset map, so `qemu-img convert`,
        # `cp --sparse` and the like skip the holes instead of reading them
        # (the kernel sends nothing else).  Called only by a pyfuse3 that has
        # the handler (see SEEK_HOLE_SUPPORTED).
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FUSEError(errno.EINVAL)
        entry = self.entries.get(InodeT(fh))
        if entry is None:
            return self._lseek_volume(fh, off, whence)
        if not 0 <= off < entry.size:
            raise FUSEError(errno.ENXIO)
        if entry.dev_id is None:
            return off if whence == os.SEEK_DATA else entry.size
        if whence == os.SEEK_HOLE:
            return self.archive.next_hole(entry.dev_id, off)
        found = self.archive.next_data(entry.dev_id, off)
        if found is None:
            raise FUSEError(errno.ENXIO)
        return found

    def _lseek_volume(self, fh: FileHandleT, off: int, whence: int) -> int:
        reader = self.volumes.get(InodeT(fh))
        if reader is None:
            raise FUSEError(errno.EBADF)
        if not 0 <= off < reader.size:
            raise FUSEError(errno.ENXIO)
        if whence == os.SEEK_HOLE:
            return reader.next_hole(off)
        found = reader.next_data(off)
        if found is None:
            raise FUSEError(errno.ENXIO)
        return found

    async def release(self, fh: FileHandleT) -> None:
        pass

    async def flush(self, fh: FileHandleT) -> None:
        pass

    # -- the filesystem --

    @_guard
    async def statfs(self, ctx) -> StatvfsData:
        st = StatvfsData()
        st.f_bsize = 65536
        st.f_frsize = 512
        # The archive's files only: a volume file shows bytes of a disk file again.
        st.f_blocks = sum(self._attrs[i].st_blocks for i in self.entries)
        st.f_bfree = st.f_bavail = 0
        st.f_files = len(self._attrs)
        st.f_ffree = st.f_favail = 0
        st.f_namemax = 255
        return st

    async def getxattr(self, inode: InodeT, name: bytes, ctx) -> bytes:
        raise FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: InodeT, ctx) -> list[bytes]:
        return []

    # Everything that would change something.  The mount is `ro`, so the
    # kernel answers most of these itself; these are the second line.
    async def setattr(self, inode, attr, fields, fh, ctx):
        _read_only()

    async def write(self, fh, off, buf):
        _read_only()

    async def create(self, parent_inode, name, mode, flags, ctx):
        _read_only()

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        _read_only()

    async def mkdir(self, parent_inode, name, mode, ctx):
        _read_only()

    async def unlink(self, parent_inode, name, ctx):
        _read_only()

    async def rmdir(self, parent_inode, name, ctx):
        _read_only()

    async def symlink(self, parent_inode, name, target, ctx):
        _read_only()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        _read_only()

    async def link(self, inode, new_parent_inode, new_name, ctx):
        _read_only()

    async def setxattr(self, inode, name, value, ctx):
        _read_only()

    async def removexattr(self, inode, name, ctx):
        _read_only()

    async def fsync(self, fh, datasync):
        pass

    async def fsyncdir(self, fh, datasync):
        pass
