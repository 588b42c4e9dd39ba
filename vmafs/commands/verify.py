"""``vmafs verify ARCHIVE [-v] [--data]``: is the archive whole and well formed?

Opening an :class:`~vmafs.archive.Archive` already checks everything
structural (that is the index builder's job, and the checks must be the
same for verify, mount and extract); this command adds the reporting, the
optional full data read and the exit status.  It never uses a saved side
index: it reads the archive itself.
"""

from __future__ import annotations

import argparse
import sys

from .. import names
from ..common.console import writing_stdout
from ..common.progress import Progress, add_progress_options, human_bytes, want_progress
from ..errors import (
    ConsistencyError,
    CorruptStreamError,
    FormatError,
    HeaderError,
    VmaError,
    read_anyway_hint,
)
from ..format import CLUSTER_SIZE
from ._common import open_archive, printable
from .list import proxmox_lines

HELP = "check an archive for damage; exit status 0 only when it is intact"

DESCRIPTION = """\
Check ARCHIVE and exit with status 0 only when it is intact.  Checks
everything Proxmox's `vma verify` checks:

  - header: magic, version, md5, sizes and offsets, blob table, names
  - every extent header: magic, md5, uuid equal to the archive's, block count
  - every cluster slot: registered dev_id (1..254), cluster within the
    device, no cluster stored twice, vmstate clusters in order

and what `vma verify` misses: clusters never written (an interrupted
backup, including one cut exactly at an extent boundary), an archive cut
inside an extent, bytes after the last extent, and config or device names
that are not plain file names ('/', '..', control characters, clashes;
Proxmox stores base names only).  Compressed archives are decompressed in
full (a saved side index is not trusted here).

With --data every stored block is also read back through the same path
mount and extract use, which catches I/O errors and corrupt or truncated
compressed streams past the extent headers.

On failure one line names the problem and where it is (archive offset,
dev id, cluster) and the kind of error in brackets, e.g.
  vmafs: error: b.vma: verify failed: cluster is stored twice
  (archive offset 4592, dev 1, cluster 7) [DuplicateClusterError]"""

EPILOG = """\
examples:
  vmafs verify backup.vma && echo intact
  vmafs verify -v --data vzdump-qemu-100-2024_03_05-14_02_11.vma.zst"""

_READ_CHUNK = 16 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the archive's contents (as `vmafs list`) and per-device statistics",
    )
    p.add_argument("--data", action="store_true", help="also read back every stored data block")
    add_progress_options(p)
    p.set_defaults(func=run)


def device_stats(archive, dev_id: int) -> dict:
    """Counts for one device from the index (no I/O)."""
    dm = archive.index.maps[dev_id]
    clusters, data, missing = dm.device.clusters, dm.data_clusters, dm.missing
    return {
        "clusters": clusters,
        "data_clusters": data,
        "zero_clusters": clusters - data - missing,
        "missing_clusters": missing,
        "stored_bytes": archive.stored_bytes(dev_id),
    }


def read_all_data(archive, bar: Progress) -> int:
    """Read every stored range of every device; returns the bytes read."""
    buf = bytearray(_READ_CHUNK)
    total = 0
    for dev in archive.devices:
        bar.set_label(f"reading {printable(dev.name)}")
        for start, length in archive.allocated_ranges(dev.dev_id):
            pos, end = start, start + length
            while pos < end:
                view = memoryview(buf)[: min(_READ_CHUNK, end - pos)]
                try:
                    n = archive.readinto(dev.dev_id, pos, view)
                except VmaError as e:
                    raise type(e)(
                        f"reading {printable(dev.name)} at byte {pos}: {e.message}",
                        offset=e.offset,
                        dev_id=dev.dev_id if e.dev_id is None else e.dev_id,
                        cluster=pos // CLUSTER_SIZE if e.cluster is None else e.cluster,
                    ) from e
                if n != len(view):
                    raise VmaError(
                        f"short read of {printable(dev.name)} at byte {pos}",
                        dev_id=dev.dev_id,
                        cluster=pos // CLUSTER_SIZE,
                    )
                pos += n
                total += n
                bar.advance(n)
    return total


def check_stream(archive, bar: Progress) -> None:
    """Decompress the whole stream of an archive indexed from its extent headers only.

    A seekable .vma.zst is opened by decoding each frame just as far as its
    extent headers; the frames' data and checksums are checked here, so
    verify always checks a compressed stream in full (a one-frame .vma.zst,
    .gz or .lzo was already decompressed in full to index it).
    """
    source = archive.source
    pos = 0
    while pos < source.size:
        n = len(source.pread(pos, min(_READ_CHUNK, source.size - pos)))
        if not n:
            raise VmaError(f"compressed stream ends at {pos} of {source.size} bytes", offset=pos)
        pos += n
        bar.advance(n)


def _failed(path: str, e: VmaError) -> VmaError:
    """The one-line verify failure: path, message with its location, what to do next."""
    hint = _next_step(e)
    return VmaError(f"{path}: verify failed: {e.unnamed()}" + (f"; {hint}" if hint else ""))


def _next_step(e: VmaError) -> str:
    """What the user can do about *e* (empty when the message says it already)."""
    hint = read_anyway_hint(e, "mount -o allow_incomplete or extract --allow-incomplete")
    if hint:
        return hint
    if isinstance(e, CorruptStreamError | FormatError | ConsistencyError):
        return "the archive is damaged: restore from another copy of this backup"
    return ""


def check_names(archive) -> None:
    """Fail on a config or device name that mount/extract would have to rename.

    Proxmox stores base names (``qemu-server.conf``, ``drive-scsi0``); a
    name with ``/``, ``..``, control characters or a clash was not written
    by Proxmox and deserves attention even though vmafs handles it safely.
    """
    for entry in names.safe_entry_names(archive).values():
        if entry.renamed:
            what = "device" if entry.kind in ("disk", "vmstate") else "config"
            raise HeaderError(
                f"{what} name {printable(entry.original)!r} is not a safe file name "
                f"({entry.reason}); mount and extract use {printable(entry.name)!r}",
                dev_id=entry.dev_id,
            )


def run(args: argparse.Namespace) -> int:
    path = args.archive
    show = want_progress(args.progress)
    try:
        archive = open_archive(path, args, use_sidecar=False)
    except VmaError as e:
        raise _failed(path, e) from e
    with archive:
        try:
            check_names(archive)
        except VmaError as e:
            raise _failed(path, e) from e
        # A stream indexed from its extent headers alone (seekable zstd) has not
        # been decoded in full yet; one that was scanned has (and --data reads it).
        if not args.data and not archive.stream_checked:
            with Progress("decompressing", archive.source.size, enabled=show) as bar:
                try:
                    check_stream(archive, bar)
                except VmaError as e:
                    raise _failed(path, e) from e
        data_bytes = None
        if args.data:
            total = sum(
                length for d in archive.devices for _, length in archive.allocated_ranges(d.dev_id)
            )
            with Progress("reading", total, enabled=show) as bar:
                try:
                    data_bytes = read_all_data(archive, bar)
                except VmaError as e:
                    raise _failed(path, e) from e
        if args.verbose:
            _print_verbose(archive, path, data_bytes is not None)
    return 0


def _print_verbose(archive, path: str, data: bool) -> None:
    """The -v report (list lines, ARCHIVE:, STATS: per device, OK:) on stdout."""
    out = sys.stdout
    with writing_stdout():
        for line in proxmox_lines(archive.header):
            out.write(line + "\n")
        idx = archive.index
        out.write(
            f"ARCHIVE: header_size: {archive.header.header_size} extents: {idx.extents} "
            f"end: {idx.end}\n"
        )
        for dev in archive.devices:
            s = device_stats(archive, dev.dev_id)
            out.write(
                f"STATS: dev_id={dev.dev_id} devname: {printable(dev.name)} "
                f"clusters: {s['clusters']} data: {s['data_clusters']} "
                f"zero: {s['zero_clusters']} missing: {s['missing_clusters']} "
                f"stored: {s['stored_bytes']} ({human_bytes(s['stored_bytes'])})\n"
            )
        checked = "structure and data" if data else "structure"
        out.write(f"OK: {printable(path)}: {checked} verified\n")
