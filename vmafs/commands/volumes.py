"""``vmafs volumes ARCHIVE [--json] [-d DRIVE]``: the volumes inside the disks.

Partitions, LVM logical volumes and whole-disk filesystems, each with its
filesystem type, label and size, found by vmafs itself (see
:mod:`vmafs.volumes`): nothing is attached or activated on the host.
"""

from __future__ import annotations

import argparse
import sys

from ..common.console import writing_stdout
from ..common.progress import add_progress_options, human_bytes
from ..errors import VolumeError
from ..volumes import Volume, find_drive, scan_drive
from ._common import open_archive, printable
from .list import write_json

HELP = "list the partitions, LVM volumes and filesystems inside the disks"

DESCRIPTION = """\
List the volumes inside each disk of ARCHIVE: partitions of a GPT or MBR
(logical partitions included), LVM2 logical volumes (read from the PV's
metadata, nothing activated on this host) and filesystems that fill a whole
disk, with each one's filesystem type (ext2, ext3, ext4, xfs, btrfs, ntfs,
vfat, swap, lvm2 for a PV, else unknown), label and size.

Volume names are <drive>/p<N> for partitions (p5 is the first logical one
of an MBR), <drive>/<vg>/<lv> for logical volumes and <drive> for a whole-disk
filesystem; anywhere a drive is named, scsi0 means drive-scsi0.  In a
`vmafs mount`, each readable volume is also a file (see docs/mount.md).

LVs that are striped, thin, raid or a snapshot's store are listed with a
note and cannot be read.  A drive whose partition table or LVM metadata is
damaged or impossible is reported as an error naming it (exit status 1);
the other drives are still listed.

With --json, a JSON object: archive, drives [{name, dev_id, size, error,
volumes [{name, kind, fstype, label, size, note, segments [{start,
disk_offset, length}]}]}]."""

EPILOG = """\
examples:
  vmafs volumes vzdump-qemu-100-2024_03_05-14_02_11.vma.zst
  vmafs volumes backup.vma -d scsi0
  vmafs volumes --json backup.vma | jq -r '.drives[].volumes[] | select(.fstype=="xfs") | .name'"""


def register(subparsers) -> None:
    p = subparsers.add_parser("volumes", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="a .vma file, plain or .zst/.gz/.lzo")
    p.add_argument(
        "-d",
        "--drive",
        metavar="DRIVE",
        help="only this drive (drive-scsi0, or scsi0 for short)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_progress_options(p)
    p.set_defaults(func=run)


def volume_dict(v: Volume) -> dict:
    """The ``--json`` object of one volume."""
    return {
        "name": v.name,
        "kind": v.kind,
        "fstype": v.fstype,
        "label": v.label,
        "size": v.size,
        "note": v.note,
        "segments": [
            {"start": s.start, "disk_offset": s.disk_offset, "length": s.length} for s in v.segments
        ],
    }


def scan(archive, drive: str | None) -> list[tuple[object, list[Volume], VolumeError | None]]:
    """(device, volumes, error) per disk of *archive* (only *drive*'s when given)."""
    disks = [d for d in archive.devices if not d.is_vmstate]
    if drive is not None:
        disks = [find_drive(disks, drive)]
    out = []
    for dev in disks:
        try:
            out.append((dev, scan_drive(archive, dev.dev_id), None))
        except VolumeError as e:
            out.append((dev, [], e))
    return out


def table(drives) -> list[str]:
    """The text listing: one block per drive, one line per volume."""
    lines = []
    for dev, volumes, error in drives:
        lines.append(f"{printable(dev.name)}  {human_bytes(dev.size)} ({dev.size} bytes)")
        if error is not None:
            lines.append("  (unreadable layout: see the error below)")
            continue
        if not volumes:
            lines.append("  (no partition table, LVM or filesystem found)")
            continue
        rows = [
            (
                printable(v.name),
                v.kind,
                v.fstype,
                printable(v.label) if v.label is not None else "-",
                human_bytes(v.size),
                v.note or "",
            )
            for v in volumes
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            cells = [r[i].ljust(widths[i]) for i in range(4)]
            lines.append(("  " + "  ".join(cells) + f"  {r[4]:>10}  {r[5]}").rstrip())
    return lines


def run(args: argparse.Namespace) -> int:
    with open_archive(args.archive, args) as archive:
        drives = scan(archive, args.drive)
        path = archive.path
    with writing_stdout():
        if args.json:
            write_json(
                {
                    "archive": path,
                    "drives": [
                        {
                            "name": dev.name,
                            "dev_id": dev.dev_id,
                            "size": dev.size,
                            "error": None if error is None else str(error),
                            "volumes": [volume_dict(v) for v in volumes],
                        }
                        for dev, volumes, error in drives
                    ],
                }
            )
        else:
            sys.stdout.write("".join(line + "\n" for line in table(drives)))
    failed = [e for _, _, e in drives if e is not None]
    for e in failed:
        sys.stdout.flush()
        sys.stderr.write(f"vmafs: error: {' '.join(str(e).split())}\n")
    return 1 if failed else 0
