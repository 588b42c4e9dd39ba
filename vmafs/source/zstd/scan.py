"""The scan of a zstd stream: decode it once, in order, recording frames and checkpoints.

Frames are found by walking their headers (skippable frames skipped).  In a
frame whose window is small enough, block boundaries about one *spacing*
of decode CPU time apart become checkpoint candidates; each is tested in a
worker thread (:mod:`.checkpoint`) while the scan goes on, and kept if it
passes, within the *index budget* (stored windows relative to the
compressed file).  The result is a :class:`~.state.FrameTable`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import mmap
import os
import time
from collections import deque
from collections.abc import Callable

import zstandard

from ...errors import SourceError, StreamTruncatedError
from .checkpoint import Candidate, try_candidate
from .frame import (
    BLOCK_COMPRESSED,
    BLOCK_RESERVED,
    BLOCK_RLE,
    BLOCK_SIZE_MAX,
    ZSTD_MAGIC,
    FrameHeader,
    block_is_candidate,
    corrupt,
    cut,
    decompressor,
    is_skippable,
    parse_frame_header,
)
from .state import FRAME_CHECKSUM, FRAME_CUT, FrameTable

log = logging.getLogger(__name__)

#: Decode CPU seconds between checkpoints (a cold read costs about this much).
DEFAULT_SPACING = 0.035
#: Stored checkpoint windows, as a fraction of the compressed file size.
DEFAULT_INDEX_BUDGET = 0.045
#: No checkpoints in frames whose window is bigger (zstd --long=31): too costly to keep.
MAX_CHECKPOINT_WINDOW = 64 << 20
_MIN_CHECKPOINT_GAP = 1 << 20  # decompressed bytes, from the frame start or last checkpoint
_CANDIDATE_GAP = 192 << 10  # between candidates tested in parallel (if _MAX_PENDING > 1)
_MAX_PENDING = 1  # candidates in flight: one, since most pass and each test costs CPU
_MASK_WHEN_BUDGET_USED = 0.5  # mask only when the windows use over half the budget so far
_SCAN_CHUNK = 4 << 20
_BATCH_BLOCKS = 32  # blocks per decompress call in the scan (at most 4 MiB of output)
_PENDING_BATCH_BLOCKS = 8  # ... while a candidate waits: its test starts and ends sooner
#: The scan waits for a candidate's test once it has decoded this many spacings
#: past the candidate (a slow test thread must not stretch checkpoint gaps).
_MAX_TEST_LAG = 1.0
_PROGRESS_STEP = 16 << 20


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


class Scanner:
    """One scan of the zstd file *fd* (*size* bytes); :meth:`run` returns what it found.

    *spacing* (decode CPU seconds between checkpoints; None: make none) and
    *budget* (stored windows / compressed size) choose the checkpoints.
    """

    def __init__(self, fd: int, size: int, spacing: float | None, budget: float) -> None:
        self.fd, self.size, self.spacing, self.budget = fd, size, spacing, budget

    def run(
        self,
        on_chunk: Callable[[int, memoryview], None],
        progress: Callable[[int, int], None] | None,
    ) -> tuple[FrameTable, dict[str, int], StreamTruncatedError | None]:
        """Decode the whole stream, handing it to *on_chunk*; returns (table, statistics, cut).

        A file cut short is read up to its last whole block: a frame cut
        inside its blocks stays in the table as far as they go (marked
        :data:`~.state.FRAME_CUT`), and *cut* says where the data ended; it
        is None when the file is whole.
        """
        rd = _SeqReader(self.fd, self.size)
        st = ScanState(on_chunk, progress, self.size)
        frames: tuple[list, ...] = ([], [], [], [], [], [])
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmafs-zstd-ckpt")
        stop = None
        try:
            while rd.tell() < self.size:
                at = rd.tell()
                head = rd.peek(18)
                if len(head) < 4:
                    raise cut(
                        "truncated zstd stream: the file ends inside the frame magic", at, st.dec
                    )
                magic = int.from_bytes(head[:4], "little")
                if is_skippable(magic):
                    if len(head) < 8:
                        raise cut(
                            "truncated zstd stream: the file ends inside a skippable frame header",
                            at,
                            st.dec,
                        )
                    n = int.from_bytes(head[4:8], "little")
                    if rd.skip(8 + n) != 8 + n:
                        raise cut(
                            "truncated zstd stream: the file ends inside the skippable frame",
                            at,
                            st.dec,
                        )
                    continue
                if magic != ZSTD_MAGIC:
                    raise corrupt("not a zstd frame (bad magic)", at, st.dec)
                hdr = parse_frame_header(head, at, st.dec)
                dec0 = st.dec
                if hdr.dict_id:
                    raise SourceError(
                        f"zstd frame at compressed offset {at} needs dictionary {hdr.dict_id}, "
                        "which vmafs does not have"
                    )
                scan = _FrameScan(self, rd, hdr, len(frames[0]), st, pool)
                scan.run()
                if scan.cut is None:
                    end, flags = rd.tell(), FRAME_CHECKSUM if hdr.checksum else 0
                else:  # its whole blocks up to the cut; their checksum (if any) is gone
                    stop, end, flags = scan.cut, scan.end_blocks, FRAME_CUT
                if stop is None or st.dec > dec0:
                    row = (at, end - at, dec0, st.dec - dec0, hdr.window_descriptor, flags)
                    for lst, v in zip(frames, row, strict=True):
                        lst.append(v)
                if stop is not None:
                    break
        except StreamTruncatedError as e:  # cut between frames or inside a frame header
            stop = e
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            rd.close()
        if progress:
            progress(self.size, self.size)
        if not frames[0] and stop is None:
            raise corrupt("no zstd frame in the file", 0, 0)
        table = FrameTable(
            frames,
            (st.cp_dec, st.cp_comp, st.cp_frame),
            st.blobs,
            None if stop is None else stop.compressed_offset,
        )
        return table, st.stats, stop

    def _submit(self, c: Candidate, comp_end: int, hdr: FrameHeader, pool, st) -> None:
        # Masking costs decodes; worth it only when the index budget is getting tight.
        mask = st.cp_bytes > _MASK_WHEN_BUDGET_USED * self.budget * comp_end
        c.future = pool.submit(
            try_candidate,
            self.fd,
            c.comp,
            comp_end - c.comp,
            hdr.window_descriptor,
            c.window,
            c.truth,
            mask,
        )

    @staticmethod
    def _settle(pending: deque, fidx: int, st) -> Candidate | None:
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

    def __init__(
        self, scanner: Scanner, rd: _SeqReader, hdr: FrameHeader, fidx: int, st, pool
    ) -> None:
        self.scanner, self.rd, self.hdr, self.fidx, self.st, self.pool = (
            scanner,
            rd,
            hdr,
            fidx,
            st,
            pool,
        )
        self.window = hdr.window_size
        self.block_max = min(self.window, BLOCK_SIZE_MAX)
        self.frame_dec0 = st.dec
        self.checkpoints = self.window <= MAX_CHECKPOINT_WINDOW and scanner.spacing is not None
        self.need = self.window + BLOCK_SIZE_MAX  # output a candidate is tested on
        # One more byte than a batch can yield: a full region would mean zstd holds output back.
        self.region = _BATCH_BLOCKS * self.block_max + 1
        # History (a window) never meets the region being written: see _keep.
        self.ring = bytearray((self.window if self.checkpoints else 0) + 3 * self.region)
        self.segs: deque[tuple[int, int]] = deque()  # (ring offset, length) of recent output
        self.hist = 0  # bytes in segs
        self.ct = 0.0  # decode CPU seconds in this frame
        self.last_ct, self.last_dec = 0.0, self.frame_dec0
        self.pending: deque[Candidate] = deque()
        self.stage = 0  # 0: frame header next, 1: blocks, 2: checksum next, 3: all handed out
        self.at = self.batch_at = self.end_blocks = rd.tell()
        self.piece = "header"  # what the last piece handed out was: header, blocks, checksum
        self.batch_blocks = 0  # blocks in it
        #: Where the file ended inside this frame (None: it did not); the
        #: frame's whole blocks before it were decoded (``end_blocks``).
        self.cut: StreamTruncatedError | None = None

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
                # Every block is in: stop here (no checksum to check).
                self.cut = cut(
                    "truncated zstd stream: the file ends inside the frame checksum",
                    self.end_blocks,
                    st.dec,
                )
                return b""
            return cks
        return b""

    def _blocks(self) -> memoryview:
        """The next batch of whole blocks (a view of the read buffer)."""
        rd, st = self.rd, self.st
        pending = self.pending
        checkpoints = self.checkpoints
        spacing, budget = self.scanner.spacing, self.scanner.budget
        block_max = self.block_max
        if pending and pending[0].future is not None:
            c = pending[0]
            if not c.future.done() and self.ct - c.ct > _MAX_TEST_LAG * spacing:
                # The test thread fell behind (a loaded machine): wait for it,
                # so that checkpoints stay about one spacing apart and a cold
                # read stays about that cheap.
                concurrent.futures.wait([c.future])
            if c.future.done():
                accepted = self.scanner._settle(pending, self.fidx, st)
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
                    return self._stop(
                        "truncated zstd stream: the file ends inside the block header", bpos
                    )
                bstart = rd._i
            buf, i = rd._buf, rd._i
            h = buf[i] | buf[i + 1] << 8 | buf[i + 2] << 16
            btype, bsize = h >> 1 & 3, h >> 3
            if btype == BLOCK_RESERVED:
                raise corrupt("zstd block of reserved type", bpos, st.dec)
            if bsize > block_max:
                raise corrupt(
                    f"zstd block of {bsize} bytes exceeds the maximum {block_max}", bpos, st.dec
                )
            clen = 3 + (1 if btype == BLOCK_RLE else bsize)
            if i + clen > len(buf):
                if nblocks:
                    break
                if not rd.ensure(clen):
                    return self._stop("truncated zstd stream: the file ends inside the block", bpos)
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

    def _stop(self, what: str, bpos: int) -> bytes:
        """End the frame's input at a cut before the block at *bpos* (zstd has decoded
        everything handed out before: ``st.dec`` is where the usable data ends)."""
        self.cut = cut(what, bpos, self.st.dec)
        self.end_blocks = bpos
        self.stage = 3
        return b""

    def _candidate(self, bpos: int, btype: int, buf: bytes, i: int, clen: int) -> None:
        st, dec = self.st, self.st.dec
        pending = self.pending
        if dec - self.last_dec < _MIN_CHECKPOINT_GAP or (
            pending and dec - pending[-1].dec < _CANDIDATE_GAP
        ):
            return
        if btype == BLOCK_COMPRESSED and not block_is_candidate(buf[i + 3 : i + clen]):
            st.stats["rejected_header"] += 1
            return
        c = Candidate(dec, bpos, self.ct, self._buffers(), self.need)
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
        reader = decompressor().stream_reader(
            self, read_size=_SCAN_CHUNK, read_across_frames=False, closefd=False
        )
        try:
            self._decode(reader)
        finally:
            reader.close()  # drops its hold on the last input (a view of the mapped file)
        if self.cut is not None:
            return  # candidates still waiting are dropped: their blocks ran out
        if self.stage != 3:
            raise corrupt("zstd frame did not end after its last block", self.rd.tell(), st.dec)
        frame_dec0 = self.frame_dec0
        if hdr.content_size is not None and st.dec - frame_dec0 != hdr.content_size:
            raise corrupt(
                f"zstd frame holds {st.dec - frame_dec0} bytes, its header says {hdr.content_size}",
                self.at,
                st.dec,
            )
        # Candidates near the frame end are tested on what is left of the frame.
        pending = self.pending
        for c in pending:
            if c.future is None:
                self.scanner._submit(c, self.end_blocks, hdr, self.pool, st)
        while pending:
            concurrent.futures.wait([pending[0].future])
            if self.scanner._settle(pending, self.fidx, st) is not None:
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
                    raise corrupt(f"bad zstd frame header ({e})", self.at, st.dec) from e
                if self.piece == "checksum":
                    raise corrupt(
                        f"zstd frame checksum mismatch ({e})", self.end_blocks, st.dec
                    ) from e
                raise corrupt(
                    f"corrupt zstd data ({e}) in the {self.batch_blocks} block(s) starting",
                    self.batch_at,
                    st.dec,
                ) from e
            self.ct += clock() - t0
            if n == 0:
                break  # all of the frame was handed out and zstd used it up
            if n >= region:
                raise SourceError("zstd returned more than a batch of blocks")
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
                    self.scanner._submit(c, self.rd.tell(), self.hdr, self.pool, self.st)


class ScanState:
    """What the scan has found so far, shared by the frame scans and the candidate tests."""

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
