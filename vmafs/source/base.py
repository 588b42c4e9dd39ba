"""What every source shares: the defaults of the Source protocol and the block cache.

:class:`SourceBase` gives each member of :class:`~vmafs.source.Source` that
a container may have no use for a default that says so (no scan, no saved
state, no cheaper header walk).  :class:`BlockSource` is the read side of
every compressed container: a stream cut into independently decodable
blocks (zstd frames or pages, gzip spans between seek points, lzop blocks),
an LRU cache of decoded blocks, and the one ``pread`` loop over them.  A
container says where the block holding a byte lies and how to decode it.

How an error names the archive file is decided here too, once: the sources'
messages never contain the path; :func:`~vmafs.errors.naming_archive`
around a scan, and around a read, puts it in front (once).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ..errors import CorruptStreamError, SourceError, StreamTruncatedError, VmaError, naming_archive

ProgressFn = Callable[[int, int], None]
ChunkFn = Callable[[int, memoryview], None]

_TRAILING_READ = 4 << 20


def open_fd(path: str) -> int:
    """A read-only descriptor of *path*; SourceError (naming it) if it cannot be opened."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from e


class ReaderBase:
    """``pread_into`` for a reader that has only ``pread`` (see :class:`~vmafs.source.Reader`)."""

    path: str
    size: int | None

    def pread(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """Read into *buf*; returns the count (short only at the end).  Here: a copy of pread."""
        data = self.pread(offset, len(buf))
        buf[: len(data)] = data
        return len(data)


class SourceBase(ReaderBase):
    """Defaults for the members of :class:`~vmafs.source.Source` a container may lack.

    Subclasses set ``path``, ``size``, ``kind`` and ``_fd`` and implement
    ``pread``, ``checkpoint_state`` and ``load_checkpoint_state`` (what the
    side index keeps: for a plain archive, nothing); the rest is optional.
    """

    #: The container's name, as side indexes record it.
    kind: str
    #: True when the stream is compressed: reading it out of order costs decoding.
    compressed = True
    needs_scan = False
    #: Set by a scan that found the compressed file cut short: the stream
    #: (``size`` bytes) ends where its usable data does, and this says where
    #: that was.  The index then marks the archive incomplete.  None: whole.
    truncation: StreamTruncatedError | None = None
    _fd = -1

    def fileno(self) -> int:
        """The descriptor of the archive file (its identity for the side index)."""
        return self._fd

    def pread_into_cached(self, offset: int, buf: memoryview) -> int:
        """Never sure to be quick: BlockingIOError (a container's decoding is work)."""
        raise BlockingIOError(errno.EAGAIN, "not a plain archive: reads may wait")

    def header_reader(self) -> ReaderBase:
        """What the extent-header walk should read through: the source itself, by default."""
        return self

    def scan(self, on_chunk: ChunkFn, progress: ProgressFn | None = None) -> None:
        raise SourceError(f"a {self.kind} source is read at random; it has no scan")

    def stream(self, on_chunk: ChunkFn, progress: ProgressFn | None = None) -> None:
        """Every byte to *on_chunk* once, in order, keeping nothing for random reads.

        For one-shot consumers (``vmafs recompress``).  By default the scan,
        which a container overrides when a bare pass is cheaper.
        """
        self.scan(on_chunk, progress)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BlockCache:
    """An LRU cache of decoded blocks, bounded in bytes and in count; thread-safe.

    It always keeps the newest block, however big: the read that decoded it
    is about to use it.
    """

    def __init__(self, *, max_bytes: int | None = None, max_blocks: int | None = None) -> None:
        self._max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self._max_blocks = max_blocks if max_blocks is not None else 1 << 62
        self._blocks: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> bytes | None:
        """The block under *key*, now the most recently used; None if not cached."""
        with self._lock:
            data = self._blocks.get(key)
            if data is not None:
                self._blocks.move_to_end(key)
            return data

    def peek(self, key: Hashable) -> bytes | None:
        """The block under *key* without counting it as used (for one-off walkers)."""
        with self._lock:
            return self._blocks.get(key)

    def put(self, key: Hashable, data: bytes) -> None:
        """Keep *data* under *key* (unless a racing reader put it first), evicting the oldest."""
        with self._lock:
            if key in self._blocks:
                return
            self._blocks[key] = data
            self._bytes += len(data)
            blocks = self._blocks
            while len(blocks) > 1 and (
                self._bytes > self._max_bytes or len(blocks) > self._max_blocks
            ):
                _, old = blocks.popitem(last=False)
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)


class BlockSource(SourceBase):
    """A compressed stream read in decoded blocks through one :class:`BlockCache`.

    A subclass implements :meth:`_locate` and :meth:`_decode` and keeps
    ``needs_scan`` True until blocks can be located.  ``pread`` is
    thread-safe when ``_decode`` is; it decodes outside the cache's lock.
    """

    def __init__(self, path: str, cache: BlockCache) -> None:
        self.path = path
        self.size: int | None = None
        self.needs_scan = True
        self._fd = open_fd(path)
        self.compressed_size = os.fstat(self._fd).st_size
        self._cache = cache
        #: (start, bytes) of the block the last read ended in: the next read of a
        #: sequential reader (FUSE asks 128 KiB at a time) usually lies in it too.
        self._last: tuple[int, bytes] = (0, b"")

    def _locate(self, pos: int) -> tuple[Hashable, int]:
        """(cache key, stream offset where it starts) of the block holding byte *pos*."""
        raise NotImplementedError

    def _decode(self, key: Hashable, start: int) -> bytes:
        """The decoded bytes of block *key*, which starts at stream offset *start*."""
        raise NotImplementedError

    def _forget_blocks(self) -> None:
        """Drop every decoded block (the block layout changed, or the source closes)."""
        self._last = (0, b"")
        self._cache.clear()

    def scan(self, on_chunk: ChunkFn, progress: ProgressFn | None = None) -> None:
        """Decode the whole stream once, in order, handing it to *on_chunk*.

        Afterwards ``needs_scan`` is False and ``size`` is known.  A VmaError
        raised on the way (by the stream or by *on_chunk*) names the file once.
        """
        with naming_archive(self.path):
            self._scan(on_chunk, progress)

    def _scan(self, on_chunk: ChunkFn, progress: ProgressFn | None) -> None:
        raise NotImplementedError

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the decoded stream; short only at its end.

        A VmaError (corrupt data, or a file changed since its scan) names the
        file in front of its message (as :func:`~vmafs.errors.naming_archive`
        with ``in_message=False``; a plain try here, since a read that hits
        the cache costs a few microseconds and a context manager as much again).
        """
        if offset < 0:
            raise ValueError("negative offset")
        try:
            if self.needs_scan:
                raise SourceError(f"{self.kind} stream read before its scan")
            end = min(offset + size, self.size)
            parts = []
            pos = offset
            while pos < end:
                start, data = self._last
                if not start <= pos < start + len(data):
                    key, start = self._locate(pos)
                    data = self._cache.get(key)
                    if data is None:
                        data = self._decode(key, start)
                        self._cache.put(key, data)
                    self._last = (start, data)
                a = pos - start
                b = min(len(data), end - start)
                parts.append(data[a:b] if (a or b != len(data)) else data)
                pos = start + b
        except VmaError as e:
            e.name_archive(self.path, in_message=False)
            raise
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # b"" at or past the end

    def close(self) -> None:
        self._forget_blocks()
        super().close()


def check_trailing(fd: int, at: int, end: int, *, after: str, container: str, uoff: int) -> None:
    """Bytes [at, end) of the file follow the stream's *after*: zeros are tolerated, else an error.

    As ``gzip -d`` and ``lzop -d`` do, padding with zeros (tape blocks) is
    accepted; anything else is reported with where it starts and where its
    first non-zero byte is (*uoff*: the stream length, as the error's offset).
    """
    pos = at
    while pos < end:
        data = os.pread(fd, min(_TRAILING_READ, end - pos), pos)
        if not data:
            return
        if data.count(0) != len(data):
            bad = pos + len(data) - len(data.lstrip(b"\0"))
            raise CorruptStreamError(
                f"{end - at} bytes after {after} are not {container} (they start at "
                f"compressed offset {at}, first non-zero byte at {bad})",
                offset=uoff,
            )
        pos += len(data)
