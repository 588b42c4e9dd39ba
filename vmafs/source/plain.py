"""An uncompressed archive: random access is plain ``os.pread``."""

from __future__ import annotations

import errno
import os

import numpy as np

from ..errors import IndexCacheError, SourceError
from .base import SourceBase, open_fd


class PlainSource(SourceBase):
    """A plain ``.vma`` file (or block device): no scan, thread-safe preads."""

    kind = "plain"
    compressed = False

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = open_fd(path)
        # lseek(SEEK_END) also sizes block devices, where st_size is 0.
        try:
            self.size: int | None = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:  # a pipe (open_source refuses those before this)
            self.close()
            raise SourceError(
                f"cannot seek ({e.strerror}); vmafs needs a regular file or "
                "block device: save the stream to a file first"
            ).name_archive(path) from e

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size); short only at the end of the file."""
        return os.pread(self._fd, size, offset)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """Read into *buf* without an intermediate bytes object; returns the count."""
        return os.preadv(self._fd, [buf], offset)

    def pread_into_cached(self, offset: int, buf: memoryview) -> int:
        """As :meth:`pread_into` when all of it is in the page cache (preadv2
        RWF_NOWAIT), else BlockingIOError."""
        got = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        if got < len(buf) and offset + got < self.size:
            raise BlockingIOError(errno.EAGAIN, "partly in the page cache")
        return got

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Nothing: a plain archive is read where it lies.  Its side index holds
        only the offset map (:mod:`vmafs.sidecar`), which spares storage that
        seeks the walk over every extent header."""
        return {}

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        """Accept the (empty) state of :meth:`checkpoint_state`."""
        if state:
            raise IndexCacheError("a plain archive's side index holds no checkpoints")
