"""``vmafs mount`` and ``vmafs umount`` on the ``vmafs`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import MountError, UsageError
from .mounting import mount
from .options import DEFAULT_READAHEAD_KB, parse_options
from .running import EXIT_TIMEOUT
from .umount import umount

MOUNT_OPTIONS_HELP = f"""\
options (-o, comma-separated, may repeat):
  allow_other       let other users in (file modes still apply)
  allow_incomplete  mount an interrupted or cut-short backup (plain or
                    compressed); missing clusters read as EIO
  uid=N, gid=N      owner shown for every file (default: you)
  fsname=NAME       source shown by mount/df (default: the archive's path)
  direct_io         no page cache, 1 MiB requests: fastest for one-off bulk
                    copies (qemu-img convert); slow small reads, no shared mmap.
                    One reader gets the same on the default mount by opening
                    with O_DIRECT (qemu-img convert -T none, dd iflag=direct)
  readahead=KIB     readahead of the mount (default {DEFAULT_READAHEAD_KB}; root only,
                    0 keeps the kernel's 128; rounded down to whole requests
                    when spliced replies cap them, e.g. to 960)
  threads           serve reads from worker threads: for archives on slow or
                    network storage read by several programs at once
  logfile=PATH      log here instead of syslog when detached
  nonempty          mount over a directory that is not empty (hides its files)
  index_beside      a side index this mount makes goes beside the archive
                    (default: the cache, /var/cache/vmafs for root)
  debug             log debug messages and libfuse's trace of every request
                    (to stderr with -f, else into the log file)
mount(8)'s generic options (defaults, noauto, user, nofail, _netdev, x-*, ...)
are accepted and ignored. See vmafs(1) and docs/mount.md."""


def register(subparsers) -> None:
    """Add ``mount`` and ``umount`` to the ``vmafs`` command line."""
    p = subparsers.add_parser(
        "mount",
        help="mount an archive as a read-only directory of raw disk images",
        description="Mount ARCHIVE on MOUNTPOINT: disk-<drive>.raw per disk, each config\n"
        "file, vmstate.bin if the backup has RAM state. Read-only, files mode 0400,\n"
        "owned by you. Returns once the mount is ready (detaches unless -f).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=MOUNT_OPTIONS_HELP,
    )
    p.add_argument("archive", help="the .vma (or .vma.zst/.gz/.lzo) file")
    p.add_argument("mountpoint", help="an empty directory (-o nonempty allows another directory)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="mount options, see below",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument(
        "--guest",
        action="store_true",
        help="also mount every guest filesystem read-only: the archive at MOUNTPOINT/archive, "
        "each volume at MOUNTPOINT/<volume name> (root; docs/restore.md)",
    )
    p.add_argument(
        "--engine",
        choices=("appliance", "kernel"),
        default=None,
        help="with --guest: how guest filesystems are mounted: 'appliance' (the default "
        "when libguestfs is installed: one libguestfs VM parses them all, the host kernel "
        "none) or 'kernel' (read-only loop mounts on the host, faster); docs/restore.md",
    )
    p.set_defaults(func=run)
    u = subparsers.add_parser(
        "umount",
        help="unmount a vmafs mount",
        description="Unmount MOUNTPOINT and wait until its filesystem process has exited\n"
        "and closed the archive (unlike 'fusermount3 -u MOUNTPOINT', which returns\n"
        "at once): the archive's own filesystem can be unmounted right after. For a\n"
        "'mount --guest' tree: every guest filesystem, the archive and the tree, in\n"
        "that order, also when the mount's process died.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    u.add_argument("mountpoint")
    u.add_argument(
        "-z", "--lazy", action="store_true", help="detach now, clean up when unused; no waiting"
    )
    u.add_argument(
        "--timeout",
        type=float,
        default=EXIT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait at most this long for the process to exit (default {EXIT_TIMEOUT:.0f})",
    )
    u.set_defaults(func=run_umount)


def fail(prog: str, message: str, status: int = 1) -> int:
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    return status


def run(args: argparse.Namespace) -> int:
    if args.guest:
        from ..guest.tree import run_mount  # noqa: PLC0415 - only for --guest

        try:
            return run_mount(args)
        except UsageError as e:
            return fail("vmafs", f"mount: {e}", 2)
    try:
        opts = parse_options(args.options)
        status = mount(
            args.archive, args.mountpoint, opts, foreground=args.foreground, verbose=args.verbose
        )
    except UsageError as e:
        return fail("vmafs", f"mount: {e}", 2)
    except MountError as e:
        return fail("vmafs", str(e))
    if status == 0 and not args.foreground:
        # The mount is up and served by the detached process; this one has
        # nothing left to do.  Tearing down its interpreter (numpy, trio, the
        # archive's index) would take 0.05-0.15 s more before the caller
        # sees the mount ready.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return status


def run_umount(args: argparse.Namespace) -> int:
    from ..guest.tree import run_umount as umount_guest  # noqa: PLC0415 - light

    status = umount_guest(args)  # a tree made by mount --guest, when one is recorded
    if status is not None:
        return status
    try:
        umount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    except MountError as e:
        return fail("vmafs", str(e))
    return 0
