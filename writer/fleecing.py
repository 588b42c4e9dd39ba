"""Fleecing: the backup reads a point-in-time view, so the guest never waits on the writer.

Push mode (:mod:`writer.backup` alone) puts the writer in the guest's write
path: a guest write to a cluster the job has not copied yet waits until the
writer took the old data.  With fleecing, for each drive::

    guest device --> copy-before-write filter (vmafs-<tag>-c<i>) --> the guest's node
                          | old data of a cluster, before its first overwrite
                          v
                     fleecing image (qcow2, sparse, DIR/vmafs-fleece-<tag>/<i>.qcow2,
                                     node vmafs-<tag>-f<i>)
    snapshot-access (vmafs-<tag>-s<i>) over the filter --> backup job --> NBD --> vmafs

The guest's writes wait only for the local fleecing image, at most
``cbw-timeout`` seconds; with ``on-cbw-error=break-snapshot`` a failed or
timed-out copy drops the snapshot (the job then fails reading it, with
``Permission denied``) instead of failing the guest write.  A stopped, dead
or full writer stalls only the job.

The filter is put in front of the disk by re-pointing the guest device's
``drive`` property at it (``qom-set``; QEMU 7.2 allows that on a realized
device and keeps the BlockBackend, so ``query-block`` names the same drive)
and taken out the same way.  QEMU 7.2 has no ``x-blockdev-replace``, and
``blockdev-remove-medium`` works only on removable devices, so a drive
without a guest device cannot be fleeced - nor does it need to be.
With more than one drive a running VM is paused (``stop``/``cont``, a few
QMP round trips) while the filters go in, so all drives have one point in
time.

:class:`Fleecing` does the set-up and the tear-down; the tear-down leaves the
guest's graph exactly as it was (``tests/test_fleecing.py`` compares
``query-named-block-nodes`` and ``query-block``).  A vmafs that was killed
cannot tear down: its filters stay in front of the guest's disks.  The run's
directory holds ``state.json`` (what was changed) and stays locked
(``flock``) while the run lives; :func:`reap_stale_fleecing`, called by the
next backup, undoes what a dead run left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import trio

from vmafs.common.progress import human_bytes
from vmafs.errors import BackupError

from .qmp import QemuError, QmpConnection

__all__ = [
    "DEFAULT_CBW_TIMEOUT",
    "DEFAULT_RESERVE",
    "Fleecing",
    "FleecingOptions",
    "check_directory",
    "reap_stale_fleecing",
]

log = logging.getLogger("writer.fleecing")

#: seconds a guest write may wait for its copy-before-write into the fleecing
#: image.  The image is on a local disk, so a copy normally takes milliseconds;
#: a copy slower than this means the local disk is in trouble, and the
#: guest's write must not share that fate: the snapshot is dropped instead.
#: Well below the 30 s after which a Linux guest's SCSI layer gives up on a
#: command (and resets the disk).
DEFAULT_CBW_TIMEOUT = 10
#: free space DIR must have when the backup starts (bytes)
DEFAULT_RESERVE = 1 << 30
#: name of the run's private directory inside DIR
DIR_PREFIX = "vmafs-fleece-"
STATE_FILE = "state.json"
#: seconds the reaper waits for a dead run's jobs to end after cancelling them
REAP_JOB_TIMEOUT = 30.0


@dataclass(frozen=True)
class FleecingOptions:
    """``--fleecing DIR``, ``--cbw-timeout``, ``--fleecing-reserve``."""

    directory: str
    cbw_timeout: int = DEFAULT_CBW_TIMEOUT
    reserve: int = DEFAULT_RESERVE


def check_directory(opts: FleecingOptions) -> None:
    """Refuse a fleecing directory that is missing, not writable or too full.

    Run before anything starts in QEMU; each error is one line that says
    what to do.
    """
    d = opts.directory
    if not os.path.exists(d):
        raise BackupError(
            f"--fleecing {d}: no such directory (create it on a local disk: mkdir -p {d})"
        )
    if not os.path.isdir(d):
        raise BackupError(f"--fleecing {d}: not a directory (give a directory on a local disk)")
    try:  # root passes os.access on a read-only mount: try it for real
        fd, probe = _mkstemp(d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BackupError(
            f"--fleecing {d}: cannot create files there ({e.strerror}): choose a writable "
            "directory on a local disk"
        ) from None
    st = os.statvfs(d)
    free = st.f_bavail * st.f_frsize
    if free < opts.reserve:
        raise BackupError(
            f"--fleecing {d}: {human_bytes(free)} free, less than the reserve of "
            f"{human_bytes(opts.reserve)}: make room there, choose another directory, or "
            "lower --fleecing-reserve"
        )


def _mkstemp(d: str) -> tuple[int, str]:
    import tempfile  # noqa: PLC0415 - only for this probe

    return tempfile.mkstemp(prefix=".vmafs-probe-", dir=d)


# --- one run's fleecing ------------------------------------------------------------------


@dataclass
class FleecedDrive:
    """What vmafs changed for one drive (also the record in ``state.json``)."""

    label: str
    #: QOM path of the guest device whose ``drive`` property is re-pointed
    qdev: str
    #: the node the device used before (and uses again afterwards)
    original: str
    size: int
    image_path: str
    image_node: str
    filter_node: str
    access_node: str


class Disk(Protocol):
    """What fleecing needs of a :class:`writer.backup.SourceDisk`."""

    @property
    def label(self) -> str: ...

    node: str
    size: int
    qdev: str


class Fleecing:
    """Set up and tear down the fleecing of *disks* for one backup run.

    ``await setup()`` returns the snapshot-access node per disk (the jobs'
    sources); ``await teardown()`` undoes everything setup did, in reverse,
    whether setup finished or not.  :meth:`image_bytes` is the space the
    fleecing images take now.
    """

    def __init__(
        self, qmp: QmpConnection, disks: Sequence[Disk], opts: FleecingOptions, tag: str
    ) -> None:
        self.qmp = qmp
        self.opts = opts
        self.tag = tag
        self.dir = os.path.join(opts.directory, DIR_PREFIX + tag)
        self.drives = [
            FleecedDrive(
                label=d.label,
                qdev=d.qdev,
                original=d.node,
                size=d.size,
                image_path=os.path.join(self.dir, f"{i}.qcow2"),
                image_node=f"vmafs-{tag}-f{i}",
                filter_node=f"vmafs-{tag}-c{i}",
                access_node=f"vmafs-{tag}-s{i}",
            )
            for i, d in enumerate(disks)
        ]
        self._lock: int | None = None
        self.peak = 0

    @staticmethod
    def refuse_unattached(disks: Sequence[Disk]) -> None:
        """One line for a drive that has no guest device to re-point."""
        for d in disks:
            if not d.qdev:
                raise BackupError(
                    f"drive {d.label!r} is not attached to a guest device, so no guest "
                    "write can be routed through a fleecing filter; back it up without "
                    "--fleecing (nothing waits on it there either)"
                )

    # -- set-up --

    async def setup(self) -> list[str]:
        os.mkdir(self.dir, 0o700)
        self._lock = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._write_state()
        for d in self.drives:
            await _create_image(d.image_path, d.size)
            await self.qmp.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": d.image_node,
                    "discard": "unmap",
                    # scratch data, worthless after a host crash: no fsync for the
                    # ordering of qcow2's metadata updates in a guest write's path
                    "cache": {"no-flush": True},
                    "file": {"driver": "file", "filename": d.image_path},
                },
            )
            await self.qmp.execute(
                "blockdev-add",
                {
                    "driver": "copy-before-write",
                    "node-name": d.filter_node,
                    "file": d.original,
                    "target": d.image_node,
                    "on-cbw-error": "break-snapshot",
                    "cbw-timeout": self.opts.cbw_timeout,
                },
            )
        await self._insert_filters()
        for d in self.drives:
            await self.qmp.execute(
                "blockdev-add",
                {"driver": "snapshot-access", "node-name": d.access_node, "file": d.filter_node},
            )
        log.info("fleecing images in %s", self.dir)
        return [d.access_node for d in self.drives]

    def _write_state(self) -> None:
        with open(os.path.join(self.dir, STATE_FILE), "w") as f:
            json.dump([asdict(d) for d in self.drives], f)

    async def _insert_filters(self) -> None:
        """Re-point every guest device at its filter; one point in time for all.

        With more than one drive the VM is paused for the switch (if it runs):
        a guest write between two re-pointings would be in one drive's
        snapshot and not in the other's.
        """
        pause = len(self.drives) > 1 and (await self.qmp.execute("query-status"))["running"]
        if pause:
            await self.qmp.execute("stop")
        try:
            for d in self.drives:
                await _set_drive(self.qmp, d.qdev, d.filter_node)
        finally:
            if pause:
                with trio.CancelScope(shield=True):
                    await self.qmp.execute("cont")

    # -- progress --

    def image_bytes(self) -> int:
        """Bytes the fleecing images occupy on disk now (and the peak so far)."""
        total = 0
        for d in self.drives:
            with contextlib.suppress(OSError):
                total += os.stat(d.image_path).st_blocks * 512
        self.peak = max(self.peak, total)
        return total

    # -- tear-down --

    def discard(self) -> None:
        """Remove the run's directory and images without asking QEMU (it is gone)."""
        self.image_bytes()
        if self._lock is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._lock)
            self._lock = None

    async def teardown(self) -> list[str]:
        """Undo :meth:`setup` (any part of it); returns what could not be undone."""
        self.image_bytes()
        left = await undo(self.qmp, self.drives)
        if self._lock is not None:
            if not left:
                shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._lock)
            self._lock = None
        return left


async def _create_image(path: str, size: int) -> None:
    """A sparse qcow2 of *size* bytes (no backing file: the filter only adds to it)."""
    try:
        await trio.run_process(
            ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
            capture_stdout=True,
            capture_stderr=True,
        )
    except subprocess.CalledProcessError as e:
        err = " ".join(e.stderr.decode(errors="replace").split())
        raise BackupError(f"cannot create the fleecing image {path}: {err}") from None
    except FileNotFoundError:
        raise BackupError(
            "cannot create the fleecing image: qemu-img is not on PATH (Debian: qemu-utils)"
        ) from None


async def _set_drive(qmp: QmpConnection, qdev: str, node: str) -> None:
    await qmp.execute("qom-set", {"path": qdev, "property": "drive", "value": node})


async def undo(qmp: QmpConnection, drives: Sequence[FleecedDrive]) -> list[str]:
    """Put every device back on its original node, delete our nodes and files.

    Tolerates any state between "nothing done" and "all done" (each step
    checks what is there).  Order matters: the snapshot-access node goes
    first (while it exists the filter forbids other writers on the disk, so
    the device could not go back), then the device is re-pointed, then the
    filter and the image go.  Returns the names of what stayed.
    """
    left: list[str] = []
    present = {n["node-name"] for n in await qmp.execute("query-named-block-nodes", {"flat": True})}
    blocks = await qmp.execute("query-block")
    on_filter = {
        b.get("qdev"): (b.get("inserted") or {}).get("node-name") for b in blocks if b.get("qdev")
    }

    async def delete(node: str) -> None:
        if node not in present:
            return
        try:
            await qmp.execute("blockdev-del", {"node-name": node})
        except QemuError as e:
            log.warning("could not remove node %s: %s", node, e)
            left.append(node)

    for d in drives:
        await delete(d.access_node)
    for d in drives:
        if on_filter.get(d.qdev) == d.filter_node:
            try:
                await _set_drive(qmp, d.qdev, d.original)
            except QemuError as e:
                log.warning("could not put %s back on node %s: %s", d.qdev, d.original, e)
                left.append(d.filter_node)
                continue
    for d in drives:
        if d.filter_node not in left:
            await delete(d.filter_node)
    for d in drives:
        if d.filter_node not in left:
            await delete(d.image_node)
        if d.image_node not in left and d.filter_node not in left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d.image_path)
    return left


# --- what a killed vmafs left -----------------------------------------------------------

#: a run's fleecing image node: the first thing a run adds to QEMU, the last it removes
_IMAGE = re.compile(r"vmafs-([0-9a-f]{6})-f[0-9]+")


async def reap_stale_fleecing(qmp: QmpConnection) -> list[str]:
    """Undo the fleecing of runs whose vmafs is gone (SIGKILL, OOM, a crash).

    A run is found by its image nodes (it may have died before adding its
    filters) and is dead when its directory's lock can be taken.  Its jobs
    are cancelled first (a dead run's job may still be reading the
    snapshot), then :func:`undo` puts the devices back and deletes nodes and
    files.  Returns the filter nodes of the runs undone.
    """
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    runs: dict[str, str] = {}  # tag -> the run's directory
    for node in nodes:
        m = _IMAGE.fullmatch(node.get("node-name", ""))
        if m and node.get("drv") == "qcow2":
            runs[m.group(1)] = os.path.dirname((node.get("image") or {}).get("filename", ""))
    reaped: list[str] = []
    for tag, run_dir in sorted(runs.items()):
        drives = _read_state(run_dir)
        if drives is None or not _dead(run_dir):
            continue
        await _cancel_jobs(qmp, tag)
        left = await undo(qmp, drives)
        if left:
            log.warning("a killed vmafs's fleecing could not be undone: %s", ", ".join(left))
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        for d in drives:
            log.warning(
                "removed fleecing filter %s left in front of %s by a killed vmafs",
                d.filter_node,
                d.label,
            )
            reaped.append(d.filter_node)
    return reaped


def _read_state(run_dir: str) -> list[FleecedDrive] | None:
    if not os.path.basename(run_dir).startswith(DIR_PREFIX):
        return None
    try:
        with open(os.path.join(run_dir, STATE_FILE)) as f:
            return [FleecedDrive(**d) for d in json.load(f)]
    except (OSError, ValueError, TypeError) as e:
        log.info("fleecing state in %s unreadable: %s", run_dir, e)
        return None


def _dead(run_dir: str) -> bool:
    """Is the vmafs that owns *run_dir* gone?  (It holds an flock on it while it lives.)"""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def _cancel_jobs(qmp: QmpConnection, tag: str) -> None:
    prefix = f"vmafs-{tag}-j"
    with trio.move_on_after(REAP_JOB_TIMEOUT):
        first = True
        while True:
            jobs = [
                j for j in await qmp.execute("query-block-jobs") if j["device"].startswith(prefix)
            ]
            if not jobs:
                return
            if first:
                for j in jobs:
                    with contextlib.suppress(QemuError):
                        await qmp.execute(
                            "block-job-cancel", {"device": j["device"], "force": True}
                        )
                first = False
            await trio.sleep(0.05)
