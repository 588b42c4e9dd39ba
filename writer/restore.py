"""``vmafs restore``: disks of an archive into images, slowly or live (instant restore).

Both serve the archive's disks in-process over NBD (:mod:`vmafs.serve`, a
private Unix socket) and let QEMU do the copying:

- ``vmafs restore ARCHIVE DRIVE=IMAGE...``: ``qemu-img convert`` from each
  export into IMAGE (any format qemu-img writes, a block device too), holes
  skipped through block status;
- ``vmafs restore --live ARCHIVE DRIVE=IMAGE... --qmp SOCKET``: creates each
  IMAGE as a qcow2 whose backing file is the disk's export, says so, and
  waits for QEMU (started by the user, or by ``qm start``) to open those
  images: the guest runs at once, its reads of what was not copied yet go to
  the backup, its writes go into IMAGE.  Then one ``block-stream`` job per
  image copies every cluster still in the backing file into IMAGE while the
  guest runs, with progress.  When every job is done QEMU has dropped the
  backing file from the images (their headers too): the backup is no longer
  needed, the server stops, the command exits 0.

QMP is held only for a moment every second (``qm`` commands on a Proxmox
host keep working during the restore): the jobs are started with
``auto-dismiss: false``, so a job that ended, well or not, stays in
``query-jobs`` with its error until this command dismisses it.

Failure: a job that fails (the NBD server gone, an I/O error, QEMU's
``block-job-cancel``) ends the command with one line naming the drive, the
image, how far it got and QEMU's error; the guest keeps running on IMAGE,
whose own writes are intact (only reads of clusters never copied fail).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass

import trio

from vmafs.archive import Archive
from vmafs.common.progress import Progress, add_progress_options, human_bytes, want_progress
from vmafs.common.signals import unwrap_group
from vmafs.errors import BackupError
from vmafs.serve import exports_for
from vmafs.serve.run import open_server, uris

from .qmp import QemuError, QmpConnection

log = logging.getLogger("vmafs.restore")

#: seconds between two looks at the jobs (each a short QMP connection)
POLL_INTERVAL = 1.0
JOB_PREFIX = "vmafs-restore-"


class RestoreError(BackupError):
    """A restore cannot start or failed; the message is the one line to print."""


@dataclass
class Target:
    """One ``DRIVE=IMAGE[:FORMAT]`` of the command line, resolved against the archive."""

    drive: str  # as given
    export: str  # the export (device) name, drive-scsi0
    image: str  # absolute path
    fmt: str
    size: int
    node: str | None = None  # the qcow2 node QEMU opened IMAGE as (live)

    @property
    def job_id(self) -> str:
        return JOB_PREFIX + self.export.removeprefix("drive-")


def parse_target(text: str) -> tuple[str, str, str | None]:
    """``scsi0=/path/disk.qcow2[:qcow2]`` -> (drive, image, format or None)."""
    drive, eq, rest = text.partition("=")
    if not eq or not drive or not rest:
        raise ValueError(
            f"{text!r}: expected DRIVE=IMAGE[:FORMAT] (e.g. scsi0=vm-100-disk-0.qcow2)"
        )
    image, colon, fmt = rest.rpartition(":")
    if not colon or "/" in fmt or not fmt.isalnum():
        image, fmt = rest, None
    return drive, image, fmt


def resolve_targets(archive: Archive, specs, live: bool) -> list[Target]:
    """Targets for *specs*; every drive must be a disk of *archive*, every IMAGE new."""
    exports, aliases = exports_for(archive)
    out: list[Target] = []
    for drive, image, fmt in specs:
        name = aliases.get(drive, drive)
        export = exports.get(name)
        if export is None:
            raise RestoreError(
                f"{drive}: no such disk in {archive.path} (it has: {', '.join(exports)})"
            )
        if any(t.export == name for t in out):
            raise RestoreError(f"{drive}: disk {name} is named twice")
        image = os.path.abspath(image)
        if fmt is None:
            fmt = "qcow2" if live or image.endswith(".qcow2") else "raw"
        if live and fmt != "qcow2":
            raise RestoreError(
                f"{image}: --live restores into qcow2 images only (block-stream needs the "
                "backing file a qcow2 has); restore without --live into other formats"
            )
        if os.path.lexists(image) and not (not live and _is_block_device(image)):
            raise RestoreError(f"{image}: exists; remove it or choose another name")
        if not os.path.isdir(os.path.dirname(image)):
            raise RestoreError(f"{image}: directory {os.path.dirname(image)} does not exist")
        out.append(Target(drive, name, image, fmt, export.size))
    return out


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def _qemu_img(*args: str) -> None:
    proc = await trio.run_process(
        ["qemu-img", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.decode(errors="replace").split())
        raise RestoreError(f"qemu-img {args[0]} failed: {detail}")


# --- the slow way: qemu-img convert ---------------------------------------------------------


async def convert_all(archive: Archive, targets: list[Target], socket_path: str, bar) -> None:
    server = open_server(archive, socket=socket_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        total = sum(t.size for t in targets)
        done = 0
        for t, uri in zip(targets, uris(server, [t.export for t in targets]), strict=True):
            args = ["convert", "-f", "raw", "-O", t.fmt, uri, t.image]
            if _is_block_device(t.image):
                args.insert(1, "-n")  # write into the existing device
            log.info("restoring %s into %s (%s)", t.export, t.image, t.fmt)
            await _qemu_img(*args)
            done += t.size
            bar(done, total)
        nursery.cancel_scope.cancel()


# --- live ------------------------------------------------------------------------------------


async def _connect(address, deadline: float) -> QmpConnection:
    """A QMP connection, retried until *deadline* (QEMU may not be started yet)."""
    last = None
    while True:
        try:
            return await QmpConnection.open(address, name="vmafs-restore")
        except QemuError as e:
            last = e
        if trio.current_time() > deadline:
            raise RestoreError(f"QEMU's QMP at {address} did not answer in time: {last}")
        await trio.sleep(0.2)


async def _qmp(address, command: str, args=None, *, deadline: float):
    conn = await _connect(address, deadline)
    try:
        return await conn.execute(command, args)
    finally:
        await conn.aclose()


def _find_nodes(nodes: list[dict], targets: list[Target], socket_path: str) -> list[Target]:
    """Set each target's node: the qcow2 node QEMU opened the image as; the missing ones."""
    missing = []
    for t in targets:
        for n in nodes:
            if n.get("drv") == "qcow2" and os.path.realpath(n.get("file", "")) == t.image:
                t.node = n["node-name"]
                backing = n.get("backing_file") or ""
                if socket_path not in urllib.parse.unquote(backing):
                    raise RestoreError(
                        f"{t.image}: QEMU opened it with backing file {backing!r}, not this "
                        "restore's export: was the image replaced?"
                    )
                break
        else:
            missing.append(t)
    return missing


async def live_restore(
    archive: Archive,
    targets: list[Target],
    qmp,
    socket_path: str,
    *,
    speed: int,
    wait: float,
    bar,
    announce,
) -> None:
    """Everything ``vmafs restore --live`` does after parsing; raises RestoreError."""
    server = open_server(archive, socket=socket_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        for t, uri in zip(targets, uris(server, [t.export for t in targets]), strict=True):
            await _qemu_img(
                "create", "-q", "-f", "qcow2", "-u", "-b", uri, "-F", "raw", t.image, str(t.size)
            )
        announce(targets)
        deadline = trio.current_time() + wait
        # QEMU opens its drives before it answers QMP; poll until every image is open
        while True:
            nodes = await _qmp(qmp, "query-named-block-nodes", {"flat": True}, deadline=deadline)
            missing = _find_nodes(nodes, targets, socket_path)
            if not missing:
                break
            if trio.current_time() > deadline:
                raise RestoreError(
                    f"QEMU at {qmp} has not opened {missing[0].image} within {wait:g} s: "
                    "start the VM with that image as its disk"
                )
            await trio.sleep(POLL_INTERVAL)
        for t in targets:
            args = {"job-id": t.job_id, "device": t.node, "auto-dismiss": False}
            if speed:
                args["speed"] = speed
            await _qmp(qmp, "block-stream", args, deadline=deadline)
            log.info("streaming %s into %s (node %s)", t.export, t.image, t.node)
        await _watch_jobs(qmp, targets, bar)
        nursery.cancel_scope.cancel()


async def _watch_jobs(qmp, targets: list[Target], bar) -> None:
    total = sum(t.size for t in targets)
    pending = {t.job_id: t for t in targets}
    progress = dict.fromkeys(pending, 0)
    failures: list[str] = []
    while pending:
        await trio.sleep(POLL_INTERVAL)
        deadline = trio.current_time() + 60
        jobs = {j["id"]: j for j in await _qmp(qmp, "query-jobs", deadline=deadline)}
        for job_id, t in list(pending.items()):
            job = jobs.get(job_id)
            if job is None:
                failures.append(f"{t.export}: the job {job_id} disappeared (dismissed by someone)")
                del pending[job_id]
                continue
            done, length = job.get("current-progress", 0), job.get("total-progress", 0)
            progress[job_id] = done * t.size // length if length else 0
            if job["status"] != "concluded":
                continue
            error = job.get("error")
            if error:
                failures.append(
                    f"block-stream of {t.export} into {t.image} failed after "
                    f"{human_bytes(done)} of {human_bytes(length)}: {error}; the guest keeps "
                    f"running on {t.image} with its own writes intact, but reads of clusters "
                    "not copied yet fail until the backup is served again"
                )
            else:
                progress[job_id] = t.size
                log.info("%s restored into %s", t.export, t.image)
            await _qmp(qmp, "job-dismiss", {"id": job_id}, deadline=deadline)
            del pending[job_id]
        bar(sum(progress.values()), total)
    if failures:
        raise RestoreError(failures[0])


# --- command line ---------------------------------------------------------------------------


class _Signals:
    """SIGINT/SIGTERM during a live restore: the first warns (the guest still reads
    from this process), the second stops serving anyway."""

    def __init__(self) -> None:
        self.count = 0

    async def watch(self, cancel: trio.CancelScope, live: bool) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
            async for signum in sigs:
                self.count += 1
                if live and self.count == 1:
                    log.warning(
                        "%s: the guest still reads uncopied clusters from this process; "
                        "send it again to stop serving anyway (the guest's reads then fail)",
                        signal.Signals(signum).name,
                    )
                    continue
                self.signal = signal.Signals(signum)
                cancel.cancel()
                return


def run_restore(args) -> int:
    from .qmp import parse_address  # noqa: PLC0415

    if args.live and not args.qmp:
        raise RestoreError(
            "--live needs --qmp SOCKET (the QMP socket of the QEMU that runs the VM)"
        )
    if args.qmp and not args.live:
        raise RestoreError("--qmp is for --live restores only")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="vmafs: %(levelname)s: %(message)s",
            stream=sys.stderr,
        )
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL + 1)
    if not args.verbose:  # refusals and lost connections: the one error line says what matters
        logging.getLogger("vmafs.serve").setLevel(logging.ERROR)
    with Progress("indexing", enabled=want_progress(args.progress)) as indexing:
        archive = Archive.open(args.archive, progress=indexing)
    try:
        targets = resolve_targets(archive, args.targets, args.live)
        sock_dir = None
        socket_path = args.socket
        if socket_path is None:
            sock_dir = tempfile.mkdtemp(prefix="vmafs-restore-", dir=args.socket_dir)
            socket_path = os.path.join(sock_dir, "nbd.sock")
        socket_path = os.path.abspath(socket_path)
        bar = Progress(
            "live restore" if args.live else "restore",
            sum(t.size for t in targets),
            enabled=want_progress(args.progress),
        )
        signals = _Signals()

        def announce(ts: list[Target]) -> None:
            for t in ts:
                print(f"{t.export}: {t.image} (qcow2, backing: the backup)", flush=True)
            print(
                f"ready: start the VM with these images as its disks; QMP: {args.qmp}", flush=True
            )

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(signals.watch, nursery.cancel_scope, args.live)
                if args.live:
                    await live_restore(
                        archive,
                        targets,
                        parse_address(args.qmp),
                        socket_path,
                        speed=args.speed,
                        wait=args.wait,
                        bar=bar,
                        announce=announce,
                    )
                else:
                    await convert_all(archive, targets, socket_path, bar)
                nursery.cancel_scope.cancel()

        try:
            with bar:
                try:
                    trio.run(main)
                except BaseExceptionGroup as group:
                    raise unwrap_group(group) from None
        finally:
            if sock_dir is not None:
                for name in os.listdir(sock_dir):
                    os.unlink(os.path.join(sock_dir, name))
                os.rmdir(sock_dir)
        sig = getattr(signals, "signal", None)
        if sig is not None:
            sys.stderr.write(f"vmafs: error: restore: stopped by {sig.name}\n")
            return 128 + sig.value
        for t in targets:
            print(f"{t.export}: restored into {t.image}", flush=True)
        if args.live:
            print("done: the images no longer need the backup", flush=True)
        return 0
    finally:
        archive.close()


HELP = "restore disks into images, or boot a VM from the backup while it restores (--live)"

DESCRIPTION = """\
Restore disks of ARCHIVE into new images.  Each TARGET is DRIVE=IMAGE[:FORMAT]:
DRIVE a disk of the archive (drive-scsi0 or scsi0), IMAGE a new file (or,
without --live, an existing block device), FORMAT any format qemu-img writes
(default: qcow2 for a .qcow2 name, else raw).

Without --live, qemu-img converts each disk from the archive, skipping holes.

With --live (instant restore), each IMAGE is created as a qcow2 whose backing
file is the disk, served by this command over NBD; start the VM with those
images as its disks (the command prints when they are ready) and it runs at
once.  Meanwhile a block-stream job per disk copies everything into the
images while the guest runs; when they are done, the images no longer need
the backup and the command exits.  See docs/restore.md (Proxmox: qm, plain
QEMU, libvirt)."""

EPILOG = """\
examples:
  vmafs restore backup.vma.zst scsi0=/var/lib/vz/images/100/vm-100-disk-0.qcow2
  vmafs restore --live backup.vma.zst scsi0=/var/lib/vz/images/100/vm-100-disk-0.qcow2 \\
      --qmp /var/run/qemu-server/100.qmp       # then, in another shell: qm start 100"""


def _target(text: str):
    import argparse  # noqa: PLC0415

    try:
        return parse_target(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers) -> None:
    from .cli import parse_rate  # noqa: PLC0415

    p = subparsers.add_parser("restore", help=HELP, description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("archive", metavar="ARCHIVE", help="the .vma (or .vma.zst/.gz/.lzo) file")
    p.add_argument(
        "targets", nargs="+", type=_target, metavar="DRIVE=IMAGE[:FORMAT]", help="what goes where"
    )
    p.add_argument("--live", action="store_true", help="instant restore: see above")
    p.add_argument(
        "--qmp", metavar="SOCKET", help="with --live: QMP socket of the VM's QEMU (or HOST:PORT)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --live: how long to wait for QEMU to open the images (default 600)",
    )
    p.add_argument(
        "--speed",
        type=parse_rate,
        default=0,
        metavar="RATE",
        help="with --live: copy at most RATE bytes/s (e.g. 50M; default 0: unlimited)",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="the NBD socket (default: a private directory in $TMPDIR); with --live its path "
        "is written into the images until the copy is done",
    )
    p.add_argument("--socket-dir", metavar="DIR", help="where the private socket directory is made")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    add_progress_options(p)
    p.set_defaults(func=run_restore)


__all__ = ["RestoreError", "register", "run_restore"]
