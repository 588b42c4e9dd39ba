"""The QEMU-side processes the bench drives, and its QMP through the writer's client.

- :func:`qemu_vm`: a QEMU with no machine, one drive and two QMP monitors
  (the write-latency figure: one for the backup, one for guest writes);
- :func:`nbdkit_memory`: ``nbdkit memory`` on a Unix socket (a C NBD server
  that stores nothing);
- :func:`backup_job`, :func:`job_completed`: a QEMU ``blockdev-backup`` into
  a blockdev node, over a :class:`~vmafs.writer.qmp.QmpConnection` (trio);
- :func:`qsd_backup`: a whole baseline backup of an image by a
  qemu-storage-daemon (started by :mod:`vmafs.writer.storage_daemon`), timed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping

import trio
from vmafs.writer.qmp import QmpConnection
from vmafs.writer.storage_daemon import raw_image_nodes, start_storage_daemon

from .util import fsync_path, need, wait_for_path


def qemu_vm(
    image: str, qmp_socks: tuple[str, ...], *, guest_device: bool = False
) -> subprocess.Popen:
    """QEMU (``-machine none``) with *image* as drive ``drive0``, one QMP monitor per socket.

    With *guest_device* it is a paused PC whose ``drive0`` is used by a
    virtio-blk-pci device ``vd0`` (writes can then take the guest's path,
    ``qemu-io -d vd0/virtio-backend``, as a fleecing filter needs).
    """
    for p in qmp_socks:
        if os.path.exists(p):
            os.unlink(p)
    monitors = [a for p in qmp_socks for a in ("-qmp", f"unix:{p},server=on,wait=off")]
    return subprocess.Popen(
        [
            need("qemu-system-x86_64"),
            *(
                ("-machine", "pc", "-S", "-device", "virtio-blk-pci,drive=drive0,id=vd0")
                if guest_device
                else ("-machine", "none")
            ),
            "-nodefaults",
            "-display",
            "none",
            "-drive",
            # auto-read-only=off: no guest device holds write permission, so QEMU
            # would open the image read-only and reopen it read-write once the job
            # or qemu-io needs that, replacing the fd under reads in flight; the
            # job then failed with EBADF (or a read error) in ~1 of 10 rounds.
            f"file={image},format=raw,if=none,id=drive0,auto-read-only=off",
            *monitors,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(p: subprocess.Popen | None) -> None:
    """Terminate *p* (kill after 10 s) and reap it."""
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def nbdkit_memory(sock: str, size: int) -> tuple[subprocess.Popen, dict]:
    """Start ``nbdkit memory`` of *size* bytes on unix socket *sock*; returns it
    and the QEMU blockdev options of an nbd node that connects to it."""
    if os.path.exists(sock):
        os.unlink(sock)
    nbd = subprocess.Popen(
        [need("nbdkit"), "-f", "-U", sock, "memory", str(size)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_path(sock, nbd)
    return nbd, {"driver": "nbd", "server": {"type": "unix", "path": sock}}


async def backup_job(
    qmp: QmpConnection,
    device: str,
    node: dict,
    speed: int = 0,
    perf: Mapping[str, object] | None = None,
) -> None:
    """Add *node* as ``tgt`` and start job ``j``: a full blockdev-backup of *device* into it.

    *perf* is the job's ``x-perf`` (e.g. ``vmafs backup``'s ``JOB_PERF``, for
    the same job as vmafs runs).
    """
    await qmp.execute("blockdev-add", {"node-name": "tgt", **node})
    args: dict = {"job-id": "j", "device": device, "target": "tgt", "sync": "full"}
    if speed:
        args["speed"] = speed
    if perf:
        args["x-perf"] = dict(perf)
    await qmp.execute("blockdev-backup", args)


async def job_completed(qmp: QmpConnection, timeout: float = 600.0) -> None:
    """Wait for BLOCK_JOB_COMPLETED; raise with QEMU's error if the job failed."""
    with trio.fail_after(timeout):
        async for ev in qmp.events:
            if ev.get("event") == "BLOCK_JOB_COMPLETED":
                if ev["data"].get("error"):
                    raise RuntimeError(f"backup job failed: {ev['data']['error']}")
                return
    raise RuntimeError("the QMP connection closed before the backup job completed")


def qsd_backup(work: str, image: str, size: int, target: str) -> tuple[float, float]:
    """blockdev-backup of *image* by a fresh qemu-storage-daemon into *target*.

    *target* is ``nbdkit`` (memory plugin) or ``raw`` (a file, fsynced at the
    end).  Returns (end-to-end seconds incl. daemon start, job seconds).
    """
    sock = os.path.join(work, "qsd-qmp.sock")
    nbd_sock = os.path.join(work, "nbdkit.sock")
    out = os.path.join(work, "backup-target.raw")
    for p in (sock, nbd_sock, out):
        if os.path.exists(p):
            os.unlink(p)
    nbdkit = daemon = None
    t_start = time.perf_counter()

    async def job() -> float:
        async with await QmpConnection.open(sock, name="bench-qsd") as q:
            t_job = time.perf_counter()
            await backup_job(q, "src", node)
            await job_completed(q)
            await q.execute("blockdev-del", {"node-name": "tgt"})
        return t_job

    try:
        if target == "nbdkit":
            nbdkit, node = nbdkit_memory(nbd_sock, size)
        else:
            with open(out, "wb") as f:
                f.truncate(size)
            node = {"driver": "file", "filename": out}
        daemon = start_storage_daemon(
            sock, raw_image_nodes(image), binary=need("qemu-storage-daemon")
        )
        t_job = trio.run(job)
        if target == "raw":
            fsync_path(out)
        t_end = time.perf_counter()
        return t_end - t_start, t_end - t_job
    finally:
        stop(daemon)
        stop(nbdkit)
        for p in (sock, nbd_sock, out):
            if os.path.exists(p):
                os.unlink(p)
