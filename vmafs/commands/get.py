"""``vmafs get ARCHIVE VOLUME:/PATH DEST``: copy files out of a guest filesystem."""

from __future__ import annotations

import argparse
import sys

from ..common.progress import add_progress_options
from ._guest import add_guest_arguments, opened_volume

HELP = "copy a file or a directory tree out of a guest filesystem of an archive"

DESCRIPTION = """\
Copy PATH inside VOLUME (a file, a symlink or a whole directory tree) to
DEST, like 'cp -a': into DEST under its own name when DEST is a directory
(the volume's root '/' copies its contents into DEST), else as DEST.
Keeps contents, permission bits (not setuid/setgid), modification and
access times and symlinks (not followed, targets unchanged); files belong
to you, hard links become separate files, devices, FIFOs and sockets are
skipped with a note.  Nothing is ever written outside DEST: symlinks
there are not followed, guest names with '/' or '..' are refused.  An
existing file is not overwritten without --force."""

EPILOG = """\
examples:
  vmafs get backup.vma scsi0/pve/root:/etc/fstab .
  vmafs get backup.vma.zst scsi0/pve/root:/home/alice restore/
  vmafs get --engine kernel --force backup.vma scsi0/p1:/ boot-copy/"""


def register(subparsers) -> None:
    p = subparsers.add_parser("get", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    add_guest_arguments(p, "what to copy")
    p.add_argument("dest", metavar="DEST", help="a directory to copy into, or the new name")
    p.add_argument(
        "-f",
        "--force",
        "--overwrite",
        dest="force",
        action="store_true",
        help="replace existing files (directories are merged into)",
    )
    add_progress_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..common.progress import Progress, want_progress  # noqa: PLC0415
    from ..guest.copy import PROGRESS_FROM, copy_tree  # noqa: PLC0415
    from ..guest.paths import resolve  # noqa: PLC0415

    wanted = want_progress(args.progress)
    with opened_volume(args) as (_session, volume, fs, target):
        source = resolve(fs, target.path, follow_last=False)
        with Progress(f"copying {volume.name}:{target.path}", enabled=False) as bar:

            def on_total(total: int) -> None:
                bar.total = total
                bar.enabled = wanted and (args.progress or total >= PROGRESS_FROM)

            result = copy_tree(
                fs,
                source,
                args.dest,
                overwrite=args.force,
                progress=bar.advance,
                on_total=on_total,
            )
    for note in result.skipped:
        sys.stderr.write(f"vmafs: note: {note}\n")
    return 0
