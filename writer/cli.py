"""``vmafs backup`` and ``vmafs create``: the writer's commands (registered by vmafs.cli)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import trio

from vmafs.common.atomic import AtomicOutput
from vmafs.common.progress import Progress, add_progress_options, human_bytes, want_progress
from vmafs.common.signals import LateSignals, SignalGuard
from vmafs.errors import BackupError

from .backup import (
    BackupInterrupted,
    BackupResult,
    DriveSpec,
    backup,
    interrupted,
    parse_drive_spec,
    resolve_disks,
    signal_guard,
)
from .create import ImageSpec, create, parse_image_spec
from .fleecing import DEFAULT_CBW_TIMEOUT, DEFAULT_RESERVE, FleecingOptions, check_directory
from .output import ArchiveOutput
from .packer import check_names
from .qmp import QmpConnection, parse_address

__all__ = ["register_backup", "register_create", "run_backup", "run_create"]

MAX_CONFIG_BYTES = 65535

BACKUP_HELP = "back up disks of a running QEMU into a VMA archive"
BACKUP_DESCRIPTION = """\
Back up DRIVEs of a running QEMU (stock QEMU, no Proxmox patches) into a VMA
archive that Proxmox's vma/qmrestore and vmafs read.  vmafs connects to the
QMP socket, serves an NBD export per disk on a private Unix socket, adds an
nbd target node per disk and starts one transaction of blockdev-backup jobs
(sync=full, completion-mode grouped: one point in time for all disks).
Clusters arrive in whatever order QEMU sends them - a guest write to a
cluster not yet copied sends that cluster's old data first - and are
appended to the archive as they come.

DRIVE is a -drive id (BlockBackend name), a guest device id or a block node
name.  DEVNAME is the disk's name in the archive; default drive-DRIVE, as
Proxmox names them (a DRIVE already starting with drive- is kept).  DEVNAME
and config names must be plain UTF-8 file names (no '/', no control
characters, DEVNAME at most 246 bytes); DEVNAME 'vmstate' is reserved for RAM
state.  ARCHIVE ending in .zst is written zstd-compressed; other compressed
suffixes (.gz, .lzo, .zstd, ...) are refused: pipe '-o -' into the compressor.

The archive is written to a hidden temporary file beside ARCHIVE and renamed
only after every job completed without error.  On any failure (QEMU error,
job error, disk full, Ctrl-C/SIGTERM, QEMU gone) the jobs are cancelled,
the nodes removed, the temporary file deleted, and one line says why.

Guest safety: in push mode (the default), while the job runs, a guest write
to a cluster that was not copied yet waits for this process to accept the old
data; if vmafs dies, such guest writes fail with an I/O error until QEMU has
ended the job.  With --fleecing DIR the old data goes into a sparse qcow2
image in DIR instead (a copy-before-write filter in front of each guest
disk, on-cbw-error=break-snapshot): guest writes wait only for that local
disk, at most --cbw-timeout seconds, and a stopped, dead or full vmafs fails
the backup, never the guest.  Use it wherever a local disk has room for the
clusters the guest overwrites during the backup (docs/backup.md)."""

BACKUP_EPILOG = """\
examples:
  vmafs backup --qmp /run/qemu-100.qmp -o vzdump-qemu-100.vma \\
      -c qemu-server.conf scsi0 efidisk0
  vmafs backup --qmp /run/qemu-100.qmp -o backup.vma.zst drive0=drive-scsi0
  vmafs backup --qmp /run/qemu-100.qmp -o /mnt/nfs/vm-100.vma --fleecing /var/tmp scsi0
  vmafs backup --qmp /run/qemu-100.qmp -o - scsi0 | zstd > backup.vma.zst"""

CREATE_HELP = "make a VMA archive from disk image files (raw, qcow2, ...)"
CREATE_DESCRIPTION = """\
Make a VMA archive from image files of any format QEMU reads, through a
private qemu-storage-daemon running the same blockdev-backup path as
`vmafs backup`.  Each DEVNAME=IMAGE becomes one disk (in the given order).
Images are opened read-only.  The daemon is stopped in every case.

Without FORMAT: a block device (LVM, ZFS, RBD volume) is raw; a regular file
is probed with `qemu-img info`, and refused when it probes as an image that
refers to other files (a backing file, a qcow2 data file, vmdk extents) - a
guest can write such a header into its own disk to make vmafs read a host
file.  Write IMAGE:FORMAT (e.g. disk.qcow2:qcow2) to follow a backing chain.

DEVNAME and config names must be plain UTF-8 file names (no '/', no control
characters, DEVNAME at most 246 bytes and not 'vmstate', which is reserved
for RAM state).  ARCHIVE ending in .zst is written zstd-compressed; other
compressed suffixes (.gz, .lzo, .zstd, ...) are refused: write '-' and pipe
it into the compressor."""

CREATE_EPILOG = """\
examples:
  vmafs create vm.vma -c qemu-server.conf drive-scsi0=disk.qcow2 drive-efidisk0=efi.raw:raw
  vmafs create vm.vma.zst drive-virtio0=/dev/vg/vm-100-disk-0
  vmafs create vm.vma drive-scsi0=overlay.qcow2:qcow2    # follows its backing chain
  vmafs create - drive-scsi0=disk.raw:raw | gzip > vm.vma.gz"""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: QEMU's job speed is an int64 of bytes/s
MAX_RATE = (1 << 63) - 1


def parse_rate(text: str) -> int:
    """``100M`` -> 104857600 bytes/s (binary units; ``0`` = unlimited)."""
    t = text.strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rate {text!r} (e.g. 50M)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: must be a number >= 0 (e.g. 50M)")
    rate = int(value * _UNITS[unit])
    if rate > MAX_RATE:
        raise argparse.ArgumentTypeError(
            f"bad rate {text!r}: more than QEMU's limit of {MAX_RATE} bytes/s (use 0: unlimited)"
        )
    return rate


def parse_size(text: str) -> int:
    """``1G`` -> 1073741824 bytes (the units of :func:`parse_rate`)."""
    try:
        return parse_rate(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G)") from None


def parse_seconds(text: str) -> int:
    """A cbw-timeout: whole seconds, at least 1 (QEMU's 0 would mean "wait forever")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or value > 3600:
        raise argparse.ArgumentTypeError(
            f"bad timeout {text!r}: whole seconds from 1 to 3600 (0, QEMU's 'no limit', "
            "would let a stuck fleecing disk stall the guest)"
        )
    return value


def _drive(text: str) -> DriveSpec:
    try:
        return parse_drive_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _image(text: str) -> ImageSpec:
    try:
        return parse_image_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="CONFIG",
        help="store this file (by its base name, <= 65535 bytes) in the archive; repeatable",
    )
    p.add_argument(
        "--speed",
        type=parse_rate,
        default=0,
        metavar="RATE",
        help="limit each disk's backup job to RATE bytes/s (K/M/G/T suffixes; "
        "default 0: unlimited)",
    )
    p.add_argument(
        "-f", "--force", action="store_true", help="replace ARCHIVE if it exists (atomically)"
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print a summary line on stderr at the end"
    )
    add_progress_options(p)


def register_backup(subparsers) -> None:
    p = subparsers.add_parser(
        "backup", help=BACKUP_HELP, description=BACKUP_DESCRIPTION, epilog=BACKUP_EPILOG
    )
    p.add_argument(
        "--qmp", required=True, metavar="SOCKET", help="QEMU's QMP socket (path, or HOST:PORT)"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="ARCHIVE",
        help="archive to write (.vma, or .vma.zst for zstd); '-' streams to stdout",
    )
    p.add_argument(
        "--socket-dir",
        metavar="DIR",
        help="existing directory in which to create the private NBD socket directory "
        "(default $TMPDIR or /tmp); QEMU must be able to connect there",
    )
    p.add_argument(
        "--fleecing",
        metavar="DIR",
        help="fleecing mode: keep the old data of clusters the guest overwrites during the "
        "backup in sparse qcow2 images in DIR (a local disk), so guest writes never wait "
        "for vmafs; DIR must exist, be writable and have --fleecing-reserve free",
    )
    p.add_argument(
        "--cbw-timeout",
        type=parse_seconds,
        metavar="SECONDS",
        help="with --fleecing: the longest a guest write waits for its copy into the "
        "fleecing image; a slower copy drops the snapshot and fails the backup, not the "
        f"write (default {DEFAULT_CBW_TIMEOUT})",
    )
    p.add_argument(
        "--fleecing-reserve",
        type=parse_size,
        metavar="SIZE",
        help="with --fleecing: refuse to start unless DIR has this much free space "
        f"(K/M/G/T suffixes; default {DEFAULT_RESERVE >> 30}G)",
    )
    _common_options(p)
    p.add_argument("drives", nargs="+", type=_drive, metavar="DRIVE[=DEVNAME]")
    p.set_defaults(func=run_backup)


def register_create(subparsers) -> None:
    p = subparsers.add_parser(
        "create", help=CREATE_HELP, description=CREATE_DESCRIPTION, epilog=CREATE_EPILOG
    )
    p.add_argument("archive", metavar="ARCHIVE", help="archive to write; '-' streams to stdout")
    _common_options(p)
    p.add_argument(
        "images",
        nargs="+",
        type=_image,
        metavar="DEVNAME=IMAGE[:FORMAT]",
        help="a disk of the archive; without FORMAT a block device is raw and a file is probed "
        "(refused if it names a backing file: write IMAGE:FORMAT to follow it)",
    )
    p.set_defaults(func=run_create)


def read_configs(paths: list[str]) -> list[tuple[str, bytes]]:
    """(basename, bytes) per config file; checked before any QEMU work starts."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise BackupError(f"{path}: config files are limited to {MAX_CONFIG_BYTES} bytes")
        out.append((os.path.basename(path), data))
    return out


def check_output(target: str, *, overwrite: bool) -> None:
    """Refuse an unusable ARCHIVE before anything else starts (see AtomicOutput.check)."""
    try:
        AtomicOutput.check(target, overwrite=overwrite)
    except FileExistsError as e:
        e.strerror = f"{e.strerror} (-f replaces it)"
        raise


def _summary(result: BackupResult, target: str) -> str:
    rate = result.disk_bytes / result.seconds if result.seconds > 0 else 0
    return (
        f"vmafs: wrote {target}: {len(result.disks)} disk(s), "
        f"{human_bytes(result.disk_bytes)} of disks, {human_bytes(result.bytes_written)} "
        f"archive, {result.clusters} clusters ({result.duplicates} re-sent), "
        f"{result.seconds:.1f} s ({human_bytes(rate)}/s); NBD reply latency "
        f"p50 {result.latency_p50 * 1e3:.2f} ms p99 {result.latency_p99 * 1e3:.2f} ms "
        f"max {result.latency_max * 1e3:.2f} ms over {result.requests} requests"
        + (
            f"; fleecing images peaked at {human_bytes(result.fleecing_peak)}"
            if result.fleecing_peak
            else ""
        )
    )


def _setup_logging(verbose: bool) -> None:
    """INFO with -v; else warnings only, and none from the data path.

    Without -v a failed backup prints exactly one line: the NBD server's and
    the packer's per-request failures are what that line reports.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="vmafs: %(name)s: %(message)s",
            stream=sys.stderr,
        )
    # qemu.qmp logs what our QemuError already says (and, at INFO, every state change)
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
    if not verbose:
        for name in ("writer.nbd", "writer.packer"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _interrupted(e: BackupInterrupted) -> int:
    """One line and 128+signal (130 Ctrl-C, 143 SIGTERM), as the other commands exit."""
    sys.stderr.write(f"vmafs: error: {e}\n")
    return 128 + e.signum


def run_backup(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    configs = read_configs(args.config)
    check_names([d.devname for d in args.drives], [name for name, _ in configs])
    check_output(args.output, overwrite=args.force)
    if args.socket_dir is not None and not os.path.isdir(args.socket_dir):
        raise BackupError(f"--socket-dir {args.socket_dir}: no such directory")
    fleecing = None
    if args.fleecing is not None:
        fleecing = FleecingOptions(
            os.path.abspath(args.fleecing),
            DEFAULT_CBW_TIMEOUT if args.cbw_timeout is None else args.cbw_timeout,
            DEFAULT_RESERVE if args.fleecing_reserve is None else args.fleecing_reserve,
        )
        check_directory(fleecing)
    else:
        for option, value in (
            ("--cbw-timeout", args.cbw_timeout),
            ("--fleecing-reserve", args.fleecing_reserve),
        ):
            if value is not None:
                raise BackupError(f"{option} applies only to fleecing: add --fleecing DIR")
    bar = Progress("backup", enabled=want_progress(args.progress))
    guard = signal_guard()
    late = LateSignals(lambda signum: interrupted(signum, "nothing written"))

    async def main() -> BackupResult:
        # The temp file is made inside the guarded run, so a signal at any
        # point after it exists removes it again.
        await late.ready()
        output = late.output = ArchiveOutput(args.output, overwrite=args.force)
        try:
            qmp = await QmpConnection.open(parse_address(args.qmp))
        except BaseException:
            output.abort()
            raise
        async with qmp:
            try:
                disks = await resolve_disks(qmp, args.drives)
            except BaseException:
                output.abort()
                raise
            return await backup(
                qmp,
                disks,
                output,
                configs,
                speed=args.speed,
                progress=bar,
                socket_dir=args.socket_dir,
                signals=guard,
                fleecing=fleecing,
                note=bar.set_note,
            )

    return _run(guard, main, bar, args.verbose, args.output, late)


def run_create(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    configs = read_configs(args.config)
    check_names([i.devname for i in args.images], [name for name, _ in configs])
    check_output(args.archive, overwrite=args.force)
    bar = Progress("create", enabled=want_progress(args.progress))
    guard = signal_guard()
    late = LateSignals(lambda signum: interrupted(signum, "nothing written"))

    async def main() -> BackupResult:
        await late.ready()
        output = late.output = ArchiveOutput(args.archive, overwrite=args.force)
        return await create(
            output, args.images, configs, speed=args.speed, progress=bar, signals=guard
        )

    return _run(guard, main, bar, args.verbose, args.archive, late)


def _run(
    guard: SignalGuard, main, bar: Progress, verbose: bool, target: str, late: LateSignals
) -> int:
    try:
        with bar:
            result = trio.run(late.run, guard, main)
    except BackupInterrupted as e:
        return _interrupted(e)
    late.committed()  # a result means the archive is committed
    if verbose:
        sys.stderr.write(_summary(result, target) + "\n")
    return 0
