"""Random-access sources: ``pread`` over the uncompressed VMA stream.

The index and the filesystem see only this protocol; which container the
stream lives in (plain file, zstd, gzip, lzop) is chosen by magic bytes,
never by file name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from ..errors import SourceError
from ..format import VMA_MAGIC
from .plain import PlainSource

ProgressFn = Callable[[int, int], None]


class Source(Protocol):
    """What the index builder and the filesystem need from an input."""

    path: str
    #: Length of the uncompressed VMA stream; None until a scan knows it.
    size: int | None
    #: True when :meth:`scan` must run (or saved state be loaded) before ``pread``.
    needs_scan: bool

    def scan(
        self, on_chunk: Callable[[int, memoryview], None], progress: ProgressFn | None = None
    ) -> None:
        """One sequential pass over the stream, handing every byte to *on_chunk* in order.

        *on_chunk(offset, view)* must copy what it keeps: the view may be of a
        buffer that the source reuses once the call returns.
        """

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the stream; short only at its end; thread-safe."""

    def close(self) -> None: ...


# (magic prefix, factory) in the order they are tried; filled by the
# compression modules that are importable.
_MAGICS: list[tuple[bytes, Callable[[str], Source]]] = [(VMA_MAGIC, PlainSource)]


def register(magic: bytes, factory: Callable[[str], Source]) -> None:
    """Let a container module claim files starting with *magic*."""
    _MAGICS.append((magic, factory))


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open *path* with the source its first bytes call for."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from e
    for magic, factory in _MAGICS:
        if head.startswith(magic):
            return factory(path)
    raise SourceError(
        f"{path}: not a VMA archive (first bytes {head[:4].hex()}; "
        "expected VMA, zstd, gzip or lzop)"
    )


from . import gzip as _gzip  # noqa: E402,F401  (registers the gzip magic)
from . import lzo as _lzo  # noqa: E402,F401  (registers the lzop magic)
from . import zstd as _zstd  # noqa: E402,F401  (registers the zstd magic numbers)
