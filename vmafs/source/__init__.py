"""Random-access sources: ``pread`` over the uncompressed VMA stream.

The index and the filesystem see only this protocol; which container the
stream lives in (plain file, zstd, gzip, lzop) is chosen by magic bytes,
never by file name.
"""

from __future__ import annotations

import errno
import importlib
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..errors import SourceError, StreamTruncatedError, naming_archive
from ..format import VMA_MAGIC
from .plain import PlainSource

if TYPE_CHECKING:
    import numpy as np

ProgressFn = Callable[[int, int], None]
ChunkFn = Callable[[int, memoryview], None]


class Reader(Protocol):
    """What the header and extent-header walk reads through: a source or its header_reader()."""

    path: str
    #: Length of the uncompressed VMA stream; None until a scan knows it.
    size: int | None

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the stream; short only at its end; thread-safe.

        A header reader may return less (at least 512 bytes unless at the end).
        """

    def pread_into(self, offset: int, buf: memoryview) -> int:
        """As :meth:`pread`, into *buf*; returns the count."""


class Source(Reader, Protocol):
    """What the index builder, the side index and the filesystem need from an input.

    Every container implements all of it (:class:`~vmafs.source.base.SourceBase`
    has the defaults of the members a container may have no use for), so no
    caller probes for a member.
    """

    #: The container's name, as side indexes record it ("plain", "gzip", ...).
    kind: str
    #: True for a compressed stream: reading it out of order costs decoding.
    compressed: bool
    #: True when :meth:`scan` must run (or saved state be loaded) before ``pread``.
    needs_scan: bool
    #: After a scan (or a load of saved state): where a compressed file cut
    #: short stops yielding data (a StreamTruncatedError, not raised), else None.
    #: ``size`` is then the length of the usable stream before the cut.
    truncation: StreamTruncatedError | None

    def pread_into_cached(self, offset: int, buf: memoryview) -> int:
        """As :meth:`pread_into`, from memory only: BlockingIOError when any of
        it would wait for storage (a plain archive: not all in the page cache;
        a container without such a check: always).  OSError EOPNOTSUPP when
        the file system cannot tell."""

    def fileno(self) -> int:
        """The descriptor of the archive file (the side index's identity checks use it)."""

    def header_reader(self) -> Reader:
        """A reader for the extent-header walk: the source itself, or a cheaper one.

        A cheaper one (seekable zstd: each frame decoded only as far as its
        headers) never touches the read cache; reading through it does not
        check the container's data in full.
        """

    def scan(self, on_chunk: ChunkFn, progress: ProgressFn | None = None) -> None:
        """One sequential pass over the stream, handing every byte to *on_chunk* in order.

        *on_chunk(offset, view)* must copy what it keeps: the view may be of a
        buffer that the source reuses once the call returns.  Afterwards
        ``needs_scan`` is False.  A file cut short is not an error here: the
        pass ends with the last whole block before the cut, ``size`` is the
        stream up to there and ``truncation`` says where the cut is.  A source
        read at random has no scan (SourceError).
        """

    def stream(self, on_chunk: ChunkFn, progress: ProgressFn | None = None) -> None:
        """As :meth:`scan` for a one-shot consumer: may skip what random reads need."""

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """What a later open needs to skip the scan, for the side index (after a scan)."""

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        """Adopt :meth:`checkpoint_state` output; IndexCacheError when it does not fit."""

    def close(self) -> None: ...


# (magic prefix, factory) in the order they are tried; the container modules
# add theirs with register() when they are imported.
_MAGICS: list[tuple[bytes, Callable[[str], Source]]] = [(VMA_MAGIC, PlainSource)]

#: (magic prefix, module of this package that registers it).  A container
#: module and its library (zstandard, indexed_gzip, python-lzo) are imported
#: only when a file starts with its magic: a plain archive needs none of them,
#: and they are ~35 ms of every ``vmafs mount``'s start otherwise.
CONTAINERS: list[tuple[bytes, str]] = [
    (b"\x28\xb5\x2f\xfd", "zstd"),  # zstd frame, 0xFD2FB528 little-endian
    *((bytes([0x50 | low, 0x2A, 0x4D, 0x18]), "zstd") for low in range(16)),  # skippable frame
    (b"\x1f\x8b", "gzip"),
    (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
]


def register(magic: bytes, factory: Callable[[str], Source]) -> None:
    """Let a container module claim files starting with *magic*."""
    _MAGICS.append((magic, factory))


def _factory(head: bytes) -> Callable[[str], Source] | None:
    for magic, factory in _MAGICS:
        if head.startswith(magic):
            return factory
    return None


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    return "not a regular file"


def _read_head(path: str) -> bytes:
    """The first bytes of *path*, which must be a regular file or a block device.

    vmafs reads archives at random offsets (and a compressed one twice: the
    scan, then the reads), so a pipe (``<(cat x.vma.zst)``, a FIFO) cannot
    work; it is refused here with a clear message, before anything reads from
    it (O_NONBLOCK: opening a FIFO without a writer must not hang).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SourceError(f"cannot open {path}: {os.strerror(errno.EISDIR)}")
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise SourceError(
                f"is {_kind_of(mode)}; vmafs needs a regular file or block device "
                "(it reads archives at random offsets): save the stream to a file first"
            ).name_archive(path)
        try:
            return os.pread(fd, 16, 0)
        except OSError as e:
            raise SourceError(f"cannot read {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def _import_container(head: bytes) -> None:
    for magic, module in CONTAINERS:
        if head.startswith(magic):
            importlib.import_module(f"{__name__}.{module}")  # registers its magic
            return


def import_container(path: str | os.PathLike[str]) -> None:
    """Import the container module that *path*'s first bytes call for, if any.

    :func:`open_source` does this itself; calling this first lets a caller
    choose when the import is paid (``vmafs mount``: before it starts a
    thread that competes for the interpreter).  Raises SourceError if
    *path* cannot be read.
    """
    head = _read_head(os.fspath(path))
    if _factory(head) is None:
        _import_container(head)


def open_source(path: str | os.PathLike[str]) -> Source:
    """Open *path* with the source its first bytes call for."""
    path = os.fspath(path)
    head = _read_head(path)
    factory = _factory(head)
    if factory is None:
        _import_container(head)
        factory = _factory(head)
    if factory is None:
        if not head:
            raise SourceError("the file is empty (not a VMA archive)").name_archive(path)
        raise SourceError(
            f"not a VMA archive (first bytes {head[:4].hex()}; expected VMA, zstd, gzip or lzop)"
        ).name_archive(path)
    with naming_archive(path):  # a container's errors name the file (once)
        return factory(path)
