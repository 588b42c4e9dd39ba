"""The zstd seekable format: independent frames plus a seek table.

Layout (zstd's contrib/seekable_format/zstd_seekable_compression_format.md):
ordinary zstd frames back to back, then one skippable frame holding the seek
table::

    Skippable_Magic_Number  u32 LE  0x184D2A5E
    Frame_Size              u32 LE  entries + footer
    Seek_Table_Entries      per frame: Compressed_Size u32, Decompressed_Size u32,
                            [Checksum u32 = low 32 bits of XXH64 of the frame's data]
    Seek_Table_Footer       Number_Of_Frames u32, Seek_Table_Descriptor u8
                            (bit 7 = entries carry checksums, bits 6-2 reserved = 0),
                            Seekable_Magic_Number u32 LE 0x8F92EAB1

``zstd -d`` skips skippable frames, so it yields the concatenated frame data;
a reader finds the table from the last 9 bytes without scanning.  This module
is the only place that knows the table's layout: the writer
(:class:`SeekableZstdWriter`, used by the VMA writer and ``vmafs recompress``)
and the reader (:mod:`vmafs.source.zstd`) both go through it.  Like
:mod:`vmafs.format` it belongs to the format layer the two halves share, so it
imports nothing of the project (tests/test_layering.py).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

SKIPPABLE_MAGIC_SEEKABLE = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER_SIZE = 9
SKIPPABLE_HEADER_SIZE = 8
MAX_FRAMES = 0x8000000  # the reference implementation's bound
MAX_FRAME_DECOMPRESSED_SIZE = 0x40000000  # 1 GiB, ditto
CHECKSUM_FLAG = 0x80
_RESERVED_BITS = 0x7C

_FOOTER = struct.Struct("<IBI")
_SKIPPABLE_HEADER = struct.Struct("<II")


@dataclass(frozen=True)
class SeekTable:
    """Sizes of the frames of a seekable file, in file order."""

    compressed_sizes: list[int]
    decompressed_sizes: list[int]
    checksums: list[int] | None  # None when the table carries none
    #: Bytes of the skippable frame holding the table (header included).
    table_size: int

    def __len__(self) -> int:
        return len(self.compressed_sizes)

    def to_bytes(self) -> bytes:
        """The whole skippable frame, ready to append after the last frame."""
        with_checksum = self.checksums is not None
        entry = struct.Struct("<III" if with_checksum else "<II")
        parts = []
        for i, (c, d) in enumerate(
            zip(self.compressed_sizes, self.decompressed_sizes, strict=True)
        ):
            if with_checksum:
                parts.append(entry.pack(c, d, self.checksums[i]))
            else:
                parts.append(entry.pack(c, d))
        body = b"".join(parts) + _FOOTER.pack(
            len(self.compressed_sizes), CHECKSUM_FLAG if with_checksum else 0, SEEKABLE_MAGIC
        )
        return _SKIPPABLE_HEADER.pack(SKIPPABLE_MAGIC_SEEKABLE, len(body)) + body

    @classmethod
    def from_tail(cls, read_at, file_size: int) -> SeekTable | None:
        """Parse the seek table at the end of a file, or None when there is none.

        *read_at(offset, size)* returns file bytes.  A footer whose fields do
        not add up (sizes past the file, reserved bits set, frame sizes that
        do not tile the file exactly) counts as no table: the caller scans.
        """
        if file_size < SKIPPABLE_HEADER_SIZE + FOOTER_SIZE:
            return None
        footer = read_at(file_size - FOOTER_SIZE, FOOTER_SIZE)
        if len(footer) != FOOTER_SIZE:
            return None
        nframes, descriptor, magic = _FOOTER.unpack(footer)
        if magic != SEEKABLE_MAGIC or descriptor & _RESERVED_BITS or nframes > MAX_FRAMES:
            return None
        with_checksum = bool(descriptor & CHECKSUM_FLAG)
        entry_size = 12 if with_checksum else 8
        frame_size = nframes * entry_size + FOOTER_SIZE
        table_size = SKIPPABLE_HEADER_SIZE + frame_size
        if table_size > file_size:
            return None
        raw = read_at(file_size - table_size, table_size)
        if len(raw) != table_size:
            return None
        skip_magic, skip_size = _SKIPPABLE_HEADER.unpack_from(raw)
        if skip_magic != SKIPPABLE_MAGIC_SEEKABLE or skip_size != frame_size:
            return None
        csizes, dsizes, sums = [], [], []
        fmt = struct.Struct("<III" if with_checksum else "<II")
        for fields in fmt.iter_unpack(
            raw[SKIPPABLE_HEADER_SIZE : SKIPPABLE_HEADER_SIZE + nframes * entry_size]
        ):
            csizes.append(fields[0])
            dsizes.append(fields[1])
            if with_checksum:
                sums.append(fields[2])
        if sum(csizes) != file_size - table_size:
            return None
        return cls(csizes, dsizes, sums if with_checksum else None, table_size)


#: Frame sizes (uncompressed).  A frame holds whole units (for a VMA
#: archive: the header, then whole extents) or part of one big unit.
#: It ends at the first unit boundary at or after FRAME_TARGET bytes, and
#: earlier when the next unit would take it past FRAME_LIMIT.  A unit bigger
#: than FRAME_LIMIT is cut into as few near-equal frames as keep each about
#: that size (cuts at a multiple of 4 KiB from the unit's end, so a VMA
#: extent's 4 KiB blocks are never split).  A random read decompresses one
#: whole frame, so these bound a read's cost: a full Proxmox extent (512 B +
#: 59 x 64 KiB, ~3.7 MiB) becomes two frames of ~1.8 MiB, runs of small
#: extents are grouped to at least 1 MiB.  Measured in docs/compression.md
#: ("Seekable output").
FRAME_TARGET = 1 << 20
FRAME_LIMIT = 2 << 20
_CUT_ALIGN = 4096


def split_points(size: int, limit: int) -> list[int]:
    """Where a unit of *size* bytes is cut (offsets inside it) so no piece is much over *limit*.

    ``ceil(size / limit)`` pieces of near-equal size; every piece but the
    first is a multiple of 4 KiB, the first also takes ``size % 4096``.
    """
    k = -(-size // limit)
    if k <= 1:
        return []
    head, blocks = size % _CUT_ALIGN, size // _CUT_ALIGN
    return [head + _CUT_ALIGN * (blocks * i // k) for i in range(1, k)]


class SeekableZstdWriter:
    """Write a zstd seekable file of independent frames.

    Two ways to make frames:

    - :meth:`write` (one unit) or :meth:`unit` + :meth:`feed` (a unit handed
      over in pieces): the writer groups units into frames by
      :data:`FRAME_TARGET` / :data:`FRAME_LIMIT`; a frame ends only between
      units, or inside a unit bigger than the limit (:func:`split_points`).
      The VMA writer and ``vmafs recompress`` pass the header and each
      extent as units, so a frame starts at an extent or inside a full one;
    - :meth:`write_frame`: *data* becomes one frame, as it is.

    :meth:`close` ends the last frame and appends the seek table; it does not
    close *fileobj*.  Frames carry zstd's content checksum, and the table
    repeats it, so both ``zstd -d`` and the seek table can verify the data.
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        level: int = 3,
        *,
        threads: int = 0,
        frame_target: int = FRAME_TARGET,
        frame_limit: int = FRAME_LIMIT,
    ) -> None:
        self._f = fileobj
        self._cctx = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, threads=threads
        )
        self._target = frame_target
        self._limit = max(frame_limit, frame_target)
        self._buf = bytearray()  # the frame being assembled (whole units so far)
        self._cuts: deque[int] = deque()  # where frames end inside the current unit
        self._in_unit = 0  # bytes of the current unit fed so far
        self._csizes: list[int] = []
        self._dsizes: list[int] = []
        self._sums: list[int] = []
        self._closed = False
        #: Compressed bytes written so far (frames only, until close()).
        self.compressed_size = 0
        #: Uncompressed bytes in written frames.
        self.size = 0

    def unit(self, size: int) -> None:
        """The next *size* bytes fed belong together: a frame ends inside them only to
        cut a unit bigger than FRAME_LIMIT.

        Ends the current frame here if it holds FRAME_TARGET bytes or more,
        or if *size* more would take it past FRAME_LIMIT.
        """
        n = len(self._buf)
        if n and (n >= self._target or n + size > self._limit):
            self.end_frame()
        self._cuts = deque(split_points(size, self._limit))
        self._in_unit = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes of the current unit (see :meth:`unit`)."""
        if self._closed:
            raise ValueError("feed() on a closed SeekableZstdWriter")
        view = memoryview(data)
        cuts = self._cuts
        while cuts and self._in_unit + len(view) >= cuts[0]:
            k = cuts.popleft() - self._in_unit
            self._buf += view[:k]
            self._in_unit += k
            view = view[k:]
            self.end_frame()
        self._buf += view
        self._in_unit += len(view)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append *data* as one unit (``unit(len(data))`` then ``feed(data)``)."""
        self.unit(len(data))
        self.feed(data)

    def end_frame(self) -> None:
        """Compress what :meth:`feed` collected as one frame (nothing if empty)."""
        if self._buf:
            self._compress(self._buf)
            self._buf = bytearray()

    def write_frame(self, data: bytes | bytearray | memoryview) -> int:
        """Compress *data* as one frame and write it; returns the frame's compressed size.

        A frame being collected by :meth:`feed` is ended first.
        """
        if self._closed:
            raise ValueError("write_frame() on a closed SeekableZstdWriter")
        self.end_frame()
        return self._compress(data)

    def _compress(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if n == 0:
            return 0  # an empty frame would only cost a table entry
        if n > MAX_FRAME_DECOMPRESSED_SIZE:
            raise ValueError(f"frame of {n} bytes exceeds the seekable format's 1 GiB limit")
        if len(self._csizes) >= MAX_FRAMES:
            raise ValueError("too many frames for a seek table")
        frame = self._cctx.compress(data)
        self._f.write(frame)
        self._csizes.append(len(frame))
        self._dsizes.append(n)
        # The frame's content checksum is the seek table's checksum (XXH64, low 32 bits).
        self._sums.append(int.from_bytes(frame[-4:], "little"))
        self.compressed_size += len(frame)
        self.size += n
        return len(frame)

    @property
    def frames(self) -> int:
        return len(self._csizes)

    def close(self) -> None:
        """End the last frame and write the seek table (once); the file object stays open."""
        if self._closed:
            return
        self.end_frame()
        self._closed = True
        table = SeekTable(self._csizes, self._dsizes, self._sums, 0)
        self._f.write(table.to_bytes())

    def __enter__(self) -> SeekableZstdWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
