"""lzop input (``.vma.lzo`` as vzdump writes it with ``lzop``).

An lzop file is a header and then independently compressed blocks (256 KiB
of input each by default)::

    u32 dst_len            uncompressed length; 0 ends the stream
    u32 src_len            compressed length; == dst_len: stored, not compressed
    [u32 adler32(data)]    if F_ADLER32_D
    [u32 crc32(data)]      if F_CRC32_D
    [u32 adler32(cdata)]   if F_ADLER32_C and src_len < dst_len
    [u32 crc32(cdata)]     if F_CRC32_C and src_len < dst_len
    src_len bytes          raw LZO1X (methods 1, 2, 3 all decode as LZO1X)

(all big-endian).  Random access is therefore a table of blocks built in one
pass; a read decompresses only the blocks it touches (python-lzo) and checks
their checksums.  The scan decompresses every block anyway, because the VMA
index is built from the stream in the same pass and every checksum is
checked once up front.  Several lzop files concatenated are read as one
stream, as ``lzop -d`` does.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable

import lzo
import numpy as np

from ..errors import CorruptStreamError, IndexCacheError, SourceError, StreamTruncatedError
from . import register
from .base import BlockCache, BlockSource, check_trailing

LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"

# Header flags (lzop's conf.h).
F_ADLER32_D = 0x00000001
F_ADLER32_C = 0x00000002
F_STDIN = 0x00000004
F_STDOUT = 0x00000008
F_NAME_DEFAULT = 0x00000010
F_DOSISH = 0x00000020
F_H_EXTRA_FIELD = 0x00000040
#: lzop itself never writes an extra field; one this long is not an lzop file,
#: and its length field must not size a read (4 GiB at most otherwise).
MAX_EXTRA_FIELD = 64 << 10
F_H_GMTDIFF = 0x00000080
F_CRC32_D = 0x00000100
F_CRC32_C = 0x00000200
F_MULTIPART = 0x00000400
F_H_FILTER = 0x00000800
F_H_CRC32 = 0x00001000
F_H_PATH = 0x00002000
F_MASK = 0x00003FFF
F_OS_MASK = 0xFF000000
F_CS_MASK = 0x00F00000
F_RESERVED = (F_MASK | F_OS_MASK | F_CS_MASK) ^ 0xFFFFFFFF

M_LZO1X_1 = 1
M_LZO1X_1_15 = 2
M_LZO1X_999 = 3
_METHODS = {M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999}

MAX_BLOCK_SIZE = 64 << 20  # lzop refuses larger blocks
_READ = 4 << 20
_CACHE_BLOCKS = 16  # decompressed blocks kept for neighbouring reads

ProgressFn = Callable[[int, int], None]


class _Reader:
    """Sequential reads of the compressed file that know their file offset."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.pos = 0  # file offset of buf[0]
        self.buf = b""
        self.i = 0
        self.stream_pos = 0  # uncompressed bytes produced so far (error offsets)

    @property
    def offset(self) -> int:
        return self.pos + self.i

    def read(self, n: int, what: str) -> bytes:
        if self.i + n > len(self.buf):
            self.pos += self.i
            self.buf = self.buf[self.i :] + os.pread(
                self.fd, max(_READ, n - (len(self.buf) - self.i)), self.pos + len(self.buf) - self.i
            )
            self.i = 0
            if n > len(self.buf):
                raise StreamTruncatedError(
                    f"lzop stream truncated inside {what}: {n} bytes needed at compressed "
                    f"offset {self.pos}, the file ends at {self.size}",
                    offset=self.stream_pos,
                    compressed_offset=self.pos,
                )
        out = self.buf[self.i : self.i + n]
        self.i += n
        return out

    def at_end(self) -> bool:
        if self.i < len(self.buf):
            return False
        return self.offset >= self.size


def _u32(b: bytes, i: int = 0) -> int:
    return int.from_bytes(b[i : i + 4], "big")


def _parse_header(r: _Reader) -> int:
    """Read one lzop file header at *r*; returns its flags."""
    at, here = r.offset, r.stream_pos
    where = f"lzop header at compressed offset {at}"
    if r.read(len(LZOP_MAGIC), "the lzop magic") != LZOP_MAGIC:
        raise CorruptStreamError(f"{where}: bad magic", offset=here)
    raw = bytearray()

    def take(n: int) -> bytes:
        b = r.read(n, "the lzop header")
        raw.extend(b)
        return b

    version = int.from_bytes(take(2), "big")
    take(2)  # lib_version
    if version >= 0x0940:
        needed = int.from_bytes(take(2), "big")
        if needed > 0x1040:
            raise SourceError(f"{where} needs lzop version {needed:#x} to extract", offset=here)
    method = take(1)[0]
    if version >= 0x0940:
        take(1)  # level
    flags = _u32(take(4))
    if flags & F_H_FILTER:
        take(4)
    take(4)  # mode
    take(4)  # mtime low
    if version >= 0x0940:
        take(4)  # mtime high
    name_len = take(1)[0]
    take(name_len)
    stored = _u32(r.read(4, "the lzop header checksum"))
    want = zlib.crc32(raw) if flags & F_H_CRC32 else zlib.adler32(raw)
    if stored != want:
        raise CorruptStreamError(
            f"{where}: checksum mismatch (stored {stored:#010x}, computed {want:#010x})",
            offset=here,
        )
    if version < 0x0900:
        raise SourceError(f"{where}: version {version:#x} is too old", offset=here)
    if flags & F_RESERVED:
        raise CorruptStreamError(f"{where} has reserved flags set ({flags:#010x})", offset=here)
    if method not in _METHODS:
        raise SourceError(f"{where}: method {method} is not LZO1X (only 1, 2, 3 are)", offset=here)
    if flags & F_H_FILTER:
        raise SourceError(f"{where}: files made with --filter are not supported", offset=here)
    if flags & F_MULTIPART:
        raise SourceError(f"{where}: multi-part files are not supported", offset=here)
    if flags & F_H_EXTRA_FIELD:
        ext = r.read(4, "the lzop extra field")
        n = _u32(ext)
        if n > MAX_EXTRA_FIELD:
            raise CorruptStreamError(
                f"{where}: extra field of {n} bytes (lzop writes none; at most "
                f"{MAX_EXTRA_FIELD} are read): not an lzop file vmafs can read",
                offset=here,
            )
        ext += r.read(n, "the lzop extra field")
        stored = _u32(r.read(4, "the lzop extra field checksum"))
        want = zlib.crc32(ext) if flags & F_H_CRC32 else zlib.adler32(ext)
        if stored != want:
            raise CorruptStreamError(f"{where}: extra field checksum mismatch", offset=here)
    return flags


class LzoSource(BlockSource):
    """An lzop-compressed VMA stream; random access by block table."""

    kind = "lzo"

    def __init__(self, path: str) -> None:
        super().__init__(path, BlockCache(max_blocks=_CACHE_BLOCKS))
        self._table: dict[str, np.ndarray] | None = None
        self._starts: np.ndarray | None = None  # uncompressed offset of each block

    # -- the scan --

    def _scan(self, on_chunk, progress) -> None:
        """Walk every block once: check it, feed it to *on_chunk*, record where it lives.

        A file cut short ends the walk at the last whole block (``truncation``
        says where the cut is): a block is only checked, and handed on, whole.
        """
        r = _Reader(self._fd, self.compressed_size)
        cols: dict[str, list[int]] = {k: [] for k in _COLUMNS}
        try:
            out_pos = self._walk(r, cols, on_chunk, progress)
            cut = None
        except StreamTruncatedError as e:
            out_pos, cut = r.stream_pos, e
        table = {k: np.array(v, dtype=_COLUMNS[k]) for k, v in cols.items()}
        self._adopt(table, out_pos, cut)
        if progress is not None:
            progress(self.compressed_size, self.compressed_size)

    def _walk(self, r: _Reader, cols: dict[str, list[int]], on_chunk, progress) -> int:
        """The blocks of every lzop file in a row, into *cols*; returns the stream length."""
        out_pos = 0
        last = 0
        while True:
            flags = _parse_header(r)
            while True:
                at = r.offset
                dst_len = _u32(r.read(4, "a block header"))
                if dst_len == 0:
                    break
                src_len = _u32(r.read(4, "a block header"))
                sums = [0, 0, 0, 0]  # d_adler, d_crc, c_adler, c_crc
                if flags & F_ADLER32_D:
                    sums[0] = _u32(r.read(4, "a block header"))
                if flags & F_CRC32_D:
                    sums[1] = _u32(r.read(4, "a block header"))
                if src_len < dst_len:
                    if flags & F_ADLER32_C:
                        sums[2] = _u32(r.read(4, "a block header"))
                    if flags & F_CRC32_C:
                        sums[3] = _u32(r.read(4, "a block header"))
                _check_lengths(dst_len, src_len, at, out_pos)
                data_at = r.offset
                data = r.read(src_len, "a block's data")
                block = _decode(data, dst_len, flags, sums, data_at, out_pos)
                on_chunk(out_pos, memoryview(block))
                for k, v in zip(
                    _COLUMNS, (out_pos, data_at, src_len, dst_len, flags, *sums), strict=True
                ):
                    cols[k].append(v)
                out_pos += dst_len
                r.stream_pos = out_pos
                if progress is not None and r.offset - last >= 16 << 20:
                    progress(r.offset, self.compressed_size)
                    last = r.offset
            if r.at_end():
                break
            rest_at = r.offset
            head = r.read(min(len(LZOP_MAGIC), self.compressed_size - rest_at), "trailing data")
            if head != LZOP_MAGIC:
                check_trailing(
                    self._fd,
                    rest_at,
                    self.compressed_size,
                    after="the end-of-stream marker",
                    container="an lzop file",
                    uoff=out_pos,
                )
                break
            r.i -= len(LZOP_MAGIC)  # let _parse_header see the magic
        return out_pos

    def _adopt(
        self, table: dict[str, np.ndarray], size: int, cut: StreamTruncatedError | None
    ) -> None:
        self._table = table
        self._starts = table["uoff"]
        self._forget_blocks()
        self.size = size
        self.truncation = cut
        self.needs_scan = False  # as zstd: False once reads can be served

    # -- persistence (vmafs.sidecar) --

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        if self._table is None:
            raise SourceError("lzop: no block table yet (scan first)")
        state = dict(self._table)
        cut = -1 if self.truncation is None else self.truncation.compressed_offset
        state["meta"] = np.array([self.size, self.compressed_size, cut], dtype=np.int64)
        return state

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        try:
            size, csize, cut = (int(x) for x in state["meta"])
            table = {k: np.asarray(state[k], dtype=dt) for k, dt in _COLUMNS.items()}
        except (KeyError, ValueError, TypeError) as e:
            raise IndexCacheError(f"lzop block table unusable: {e}") from e
        n = len(table["uoff"])
        ok = (
            csize == self.compressed_size
            and all(len(v) == n for v in table.values())
            and (n == 0 or int(table["uoff"][0]) == 0)
            and int(table["ulen"].sum(dtype=np.int64)) == size
            and np.array_equal(table["uoff"][1:], np.cumsum(table["ulen"], dtype=np.int64)[:-1])
            and (n == 0 or int(table["coff"][-1]) + int(table["clen"][-1]) <= csize)
            and -1 <= cut <= csize
        )
        if not ok:
            raise IndexCacheError("lzop block table does not fit the file")
        self._adopt(table, size, None if cut < 0 else _cut(cut, size))

    # -- reading: blocks are the lzop blocks --

    def _locate(self, pos: int) -> tuple[int, int]:
        i = int(np.searchsorted(self._starts, pos, side="right")) - 1
        return i, int(self._starts[i])

    def _decode(self, i: int, start: int) -> bytes:
        t = self._table
        coff, clen, ulen = int(t["coff"][i]), int(t["clen"][i]), int(t["ulen"][i])
        sums = [int(t[k][i]) for k in ("d_adler", "d_crc", "c_adler", "c_crc")]
        raw = os.pread(self._fd, clen, coff)
        if len(raw) != clen:
            raise StreamTruncatedError(
                f"lzop block data at compressed offset {coff} cut short (file shrank?)",
                offset=start,
                compressed_offset=coff + len(raw),
            )
        return _decode(raw, ulen, int(t["flags"][i]), sums, coff, start)


def _cut(at: int, size: int) -> StreamTruncatedError:
    """The cut a saved block table recorded: the file ends at *at*, after *size* bytes."""
    return StreamTruncatedError(
        f"lzop stream truncated at compressed offset {at}", offset=size, compressed_offset=at
    )


# Block table columns and their dtypes (also the side index layout).
_COLUMNS = {
    "uoff": np.int64,  # uncompressed offset of the block
    "coff": np.int64,  # file offset of its (compressed) data
    "clen": np.uint32,
    "ulen": np.uint32,
    "flags": np.uint32,  # header flags of the lzop member it belongs to
    "d_adler": np.uint32,
    "d_crc": np.uint32,
    "c_adler": np.uint32,
    "c_crc": np.uint32,
}


def _check_lengths(dst_len: int, src_len: int, at: int, uoff: int) -> None:
    where = f"lzop block header at compressed offset {at}"
    if dst_len > MAX_BLOCK_SIZE:
        raise CorruptStreamError(
            f"{where} claims {dst_len} bytes (max {MAX_BLOCK_SIZE})", offset=uoff
        )
    if src_len == 0 or src_len > dst_len:
        raise CorruptStreamError(
            f"{where}: impossible lengths (compressed {src_len}, uncompressed {dst_len})",
            offset=uoff,
        )


def _decode(data: bytes, dst_len: int, flags: int, sums, data_at: int, uoff: int) -> bytes:
    """Check and decompress one block whose data starts at compressed offset *data_at*."""
    d_adler, d_crc, c_adler, c_crc = sums
    where = f"lzop block at compressed offset {data_at}"
    if len(data) < dst_len:
        if flags & F_ADLER32_C and zlib.adler32(data) != c_adler:
            raise CorruptStreamError(f"{where}: adler32 of compressed data mismatch", offset=uoff)
        if flags & F_CRC32_C and zlib.crc32(data) != c_crc:
            raise CorruptStreamError(f"{where}: crc32 of compressed data mismatch", offset=uoff)
        try:
            out = lzo.decompress(data, False, dst_len)
        except lzo.error as e:
            raise CorruptStreamError(f"{where}: LZO data corrupt ({e})", offset=uoff) from None
        if len(out) != dst_len:
            raise CorruptStreamError(
                f"{where}: decompressed to {len(out)} bytes, header says {dst_len}", offset=uoff
            )
    else:
        out = data
    if flags & F_ADLER32_D and zlib.adler32(out) != d_adler:
        raise CorruptStreamError(f"{where}: adler32 of uncompressed data mismatch", offset=uoff)
    if flags & F_CRC32_D and zlib.crc32(out) != d_crc:
        raise CorruptStreamError(f"{where}: crc32 of uncompressed data mismatch", offset=uoff)
    return out


register(LZOP_MAGIC, LzoSource)
