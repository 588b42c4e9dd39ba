"""Random reads of a zstd stream: decoding the block of the stream that holds a byte.

A *block* of the stream (the unit the source's cache keeps) is a whole
small frame, or a 1 MiB page of a big frame.  A page is decoded by a
*cursor*: a decoder started at the frame's start or at the nearest
checkpoint before the page (a synthetic frame: the checkpoint's window,
then the original blocks), parked afterwards so that the next page of a
sequential read continues where it stopped.  Decoding runs outside any
lock; the cursors are shared under one.

:class:`HeadReader` serves the index builder's header walk without
decoding whole frames.
"""

from __future__ import annotations

import bisect
import os
import threading

import zstandard

from ...errors import IndexCacheError
from ..base import BlockCache, ReaderBase
from .frame import (
    corrupt,
    cut,
    decompressor,
    frame_failed,
    put_resume_prefix,
    resume_prefix_size,
)
from .state import FRAME_CHECKSUM, FRAME_CUT, FrameTable

#: Frames up to this size are decoded and cached whole; bigger ones in pages.
SMALL_FRAME = 16 << 20
PAGE = 1 << 20
_READ_CHUNK = 256 << 10
_CURSORS = 4
#: Header reads (:class:`HeadReader`): at most this much output per call, and
#: compressed input taken in pieces of this size.
HEAD_CHUNK = 64 << 10
_HEAD_READ_SIZE = 16 << 10


class _RangeFile:
    """A read-only file-like view of [start, end) of a descriptor, with optional prefix bytes."""

    def __init__(self, fd: int, start: int, end: int, prefix: bytes | bytearray = b"") -> None:
        self._fd, self.pos, self.end, self._prefix = fd, start, end, prefix

    def read(self, n: int = -1) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix, b""
            return out
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self.pos)
        self.pos += len(data)
        return data


class _Cursor:
    """A parked decoder: the next byte it yields is decompressed offset ``pos``."""

    __slots__ = ("frame", "pos", "reader", "checkpoint", "start")

    def __init__(
        self, frame: int, pos: int, reader, checkpoint: int, start: int | None = None
    ) -> None:
        self.frame, self.pos, self.reader, self.checkpoint = frame, pos, reader, checkpoint
        self.start = pos if start is None else start  # where its real output begins

    def read(self, start: int, end: int, scratch: bytearray) -> bytes:
        skip = start - self.pos
        while skip > 0:
            view = memoryview(scratch)[: min(skip, len(scratch))]
            got = self.reader.readinto(view)
            if got <= 0:
                raise EOFError
            skip -= got
            self.pos += got
        out = self.reader.read(end - start)
        self.pos += len(out)
        if len(out) != end - start:
            raise EOFError
        return out


class FrameReader:
    """Locates and decodes the blocks of one :class:`~.state.FrameTable`; thread-safe."""

    def __init__(self, fd: int, table: FrameTable) -> None:
        self._fd = fd
        self.table = table
        self._lock = threading.Lock()
        self._cursors: list[_Cursor] = []
        #: Checkpoints whose verified window did not cover a later reach-back.
        self.bad = [False] * table.checkpoints

    def locate(self, pos: int) -> tuple[tuple[int, int], int]:
        """(key, start) of the block holding *pos*: key (frame, -1) for a whole frame,
        (frame, page number) for a page."""
        t = self.table
        fi = bisect.bisect_right(t.f_dec_list, pos) - 1
        fdec = t.f_dec_list[fi]
        if int(t.f_dsize[fi]) <= SMALL_FRAME and fi not in t.framed:
            return (fi, -1), fdec
        k = (pos - fdec) // PAGE
        return (fi, k), fdec + k * PAGE

    def decode(self, key: tuple[int, int], start: int) -> bytes:
        fi, page = key
        if page < 0:
            return self.decode_frame(fi)
        fend = self.table.f_dec_list[fi] + int(self.table.f_dsize[fi])
        return self._decode_page(fi, start, min(start + PAGE, fend))

    def decode_frame(self, fi: int) -> bytes:
        t = self.table
        comp, csize, fsize = int(t.f_comp[fi]), int(t.f_csize[fi]), int(t.f_dsize[fi])
        raw = os.pread(self._fd, csize, comp)
        if len(raw) != csize:
            raise cut("truncated zstd stream (file shorter than its index)", comp + len(raw))
        try:
            if int(t.f_flags[fi]) & FRAME_CUT:
                # No end to the frame: a streaming decoder yields its whole blocks.
                with decompressor().stream_reader(raw, read_across_frames=False) as r:
                    out = r.read(fsize)
            else:
                out = decompressor().decompress(raw, max_output_size=fsize)
        except zstandard.ZstdError as e:
            raise corrupt(f"corrupt zstd frame ({e})", comp, int(t.f_dec[fi])) from e
        if len(out) != fsize:
            raise corrupt(
                f"zstd frame holds {len(out)} bytes, the index says {fsize}",
                comp,
                int(t.f_dec[fi]),
            )
        return out

    def _decode_page(self, fi: int, start: int, end: int) -> bytes:
        t = self.table
        scratch = bytearray(_READ_CHUNK * 4)
        while True:
            cur = self._take_cursor(fi, start)
            try:
                data = cur.read(start, end, scratch)
            except (zstandard.ZstdError, EOFError) as e:
                fend = int(t.f_comp[fi] + t.f_csize[fi])
                if os.fstat(self._fd).st_size < fend:
                    raise cut(
                        "truncated zstd stream (file shorter than its index)",
                        os.fstat(self._fd).st_size,
                        cur.pos,
                    ) from e
                if cur.checkpoint >= 0:
                    # The verified window did not cover a later reach-back: never use it again.
                    self.bad[cur.checkpoint] = True
                    continue
                raise frame_failed(e, int(t.f_comp[fi]), cur.start, end, cur.pos) from e
            with self._lock:
                self._cursors.append(cur)
                if len(self._cursors) > _CURSORS:
                    self._cursors.pop(0)
            return data

    def _take_cursor(self, fi: int, start: int) -> _Cursor:
        """The closest usable decoder at or before *start* in frame *fi*."""
        t = self.table
        j = bisect.bisect_right(t.c_dec_list, start) - 1
        while j >= 0 and int(t.c_frame[j]) == fi and self.bad[j]:
            j -= 1
        use_cp = j >= 0 and int(t.c_frame[j]) == fi
        entry = t.c_dec_list[j] if use_cp else t.f_dec_list[fi]
        with self._lock:
            best = None
            for c in self._cursors:
                if c.frame == fi and entry <= c.pos <= start and (best is None or c.pos > best.pos):
                    best = c
            if best is not None:
                self._cursors.remove(best)
                return best
        fcomp, fcsize = int(t.f_comp[fi]), int(t.f_csize[fi])
        if not use_cp:
            src = _RangeFile(self._fd, fcomp, fcomp + fcsize)
            reader = decompressor().stream_reader(
                src, read_size=_READ_CHUNK, read_across_frames=False
            )
            return _Cursor(fi, entry, reader, -1)
        try:
            window = zstandard.ZstdDecompressor().decompress(t.windows[j])
        except zstandard.ZstdError as e:
            raise IndexCacheError(f"checkpoint window {j} is corrupt ({e})") from e
        comp_end = fcomp + fcsize - (4 if int(t.f_flags[fi]) & FRAME_CHECKSUM else 0)
        # The scan tested this very construction: the window decodes first, then the blocks.
        prefix = bytearray(resume_prefix_size(len(window)))
        put_resume_prefix(prefix, 0, int(t.f_wd[fi]), window)
        src = _RangeFile(self._fd, int(t.c_comp[j]), comp_end, prefix)
        reader = decompressor().stream_reader(src, read_size=_READ_CHUNK, read_across_frames=False)
        return _Cursor(fi, entry - len(window), reader, j, start=entry)

    def close(self) -> None:
        with self._lock:
            self._cursors.clear()


class HeadReader(ReaderBase):
    """Partial frame decodes for the index builder's header walk.

    The index builder reads the archive header and every extent header (512
    bytes each, at the extent boundaries where the seekable writer starts its
    frames).  Through :meth:`ZstdSource.pread` each of those would decode its
    whole frame (~3.7 MiB for a Proxmox extent) and read all of its
    compressed bytes.  Here one streaming decoder is kept on the frame being
    walked: a read decodes from the frame's start (or from where the last read
    stopped, when it lies ahead in the same frame) just up to the bytes asked
    for, taking compressed input in pieces of :data:`_HEAD_READ_SIZE`.  Frames
    already in the source's cache are served from it; nothing is added to it.

    ``pread(offset, size)`` returns at least ``min(size, HEAD_CHUNK, bytes
    left)`` bytes and never more than :data:`HEAD_CHUNK`: a caller that wants
    more asks again from where the data stopped (:func:`~vmafs.index.build_index`
    does, and needs only 512 bytes per read).  The frame checksum is verified
    only when a read decodes a frame to its end; an extent header carries its
    own md5, and :meth:`ZstdSource.pread` verifies the whole frame later.
    One walker at a time: not thread-safe.
    """

    def __init__(self, path: str, fd: int, table: FrameTable, cache: BlockCache) -> None:
        self.path = path
        self.size = table.size
        self._fd, self._table, self._cache = fd, table, cache
        self._dctx = decompressor()
        self._cur: _Cursor | None = None
        self._scratch = bytearray(HEAD_CHUNK)

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0:
            raise ValueError("negative offset")
        t = self._table
        end = min(offset + min(size, HEAD_CHUNK), self.size)
        parts = []
        pos = offset
        while pos < end:
            fi = bisect.bisect_right(t.f_dec_list, pos) - 1
            fdec = t.f_dec_list[fi]
            stop = min(end, fdec + int(t.f_dsize[fi]))
            whole = self._cache.peek((fi, -1))
            if whole is not None:
                parts.append(whole[pos - fdec : stop - fdec])
            else:
                parts.append(self._decode(fi, pos, stop))
            pos = stop
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # b"" at or past the end

    def _decode(self, fi: int, start: int, end: int) -> bytes:
        t = self._table
        cur = self._cur
        if cur is None or cur.frame != fi or cur.pos > start:
            self._cur = cur = None  # its reader is done with before the decoder is reused
            comp, csize = int(t.f_comp[fi]), int(t.f_csize[fi])
            reader = self._dctx.stream_reader(
                _RangeFile(self._fd, comp, comp + csize),
                read_size=_HEAD_READ_SIZE,
                read_across_frames=False,
            )
            cur = _Cursor(fi, t.f_dec_list[fi], reader, -1)
        try:
            data = cur.read(start, end, self._scratch)
        except (zstandard.ZstdError, EOFError) as e:
            self._cur = None
            comp = int(t.f_comp[fi])
            have = os.fstat(self._fd).st_size
            if have < comp + int(t.f_csize[fi]):
                raise cut(
                    "truncated zstd stream (file shorter than its index)", have, cur.pos
                ) from e
            raise frame_failed(e, comp, cur.start, end, cur.pos) from e
        self._cur = cur
        return data
