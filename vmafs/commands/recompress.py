"""``vmafs recompress IN OUT.vma.zst``: any archive -> seekable zstd, in one pass.

The input (plain, or compressed in any form vmafs reads) is decompressed
once, front to back.  Every byte goes to two consumers:

- :class:`~vmafs.index.StreamIndexer`, which checks the VMA structure exactly
  as ``vmafs verify`` does, so a damaged archive is never turned into a
  good-looking seekable one;
- :class:`_Framer`, which finds the VMA extent boundaries and hands the
  stream to :class:`~vmafs.source.zstd_seekable.SeekableZstdWriter` one
  extent at a time, so that its frames hold whole extents (the header rides
  in the first frame).  Frame sizes are the writer's
  (:data:`~vmafs.source.zstd_seekable.FRAME_TARGET`, ``FRAME_LIMIT``), the
  same as for the VMA writer's own ``.vma.zst`` output.

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
from ..source.zstd_seekable import FRAME_LIMIT, FRAME_TARGET, SeekableZstdWriter
from ._common import add_progress_options
from .progress import Progress, human_bytes, want_progress

HELP = "rewrite an archive as seekable zstd (frames aligned to extents)"

DESCRIPTION = """\
Read IN (a plain .vma or a .vma.zst/.gz/.lzo, e.g. straight from vzdump),
check its VMA structure as `vmafs verify` does, and write OUT as zstd in
the seekable format: independent frames of whole VMA extents (1-4 MiB
each; a full extent is about 3.7 MiB) plus a seek table.  `zstd -d OUT`
yields the plain archive byte for byte, so Proxmox restores it as usual;
vmafs mounts it with random access and needs no side index.

OUT must not exist.  The data is written to OUT.tmp first and renamed when
complete; on any error OUT.tmp is removed and OUT is not created."""

EPILOG = """\
examples:
  vmafs recompress vzdump-qemu-100-2024_01_01-00_00_00.vma.zst vm100.seekable.vma.zst
  vmafs recompress --level 9 backup.vma.gz backup.vma.zst"""

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
            writer = SeekableZstdWriter(
                out,
                level=level,
                threads=threads,
                frame_target=frame_target,
                frame_limit=frame_limit,
            )
            framer = _Framer(writer)
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
