"""The zstd frame format (RFC 8878) as far as random access needs it.

Frame headers, block headers, the cheap test whether a block can start a
resume, and the *synthetic frame* that resumes decoding mid-frame: a frame
header with the original window size followed by the preceding output as
raw blocks (:func:`put_resume_prefix`).  Errors name the compressed offset.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import zstandard

from ...errors import CorruptStreamError, SourceError, StreamTruncatedError

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
#: The largest window accepted unless ``$VMAFS_ZSTD_MAX_WINDOW_MIB`` raises it:
#: zstd's own default decoding limit (``--memory=128MB``), which every level
#: without ``--long`` stays within.  A decoder holds a whole window in memory,
#: so a frame header must not size that allocation unchecked.
DEFAULT_WINDOW_LIMIT = 1 << 27
WINDOW_LIMIT_ENV = "VMAFS_ZSTD_MAX_WINDOW_MIB"


def window_limit() -> int:
    """The largest zstd window this process decodes (bytes)."""
    raw = os.environ.get(WINDOW_LIMIT_ENV, "")
    if raw.isdigit():
        return min(int(raw) << 20, MAX_WINDOW)
    return DEFAULT_WINDOW_LIMIT


def corrupt(msg: str, comp_off: int, dec_off: int | None = None) -> CorruptStreamError:
    return CorruptStreamError(f"{msg} at compressed offset {comp_off}", offset=dec_off)


def cut(msg: str, comp_off: int, dec_off: int | None = None) -> StreamTruncatedError:
    """The error of a zstd file that ends at *comp_off*, its usable data at *dec_off*."""
    return StreamTruncatedError(
        f"{msg} at compressed offset {comp_off}", offset=dec_off, compressed_offset=comp_off
    )


def frame_failed(e: Exception, comp_off: int, start: int, end: int, pos: int):
    """The error for a frame that would not decode between *start* and *end*."""
    what = "truncated" if isinstance(e, EOFError) else f"corrupt ({e})"
    return corrupt(
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


def parse_frame_header(head: bytes, comp_off: int, dec_off: int | None = None) -> FrameHeader:
    """Parse a zstd frame header at the start of *head* (magic included).

    A *head* too short for the header means the file ends inside it
    (StreamTruncatedError, its offset *dec_off*).
    """
    if len(head) < 6:
        raise cut("truncated zstd stream: the file ends inside the frame header", comp_off, dec_off)
    fhd = head[4]
    fcs_flag, single, reserved, checksum, dict_flag = (
        fhd >> 6,
        fhd >> 5 & 1,
        fhd >> 3 & 1,
        fhd >> 2 & 1,
        fhd & 3,
    )
    if reserved:
        raise corrupt("zstd frame header has its reserved bit set", comp_off)
    pos = 5
    wd = None
    if not single:
        wd = head[pos]
        pos += 1
    dsize = _DICT_ID_SIZES[dict_flag]
    fsize = _FCS_SIZES[fcs_flag] if (fcs_flag or not single) else 1
    end = pos + dsize + fsize
    if len(head) < end:
        raise cut("truncated zstd stream: the file ends inside the frame header", comp_off, dec_off)
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
        raise corrupt(f"zstd frame window of {window} bytes is too large", comp_off)
    limit = window_limit()
    if window > limit:
        need = -(-window // (1 << 20))
        raise SourceError(
            f"zstd frame at compressed offset {comp_off} needs a {need} MiB window to decode "
            f"(made with zstd --long?), more than the {limit >> 20} MiB allowed: set "
            f"{WINDOW_LIMIT_ENV}={need} to allow it (decoding then takes that much memory)",
            offset=None,
        )
    return FrameHeader(end, window, wd, fcs, bool(checksum), dict_id)


def block_is_candidate(body: bytes) -> bool:
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


def synthetic_header(window_descriptor: int) -> bytes:
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
    buf[at : at + 6] = synthetic_header(window_descriptor)
    pos, n = at + 6, len(window)
    for a in range(0, n, BLOCK_SIZE_MAX):
        b = min(a + BLOCK_SIZE_MAX, n)
        buf[pos : pos + 3] = ((b - a) << 3 | BLOCK_RAW << 1).to_bytes(3, "little")
        buf[pos + 3 : pos + 3 + b - a] = window[a:b]
        pos += 3 + b - a
    return pos


def decompressor() -> zstandard.ZstdDecompressor:
    """A decoder that accepts every window the format allows."""
    return zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)


def is_skippable(magic: int) -> bool:
    return magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC_BASE


def first_frame_at(fd: int, first: int) -> bool:
    """True when a zstd frame starts at *first*, after nothing but whole skippable frames.

    The first data frame need not start at 0: pzstd, for one, writes a
    skippable frame first.
    """
    pos = 0
    while pos < first:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            return False
        magic, n = struct.unpack("<II", head)
        if not is_skippable(magic):
            return False
        pos += 8 + n
    return pos == first and os.pread(fd, 4, first) == ZSTD_MAGIC_BYTES
