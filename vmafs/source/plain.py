"""An uncompressed archive: random access is plain ``os.pread``."""

from __future__ import annotations

import os

from ..errors import SourceError
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
