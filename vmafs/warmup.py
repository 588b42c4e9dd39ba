"""Reading a plain archive's extent headers into the page cache while Python imports.

A command that serves an archive starts with two waits on a cold machine:
importing numpy (and pyfuse3, trio), then walking the archive's extent
headers (:func:`vmafs.index.build_index`: one read per extent with data,
each known only from the one before).  Both wait mostly for the disk, so
they can overlap: :class:`HeaderWarmer` walks the headers in a thread from
the moment the command starts, with nothing but ``os.pread`` and the
block count of each header, so the real walk finds them in the page cache.

It is a prefetch, nothing more: it checks only the magic and stops at the
first thing that does not look like an extent header (the real walk
validates everything and reports what it finds), never reads past the
file, reads what the real walk will read (a page after an extent with
data, a window over data-less extents), and stops when asked.
Compressed archives (no ``VMA\\0`` at offset 0) are left alone: their walk
is a decompression, not header reads.
"""

from __future__ import annotations

import os
import threading

from .errors import VmaError
from .format import (
    BLOCK_SIZE,
    EXTENT_HEADER_SIZE,
    HEADER_READ,
    HEADERS_READ_AHEAD,
    VMA_EXTENT_MAGIC,
    VMA_MAGIC,
    Header,
)


class HeaderWarmer:
    """``w = HeaderWarmer(path)`` starts; ``w.stop()`` stops and joins (idempotent)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.headers = 0  # extent headers read (for tests and curiosity)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="vmafs-warm-headers", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Wait until the walk ends by itself (the file's end, or not a header)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # the command's own open reports it
        try:
            self._walk(fd)
        except (OSError, VmaError):
            pass  # a prefetch: the real walk reads (and reports) the same place
        finally:
            os.close(fd)

    def _walk(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER_READ, 0)
        if head[:4] != VMA_MAGIC:
            return
        pos = Header.peek_size(head)
        want = HEADERS_READ_AHEAD
        stop = self._stop
        while pos < size and not stop.is_set():
            buf = os.pread(fd, want, pos)
            rel = 0
            while True:
                if buf[rel : rel + 4] != VMA_EXTENT_MAGIC:
                    return
                self.headers += 1
                blocks = int.from_bytes(buf[rel + 6 : rel + 8], "big")
                step = EXTENT_HEADER_SIZE + BLOCK_SIZE * blocks
                pos += step
                rel += step
                # As the real walk: a page after an extent with data, a whole
                # window while headers of data-less extents follow each other.
                want = HEADER_READ if blocks else HEADERS_READ_AHEAD
                if rel + EXTENT_HEADER_SIZE > len(buf):
                    break  # the next header is past what was read: read it there
