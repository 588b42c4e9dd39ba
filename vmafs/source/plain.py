"""An uncompressed archive: random access is plain ``os.pread``."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import SourceError


class PlainSource:
    """A plain ``.vma`` file (or block device): no scan, thread-safe preads."""

    needs_scan = False

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror}") from e
        # lseek(SEEK_END) also sizes block devices, where st_size is 0.
        try:
            self.size: int | None = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:  # a pipe (open_source refuses those before this)
            os.close(self._fd)
            self._fd = -1
            raise SourceError(
                f"{path}: cannot seek ({e.strerror}); vmafs needs a regular file or "
                "block device: save the stream to a file first"
            ) from e

    def fileno(self) -> int:
        return self._fd

    def scan(self, on_chunk: Callable[[int, memoryview], None], progress=None) -> None:
        raise NotImplementedError("a plain source needs no scan")

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size); short only at the end of the file."""
        return os.pread(self._fd, size, offset)

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """Read into *buf* without an intermediate bytes object; returns the count."""
        return os.preadv(self._fd, [buf], offset)

    def checkpoint_state(self) -> bytes:
        """Nothing: a plain archive is read where it lies.  Its side index holds
        only the offset map (:mod:`vmafs.sidecar`), which spares slow storage
        the walk over every extent header."""
        return b""

    def load_checkpoint_state(self, state: bytes) -> None:
        """Accept the (empty) state of :meth:`checkpoint_state`."""
        if state != b"":
            raise ValueError("a plain archive has no checkpoints")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
