"""``vmafs recompress IN OUT.vma.zst``: any archive -> seekable zstd, in one pass.

The input (plain, or compressed in any form vmafs reads) is decompressed
once, front to back.  Every byte goes to two consumers:

- :class:`~vmafs.index.StreamIndexer`, which checks the VMA structure exactly
  as ``vmafs verify`` does, so a damaged archive is never turned into a
  good-looking seekable one;
- :class:`_Framer`, which cuts the stream at VMA extent boundaries into
  frames of at least :data:`FRAME_TARGET` bytes (whole extents; the header
  rides in the first frame) and hands them to
  :class:`~vmafs.source.zstd_seekable.SeekableZstdWriter`.

The output is written to ``OUT.tmp`` and linked to ``OUT`` only when the
whole input checked out; ``OUT`` is never overwritten.  ``zstd -d OUT``
gives back the plain archive byte for byte (what Proxmox's restore pipes),
and vmafs reads it at random with no side index.
"""

from __future__ import annotations

import errno
import os

from ..format import BLOCK_SIZE, EXTENT_HEADER_SIZE, HEADER_STRUCT_SIZE, Header
from ..index import StreamIndexer
from ..source import open_source
from ..source.zstd_seekable import SeekableZstdWriter
from ._common import add_progress_options
from .progress import Progress, human_bytes, want_progress

HELP = "rewrite an archive as seekable zstd (frames aligned to extents)"

DESCRIPTION = """\
Read IN (a plain .vma or a .vma.zst/.gz/.lzo, e.g. straight from vzdump),
check its VMA structure as `vmafs verify` does, and write OUT as zstd in
the seekable format: independent frames of whole VMA extents (about 4 MiB
and up each) plus a seek table.  `zstd -d OUT` yields the plain archive byte
for byte, so Proxmox restores it as usual; vmafs mounts it with random
access and needs no side index.

OUT must not exist.  The data is written to OUT.tmp first and renamed when
complete; on any error OUT.tmp is removed and OUT is not created."""

EPILOG = """\
examples:
  vmafs recompress vzdump-qemu-100-2024_01_01-00_00_00.vma.zst vm100.seekable.vma.zst
  vmafs recompress --level 9 backup.vma.gz backup.vma.zst"""

#: A frame is cut at the first extent boundary at or after this many bytes.
FRAME_TARGET = 4 << 20
_PLAIN_READ = 8 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser("recompress", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("input", metavar="IN", help="archive to read (plain or compressed)")
    p.add_argument("output", metavar="OUT", help="seekable .vma.zst to create (must not exist)")
    p.add_argument(
        "--level", type=int, default=3, metavar="N", help="zstd compression level (default 3)"
    )
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="zstd worker threads (default 0: none)"
    )
    add_progress_options(p)
    p.set_defaults(func=run)


class _Framer:
    """Groups the stream into frames of whole extents, at least *target* bytes each."""

    def __init__(self, write_frame, target: int = FRAME_TARGET) -> None:
        self.write_frame = write_frame
        self.target = target
        self.buf = bytearray()
        self.start = 0  # stream offset of buf[0]
        self.next: int | None = None  # offset of the next structure boundary

    def feed(self, chunk) -> None:
        self.buf += chunk
        end = self.start + len(self.buf)
        while True:
            if self.next is None:
                if len(self.buf) < HEADER_STRUCT_SIZE:
                    return
                # Validated by the StreamIndexer fed before us.
                self.next = Header.peek_size(bytes(self.buf[:HEADER_STRUCT_SIZE]))
                continue
            if self.next + 8 > end:
                return
            if self.next - self.start >= self.target:
                self._cut(self.next)
            rel = self.next - self.start
            blocks = int.from_bytes(self.buf[rel + 6 : rel + 8], "big")
            self.next += EXTENT_HEADER_SIZE + BLOCK_SIZE * blocks

    def _cut(self, at: int) -> None:
        n = at - self.start
        self.write_frame(memoryview(self.buf)[:n])
        del self.buf[:n]
        self.start = at

    def flush(self) -> None:
        if self.buf:
            self._cut(self.start + len(self.buf))


def recompress(
    src_path: str,
    out_path: str,
    *,
    level: int = 3,
    threads: int = 0,
    progress=None,
    frame_target: int = FRAME_TARGET,
) -> dict:
    """Write *out_path* (must not exist) as seekable zstd; returns some numbers."""
    if os.path.lexists(out_path):
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", out_path)
    tmp = out_path + ".tmp"
    source = open_source(src_path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except BaseException:
        source.close()
        raise
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            writer = SeekableZstdWriter(out, level=level, threads=threads)
            framer = _Framer(writer.write_frame, frame_target)
            indexer = StreamIndexer()

            def on_chunk(offset: int, chunk) -> None:
                indexer.feed(offset, chunk)
                framer.feed(chunk)

            size = _stream(source, on_chunk, progress)
            index = indexer.finish(size)  # raises unless the archive is whole and valid
            framer.flush()
            writer.close()
            out.flush()
            os.fsync(out.fileno())
            frames, csize = writer.frames, out.tell()
        os.link(tmp, out_path)  # fails rather than overwrite a file created meanwhile
    finally:
        source.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return {"size": size, "compressed": csize, "frames": frames, "extents": index.extents}


def _stream(source, on_chunk, progress) -> int:
    """Every byte of the VMA stream to *on_chunk*, in order; returns its length."""
    if source.needs_scan:
        # A one-pass decompressor that skips building random-access checkpoints, if offered.
        getattr(source, "stream", source.scan)(on_chunk, progress)
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
    with Progress("recompressing", enabled=show) as bar:
        r = recompress(
            args.input, args.output, level=args.level, threads=args.threads, progress=bar
        )
    print(
        f"{args.output}: {human_bytes(r['compressed'])} in {r['frames']} frames "
        f"({r['extents']} extents, {human_bytes(r['size'])} uncompressed)"
    )
    return 0
