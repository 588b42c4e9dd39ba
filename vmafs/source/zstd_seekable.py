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
and the reader (:mod:`vmafs.source.zstd`) both go through it.
"""

from __future__ import annotations

import struct
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


class SeekableZstdWriter:
    """Write a zstd seekable file: one independent frame per :meth:`write_frame`.

    The caller chooses frame boundaries (the VMA writer aligns them to
    extents, a few MiB each, so a random read decompresses one small frame).
    :meth:`close` appends the seek table; it does not close *fileobj*.
    Frames carry zstd's content checksum, and the table repeats it, so both
    ``zstd -d`` and the seek table can verify the data.
    """

    def __init__(self, fileobj: BinaryIO, level: int = 3, *, threads: int = 0) -> None:
        self._f = fileobj
        self._cctx = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True, threads=threads
        )
        self._csizes: list[int] = []
        self._dsizes: list[int] = []
        self._sums: list[int] = []
        self._closed = False
        #: Compressed bytes written so far (frames only, until close()).
        self.compressed_size = 0
        #: Uncompressed bytes accepted so far.
        self.size = 0

    def write_frame(self, data: bytes | bytearray | memoryview) -> int:
        """Compress *data* as one frame and write it; returns the frame's compressed size."""
        if self._closed:
            raise ValueError("write_frame() on a closed SeekableZstdWriter")
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
        """Write the seek table (once); the file object stays open."""
        if self._closed:
            return
        self._closed = True
        table = SeekTable(self._csizes, self._dsizes, self._sums, 0)
        self._f.write(table.to_bytes())

    def __enter__(self) -> SeekableZstdWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
