"""Random access into zstd streams: frames, seek tables and mid-frame checkpoints.

One class, :class:`ZstdSource`, serves every zstd layout by what it finds:

- **Seekable format** (a seek table in a trailing skippable frame, as written
  by :class:`~vmafs.zstd_seekable.SeekableZstdWriter`): the frames are
  known from the table, ``needs_scan`` is False, a read decompresses the one
  small frame it touches.
- **Several frames without a table** (``pzstd``, ``cat a.zst b.zst``): one
  scan records where each frame starts, compressed and decompressed.
- **One big frame** (what vzdump writes with ``zstd --threads=N``): zstd has
  no restart points inside a frame, so the scan makes some.  At a block
  boundary the decoder's state is the window of recent output plus entropy
  tables and three repeat offsets.  A block that defines its own tables and
  whose offsets reach only into the window can be decoded by a fresh decoder
  given a *synthetic frame*: a frame header with the original window size (no
  checksum, no content size), the preceding output as raw blocks, then the
  original blocks from that boundary on (:func:`put_resume_prefix`; the
  same as giving the window as a raw-content dictionary).  Whether a boundary
  qualifies cannot be read off its header (repeat offsets live inside the
  compressed sequences), so each candidate is **tested during the scan**: a
  worker thread decodes one window's worth of output from it and compares
  that with the bytes the scan just produced.  The same test finds how little
  of the window suffices (zstd refuses an offset before the start of the
  frame; zeroed bytes that a match copies change the output), so a
  checkpoint keeps a short tail with its unused incompressible parts zeroed,
  compressed.  Candidates that fail are dropped; the next boundary is tried.

Checkpoint spacing is driven by two budgets: decode CPU time between
checkpoints (a read costs at most about that much) and the size of the
stored windows relative to the compressed file (``index_budget``).

Reads go through a small LRU cache of decompressed units (whole small
frames, or 1 MiB pages of big frames) and a few parked decoders ("cursors"),
so sequential reads continue decoding instead of restarting from a
checkpoint.  Everything is thread-safe; decoding runs outside the lock.

Corrupt or truncated input raises :class:`~vmafs.errors.CorruptStreamError`
naming the compressed offset (and, as the error's ``offset``, the position in
the decompressed stream); every loop consumes input, so nothing can hang.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import itertools
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from ..errors import CorruptStreamError, IndexCacheError, SourceError, VmaError, naming_archive
from ..zstd_seekable import SeekTable
from . import register

log = logging.getLogger(__name__)

# --- zstd frame format (RFC 8878) ---------------------------------------------

ZSTD_MAGIC = 0xFD2FB528
ZSTD_MAGIC_BYTES = struct.pack("<I", ZSTD_MAGIC)
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC_BASE = 0x184D2A50
BLOCK_SIZE_MAX = 128 * 1024
BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED, BLOCK_RESERVED = 0, 1, 2, 3
LITERALS_TREELESS = 3
SEQ_MODE_REPEAT = 3
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)
MAX_WINDOW = 1 << 31  # zstd's format maximum on 64-bit

# --- tuning -------------------------------------------------------------------------

#: Frames up to this size are decoded and cached whole; bigger ones in pages.
SMALL_FRAME = 16 << 20
PAGE = 1 << 20
#: Decode CPU seconds between checkpoints (a cold read costs about this much).
DEFAULT_SPACING = 0.035
#: Stored checkpoint windows, as a fraction of the compressed file size.
DEFAULT_INDEX_BUDGET = 0.045
#: No checkpoints in frames whose window is bigger (zstd --long=31): too costly to keep.
MAX_CHECKPOINT_WINDOW = 64 << 20
_MIN_CHECKPOINT_GAP = 1 << 20  # decompressed bytes, from the frame start or last checkpoint
_CANDIDATE_GAP = 192 << 10  # between candidates tested in parallel (if _MAX_PENDING > 1)
_MAX_PENDING = 1  # candidates in flight: one, since most pass and each test costs CPU
_TRIM_LADDER = (256 << 10, 1 << 20, 4 << 20, 16 << 20)
_WINDOW_LEVEL = 1
_SEGMENT = 64 << 10  # unit of window masking
_MASK_MIN_ENTROPY = 7.4  # segments with more bits per byte (sampled) are worth masking...
_MASK_MIN_BYTES = 128 << 10  # ...when there are at least this many bytes of them
_MASK_WHEN_BUDGET_USED = 0.5  # mask only when the windows use over half the budget so far
_MASK_TRIALS = 2  # all costly segments; if that fails, the older half
_CHECK_STEP = 256 << 10  # a candidate's output is compared in pieces of this size
_SCAN_CHUNK = 4 << 20
_BATCH_BLOCKS = 32  # blocks per decompress call in the scan (at most 4 MiB of output)
_PENDING_BATCH_BLOCKS = 8  # ... while a candidate waits: its test starts and ends sooner
#: The scan waits for a candidate's test once it has decoded this many spacings
#: past the candidate (a slow test thread must not stretch checkpoint gaps).
_MAX_TEST_LAG = 1.0
_READ_CHUNK = 256 << 10
_PROGRESS_STEP = 16 << 20
_CURSORS = 4
#: Header reads (:meth:`ZstdSource.header_reader`): at most this much output per
#: call, and compressed input taken in pieces of this size.
_HEAD_CHUNK = 64 << 10
_HEAD_READ_SIZE = 16 << 10
STATE_VERSION = 1


def _corrupt(msg: str, comp_off: int, dec_off: int | None = None) -> CorruptStreamError:
    return CorruptStreamError(f"{msg} at compressed offset {comp_off}", offset=dec_off)


def _frame_failed(e: Exception, comp_off: int, start: int, end: int, pos: int):
    """The error for a frame that would not decode between *start* and *end*."""
    what = "truncated" if isinstance(e, EOFError) else f"corrupt ({e})"
    return _corrupt(
        f"zstd frame {what} between decompressed offsets {start} and {end}", comp_off, pos
    )


@dataclass(frozen=True)
class FrameHeader:
    size: int  # bytes of magic + header
    window_size: int
    window_descriptor: int  # byte to put in a synthetic frame header
    content_size: int | None
    checksum: bool
    dict_id: int


def window_descriptor_for(window_size: int) -> int:
    """The smallest Window_Descriptor byte whose window is at least *window_size*."""
    log = max(10, (max(window_size, 1) - 1).bit_length())
    base = 1 << log
    # A smaller base with a mantissa may fit tighter: base/2 * (1 + m/8).
    if log > 10:
        half = base >> 1
        for m in range(1, 8):
            if half + (half >> 3) * m >= window_size:
                return ((log - 11) << 3) | m
    return (log - 10) << 3


def parse_frame_header(head: bytes, comp_off: int) -> FrameHeader:
    """Parse a zstd frame header at the start of *head* (magic included)."""
    if len(head) < 6:
        raise _corrupt("truncated zstd frame header", comp_off)
    fhd = head[4]
    fcs_flag, single, reserved, checksum, dict_flag = (
        fhd >> 6,
        fhd >> 5 & 1,
        fhd >> 3 & 1,
        fhd >> 2 & 1,
        fhd & 3,
    )
    if reserved:
        raise _corrupt("zstd frame header has its reserved bit set", comp_off)
    pos = 5
    wd = None
    if not single:
        wd = head[pos]
        pos += 1
    dsize = _DICT_ID_SIZES[dict_flag]
    fsize = _FCS_SIZES[fcs_flag] if (fcs_flag or not single) else 1
    end = pos + dsize + fsize
    if len(head) < end:
        raise _corrupt("truncated zstd frame header", comp_off)
    dict_id = int.from_bytes(head[pos : pos + dsize], "little")
    pos += dsize
    fcs = None
    if fsize:
        fcs = int.from_bytes(head[pos : pos + fsize], "little")
        if fsize == 2:
            fcs += 256
    if wd is not None:
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        window = base + (base >> 3) * mantissa
    else:
        window = max(fcs, 1)
        wd = window_descriptor_for(window)
    if window > MAX_WINDOW:
        raise _corrupt(f"zstd frame window of {window} bytes is too large", comp_off)
    return FrameHeader(end, window, wd, fcs, bool(checksum), dict_id)


def _block_is_candidate(body: bytes) -> bool:
    """Cheap header test: a compressed block that reuses earlier tables cannot start a resume."""
    n = len(body)
    if n < 2:
        return False
    b0 = body[0]
    ltype = b0 & 3
    if ltype == LITERALS_TREELESS:
        return False
    sf = b0 >> 2 & 3
    if ltype < 2:  # raw or RLE literals
        if sf in (0, 2):
            hsize, lsize = 1, b0 >> 3
        elif sf == 1:
            hsize, lsize = 2, (b0 >> 4) + (body[1] << 4)
        else:
            if n < 3:
                return False
            hsize, lsize = 3, (b0 >> 4) + (body[1] << 4) + (body[2] << 12)
        pos = hsize + (lsize if ltype == 0 else 1)
    else:
        hsize = (3, 3, 4, 5)[sf]
        if n < hsize:
            return False
        h = int.from_bytes(body[:hsize], "little")
        shift = {3: 14, 4: 18, 5: 22}[hsize]
        bits = {3: 10, 4: 14, 5: 18}[hsize]
        pos = hsize + (h >> shift & ((1 << bits) - 1))
    if pos >= n:
        return True  # no sequences section content: literals only
    s0 = body[pos]
    if s0 == 0:
        return True
    pos += 1 if s0 < 128 else (2 if s0 < 255 else 3)
    if pos >= n:
        return False
    modes = body[pos]
    return (
        (modes >> 6) != SEQ_MODE_REPEAT
        and (modes >> 4 & 3) != SEQ_MODE_REPEAT
        and (modes >> 2 & 3) != SEQ_MODE_REPEAT
    )


def _synthetic_header(window_descriptor: int) -> bytes:
    # Frame_Header_Descriptor 0: no content size, not single-segment, no checksum, no dict id.
    return ZSTD_MAGIC_BYTES + bytes((0, window_descriptor))


def resume_prefix_size(keep: int) -> int:
    """Bytes of :func:`put_resume_prefix` output for a window of *keep* bytes."""
    return 6 + keep + 3 * -(-keep // BLOCK_SIZE_MAX)


def put_resume_prefix(buf: bytearray, at: int, window_descriptor: int, window) -> int:
    """Write the start of a synthetic frame into *buf* at *at*; returns where it ends.

    The frame header (the original window size, no checksum, no content
    size) is followed by *window* as raw blocks, so the original compressed
    blocks that follow decode with that window as their history.  This is
    what a raw-content dictionary gives a decoder, as plain frame data: the
    decoder starts with no entropy tables and the initial repeat offsets
    either way, and an offset reaching before the window's start is refused
    either way.  Its output starts with the window itself.
    """
    buf[at : at + 6] = _synthetic_header(window_descriptor)
    pos, n = at + 6, len(window)
    for a in range(0, n, BLOCK_SIZE_MAX):
        b = min(a + BLOCK_SIZE_MAX, n)
        buf[pos : pos + 3] = ((b - a) << 3 | BLOCK_RAW << 1).to_bytes(3, "little")
        buf[pos + 3 : pos + 3 + b - a] = window[a:b]
        pos += 3 + b - a
    return pos


def _decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)


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


class _Tester:
    """One test thread's decoder, compressor and buffers, reused from test to test.

    A test used to take fresh memory for everything (a dictionary copy and
    decoder buffers per attempt, the input, copies of the output): about a
    thousand page faults and several MiB copied under the interpreter lock
    per candidate, which the scan's own thread paid for in waits.  Here a
    test copies the window once per attempt and holds the lock for little
    else; decoding and compressing release it.
    """

    _local = threading.local()

    def __init__(self) -> None:
        self.dctx = _decompressor()
        self.cctx = zstandard.ZstdCompressor(level=_WINDOW_LEVEL)
        self.inp = bytearray()
        self.out = bytearray()

    @classmethod
    def mine(cls) -> _Tester:
        """This thread's tester (zstd contexts are not shared between threads)."""
        t = getattr(cls._local, "tester", None)
        if t is None:
            t = cls._local.tester = cls()
        return t

    def load(self, fd: int, comp: int, comp_len: int, max_keep: int) -> int:
        """Read the candidate's compressed blocks behind room for a prefix; returns that room."""
        room = resume_prefix_size(max_keep)
        if len(self.inp) < room + comp_len:
            self.inp = bytearray(room + comp_len)
        got = os.preadv(fd, [memoryview(self.inp)[room : room + comp_len]], comp)
        if got != comp_len:
            raise _corrupt("truncated zstd stream (file shorter than at its scan)", comp + got)
        return room

    def attempt(self, room: int, comp_len: int, wd: int, window, truth) -> bool | None:
        """Decode with *window* as history; compare the output after it with *truth*.

        True: exact; False: zstd refused (an offset before the window's
        start); None: wrong bytes, or the data ran out before *truth* did.
        Compares piece by piece, so a failing attempt usually stops early.
        """
        keep, want = len(window), len(truth)
        start = room - resume_prefix_size(keep)
        put_resume_prefix(self.inp, start, wd, window)
        if len(self.out) < max(keep, _CHECK_STEP):
            self.out = bytearray(max(keep, _CHECK_STEP))
        out, outv = self.out, memoryview(self.out)
        reader = self.dctx.stream_reader(
            memoryview(self.inp)[start : room + comp_len], read_across_frames=False
        )
        try:
            with reader:
                if keep and reader.readinto(outv[:keep]) != keep:
                    return None
                pos = 0
                while pos < want:
                    n = min(_CHECK_STEP, want - pos)
                    if reader.readinto(outv[:n]) != n:
                        return None
                    # bytearray.startswith compares with memcmp (a view == view would not)
                    if not out.startswith(truth[pos : pos + n]):
                        return None
                    pos += n
        except zstandard.ZstdError:
            return False
        return True


def _test_candidate(
    fd: int,
    comp: int,
    comp_len: int,
    wd: int,
    window: bytes | memoryview,
    truth: bytes | memoryview,
    mask: bool = True,
) -> tuple[int, bytes] | None:
    """Decode *truth*'s length from a synthetic frame at *comp*; keep as little window as works.

    Returns (window bytes kept, those bytes compressed) or None when the
    boundary cannot start a resume.  Runs in the scan's worker thread (zstd
    releases the GIL).

    Two reductions, each accepted only if the decode still reproduces
    *truth* exactly (which covers every reach-back into the window: past
    ``len(truth)`` the decoder's window is its own output):

    - the window is cut to the shortest tail in a ladder for which zstd does
      not refuse an offset reaching before the window;
    - incompressible 64 KiB segments of that tail (byte entropy above 7.5
      bits: already compressed data), which cost the most to store, are
      zeroed when the output does not change.  A changed
      segment that some match copies from changes the output, so a passing
      test proves the zeroed bytes were never used (or were zero).  Segments
      are tested in groups, halving a group that fails (group testing: a
      union of passing groups passes too).

    *window* and *truth* may be views of the scan's reused buffers, left
    alone until this returns.
    """
    tester = _Tester.mine()
    room = tester.load(fd, comp, comp_len, len(window))

    def attempt(win) -> bool | None:
        return tester.attempt(room, comp_len, wd, win, truth)

    ladder = [n for n in _TRIM_LADDER if n < len(window)] + [len(window)]
    for keep in ladder:
        ok = attempt(window[len(window) - keep :])
        if ok is None:
            return None  # wrong bytes: repeat offsets or tables from before the boundary
        if ok:
            break
    else:
        return None
    tail = window[len(window) - keep :]
    costly = []
    for a in range(0, keep if mask else 0, _SEGMENT):
        n = min(_SEGMENT, keep - a)
        # every 4th byte is a fair sample of a segment's byte distribution
        sample = np.frombuffer(tail, dtype=np.uint8, count=n, offset=a)[::4]
        p = np.bincount(sample, minlength=256) / len(sample)
        p = p[p > 0]
        if -(p * np.log2(p)).sum() > _MASK_MIN_ENTROPY:  # bits per byte: already compressed data
            costly.append((a, n))
    if sum(n for _, n in costly) < _MASK_MIN_BYTES:
        costly = []
    if costly:
        tail = bytearray(tail)  # masked below: a copy, not the scan's buffer
    trials = [_MASK_TRIALS]

    def maskable(group: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if not group or trials[0] <= 0:
            return []
        trials[0] -= 1
        saved = [bytes(tail[a : a + n]) for a, n in group]
        for a, n in group:
            tail[a : a + n] = bytes(n)
        ok = attempt(tail)
        for (a, n), old in zip(group, saved, strict=True):
            tail[a : a + n] = old
        if ok:
            return group
        if len(group) == 1:
            return []
        mid = len(group) // 2
        return maskable(group[:mid]) + maskable(group[mid:])

    for a, n in maskable(costly):
        tail[a : a + n] = bytes(n)
    return keep, tester.cctx.compress(tail)


class _Candidate:
    """A boundary under test: its window (the output before it) and truth (the output after).

    Both live in a buffer pair the scan reuses (``_ScanState.spare``), so a
    candidate costs the scan's thread two copies and no fresh memory.
    """

    __slots__ = ("dec", "comp", "ct", "bufs", "keep", "got", "need", "future")

    def __init__(
        self, dec: int, comp: int, ct: float, bufs: tuple[bytearray, bytearray], need: int
    ) -> None:
        self.dec, self.comp, self.ct, self.bufs, self.need = dec, comp, ct, bufs, need
        self.keep = 0  # window bytes at the start of bufs[0]
        self.got = 0  # truth bytes at the start of bufs[1]
        self.future: concurrent.futures.Future | None = None

    @property
    def window(self) -> memoryview:
        return memoryview(self.bufs[0])[: self.keep]

    @property
    def truth(self) -> memoryview:
        return memoryview(self.bufs[1])[: self.got]


class _SeqReader:
    """Sequential reads of the compressed file for the scan.

    The file is mapped, so zstd reads the page cache in place: a buffered
    read() would copy every compressed byte once more (about a tenth of the
    scan's time).  What :meth:`peek`/:meth:`take` return are views of the
    mapping.  The file must not shrink during the scan: a mapped page past
    the new end faults with SIGBUS, which ends the process (no exception;
    a known limitation, see docs/compression.md).  vzdump and vmafs replace
    archives by rename, which leaves the mapped file whole.

    Where a file cannot be mapped (some network and FUSE filesystems) the
    same interface is served from one buffer refilled in place by pread;
    views of ``_buf`` are then valid until the next refill, which the scan
    does only once zstd has used all input handed to it.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self.size = fd, size
        self._base = 0  # file offset of _buf[0]
        self._i = 0
        self._map: mmap.mmap | None = None
        try:
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except (OSError, ValueError) as e:
            log.debug("scanning with pread: cannot map the file (%s)", e)
            self._back = bytearray(_SCAN_CHUNK)
            self._buf = memoryview(self._back)[:0]
        else:
            self._map.madvise(mmap.MADV_SEQUENTIAL)
            self._buf = memoryview(self._map)

    def close(self) -> None:
        """Unmap the file, unless zstd still holds a view (then it goes with the view)."""
        if self._map is None:
            return
        self._buf.release()
        self._buf = memoryview(b"")
        with contextlib.suppress(BufferError):
            self._map.close()
        self._map = None

    def tell(self) -> int:
        return self._base + self._i

    def _fill(self, n: int) -> None:
        if self._map is not None:
            return  # all of the file is in _buf already
        # Re-read from the current position (the unread tail is in the page
        # cache): cheaper than copying a 4 MiB buffer to keep a few KiB.
        pos = self.tell()
        want = min(max(n, _SCAN_CHUNK), max(self.size - pos, 0))
        if want > len(self._back):
            self._back = bytearray(want)
        got = os.preadv(self._fd, [memoryview(self._back)[:want]], pos) if want else 0
        self._buf = memoryview(self._back)[:got]
        self._base, self._i = pos, 0

    def ensure(self, n: int) -> bool:
        """Make the next *n* bytes one slice of ``_buf`` (refilling if needed); False at EOF."""
        if self._i + n > len(self._buf):
            self._fill(n)
        return self._i + n <= len(self._buf)

    def peek(self, n: int) -> memoryview:
        if self._i + n > len(self._buf):
            self._fill(n)
        return self._buf[self._i : self._i + n]

    def take(self, n: int) -> memoryview:
        if self._i + n > len(self._buf):
            self._fill(n)
        out = self._buf[self._i : self._i + n]
        self._i += len(out)
        return out

    def skip(self, n: int) -> int:
        """Advance n bytes (fewer at the end of the file); returns how many."""
        n = min(n, self.size - self.tell())
        avail = len(self._buf) - self._i
        if n <= avail:
            self._i += n
        else:
            self._base = self.tell() + n
            self._buf, self._i = memoryview(self._back)[:0], 0
        return n


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


class ZstdSource:
    """A zstd-compressed VMA stream with random access (see the module docstring).

    *spacing* (decode CPU seconds between checkpoints; None: make none) and
    *index_budget* (stored windows / compressed size) tune the scan;
    *cache_bytes* bounds the decompressed-data cache.
    """

    def __init__(
        self,
        path: str,
        *,
        spacing: float | None = DEFAULT_SPACING,
        index_budget: float = DEFAULT_INDEX_BUDGET,
        cache_bytes: int = 64 << 20,
    ) -> None:
        self.path = path
        self._spacing = spacing
        self._budget = index_budget
        self._cache_limit = cache_bytes
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror}") from e
        self.compressed_size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached = 0
        self._cursors: list[_Cursor] = []
        self.size: int | None = None
        self.needs_scan = True
        self._set_frames([], [], [], [], [], [])
        self._set_checkpoints([], [], [], [])
        #: Statistics of the last scan (candidates tested/rejected, checkpoints kept).
        self.scan_stats: dict[str, int] = {}
        head = os.pread(self._fd, 4, 0)
        magic = int.from_bytes(head, "little") if len(head) == 4 else -1
        if magic != ZSTD_MAGIC and magic & SKIPPABLE_MAGIC_MASK != SKIPPABLE_MAGIC_BASE:
            self.close()
            raise SourceError(f"{path}: not a zstd stream")
        table = SeekTable.from_tail(self._pread_raw, self.compressed_size)
        if table is not None and len(table):
            self._load_seek_table(table)

    # --- index arrays ---------------------------------------------------------

    def _set_frames(self, comp, csize, dec, dsize, wd, flags) -> None:
        self._f_comp = np.asarray(comp, dtype=np.uint64)
        self._f_csize = np.asarray(csize, dtype=np.uint64)
        self._f_dec = np.asarray(dec, dtype=np.uint64)
        self._f_dsize = np.asarray(dsize, dtype=np.uint64)
        self._f_wd = np.asarray(wd, dtype=np.uint8)  # synthetic window descriptor
        self._f_flags = np.asarray(flags, dtype=np.uint8)  # bit 0: content checksum
        self._f_dec_list = self._f_dec.tolist()

    def _set_checkpoints(self, dec, comp, frame, windows: list) -> None:
        """Adopt checkpoint arrays and their compressed windows, one bytes-like per checkpoint.

        The windows stay separate (the scan's own blobs, or views of a loaded
        side index): joined, they would be copied into fresh memory at the end
        of every first scan; only :meth:`checkpoint_state` joins them.
        """
        self._c_dec = np.asarray(dec, dtype=np.uint64)
        self._c_comp = np.asarray(comp, dtype=np.uint64)
        self._c_frame = np.asarray(frame, dtype=np.uint32)
        self._windows = windows
        self._c_dec_list = self._c_dec.tolist()
        self._c_bad = [False] * len(self._c_dec_list)
        self._framed_cp = set(self._c_frame.tolist())

    def _load_seek_table(self, table: SeekTable) -> None:
        comp = np.concatenate(([0], np.cumsum(table.compressed_sizes, dtype=np.uint64)[:-1]))
        dec = np.concatenate(([0], np.cumsum(table.decompressed_sizes, dtype=np.uint64)[:-1]))
        n = len(table)
        self._set_frames(
            comp, table.compressed_sizes, dec, table.decompressed_sizes, [0] * n, [0] * n
        )
        self.size = int(sum(table.decompressed_sizes))
        self.needs_scan = False

    def _pread_raw(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    @property
    def frames(self) -> int:
        return len(self._f_comp)

    @property
    def checkpoints(self) -> int:
        return len(self._c_dec_list)

    def index_bytes(self) -> int:
        """Bytes a persisted side index of this source takes (arrays + windows)."""
        return sum(v.nbytes for v in self.checkpoint_state().values())

    # --- the scan ----------------------------------------------------------------

    def scan(
        self,
        on_chunk: Callable[[int, memoryview], None],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Decompress the whole stream once, in order, handing it to *on_chunk*.

        Records frames and tests checkpoint candidates on the way; afterwards
        ``needs_scan`` is False and ``size`` is known.  A VmaError raised on
        the way (by the stream or by *on_chunk*) names the file once.
        """
        with naming_archive(self.path):
            self._scan(on_chunk, progress)

    def _scan(self, on_chunk, progress) -> None:
        rd = _SeqReader(self._fd, self.compressed_size)
        st = _ScanState(on_chunk, progress, self.compressed_size)
        frames: tuple[list, ...] = ([], [], [], [], [], [])
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmafs-zstd-ckpt")
        try:
            while rd.tell() < self.compressed_size:
                at = rd.tell()
                head = rd.peek(18)
                if len(head) < 4:
                    raise _corrupt("truncated zstd frame magic", at, st.dec)
                magic = int.from_bytes(head[:4], "little")
                if magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC_BASE:
                    if len(head) < 8:
                        raise _corrupt("truncated skippable frame header", at, st.dec)
                    n = int.from_bytes(head[4:8], "little")
                    if rd.skip(8 + n) != 8 + n:
                        raise _corrupt("truncated skippable frame", at, st.dec)
                    continue
                if magic != ZSTD_MAGIC:
                    raise _corrupt("not a zstd frame (bad magic)", at, st.dec)
                hdr = parse_frame_header(head, at)
                dec0 = st.dec
                self._scan_frame(rd, hdr, len(frames[0]), st, pool)
                for lst, v in zip(
                    frames,
                    (
                        at,
                        rd.tell() - at,
                        dec0,
                        st.dec - dec0,
                        hdr.window_descriptor,
                        int(hdr.checksum),
                    ),
                    strict=True,
                ):
                    lst.append(v)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            rd.close()
        if progress:
            progress(self.compressed_size, self.compressed_size)
        if not frames[0]:
            raise _corrupt("no zstd frame in the file", 0, 0)
        with self._lock:
            self._set_frames(*frames)
            self._set_checkpoints(st.cp_dec, st.cp_comp, st.cp_frame, st.blobs)
            self._cache.clear()
            self._cached = 0
            self._cursors.clear()
            self.size = st.dec
            self.needs_scan = False
        self.scan_stats = st.stats

    def _scan_frame(self, rd: _SeqReader, hdr: FrameHeader, fidx: int, st, pool) -> None:
        at = rd.tell()
        if hdr.dict_id:
            raise SourceError(
                f"zstd frame at compressed offset {at} needs dictionary {hdr.dict_id}, "
                "which vmafs does not have"
            )
        _FrameScan(self, rd, hdr, fidx, st, pool).run()

    def _submit(self, c: _Candidate, comp_end: int, hdr: FrameHeader, pool, st) -> None:
        # Masking costs decodes; worth it only when the index budget is getting tight.
        mask = st.cp_bytes > _MASK_WHEN_BUDGET_USED * self._budget * comp_end
        c.future = pool.submit(
            _test_candidate,
            self._fd,
            c.comp,
            comp_end - c.comp,
            hdr.window_descriptor,
            c.window,
            c.truth,
            mask,
        )

    @staticmethod
    def _settle(pending: deque, fidx: int, st) -> _Candidate | None:
        """Take the oldest tested candidate; on success record it and drop the others."""
        c = pending.popleft()
        result = c.future.result()
        st.spare.append(c.bufs)  # the test is over: its buffers are free
        if result is None:
            st.stats["rejected_test"] += 1
            return None
        keep, blob = result
        st.cp_dec.append(c.dec)
        st.cp_comp.append(c.comp)
        st.cp_frame.append(fidx)
        st.blobs.append(blob)
        cost = len(blob) + 28  # + the four array entries
        st.cp_bytes += cost
        st.last_cost = cost
        st.stats["checkpoints"] += 1
        st.stats["window_bytes"] += keep
        for other in pending:
            if other.future is None or other.future.cancel():
                st.spare.append(other.bufs)  # never ran; a running test keeps its pair
        pending.clear()
        return c

    # --- persisted state ------------------------------------------------------

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """Everything a later open needs to skip the scan (for the side index)."""
        if self.needs_scan:
            raise SourceError("checkpoint_state() before scan()")
        return {
            "zstd_version": np.array(
                [STATE_VERSION, self.compressed_size, self.size], dtype=np.uint64
            ),
            "frame_comp": self._f_comp,
            "frame_csize": self._f_csize,
            "frame_dec": self._f_dec,
            "frame_dsize": self._f_dsize,
            "frame_wd": self._f_wd,
            "frame_flags": self._f_flags,
            "cp_dec": self._c_dec,
            "cp_comp": self._c_comp,
            "cp_frame": self._c_frame,
            "cp_boff": np.cumsum([0] + [len(w) for w in self._windows[:-1]], dtype=np.uint64)
            if self._windows
            else np.zeros(0, dtype=np.uint64),
            "cp_windows": np.frombuffer(b"".join(self._windows), dtype=np.uint8),
        }

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        """Adopt :meth:`checkpoint_state` output; IndexCacheError when it does not fit this file."""
        try:
            version, csize, size = (int(x) for x in np.asarray(state["zstd_version"]).tolist())
            f = [
                np.asarray(state[k])
                for k in ("frame_comp", "frame_csize", "frame_dec", "frame_dsize")
            ]
            wd, flags = np.asarray(state["frame_wd"]), np.asarray(state["frame_flags"])
            cdec, ccomp, cframe, cboff = (
                np.asarray(state[k]) for k in ("cp_dec", "cp_comp", "cp_frame", "cp_boff")
            )
            blob = np.asarray(state["cp_windows"], dtype=np.uint8).tobytes()
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCacheError(f"zstd index state of {self.path} is incomplete: {e}") from e
        problem = None
        n = len(f[0])
        if version != STATE_VERSION:
            problem = f"version {version}"
        elif csize != self.compressed_size:
            problem = "compressed size differs"
        elif n == 0 or any(len(a) != n for a in (*f, wd, flags)):
            problem = "frame arrays disagree"
        elif any(len(a) != len(cdec) for a in (ccomp, cframe, cboff)):
            problem = "checkpoint arrays disagree"
        else:
            comp, csz, dec, dsz = (a.astype(np.uint64) for a in f)
            if (
                not self._first_frame_at(int(comp[0]))
                or np.any(comp[1:] < comp[:-1] + csz[:-1])
                or int(comp[-1] + csz[-1]) > csize
                or dec[0] != 0
                or np.any(dec[1:] != dec[:-1] + dsz[:-1])
                or int(dec[-1] + dsz[-1]) != size
            ):
                problem = "frame offsets are inconsistent"
            elif len(cdec) and (
                np.any(np.diff(cdec.astype(np.int64)) <= 0)
                or np.any(cframe >= n)
                or np.any(cdec <= dec[cframe])
                or np.any(cdec >= dec[cframe] + dsz[cframe])
                or np.any(ccomp <= comp[cframe])
                or np.any(ccomp >= comp[cframe] + csz[cframe])
                or np.any(np.diff(cboff.astype(np.int64)) <= 0)
                or int(cboff[-1]) >= len(blob)
            ):
                problem = "checkpoints are inconsistent"
        if problem:
            raise IndexCacheError(f"zstd index state does not fit {self.path}: {problem}")
        with self._lock:
            self._set_frames(*f, wd, flags)
            bounds = [*cboff.tolist(), len(blob)]
            view = memoryview(blob)
            windows = [view[a:b] for a, b in itertools.pairwise(bounds)]
            self._set_checkpoints(cdec, ccomp, cframe, windows)
            self._cache.clear()
            self._cached = 0
            self._cursors.clear()
            self.size = size
            self.needs_scan = False

    def _first_frame_at(self, first: int) -> bool:
        """True when a zstd frame starts at *first*, after nothing but whole skippable frames.

        The first data frame need not start at 0: pzstd, for one, writes a
        skippable frame first.  Anything else means the saved frame table is
        not this file's.
        """
        pos = 0
        while pos < first:
            head = os.pread(self._fd, 8, pos)
            if len(head) < 8:
                return False
            magic, n = struct.unpack("<II", head)
            if magic & SKIPPABLE_MAGIC_MASK != SKIPPABLE_MAGIC_BASE:
                return False
            pos += 8 + n
        return pos == first and os.pread(self._fd, 4, first) == ZSTD_MAGIC_BYTES

    # --- reads --------------------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the decompressed stream; short only at its end."""
        if self.needs_scan:
            raise SourceError(f"{self.path}: zstd stream read before its scan")
        end = min(offset + size, self.size)
        if offset < 0:
            raise ValueError("negative offset")
        parts = []
        pos = offset
        while pos < end:
            try:
                ustart, data = self._unit(pos)
            except VmaError as e:  # corrupt, or truncated since the scan: name the file
                e.name_archive(self.path, in_message=False)
                raise
            a = pos - ustart
            b = min(len(data), end - ustart)
            parts.append(data[a:b] if (a or b != len(data)) else data)
            pos = ustart + b
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _unit(self, pos: int) -> tuple[int, bytes]:
        fi = bisect.bisect_right(self._f_dec_list, pos) - 1
        fdec, fsize = self._f_dec_list[fi], int(self._f_dsize[fi])
        if fsize <= SMALL_FRAME and fi not in self._framed_cp:
            key, start, end = (fi, -1), fdec, fdec + fsize
        else:
            k = (pos - fdec) // PAGE
            start = fdec + k * PAGE
            key, end = (fi, k), min(start + PAGE, fdec + fsize)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return start, data
        if key[1] < 0:
            data = self._decode_frame(fi)
        else:
            data = self._decode_page(fi, start, end)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = data
                self._cached += len(data)
                while self._cached > self._cache_limit and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return start, data

    def _decode_frame(self, fi: int) -> bytes:
        comp, csize, fsize = int(self._f_comp[fi]), int(self._f_csize[fi]), int(self._f_dsize[fi])
        raw = os.pread(self._fd, csize, comp)
        if len(raw) != csize:
            raise _corrupt("truncated zstd stream (file shorter than its index)", comp + len(raw))
        try:
            out = _decompressor().decompress(raw, max_output_size=fsize)
        except zstandard.ZstdError as e:
            raise _corrupt(f"corrupt zstd frame ({e})", comp, int(self._f_dec[fi])) from e
        if len(out) != fsize:
            raise _corrupt(
                f"zstd frame holds {len(out)} bytes, the index says {fsize}",
                comp,
                int(self._f_dec[fi]),
            )
        return out

    def _decode_page(self, fi: int, start: int, end: int) -> bytes:
        scratch = bytearray(_READ_CHUNK * 4)
        while True:
            cur = self._take_cursor(fi, start)
            try:
                data = cur.read(start, end, scratch)
            except (zstandard.ZstdError, EOFError) as e:
                fend = int(self._f_comp[fi] + self._f_csize[fi])
                if os.fstat(self._fd).st_size < fend:
                    raise _corrupt(
                        "truncated zstd stream (file shorter than its index)",
                        os.fstat(self._fd).st_size,
                        cur.pos,
                    ) from e
                if cur.checkpoint >= 0:
                    # The verified window did not cover a later reach-back: never use it again.
                    self._c_bad[cur.checkpoint] = True
                    continue
                comp = int(self._f_comp[fi])
                raise _frame_failed(e, comp, cur.start, end, cur.pos) from e
            with self._lock:
                self._cursors.append(cur)
                if len(self._cursors) > _CURSORS:
                    self._cursors.pop(0)
            return data

    def _take_cursor(self, fi: int, start: int) -> _Cursor:
        """The closest usable decoder at or before *start* in frame *fi*."""
        j = bisect.bisect_right(self._c_dec_list, start) - 1
        while j >= 0 and int(self._c_frame[j]) == fi and self._c_bad[j]:
            j -= 1
        use_cp = j >= 0 and int(self._c_frame[j]) == fi
        entry = self._c_dec_list[j] if use_cp else self._f_dec_list[fi]
        with self._lock:
            best = None
            for c in self._cursors:
                if c.frame == fi and entry <= c.pos <= start and (best is None or c.pos > best.pos):
                    best = c
            if best is not None:
                self._cursors.remove(best)
                return best
        fcomp, fcsize = int(self._f_comp[fi]), int(self._f_csize[fi])
        if not use_cp:
            src = _RangeFile(self._fd, fcomp, fcomp + fcsize)
            reader = _decompressor().stream_reader(
                src, read_size=_READ_CHUNK, read_across_frames=False
            )
            return _Cursor(fi, entry, reader, -1)
        try:
            window = zstandard.ZstdDecompressor().decompress(self._windows[j])
        except zstandard.ZstdError as e:
            raise IndexCacheError(f"checkpoint window {j} of {self.path} is corrupt ({e})") from e
        comp_end = fcomp + fcsize - (4 if int(self._f_flags[fi]) & 1 else 0)
        # The scan tested this very construction: the window decodes first, then the blocks.
        prefix = bytearray(resume_prefix_size(len(window)))
        put_resume_prefix(prefix, 0, int(self._f_wd[fi]), window)
        src = _RangeFile(self._fd, int(self._c_comp[j]), comp_end, prefix)
        reader = _decompressor().stream_reader(src, read_size=_READ_CHUNK, read_across_frames=False)
        return _Cursor(fi, entry - len(window), reader, j, start=entry)

    def header_reader(self) -> _HeadReader:
        """A reader for walkers that want a few bytes here and there (extent headers).

        Its ``pread`` decodes a frame only as far as the bytes asked for and
        leaves the frame cache alone; see :class:`_HeadReader`.
        """
        if self.needs_scan:
            raise SourceError(f"{self.path}: zstd stream read before its scan")
        return _HeadReader(self)

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cursors.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ZstdSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HeadReader:
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

    ``pread(offset, size)`` returns at least ``min(size, _HEAD_CHUNK, bytes
    left)`` bytes and never more than :data:`_HEAD_CHUNK`: a caller that wants
    more asks again from where the data stopped (:func:`~vmafs.index.build_index`
    does, and needs only 512 bytes per read).  The frame checksum is verified
    only when a read decodes a frame to its end; an extent header carries its
    own md5, and :meth:`ZstdSource.pread` verifies the whole frame later.
    One walker at a time: not thread-safe.
    """

    def __init__(self, src: ZstdSource) -> None:
        self._src = src
        self.path = src.path
        self.size = src.size
        self._dctx = _decompressor()
        self._cur: _Cursor | None = None
        self._scratch = bytearray(_HEAD_CHUNK)

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0:
            raise ValueError("negative offset")
        src = self._src
        end = min(offset + min(size, _HEAD_CHUNK), self.size)
        parts = []
        pos = offset
        while pos < end:
            fi = bisect.bisect_right(src._f_dec_list, pos) - 1
            fdec = src._f_dec_list[fi]
            stop = min(end, fdec + int(src._f_dsize[fi]))
            with src._lock:
                whole = src._cache.get((fi, -1))
            if whole is not None:
                parts.append(whole[pos - fdec : stop - fdec])
            else:
                parts.append(self._decode(fi, pos, stop))
            pos = stop
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)  # b"" at or past the end

    def _decode(self, fi: int, start: int, end: int) -> bytes:
        src = self._src
        cur = self._cur
        if cur is None or cur.frame != fi or cur.pos > start:
            self._cur = cur = None  # its reader is done with before the decoder is reused
            comp, csize = int(src._f_comp[fi]), int(src._f_csize[fi])
            reader = self._dctx.stream_reader(
                _RangeFile(src._fd, comp, comp + csize),
                read_size=_HEAD_READ_SIZE,
                read_across_frames=False,
            )
            cur = _Cursor(fi, src._f_dec_list[fi], reader, -1)
        try:
            data = cur.read(start, end, self._scratch)
        except (zstandard.ZstdError, EOFError) as e:
            self._cur = None
            comp = int(src._f_comp[fi])
            have = os.fstat(src._fd).st_size
            if have < comp + int(src._f_csize[fi]):
                raise _corrupt(
                    "truncated zstd stream (file shorter than its index)", have, cur.pos
                ) from e
            raise _frame_failed(e, comp, cur.start, end, cur.pos) from e
        self._cur = cur
        return data


class _FrameScan:
    """The scan of one frame: a block walker feeding zstd, and the loop taking its output.

    zstd decompresses straight into a reused ring buffer (``readinto1`` of a
    stream reader), so the scan allocates nothing per batch; the ring also
    holds the recent output that checkpoint candidates need as their window.
    The compressed side is this object's :meth:`read`, which zstd calls for
    more input: it walks the block headers and hands out batches of whole
    blocks (views of the read buffer, no copy).  zstd calls ``read`` only once
    all input handed out before is decoded, and the output region is always
    bigger than a batch can produce, so nothing is held back inside zstd:
    at a ``read`` call, ``st.dec`` is exactly the decompressed offset of the
    block boundary where the next batch starts.  That is where checkpoint
    candidates are taken.
    """

    def __init__(self, src: ZstdSource, rd: _SeqReader, hdr: FrameHeader, fidx: int, st, pool):
        self.src, self.rd, self.hdr, self.fidx, self.st, self.pool = src, rd, hdr, fidx, st, pool
        self.window = hdr.window_size
        self.block_max = min(self.window, BLOCK_SIZE_MAX)
        self.frame_dec0 = st.dec
        self.checkpoints = self.window <= MAX_CHECKPOINT_WINDOW and src._spacing is not None
        self.need = self.window + BLOCK_SIZE_MAX  # output a candidate is tested on
        # One more byte than a batch can yield: a full region would mean zstd holds output back.
        self.region = _BATCH_BLOCKS * self.block_max + 1
        # History (a window) never meets the region being written: see _keep.
        self.ring = bytearray((self.window if self.checkpoints else 0) + 3 * self.region)
        self.segs: deque[tuple[int, int]] = deque()  # (ring offset, length) of recent output
        self.hist = 0  # bytes in segs
        self.ct = 0.0  # decode CPU seconds in this frame
        self.last_ct, self.last_dec = 0.0, self.frame_dec0
        self.pending: deque[_Candidate] = deque()
        self.stage = 0  # 0: frame header next, 1: blocks, 2: checksum next, 3: all handed out
        self.at = self.batch_at = self.end_blocks = rd.tell()
        self.piece = "header"  # what the last piece handed out was: header, blocks, checksum
        self.batch_blocks = 0  # blocks in it

    # --- compressed side: zstd's input ---------------------------------------------

    def read(self, size: int = -1):
        rd, st, hdr = self.rd, self.st, self.hdr
        if self.stage == 1:
            return self._blocks()
        if self.stage == 0:
            self.stage = 1
            return rd.take(hdr.size)
        if self.stage == 2:
            self.stage = 3
            self.piece = "checksum"
            cks = rd.take(4)
            if len(cks) < 4:
                raise _corrupt(
                    "truncated zstd stream (ends inside the frame checksum)",
                    self.end_blocks,
                    st.dec,
                )
            return cks
        return b""

    def _blocks(self) -> memoryview:
        """The next batch of whole blocks (a view of the read buffer)."""
        rd, st = self.rd, self.st
        pending = self.pending
        checkpoints = self.checkpoints
        spacing, budget = self.src._spacing, self.src._budget
        block_max = self.block_max
        if pending and pending[0].future is not None:
            c = pending[0]
            if not c.future.done() and self.ct - c.ct > _MAX_TEST_LAG * spacing:
                # The test thread fell behind (a loaded machine): wait for it,
                # so that checkpoints stay about one spacing apart and a cold
                # read stays about that cheap.
                concurrent.futures.wait([c.future])
            if c.future.done():
                accepted = self.src._settle(pending, self.fidx, st)
                if accepted is not None:
                    self.last_ct, self.last_dec = accepted.ct, accepted.dec
        nblocks = 0
        bstart = rd._i
        while True:
            bpos = rd.tell()
            if rd._i + 3 > len(rd._buf):
                if nblocks:
                    break  # hand out what is there; refill on the next call
                if not rd.ensure(3):
                    raise _corrupt(
                        "truncated zstd stream (ends inside a block header)", bpos, st.dec
                    )
                bstart = rd._i
            buf, i = rd._buf, rd._i
            h = buf[i] | buf[i + 1] << 8 | buf[i + 2] << 16
            btype, bsize = h >> 1 & 3, h >> 3
            if btype == BLOCK_RESERVED:
                raise _corrupt("zstd block of reserved type", bpos, st.dec)
            if bsize > block_max:
                raise _corrupt(
                    f"zstd block of {bsize} bytes exceeds the maximum {block_max}", bpos, st.dec
                )
            clen = 3 + (1 if btype == BLOCK_RLE else bsize)
            if i + clen > len(buf):
                if nblocks:
                    break
                if not rd.ensure(clen):
                    raise _corrupt("truncated zstd stream (ends inside a block)", bpos, st.dec)
                buf, i = rd._buf, rd._i
                bstart = i
            # A checkpoint candidate at this boundary?  Only at the start of a
            # batch is st.dec this boundary's offset: end the batch before it.
            if (
                checkpoints
                and len(pending) < _MAX_PENDING
                and self.ct - self.last_ct >= spacing
                and st.cp_bytes <= budget * bpos  # may overrun by one checkpoint
            ):
                if nblocks:
                    break
                self._candidate(bpos, btype, buf, i, clen)
            nblocks += 1
            rd._i = i + clen
            if h & 1:
                self.stage = 2 if self.hdr.checksum else 3
                self.end_blocks = rd.tell()
                break
            # Smaller batches while a candidate waits for its output or its
            # test, so that it is submitted and settled (and the next one can
            # be taken) within about 1 MiB rather than 4 MiB of output.
            if nblocks >= (_PENDING_BATCH_BLOCKS if pending else _BATCH_BLOCKS):
                break
        self.piece, self.batch_at, self.batch_blocks = "blocks", rd._base + bstart, nblocks
        if st.progress and rd.tell() >= st.next_progress:
            st.progress(rd.tell(), st.total)
            st.next_progress = rd.tell() + _PROGRESS_STEP
        return rd._buf[bstart : rd._i]

    def _candidate(self, bpos: int, btype: int, buf: bytes, i: int, clen: int) -> None:
        st, dec = self.st, self.st.dec
        pending = self.pending
        if dec - self.last_dec < _MIN_CHECKPOINT_GAP or (
            pending and dec - pending[-1].dec < _CANDIDATE_GAP
        ):
            return
        if btype == BLOCK_COMPRESSED and not _block_is_candidate(buf[i + 3 : i + clen]):
            st.stats["rejected_header"] += 1
            return
        c = _Candidate(dec, bpos, self.ct, self._buffers(), self.need)
        c.keep = self._tail(min(self.window, dec - self.frame_dec0), c.bufs[0])
        pending.append(c)
        st.stats["candidates"] += 1

    def _buffers(self) -> tuple[bytearray, bytearray]:
        """A free (window, truth) buffer pair big enough for this frame."""
        spare = self.st.spare
        while spare:
            bufs = spare.pop()
            if len(bufs[0]) >= self.window and len(bufs[1]) >= self.need:
                return bufs
        return bytearray(self.window), bytearray(self.need)

    def _tail(self, n: int, out: bytearray) -> int:
        """Copy the last *n* bytes of output (fewer if there are not as many) from the
        ring to the start of *out*; returns how many."""
        n = end = min(n, self.hist)
        ring = memoryview(self.ring)
        for off, length in reversed(self.segs):
            if end <= 0:
                break
            take = min(length, end)
            out[end - take : end] = ring[off + length - take : off + length]
            end -= take
        return n

    # --- decompressed side ---------------------------------------------------------

    def run(self) -> None:
        st, hdr = self.st, self.hdr
        reader = _decompressor().stream_reader(
            self, read_size=_SCAN_CHUNK, read_across_frames=False, closefd=False
        )
        try:
            self._decode(reader)
        finally:
            reader.close()  # drops its hold on the last input (a view of the mapped file)
        if self.stage != 3:
            raise _corrupt("zstd frame did not end after its last block", self.rd.tell(), st.dec)
        frame_dec0 = self.frame_dec0
        if hdr.content_size is not None and st.dec - frame_dec0 != hdr.content_size:
            raise _corrupt(
                f"zstd frame holds {st.dec - frame_dec0} bytes, its header says {hdr.content_size}",
                self.at,
                st.dec,
            )
        # Candidates near the frame end are tested on what is left of the frame.
        pending = self.pending
        for c in pending:
            if c.future is None:
                self.src._submit(c, self.end_blocks, hdr, self.pool, st)
        while pending:
            concurrent.futures.wait([pending[0].future])
            if self.src._settle(pending, self.fidx, st) is not None:
                break
        for c in pending:
            c.future.cancel()

    def _decode(self, reader) -> None:
        """Run zstd over the frame, handing each piece of output to the scan."""
        st = self.st
        ring = memoryview(self.ring)
        region, size = self.region, len(self.ring)
        clock = time.thread_time
        on_chunk = st.on_chunk
        pos = 0  # where the next output goes in the ring
        while True:
            if pos + region > size:
                pos = 0
            t0 = clock()
            try:
                n = reader.readinto1(ring[pos : pos + region])
            except zstandard.ZstdError as e:
                if self.piece == "header":
                    raise _corrupt(f"bad zstd frame header ({e})", self.at, st.dec) from e
                if self.piece == "checksum":
                    raise _corrupt(
                        f"zstd frame checksum mismatch ({e})", self.end_blocks, st.dec
                    ) from e
                raise _corrupt(
                    f"corrupt zstd data ({e}) in the {self.batch_blocks} block(s) starting",
                    self.batch_at,
                    st.dec,
                ) from e
            self.ct += clock() - t0
            if n == 0:
                break  # all of the frame was handed out and zstd used it up
            if n >= region:
                raise SourceError(f"{self.src.path}: zstd returned more than a batch of blocks")
            view = ring[pos : pos + n]
            dec = st.dec
            on_chunk(dec, view)
            st.dec = dec + n
            if self.checkpoints:
                self._keep(pos, view)
            pos += n

    def _keep(self, pos: int, view: memoryview) -> None:
        """Track *view* (output at ring offset *pos*) as history and as candidates' truth.

        History is trimmed to the last window plus the newest region (less than
        ``window + region``); with the gap of under a region that wrapping leaves
        at the ring's end, the next region written never reaches live history in
        a ring of ``window + 3 * region``.
        """
        n = len(view)
        segs = self.segs
        segs.append((pos, n))
        self.hist += n
        while self.hist - segs[0][1] >= self.window:
            self.hist -= segs.popleft()[1]
        for c in self.pending:
            if c.future is None and c.got < c.need:
                take = min(n, c.need - c.got)
                c.bufs[1][c.got : c.got + take] = view[:take]
                c.got += take
                if c.got >= c.need:
                    self.src._submit(c, self.rd.tell(), self.hdr, self.pool, self.st)


class _ScanState:
    def __init__(self, on_chunk, progress, total: int) -> None:
        self.on_chunk, self.progress, self.total = on_chunk, progress, total
        self.next_progress = 0
        self.dec = 0
        self.cp_dec: list[int] = []
        self.cp_comp: list[int] = []
        self.cp_frame: list[int] = []
        self.blobs: list[bytes] = []
        self.spare: list[tuple[bytearray, bytearray]] = []  # candidate buffers to reuse
        self.cp_bytes = 0
        self.last_cost = 0
        self.stats = {
            "candidates": 0,  # boundaries tested by decoding
            "rejected_header": 0,  # boundaries whose block header reuses earlier tables
            "rejected_test": 0,  # tested boundaries whose decode failed or differed
            "checkpoints": 0,
            "window_bytes": 0,  # uncompressed window bytes kept, all checkpoints
        }


register(ZSTD_MAGIC_BYTES, ZstdSource)
# A zstd stream may begin with a skippable frame (any of 16 magic numbers).
for _low in range(16):
    register(struct.pack("<I", SKIPPABLE_MAGIC_BASE | _low), ZstdSource)


# --- benchmark (called by the bench helper; also `python -m vmafs.source.zstd FILE`) ---------


def benchmark(
    path: str,
    *,
    reads: int = 1000,
    read_size: int = 4096,
    seed: int = 0,
    zstd_cli: str = "zstd",
    on_chunk: Callable[[int, memoryview], None] | None = None,
) -> dict[str, float | int]:
    """Measure issue 4's source-level targets on one zstd file.

    - ``scan_ratio``: wall time of :meth:`ZstdSource.scan` (with *on_chunk*,
      default a no-op) over the wall time of ``zstd -q -d -c FILE >/dev/null``
      (run first, so both read a warm page cache);
    - ``index_ratio``: bytes of :meth:`ZstdSource.checkpoint_state` over the
      compressed file size;
    - ``read_p50_ms`` / ``read_p99_ms`` / ``read_max_ms``: *reads* random
      *read_size*-byte reads at 4 KiB-aligned offsets, on a fresh source that
      loaded the saved state (so its cache starts cold, as after a remount).

    The ``*_cpu*`` entries give the same in CPU seconds (the scan's include
    its checkpoint-testing thread), which a busy shared machine distorts less
    than wall time.
    """
    import random
    import resource
    import subprocess

    def child_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    with open(os.devnull, "wb") as null:
        c0, t0 = child_cpu(), time.perf_counter()
        subprocess.run([zstd_cli, "-q", "-d", "-c", path], stdout=null, check=True)
        zstd_s, zstd_cpu = time.perf_counter() - t0, child_cpu() - c0
    src = ZstdSource(path)
    scanned = src.needs_scan
    c0, t0 = time.process_time(), time.perf_counter()
    if scanned:
        src.scan(on_chunk or (lambda off, chunk: None))
    scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    state = src.checkpoint_state()
    index = sum(v.nbytes for v in state.values())
    stats = dict(src.scan_stats)
    size, csize, nframes = src.size, src.compressed_size, src.frames
    src.close()

    fresh = ZstdSource(path)
    if fresh.needs_scan:
        fresh.load_checkpoint_state(state)
    rnd = random.Random(seed)
    blocks = max(1, (size - read_size) // 4096)
    lat, cpu = [], []
    for _ in range(reads):
        off = rnd.randrange(blocks) * 4096
        c0, t0 = time.thread_time(), time.perf_counter()
        fresh.pread(off, read_size)
        lat.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    fresh.close()
    lat.sort()
    cpu.sort()
    return {
        "compressed_bytes": csize,
        "size": size,
        "frames": nframes,
        "checkpoints": len(state["cp_dec"]),
        "needed_scan": int(scanned),
        "zstd_d_s": round(zstd_s, 3),
        "scan_s": round(scan_s, 3),
        "scan_ratio": round(scan_s / zstd_s, 3) if scanned else 0.0,
        "index_bytes": index,
        "index_ratio": round(index / csize, 5),
        "read_p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
        "read_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 2),
        "read_max_ms": round(lat[-1] * 1e3, 2),
        "read_cpu_p99_ms": round(cpu[min(len(cpu) - 1, int(len(cpu) * 0.99))] * 1e3, 2),
        "zstd_d_cpu_s": round(zstd_cpu, 3),
        "scan_cpu_s": round(scan_cpu, 3),
        "scan_cpu_ratio": round(scan_cpu / zstd_cpu, 3) if scanned and zstd_cpu else 0.0,
        **{f"scan_{k}": v for k, v in stats.items()},
    }


if __name__ == "__main__":
    import json
    import sys

    for arg in sys.argv[1:]:
        print(json.dumps({"file": arg, **benchmark(arg)}))
