"""``vmafs index ARCHIVE``: build the side index of an archive ahead of time.

The first mount (or list/extract) of a ``.vma.zst``/``.vma.gz``/``.vma.lzo``
that is one long compressed stream has to decompress it once, and that of a
plain ``.vma`` reads every extent header (one seek per ~3.8 MB, slow on a
NAS); this command does that work up front, e.g. right after the backup
(see contrib/vzdump-hook-vmafs-index), and saves the result in the cache
directory, or as ``ARCHIVE.vmafs-index`` with ``--beside``
(:mod:`vmafs.sidecar`).  ``--list`` and ``--prune`` show and clean the
cache (:mod:`vmafs.sidecar_cache`).
"""

from __future__ import annotations

import os
import time

from .. import sidecar, sidecar_cache
from ..archive import has_plain_side_index, index_by_scan, walk_headers
from ..common.progress import Progress, add_progress_options, human_bytes, want_progress
from ..errors import naming_archive, offering_read_anyway
from ..source import open_source

HELP = "build the side index of an archive ahead of time"

DESCRIPTION = """\
Read ARCHIVE once, check its VMA structure on the way, and save the offset
map (and, for a compressed archive, the checkpoints) that let later mounts
skip that read: a compressed archive is not decompressed again, and a plain
one's extent headers (one seek per ~3.8 MB of archive, slow on backup
storage that seeks) are not walked again.  The side index goes into the cache
directory ($VMAFS_CACHE_DIR, else /var/cache/vmafs for root, else
$XDG_CACHE_HOME/vmafs, i.e. ~/.cache/vmafs), named by a hash of the
archive's absolute path; nothing is written beside the archive unless
--beside.  The cache is capped at $VMAFS_CACHE_MAX_MIB MiB (default 1024):
the least recently used side indexes are removed when a new one would
exceed it.

An index that is already valid for the archive is kept unless --force is
given.  A stale or damaged one is replaced.  Seekable zstd (vmafs's own
writer output, pzstd) needs no side index; for it this command says so and
does nothing."""

EPILOG = """\
examples:
  vmafs index /var/lib/vz/dump/vzdump-qemu-100-2024_01_01-00_00_00.vma.zst
  vmafs index --beside backup.vma.gz   (writes backup.vma.gz.vmafs-index)
  vmafs index --list                   (what the cache holds, for which archive)
  vmafs index --prune                  (remove entries of deleted or changed archives)"""


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", nargs="?", help="a .vma, plain or .zst, .gz, .lzo")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid index exists")
    p.add_argument(
        "--beside",
        action="store_true",
        help="write the index beside the archive (ARCHIVE.vmafs-index), not into the cache",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="the cache directory to use (default: $VMAFS_CACHE_DIR, /var/cache/vmafs "
        "for root, else ~/.cache/vmafs)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--list",
        action="store_true",
        help="list the side indexes in the cache (size, last use, archive), no ARCHIVE",
    )
    what.add_argument(
        "--prune",
        action="store_true",
        help="remove side indexes of archives that are gone or changed, then apply the "
        "size cap; no ARCHIVE",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="index an interrupted or cut-short backup too (missing clusters read as errors)",
    )
    add_progress_options(p)
    p.set_defaults(func=run, index_parser=p)


def run(args) -> int:
    if args.list or args.prune:
        if args.archive is not None:
            args.index_parser.error("--list and --prune take no ARCHIVE")
        return _list(args) if args.list else _prune(args)
    if args.archive is None:
        args.index_parser.error("give the ARCHIVE to index (or --list, --prune)")
    # The index raises after the scan ("stored twice", "incomplete"): name the file.
    with (
        offering_read_anyway(None if args.allow_incomplete else "--allow-incomplete"),
        naming_archive(args.archive),
    ):
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
            )
            # --beside wants one beside the archive, whatever the cache holds
            if found is not None and (not args.beside or found[0] == sidecar.beside_path(path)):
                print(f"{path}: side index is up to date: {found[0]}")
                return 0
        show = want_progress(args.progress)
        with Progress("indexing", enabled=show) as bar:
            if source.needs_scan:
                header, index = index_by_scan(source, args.allow_incomplete, bar)
            else:
                header, index = walk_headers(source, args.allow_incomplete, bar)
        dest = sidecar.save(
            source,
            header,
            index,
            directory=args.cache_dir,
            beside=args.beside,
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


def _list(args) -> int:
    directory = args.cache_dir or sidecar_cache.cache_dir()
    found = sidecar_cache.entries(directory)
    total = sum(e.size for e in found)
    print(
        f"{directory}: {len(found)} side index{'es' if len(found) != 1 else ''}, "
        f"{human_bytes(total)} of {human_bytes(sidecar_cache.max_bytes())}"
    )
    for e in reversed(found):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used_ns / 1e9))
        why = e.stale()
        note = f"  ({why}: --prune removes it)" if why else ""
        print(f"{human_bytes(e.size):>10}  {used}  {e.archive or '(archive unknown)'}{note}")
    return 0


def _prune(args) -> int:
    directory = args.cache_dir or sidecar_cache.cache_dir()
    removed = sidecar_cache.prune(directory)
    for path, why in removed:
        print(f"removed {path} ({why})")
    left = sidecar_cache.entries(directory)
    print(
        f"{directory}: {len(removed)} removed, {len(left)} left "
        f"({human_bytes(sum(e.size for e in left))})"
    )
    return 0
