"""``vmafs index ARCHIVE``: build the side index of an archive ahead of time.

The first mount (or list/extract) of a ``.vma.zst``/``.vma.gz``/``.vma.lzo``
that is one long compressed stream has to decompress it once, and that of a
plain ``.vma`` reads every extent header (one seek per ~3.8 MB, slow on a
NAS); this command does that work up front, e.g. right after the backup
(see contrib/vzdump-hook-vmafs-index), and saves the result as
``ARCHIVE.vmafs-index`` or in the cache directory (:mod:`vmafs.sidecar`).
"""

from __future__ import annotations

import os

from .. import sidecar
from ..archive import has_plain_side_index, walk_headers
from ..common.progress import Progress, add_progress_options, human_bytes, want_progress
from ..errors import naming_archive
from ..index import StreamIndexer
from ..source import open_source

HELP = "build the side index of an archive ahead of time"

DESCRIPTION = """\
Read ARCHIVE once, check its VMA structure on the way, and save the offset
map (and, for a compressed archive, the checkpoints) that let later mounts
skip that read: a compressed archive is not decompressed again, and a plain
one's extent headers (one seek per ~3.8 MB of archive, slow on backup
storage that seeks) are not walked again.  The side index goes beside the archive
(ARCHIVE.vmafs-index) when that directory is writable, else into the cache
directory ($VMAFS_CACHE_DIR, else $XDG_CACHE_HOME/vmafs, else ~/.cache/vmafs),
named by a hash of the archive's absolute path.

An index that is already valid for the archive is kept unless --force is
given.  A stale or damaged one is replaced.  Seekable zstd (vmafs's own
writer output, pzstd) needs no side index; for it this command says so and
does nothing."""

EPILOG = """\
examples:
  vmafs index /var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.vma.zst
  vmafs index --cache-dir /var/cache/vmafs backup.vma.gz
    (mount finds it there with VMAFS_CACHE_DIR=/var/cache/vmafs)"""


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma, plain or .zst, .gz, .lzo")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid index exists")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="write the index into DIR (named by path hash) instead of beside the archive",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="index an interrupted backup too (missing clusters read as errors)",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    # StreamIndexer.finish raises after the scan ("stored twice", "incomplete"): name the file.
    with naming_archive(args.archive):
        return _index(args)


def _index(args) -> int:
    path = args.archive
    source = open_source(path)
    try:
        if not source.needs_scan and not has_plain_side_index(source):
            print(f"{path}: random access without a side index; nothing to do")
            return 0
        if not args.force:
            found = sidecar.find(
                source,
                allow_incomplete=args.allow_incomplete,
                directory=args.cache_dir,
                beside=args.cache_dir is None,
            )
            if found is not None:
                print(f"{path}: side index is up to date: {found[0]}")
                return 0
        show = want_progress(args.progress)
        with Progress("indexing", enabled=show) as bar:
            if source.needs_scan:
                indexer = StreamIndexer(allow_incomplete=args.allow_incomplete)
                source.scan(indexer.feed, bar)
                header, index = indexer.header, indexer.finish(source.size)
            else:
                header, index = walk_headers(source, args.allow_incomplete, bar)
        dest = sidecar.save(
            source,
            header,
            index,
            directory=args.cache_dir,
            beside=args.cache_dir is None,
            strict=True,
        )
        size = os.path.getsize(dest)
        print(
            f"{path}: side index written to {dest} ({human_bytes(size)}, "
            f"{100 * size / max(1, os.path.getsize(path)):.1f}% of the archive)"
        )
        return 0
    finally:
        source.close()
