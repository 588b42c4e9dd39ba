"""``vmafs ls ARCHIVE VOLUME:/PATH [-l] [-R] [--json]``: list files inside a guest filesystem."""

from __future__ import annotations

import argparse
import json
import sys

from ..common.console import writing_stdout
from ._guest import add_guest_arguments, opened_volume

HELP = "list files inside a guest filesystem of an archive"

DESCRIPTION = """\
List the directory PATH (or show the file PATH) inside VOLUME, a partition,
LVM logical volume or whole-disk filesystem of one of the archive's disks
('vmafs volumes ARCHIVE' lists them).  Symlinks are resolved inside the
guest, never on the host.  Nothing is restored; the archive is mounted
privately while the command runs."""

EPILOG = """\
examples:
  vmafs ls backup.vma scsi0/p1:/
  vmafs ls -l backup.vma drive-scsi0/pve/root:/etc
  vmafs ls -R --json --engine kernel backup.vma.zst scsi0/pve/root:/home"""


def register(subparsers) -> None:
    p = subparsers.add_parser("ls", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    add_guest_arguments(p, "what to list")
    p.add_argument(
        "-l",
        dest="long",
        action="store_true",
        help="long format: mode, links, owner, size, modification time (UTC), symlink target",
    )
    p.add_argument(
        "-R",
        dest="recursive",
        action="store_true",
        help="everything below PATH, one full path per line",
    )
    p.add_argument("--json", action="store_true", help="one JSON array of records")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..guest.listing import format_line, listing, record  # noqa: PLC0415

    with opened_volume(args) as (_session, volume, fs, target):
        entries = listing(fs, target.path, recursive=args.recursive)
        out = sys.stdout
        with writing_stdout():
            if args.json:
                json.dump([record(e, volume.name) for e in entries], out, indent=1)
                out.write("\n")
            else:
                for e in entries:
                    out.write(format_line(e, long=args.long, full_path=args.recursive) + "\n")
            out.flush()
    return 0
