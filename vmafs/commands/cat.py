"""``vmafs cat ARCHIVE VOLUME:/FILE``: a file inside a guest filesystem, to stdout."""

from __future__ import annotations

import argparse
import sys

from ..common.console import writing_stdout
from ._guest import add_guest_arguments, opened_volume

HELP = "print a file inside a guest filesystem of an archive"

DESCRIPTION = """\
Write the file PATH inside VOLUME to standard output, byte for byte.
Symlinks are followed inside the guest (an absolute target means the
guest's root), never on the host."""

EPILOG = """\
examples:
  vmafs cat backup.vma scsi0/pve/root:/etc/fstab
  vmafs cat --engine kernel backup.vma.zst drive-sata0/p1:/Users/Bob/report.txt > report.txt"""

CHUNK = 1 << 20


def register(subparsers) -> None:
    p = subparsers.add_parser("cat", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    add_guest_arguments(p, "the file to print")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import GuestError  # noqa: PLC0415
    from ..guest.paths import resolve  # noqa: PLC0415

    with opened_volume(args) as (_session, volume, fs, target):
        entry = resolve(fs, target.path)
        if entry.kind != "file":
            what = "a directory" if entry.kind == "dir" else "not a regular file"
            raise GuestError(f"{volume.name}:{target.path}: {what} ('vmafs ls' lists it)")
        out = sys.stdout.buffer
        with writing_stdout():
            for chunk in fs.read(entry.path, CHUNK):
                out.write(chunk)
            out.flush()
    return 0
