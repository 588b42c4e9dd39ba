"""Testing a checkpoint candidate: can decoding resume at this block boundary?

Whether a boundary qualifies cannot be read off its header (repeat offsets
live inside the compressed sequences), so the scan hands each candidate to
a worker thread, which decodes one window's worth of output from a synthetic
frame (:func:`~.frame.put_resume_prefix`) and compares it with the bytes
the scan produced.  The same test finds how little of the window suffices
(zstd refuses an offset before the start of the frame; zeroed bytes that a
match copies change the output), so a checkpoint keeps a short tail with
its unused incompressible parts zeroed, compressed.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
import zstandard

from .frame import cut, decompressor, put_resume_prefix, resume_prefix_size

_TRIM_LADDER = (256 << 10, 1 << 20, 4 << 20, 16 << 20)
_WINDOW_LEVEL = 1
_SEGMENT = 64 << 10  # unit of window masking
_MASK_MIN_ENTROPY = 7.4  # segments with more bits per byte (sampled) are worth masking...
_MASK_MIN_BYTES = 128 << 10  # ...when there are at least this many bytes of them
_MASK_TRIALS = 2  # all costly segments; if that fails, the older half
_CHECK_STEP = 256 << 10  # a candidate's output is compared in pieces of this size


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
        self.dctx = decompressor()
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
            raise cut("truncated zstd stream (file shorter than at its scan)", comp + got)
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


def try_candidate(
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


class Candidate:
    """A boundary under test: its window (the output before it) and truth (the output after).

    Both live in a buffer pair the scan reuses (``ScanState.spare``), so a
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
