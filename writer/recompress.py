"""``vmafs recompress IN OUT.vma.zst``: any archive -> seekable zstd, in one pass.

The input (plain, or compressed in any form vmafs reads) is decompressed
once, front to back.  Every byte goes to two consumers:

- :class:`~vmafs.index.StreamIndexer`, which checks the VMA structure exactly
  as ``vmafs verify`` does, so a damaged archive is never turned into a
  good-looking seekable one;
- :class:`_Framer`, which finds the VMA extent boundaries and hands the
  stream to :class:`~vmafs.zstd_seekable.SeekableZstdWriter` one
  extent at a time, so that its frames start at extents (the header rides
  in the first frame; a full extent is cut in two).  Frame sizes are the writer's
  (:data:`~vmafs.zstd_seekable.FRAME_TARGET`, ``FRAME_LIMIT``), the
  same as for the VMA writer's own ``.vma.zst`` output.

The output (an :class:`~vmafs.common.atomic.AtomicOutput`) is written to a
hidden temporary file beside ``OUT`` (``.OUT.XXXXXXXX.tmp``, a fresh name
per run, so a file left by a killed run never blocks the next one) and
linked to ``OUT`` only when the whole input checked out; ``OUT`` is never
overwritten. An error, SIGINT, SIGTERM, SIGHUP or SIGQUIT removes the
temporary file; only SIGKILL or a crash can leave one. ``OUT`` ``-`` streams
to stdout instead (no temporary file; a failure shows as the exit status and
a stream without seek table). ``zstd -d OUT`` gives back the plain archive
byte for byte (what Proxmox's restore pipes), and vmafs reads it at random
with no side index.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

import zstandard

from vmafs.common.atomic import AtomicOutput
from vmafs.common.progress import Progress, add_progress_options, human_bytes, want_progress
from vmafs.common.signals import STOP_SIGNALS, first_signal_raises, signals_deferred
from vmafs.format import BLOCK_SIZE, EXTENT_HEADER_SIZE, HEADER_STRUCT_SIZE, Header

# The one writer module that reads archives: converting one needs the reader's
# decompression (open_source) and its structure check (StreamIndexer).
# tests/test_layering.py allows exactly these two entry points, here only.
from vmafs.index import StreamIndexer
from vmafs.source import open_source
from vmafs.zstd_seekable import FRAME_LIMIT, FRAME_TARGET, SeekableZstdWriter

HELP = "rewrite an archive as seekable zstd (frames aligned to extents)"

DESCRIPTION = """\
Read IN (a plain .vma or a .vma.zst/.gz/.lzo, e.g. straight from vzdump),
check its VMA structure as `vmafs verify` does, and write OUT as zstd in
the seekable format: independent frames of 1-2 MiB that start at VMA
extents (a full extent, about 3.7 MiB, is cut in two) plus a seek table.  `zstd -d OUT`
yields the plain archive byte for byte, so Proxmox restores it as usual;
vmafs mounts it with random access and needs no side index.

OUT must not exist; its directory must.  The data is written to a hidden
temporary file beside OUT (.OUT.XXXXXXXX.tmp) and renamed when complete;
on any error, Ctrl-C, SIGTERM, SIGHUP or SIGQUIT the temporary file is
removed and OUT is not created.  Only a hard kill (SIGKILL, power loss) can leave a
temporary file behind; it never blocks a later run and may be deleted.

OUT `-` writes the stream to stdout (not a terminal) instead: no temporary
file, no summary line.  If IN turns out damaged, the stream stops early,
without its seek table, and the exit status is non-zero.  (A file named
`-` is `./-`.)"""

EPILOG = """\
examples:
  vmafs recompress vzdump-qemu-100-2024_01_01-00_00_00.vma.zst vm100.seekable.vma.zst
  vmafs recompress --level 9 backup.vma.gz backup.vma.zst
  vmafs recompress backup.vma.gz - | ssh host 'cat > backup.vma.zst'"""

_PLAIN_READ = 8 << 20

#: zstd's level range: ``ZSTD_minCLevel()`` (the fastest of the negative "fast"
#: levels; python-zstandard does not expose it) to ``ZSTD_maxCLevel()``.
#: Level 0 is zstd's default (3).
MIN_LEVEL = -(1 << 17)
MAX_LEVEL = zstandard.MAX_COMPRESSION_LEVEL
#: ``ZSTDMT_NBWORKERS_MAX`` of a 64-bit libzstd (more workers are not used).
MAX_THREADS = 256

#: What stops a recompression cleanly (the temporary file is removed; exit status
#: 128 + the signal's number): Ctrl-C, kill's default, the terminal or ssh session
#: going away, and Ctrl-\ (SIGQUIT).
SIGNALS = (*STOP_SIGNALS, signal.SIGQUIT)


def _int_in(lo: int, hi: int, what: str):
    """An argparse ``type=``: an int in [lo, hi], else a usage error naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {what} {lo} to {hi}")
        return value

    return parse


def register(subparsers) -> None:
    p = subparsers.add_parser("recompress", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("input", metavar="IN", help="archive to read (plain or compressed)")
    p.add_argument(
        "output",
        metavar="OUT",
        help="seekable .vma.zst to create (must not exist); '-' streams to stdout",
    )
    p.add_argument(
        "--level",
        type=_int_in(MIN_LEVEL, MAX_LEVEL, "zstd levels are"),
        default=3,
        metavar="N",
        help=f"zstd compression level, {MAX_LEVEL} (smallest) down to 1, or negative for "
        f"zstd's fast levels (down to {MIN_LEVEL}); default 3",
    )
    p.add_argument(
        "--threads",
        type=_int_in(0, MAX_THREADS, "zstd worker threads are"),
        default=0,
        metavar="N",
        help=f"zstd worker threads, 0 to {MAX_THREADS} (default 0: compress in this thread)",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


class _Framer:
    """Tells *writer* where each extent begins, so its frames hold whole extents.

    Walks the structure the way the StreamIndexer fed before it validated:
    the header, then extents whose length is in bytes 6-7 of their header.
    The first bytes of a structure are held back until its length is known,
    so :meth:`SeekableZstdWriter.unit` is called before any of its bytes
    are fed; everything else passes straight through, without buffering.
    """

    def __init__(self, writer: SeekableZstdWriter) -> None:
        self.writer = writer
        self.pos = 0  # stream offset of the next chunk
        self.next = 0  # stream offset of the structure being sized
        self.head = bytearray()  # its first bytes, held back
        self.in_header = True  # the structure at self.next is the VMA header

    def feed(self, chunk) -> None:
        mv = memoryview(chunk).cast("B")
        n, i = len(mv), 0
        while i < n:
            if self.pos + i < self.next:  # inside a structure: pass through to its end
                j = min(n, self.next - self.pos)
                self.writer.feed(mv[i:j])
                i = j
                continue
            want = HEADER_STRUCT_SIZE if self.in_header else 8
            take = mv[i : i + want - len(self.head)]
            self.head += take
            i += len(take)
            if len(self.head) < want:
                break
            if self.in_header:
                size = Header.peek_size(bytes(self.head))
                self.in_header = False
            else:
                size = EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(self.head[6:8], "big")
                self.writer.unit(size)
            self.writer.feed(self.head)
            self.head = bytearray()
            self.next += size
        self.pos += n

    def flush(self) -> None:
        """Feed bytes still held back (a cut-off structure; the indexer has refused it)."""
        if self.head:
            self.writer.feed(self.head)
            self.head = bytearray()


class Interrupted(BaseException):
    """A signal stopped the recompression (BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def recompress(
    src_path: str,
    out_path: str,
    *,
    level: int = 3,
    threads: int = 0,
    progress=None,
    frame_target: int = FRAME_TARGET,
    frame_limit: int = FRAME_LIMIT,
) -> dict:
    """Write *out_path* (must not exist; ``-``: stdout) as seekable zstd; returns some numbers."""
    outputs: list[AtomicOutput] = []
    try:
        return _recompress(
            src_path,
            out_path,
            outputs,
            level=level,
            threads=threads,
            progress=progress,
            frame_target=frame_target,
            frame_limit=frame_limit,
        )
    finally:
        for output in outputs:
            output.abort()


def _recompress(
    src_path: str, out_path: str, outputs: list[AtomicOutput], *, level, threads, progress, **frames
) -> dict:
    """The work of :func:`recompress`; the output, once created, is appended to *outputs*
    (in the same signal-free step, so the caller can always remove it)."""
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level {level} is out of range ({MIN_LEVEL} to {MAX_LEVEL})")
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"threads={threads} is out of range (0 to {MAX_THREADS})")
    AtomicOutput.check(out_path)  # before any input is read
    source = open_source(src_path)
    try:
        with signals_deferred(SIGNALS):
            output = AtomicOutput(out_path)
            outputs.append(output)
        writer = SeekableZstdWriter(output, level=level, threads=threads, **frames)
        framer = _Framer(writer)
        indexer = StreamIndexer()

        def on_chunk(offset: int, chunk) -> None:
            indexer.feed(offset, chunk)
            framer.feed(chunk)

        size = _stream(source, on_chunk, progress)
        # Raises unless the archive is whole and valid (a compressed file cut
        # short, on an extent boundary too, is not whole).
        index = indexer.finish(size, source.truncation)
        framer.flush()
        writer.close()
        output.commit()
    finally:
        source.close()
    return {
        "size": size,
        "compressed": output.size,
        "frames": writer.frames,
        "extents": index.extents,
    }


def _stream(source, on_chunk, progress) -> int:
    """Every byte of the VMA stream to *on_chunk*, in order; returns its length."""
    if source.needs_scan:
        # One pass that skips building random-access checkpoints where a source can.
        source.stream(on_chunk, progress)
        return source.size
    total = source.size
    pos = 0
    while True:
        data = source.pread(pos, _PLAIN_READ)
        if not data:
            break
        on_chunk(pos, memoryview(data))
        pos += len(data)
        if progress is not None:
            progress(pos, total)
    return pos


def run(args) -> int:
    show = want_progress(args.progress)
    outputs: list[AtomicOutput] = []
    try:
        with first_signal_raises(
            SIGNALS, Interrupted, ignore=lambda: any(o.committed for o in outputs)
        ):
            try:
                with Progress("recompressing", enabled=show) as bar:
                    r = _recompress(
                        args.input,
                        args.output,
                        outputs,
                        level=args.level,
                        threads=args.threads,
                        progress=bar,
                    )
            finally:
                for output in outputs:
                    output.abort()  # also after a signal cut a cleanup short
    except Interrupted as e:
        what = (
            "the stream on stdout is incomplete"
            if args.output == "-"
            else f"{args.output} was not created"
        )
        name = signal.Signals(e.signum).name
        # After a "^C" echoed on the terminal, start a line of our own (as cli.main does).
        newline = "\n" if e.signum == signal.SIGINT and sys.stderr.isatty() else ""
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            sys.stderr.write(f"{newline}vmafs: error: interrupted by {name}; {what}\n")
        return 128 + e.signum
    if args.output != "-":
        print(
            f"{args.output}: {human_bytes(r['compressed'])} in {r['frames']} frames "
            f"({r['extents']} extents, {human_bytes(r['size'])} uncompressed)"
        )
    return 0
