"""gzip input (``.vma.gz`` as vzdump writes it with ``gzip``/``pigz --rsyncable``).

Random access comes from `indexed_gzip`_ (zran): a seek point every
``spacing`` uncompressed bytes holds the 32 KiB of history that deflate may
refer back to, so a read inflates at most ``spacing`` bytes from the nearest
point.  Multi-member files (``cat a.gz b.gz``, pigz ``--independent``) and
rsyncable output are ordinary deflate to zran and need nothing special.

The scan makes two passes over the compressed file:

1. stdlib :mod:`zlib`, front to back, member by member: hands every
   uncompressed byte to ``on_chunk`` (the VMA index is built here), checks
   each member's CRC32 and ISIZE, and notices truncation and trailing
   garbage with the compressed offset where it happened.  indexed_gzip
   cannot do this part: reading through it does not check CRCs chunk by
   chunk and returns a cut-off stream as if it had ended.
2. zran builds its seek points (``seek`` forward in steps, so there is
   progress).  Building them while reading (``auto_build`` reads) costs the
   same: every read re-inflates from the last seek point.

On a large file with a second CPU, pass 2 runs in a helper process at the
same time as pass 1 (zran holds the GIL, so a thread could not overlap
them); otherwise they run one after the other.  Python's zlib inflates
faster than the ``gzip`` tool, so the two passes together cost about
1.2x the CPU of ``gzip -d``; see docs/compression.md for numbers.  The
seek points are saved in the side index (:mod:`vmafs.sidecar`) through
:meth:`checkpoint_state`.

.. _indexed_gzip: https://github.com/pauldmccarthy/indexed_gzip
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import zstandard

if TYPE_CHECKING:
    from indexed_gzip.indexed_gzip import _IndexedGzipFile

from ..errors import (
    CorruptStreamError,
    IndexCacheError,
    SourceError,
    StreamTruncatedError,
    naming_archive,
)
from . import register
from .base import BlockCache, BlockSource, check_trailing

GZIP_MAGIC = b"\x1f\x8b"

#: Uncompressed bytes between seek points: a random read inflates at most
#: this much; each point costs 32 KiB of memory (and, zstd-compressed, of
#: side index: about 1-2% of the archive at 2 MiB).
DEFAULT_SPACING = 2 << 20
_READ = 1 << 20  # compressed bytes per read in the scan
_OUT_MAX = 4 << 20  # uncompressed bytes per inflate call (bounds memory on zeros)
_BUILD_STEP = 64 << 20  # in-process seek-point building reports progress this often
_CACHE_UNITS = 8  # inflated spans kept for neighbouring reads (~2 MiB each)
_MAX_UNIT = 8 << 20  # longest span inflated as one unit

#: Files at least this large build their seek points in a helper process
#: while the scan inflates (smaller ones: not worth a process start)...
PARALLEL_MIN_SIZE = 32 << 20
#: ... started once the scan has handed this many bytes on.
_HELPER_AFTER = 16 << 20

ProgressFn = Callable[[int, int], None]
log = logging.getLogger(__name__)

# The helper: build zran seek points over an inherited fd, export them to stdout.
_CHILD = """
import os, sys
from indexed_gzip.indexed_gzip import _IndexedGzipFile
fd, spacing = int(sys.argv[1]), int(sys.argv[2])
z = _IndexedGzipFile(fileobj=os.fdopen(fd, "rb"), spacing=spacing, readbuf_size=1 << 20)
z.build_full_index()
z.export_index(fileobj=sys.stdout.buffer)
sys.stdout.buffer.flush()
"""


class GzipSource(BlockSource):
    """A gzip-compressed VMA stream with zran seek points.

    ``pread`` is thread-safe: it serialises on one zran handle.  (zran holds
    the GIL while it inflates, so more handles would not read in parallel
    and would each hold a copy of every seek point's window.)  Its blocks
    are the spans between seek points.
    """

    kind = "gzip"

    def __init__(self, path: str, *, spacing: int = DEFAULT_SPACING) -> None:
        super().__init__(path, BlockCache(max_blocks=_CACHE_UNITS))
        self.spacing = spacing
        self._zran: _IndexedGzipFile | None = None
        self._bounds = np.zeros(1, dtype=np.int64)  # blocks: spans between seek points
        self._lock = threading.Lock()  # the zran handle's

    # -- the scan --

    def _scan(self, on_chunk: Callable[[int, memoryview], None], progress: ProgressFn | None):
        """Inflate the whole file once for *on_chunk*, and build the seek points.

        On a large file with a spare CPU the seek points are built by a child
        process while this one inflates (zran holds the GIL, so a thread would
        not overlap); if the child fails for any reason, they are built here.
        """
        csize = self.compressed_size
        helper: list[subprocess.Popen] = []
        parallel = csize >= PARALLEL_MIN_SIZE and (os.cpu_count() or 1) >= 2
        total = csize if parallel else 2 * csize

        def start_helper() -> None:
            # Only once the caller has consumed a good part of the stream: a
            # caller that stops after the VMA header (vmafs list) starts none.
            if parallel and not helper:
                child = self._start_child()
                if child is not None:
                    helper.append(child)

        try:
            self.size, self.truncation = _inflate_all(
                self._fd, csize, on_chunk, progress, total, (_HELPER_AFTER, start_helper)
            )
            start_helper()
        except BaseException:
            for child in helper:
                child.kill()
                child.wait()
            raise
        z = self._finish_child(helper[0]) if helper else None
        if z is None:
            z = self._build_points(progress, 2 * csize)
        self._set_zran(z)  # a rescan replaces loaded checkpoints
        if progress is not None:
            progress(total, total)

    def _start_child(self) -> subprocess.Popen | None:
        fd = self._fd
        try:
            return subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(fd), str(self.spacing)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(fd,),
            )
        except OSError as e:
            log.info("%s: gzip seek points built in-process (%s)", self.path, e)
            return None

    def _finish_child(self, child: subprocess.Popen) -> _IndexedGzipFile | None:
        out, err = child.communicate()
        if child.returncode != 0 or not out:
            why = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            log.info("%s: seek point helper failed (%s); building in-process", self.path, why)
            return None
        z = self._new_handle()
        try:
            z.import_index(fileobj=io.BytesIO(out))
            # The helper saw the same open file; make sure it indexed all of it.
            last = z.pread(1, self.size - 1) if self.size else b""
            # (past the end of a cut file zran may decode the padding: see _new_handle)
            if len(last) != min(1, self.size) or (z.pread(1, self.size) and not self.truncation):
                raise ValueError("helper's seek points do not span the stream")
        except Exception as e:  # noqa: BLE001 - zran has its own types; any: rebuild
            z.close()
            log.info("%s: seek points from helper unusable (%s); building in-process", self.path, e)
            return None
        return z

    def stream(
        self, on_chunk: Callable[[int, memoryview], None], progress: ProgressFn | None = None
    ):
        """Pass 1 of :meth:`scan` only: every byte to *on_chunk*, no seek points.

        For one-shot consumers (``vmafs recompress``); the source stays unreadable.
        """
        c = self.compressed_size
        with naming_archive(self.path):
            self.size, self.truncation = _inflate_all(self._fd, c, on_chunk, progress, c)

    def _build_points(self, progress: ProgressFn | None, total: int) -> _IndexedGzipFile:
        """Pass 2 in this process: zran inflates once more, leaving seek points."""
        z = self._new_handle()
        csize, size = self.compressed_size, self.size
        pos = 0
        try:
            while pos < size:
                pos = min(size, pos + _BUILD_STEP)
                z.seek(pos)
                if progress is not None:
                    progress(csize + csize * pos // size, total)
        except Exception as e:  # zran reports everything as its own exception types
            z.close()
            raise CorruptStreamError(
                f"gzip seek points could not be built ({e}); did the file change during the scan?"
            ) from e
        return z

    def _new_handle(self, *, cut: bool | None = None) -> _IndexedGzipFile:
        """A zran handle on the file; *cut*: it is cut short (default: as the scan found)."""
        # Imported here: indexed_gzip's import costs ~40 ms (importlib.metadata),
        # which every vmafs command would pay for gzip support it does not use.
        from indexed_gzip.indexed_gzip import _IndexedGzipFile  # noqa: PLC0415

        if cut is None:
            cut = self.truncation is not None
        if not cut:
            fobj = os.fdopen(os.dup(self._fd), "rb")
        else:
            # zran fails on a member whose deflate data is whole but whose
            # trailer is cut (and then on its whole last span); given the
            # missing trailer bytes as zeros, and no CRC check (pass 1 checked
            # every whole member), it reads up to the cut as stdlib zlib does.
            fobj = _PaddedFile(self._fd, self.compressed_size)
        return _IndexedGzipFile(
            fileobj=fobj,
            spacing=self.spacing,
            readbuf_size=256 << 10,
            auto_build=True,
            skip_crc_check=cut,
        )

    # -- persistence (vmafs.sidecar) --

    def checkpoint_state(self) -> dict[str, np.ndarray]:
        """The seek points and stream length, for the side index."""
        if self._zran is None:
            raise SourceError("gzip: no seek points yet (scan first)")
        buf = io.BytesIO()
        with self._lock:
            self._zran.export_index(fileobj=buf)
        # The 32 KiB windows are raw stream bytes: compress them for the side index.
        packed = zstandard.ZstdCompressor(level=3).compress(buf.getvalue())
        cut = -1 if self.truncation is None else self.truncation.compressed_offset
        return {
            "meta": np.array([self.size, self.spacing, self.compressed_size, cut], dtype=np.int64),
            "zran_zst": np.frombuffer(packed, dtype=np.uint8),
        }

    def load_checkpoint_state(self, state: dict[str, np.ndarray]) -> None:
        """Adopt seek points saved by :meth:`checkpoint_state` (the caller checked identity)."""
        try:
            size, spacing, csize, cut = (int(x) for x in state["meta"])
            packed = np.asarray(state["zran_zst"], dtype=np.uint8).tobytes()
            blob = zstandard.ZstdDecompressor().decompress(packed)
        except (KeyError, ValueError, TypeError, zstandard.ZstdError) as e:
            raise IndexCacheError(f"gzip checkpoint state unusable: {e}") from e
        if csize != self.compressed_size:
            raise IndexCacheError("gzip checkpoint state is for a file of another size")
        truncation = None if cut < 0 else _cut(cut, size)
        z = self._new_handle(cut=truncation is not None)
        try:
            z.import_index(fileobj=io.BytesIO(blob))
        except Exception as e:
            z.close()
            raise IndexCacheError(f"gzip seek points do not load: {e}") from e
        self.size, self.spacing, self.truncation = size, spacing, truncation
        self._set_zran(z)

    # -- reading: blocks are the spans between seek points --

    def _locate(self, pos: int) -> tuple[int, int]:
        i = int(np.searchsorted(self._bounds, pos, side="right")) - 1
        return i, int(self._bounds[i])

    def _decode(self, i: int, ustart: int) -> bytes:
        """Inflate span *i* whole: zran starts at its seek point anyway."""
        uend = int(self._bounds[i + 1])
        with self._lock:
            # A reader that waited here for the same span finds it decoded.
            data = self._cache.peek(i)
            if data is not None:
                return data
            try:
                data = self._zran.pread(uend - ustart, ustart)
                while len(data) < uend - ustart:
                    more = self._zran.pread(uend - ustart - len(data), ustart + len(data))
                    if not more:
                        break
                    data += more
            except Exception as e:
                raise CorruptStreamError(
                    f"gzip read at stream offset {ustart} failed: {e}", offset=ustart
                ) from e
        if len(data) < uend - ustart:
            raise StreamTruncatedError(
                f"gzip stream ended before its scanned length {self.size}; did the file change?",
                offset=ustart + len(data),
                compressed_offset=os.fstat(self._fd).st_size,
            )
        return data

    def _set_zran(self, z: _IndexedGzipFile | None) -> None:
        """Adopt zran handle *z* (closing the previous one) and derive the read units."""
        with self._lock:
            old, self._zran = self._zran, z
            self._forget_blocks()
            if z is not None:
                pts = {0, self.size} | {int(u) for u, _ in z.seek_points() if u < self.size}
                bounds = []
                for a, b in itertools.pairwise(sorted(pts)):
                    bounds.extend(range(a, b, _MAX_UNIT))  # split an unusually long span
                bounds.append(self.size)
                self._bounds = np.array(bounds, dtype=np.int64)
            self.needs_scan = z is None  # as zstd: False once reads can be served
        if old is not None and old is not z:
            old.close()

    def close(self) -> None:
        self._set_zran(None)
        super().close()


class _PaddedFile(io.RawIOBase):
    """The gzip file *fd* of *size* bytes followed by :data:`_PAD` zero bytes, for zran."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd, self._size, self._pos = os.dup(fd), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size + _PAD}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = 0
        if self._pos < self._size:
            n = os.preadv(self._fd, [view[: self._size - self._pos]], self._pos)
        if self._pos + n >= self._size:  # the padding (a file grown since: its own bytes)
            pad = min(len(view) - n, self._size + _PAD - self._pos - n)
            view[n : n + pad] = bytes(pad)
            n += pad
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


#: Zero bytes after a cut gzip file: a whole gzip trailer's worth.
_PAD = 8


def _cut(at: int, out_pos: int, member_at: int | None = None) -> StreamTruncatedError:
    """The cut of a gzip file that ends at compressed offset *at*, after *out_pos* bytes."""
    member = "" if member_at is None else f" in the member at compressed offset {member_at}"
    return StreamTruncatedError(
        f"gzip stream truncated{member}: the file ends at compressed offset {at} without the "
        f"member's trailer, after {out_pos} uncompressed bytes",
        offset=out_pos,
        compressed_offset=at,
    )


def _inflate_all(
    fd: int, csize: int, on_chunk, progress: ProgressFn | None, total: int, when=None
) -> tuple[int, StreamTruncatedError | None]:
    """Inflate every member of the gzip file *fd*; returns (uncompressed length, cut).

    *when*, if given, is ``(n, callback)``: callback() runs once, after n
    uncompressed bytes have been handed to *on_chunk*.

    A file cut short is inflated as far as it goes (deflate yields its output
    as it goes; zran reads a cut file just as far): *cut* says where it ended,
    None when every member is whole.  Raises CorruptStreamError (offset =
    compressed file offset) on bad data, a failed CRC/length check or
    trailing garbage.
    """
    out_pos = 0
    base = 0  # compressed offset of the first byte of `pending`
    pending = b""
    member_at = 0  # compressed offset where the current member starts
    d = None  # decompressor of the current member; None between members
    eof = False
    while True:
        if not eof and len(pending) < 2:
            data = os.pread(fd, _READ, base + len(pending))
            if data:
                pending += data
            else:
                eof = True
        if not pending:
            break
        if d is None:
            if len(pending) < 2 and not eof:
                continue
            if not pending.startswith(GZIP_MAGIC):
                check_trailing(
                    fd,
                    base,
                    csize,
                    after="the last member",
                    container="a gzip member",
                    uoff=out_pos,
                )
                break
            d = zlib.decompressobj(31)
            member_at = base
        try:
            out = d.decompress(pending, _OUT_MAX)
            while True:
                if out:
                    on_chunk(out_pos, memoryview(out))
                    out_pos += len(out)
                    if when is not None and out_pos >= when[0]:
                        when[1]()
                        when = None
                if not d.unconsumed_tail:
                    break
                out = d.decompress(d.unconsumed_tail, _OUT_MAX)
        except zlib.error as e:
            raise CorruptStreamError(
                f"gzip data corrupt ({e}) in the member starting at compressed offset "
                f"{member_at}, within compressed bytes {base}..{base + len(pending)}, "
                f"after {out_pos} uncompressed bytes",
                offset=out_pos,
            ) from None
        if d.eof:
            rest = d.unused_data
            base += len(pending) - len(rest)
            pending = rest
            d = None
        else:
            base += len(pending)
            pending = b""
            if eof:
                break
        if progress is not None:
            progress(base, total)
    if progress is not None:
        progress(csize, total)
    return out_pos, None if d is None else _cut(base, out_pos, member_at)


register(GZIP_MAGIC, GzipSource)
