"""The write-path figures: the writer's throughput, guest write latency during a
backup, the archive's size."""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable

import trio
from vmafs.writer.backup import JOB_PERF
from vmafs.writer.qmp import QemuError, QmpConnection

from . import datasets as ds
from .ctx import Ctx, Row, ratio
from .qemu import backup_job, job_completed, nbdkit_memory, qemu_vm, qsd_backup, stop
from .util import VMAFS, fmt_rate, fmt_s, fsync_path, need, percentile, wait_for_path, warm


def _vmafs_create(image: str, out: str) -> tuple[float, float, list[str], str]:
    """One `vmafs create` of *image* into *out* (or, if that fails, `vmafs backup`
    against a daemon the bench owns).  Returns (end-to-end s, job s, stderr lines, how)."""
    how = "`vmafs create`"
    t0 = time.perf_counter()
    p = subprocess.run(
        [*VMAFS, "create", "-f", "--no-progress", "-v", out, f"drive-scsi0={image}:raw"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wall = time.perf_counter() - t0
    err = p.stderr.decode(errors="replace").strip().splitlines()
    if p.returncode != 0:
        failed = err[-1] if err else f"exit {p.returncode}"
        warm(image)
        t0 = time.perf_counter()
        ds.write_archive_backup(image, out, ["-v"])
        wall = time.perf_counter() - t0
        err = ds.LAST_BACKUP_STDERR[:]
        how = f"`vmafs backup` (`vmafs create` failed after {wall:.1f} s: {failed})"
    m = re.search(r"clusters \(\d+ re-sent\), ([\d.]+) s", "\n".join(err))
    return wall, float(m.group(1)) if m else float("nan"), err, how


def fig_writer(ctx: Ctx) -> list[Row]:
    need("qemu-storage-daemon")
    image = ctx.get("wdisk")
    size = ctx.sizes.writer_disk
    out = os.path.join(ctx.work, "writer-out.vma")
    # vmafs and the nbdkit baseline alternated, the median of each taken: one
    # sample of either swung by a third within a run on this shared machine
    vms, nbds = [], []
    for _ in range(1 if ctx.sizes.label == "quick" else 3):
        warm(image)
        vms.append(_vmafs_create(image, out))
        warm(image)
        nbds.append(qsd_backup(ctx.work, image, size, "nbdkit"))
    vm_wall, vm_job, err, how = sorted(vms)[len(vms) // 2]
    nbd_wall, nbd_job = sorted(nbds)[len(nbds) // 2]
    ctx.facts["writer_summary"] = err[-1] if err else ""
    # the same into tmpfs: the writer's own cost without the disk write and fsync
    shm = None
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        free = 0
    if free > 2 * size + (256 << 20):
        shm_out = os.path.join("/dev/shm", f"vmafs-bench-{os.getpid()}.vma")
        warm(image)
        t0 = time.perf_counter()
        try:
            ds.write_archive_backup(image, shm_out, ["-v"])
            shm = time.perf_counter() - t0
        finally:
            if os.path.exists(shm_out):
                os.unlink(shm_out)
    ctx.facts["writer_archive"] = {"path": out, "size": os.path.getsize(out)}
    warm(image)
    raw_wall, raw_job = qsd_backup(ctx.work, image, size, "raw")
    rate = size / vm_wall
    samples = (
        f"median of {len(vms)} alternated pairs (vmafs {', '.join(fmt_s(v[0]) for v in vms)}; "
        f"nbdkit {', '.join(fmt_s(n[0]) for n in nbds)}); "
    )
    return [
        Row(
            f"writer: `vmafs create` of a {size >> 20} MiB disk of random data",
            "qemu-storage-daemon blockdev-backup into `nbdkit memory`",
            f"{fmt_rate(size / nbd_wall)} ({fmt_s(nbd_wall)}; job {fmt_s(nbd_job)})",
            f"{fmt_rate(rate)} ({fmt_s(vm_wall)}; job {fmt_s(vm_job)})",
            f"{nbd_wall / vm_wall:.2f}",
            ">= 0.80 of nbdkit memory",
            nbd_wall / vm_wall >= 0.8,
            samples + f"writer run as {how}; into tmpfs (/dev/shm, no disk write or fsync) "
            "through `vmafs backup` from a bench-owned daemon: "
            + (f"{fmt_rate(size / shm)} ({fmt_s(shm)}); " if shm else "no room in /dev/shm; ")
            + "end to end (process start to archive fsynced and renamed / job completed); "
            "'job' = the writer's own backup timer and the baseline's "
            "blockdev-backup-to-BLOCK_JOB_COMPLETED",
        ),
        Row(
            "writer: `vmafs create` (same)",
            "qemu-storage-daemon blockdev-backup into a raw file (fsynced)",
            f"{fmt_rate(size / raw_wall)} ({fmt_s(raw_wall)}; job {fmt_s(raw_job)})",
            f"{fmt_rate(rate)} ({fmt_s(vm_wall)})",
            f"{raw_wall / vm_wall:.2f}",
            "(reference)",
            None,
        ),
    ]


# --- guest write latency during a backup ------------------------------------------------

#: a backup starter: (QMP socket of the VM, drive, speed) -> an awaitable "wait for the end"
JobStarter = Callable[[str, str, int], Awaitable[Callable[[], Awaitable[object]]]]


async def _write_latency(
    ctx: Ctx,
    image: str,
    start_job: JobStarter | None,
    speed: int,
    writes: int,
    *,
    guest_device: bool = False,
) -> tuple[list[float], int, object]:
    """Run a QEMU (-machine none) with *image*; start a backup with *start_job*;
    time 4 KiB HMP qemu-io writes to not-yet-copied clusters on a second QMP monitor.
    Returns (sorted latencies, writes that were ahead of the job, the job's result).

    With *guest_device* the writes take a virtio-blk device's path (see
    :func:`qemu_vm`).  Without *start_job* no backup runs: the same writes at
    the same pace, the baseline.
    """
    size = os.path.getsize(image)
    write = "qemu-io -d vd0/virtio-backend" if guest_device else "qemu-io drive0"
    q1 = os.path.join(ctx.work, "vm-qmp1.sock")
    q2 = os.path.join(ctx.work, "vm-qmp2.sock")
    vm = qemu_vm(image, (q1, q2), guest_device=guest_device)
    try:
        wait_for_path(q2, vm)
        wait_for_path(q1, vm)
        async with await QmpConnection.open(q2, name="bench-mon") as mon:
            finish = job_id = None
            if start_job is not None:
                finish = await start_job(q1, "drive0", speed)
                with trio.fail_after(30):
                    while not (jobs := await mon.execute("query-block-jobs")):
                        await trio.sleep(0.01)
                job_id = jobs[0]["device"]
            targets = _guest_clusters(size, writes)
            rnd = random.Random(_GUEST_SEED + 1)  # the block within each cluster
            lat, ahead = [], 0
            gap = 0.5 * size / speed / writes  # writes spread over half the job's time
            for c in targets:
                jobs = await mon.execute("query-block-jobs") if job_id else []
                done = jobs[0]["offset"] if jobs else size
                off = c * 65536 + rnd.randrange(16) * 4096
                ahead += off > done
                t0 = time.perf_counter()
                r = await mon.hmp(f'{write} "write -P 0x5a {off} 4k"')
                lat.append(time.perf_counter() - t0)
                if r and "error" in r.lower():
                    raise RuntimeError(f"qemu-io: {r.strip()}")
                await trio.sleep(gap)
            result = None
            if job_id is not None:
                try:
                    await mon.execute("block-job-set-speed", {"device": job_id, "speed": 0})
                except QemuError:
                    pass  # already finished
                result = await finish()
        lat.sort()
        return lat, ahead, result
    finally:
        stop(vm)
        for p in (q1, q2):
            if os.path.exists(p):
                os.unlink(p)


#: Seeds the clusters the guest writes: every latency round writes the same
#: ones, and _ScratchDisk restores exactly those between rounds.
_GUEST_SEED = 9


def _guest_clusters(size: int, writes: int) -> list[int]:
    """The 64 KiB clusters the guest writes, one write each, all in the disk's second half."""
    clusters = size // 65536
    return random.Random(_GUEST_SEED).sample(range(clusters // 2, clusters), writes)


class _ScratchDisk:
    """The guest's disk of the latency figures: a copy of *base*, the same at
    the start of every round.

    The copy is made and fsynced once; between rounds only the clusters the
    guest wrote are copied back (and fsynced).  A fresh 512 MiB copy per round
    left that much dirty page cache for the kernel to write back under later
    rounds, where writeback can stall the guest's writes and the
    copy-before-write reads of every case alike (in a QEMU trace one 64 KiB
    source read took 467 ms while 60 other reads completed); no VM's disk
    has a fresh copy's writeback under it.
    """

    def __init__(self, base: str, path: str, writes: int) -> None:
        self.base, self.path = base, path
        self.clusters = _guest_clusters(os.path.getsize(base), writes)
        shutil.copyfile(base, path)
        fsync_path(path)

    def reset(self) -> None:
        with open(self.base, "rb") as src, open(self.path, "r+b") as dst:
            for c in self.clusters:
                dst.seek(c * 65536)
                dst.write(os.pread(src.fileno(), 65536, c * 65536))
            dst.flush()
            os.fsync(dst.fileno())

    def remove(self) -> None:
        os.unlink(self.path)


def _vmafs_backup_job(out: str, extra: tuple[str, ...] = ()) -> JobStarter:
    """A ``start_job`` for :func:`_write_latency`: ``vmafs backup -v [extra]`` into
    *out*; its result is the summary line."""

    async def start(qmp: str, drive: str, speed: int):
        proc = subprocess.Popen(
            [*VMAFS, "backup", "--qmp", qmp, "-o", out, "-f", "--no-progress", "-v"]
            + ["--speed", str(speed), *extra, drive],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        async def finish():
            _, err = await trio.to_thread.run_sync(proc.communicate, None, 600)
            if proc.returncode != 0:
                raise RuntimeError(f"vmafs backup failed: {err.decode().strip()[-300:]}")
            return err.decode(errors="replace").strip().splitlines()[-1:]

        return finish

    return start


def _latency_setup(ctx: Ctx) -> tuple[str, int, int, int]:
    """The latency figures' disk, its size, the job speed and writes per round."""
    size = ctx.sizes.latency_disk
    duration = 12.0 if ctx.sizes.label == "full" else 6.0
    writes = 150 if ctx.sizes.label == "full" else 60
    return ctx.get("ldisk"), size, int(size / duration), writes


def fig_latency(ctx: Ctx) -> list[Row]:
    need("qemu-system-x86_64")
    base, size, speed, writes = _latency_setup(ctx)
    scratch = os.path.join(ctx.work, "latency-scratch.img")
    disk = _ScratchDisk(base, scratch, writes)
    out = os.path.join(ctx.work, "latency-out.vma")
    vmafs_job = _vmafs_backup_job(out)

    async def raw_job(qmp: str, drive: str, speed: int):
        tgt = os.path.join(ctx.work, "latency-target.raw")
        with open(tgt, "wb") as f:
            f.truncate(size)
        return await qemu_job(qmp, drive, speed, {"driver": "file", "filename": tgt}, tgt)

    async def nbdkit_job(qmp: str, drive: str, speed: int):
        # The reference for what NBD itself costs: the same job into a C NBD
        # server that stores nothing (QEMU's NBD client, a socket, replies).
        nbd, node = nbdkit_memory(os.path.join(ctx.work, "latency-nbdkit.sock"), size)
        try:
            return await qemu_job(qmp, drive, speed, node, None, nbd)
        except BaseException:
            stop(nbd)
            raise

    async def qemu_job(qmp, drive, speed, node, tgt, server=None):
        q = await QmpConnection.open(qmp, name="bench-job")
        try:
            # The job vmafs backup runs (JOB_PERF: 4 copies of 256 KiB in flight,
            # no copy offload), so the baselines differ from vmafs only in the
            # target.  Copy offload (copy_file_range between two local files)
            # failed this job with EBADF in 3 of 4 runs here anyway.
            await backup_job(q, drive, node, speed, perf=JOB_PERF)  # no copy-range
        except BaseException:
            await q.aclose()
            raise

        async def finish():
            try:
                await job_completed(q)
            finally:
                await q.aclose()
                if tgt is not None:
                    os.unlink(tgt)
                stop(server)  # QEMU keeps the connection open until it stops

        return finish

    # Alternated rounds, samples pooled: one round's p99 is its second-slowest
    # write, and the baseline's alone swung from 5.5 to 19.3 ms between runs.
    rounds = 3 if ctx.sizes.label == "full" else 1
    results: dict[str, list] = {"vmafs": [], "raw": [], "nbdkit": []}
    retried = []
    jobs = [("vmafs", vmafs_job), ("raw", raw_job)]
    if shutil.which("nbdkit"):
        jobs.append(("nbdkit", nbdkit_job))
    for _ in range(rounds):
        for name, fn in jobs:
            for attempt in (1, 2):
                disk.reset()
                try:
                    results[name].append(trio.run(_write_latency, ctx, scratch, fn, speed, writes))
                    break
                except (RuntimeError, QemuError, trio.TooSlowError) as e:
                    if attempt == 2:
                        raise RuntimeError(f"the {name} job failed twice: {e}") from e
                    retried.append(f"{name} job failed once ({e}) and was run again")
    disk.remove()
    if os.path.exists(out):
        os.unlink(out)

    def pooled(runs):
        return sorted(x for r in runs for x in r[0]), sum(r[1] for r in runs)

    (vl, va), (rl, ra) = pooled(results["vmafs"]), pooled(results["raw"])
    v99, r99 = percentile(vl, 0.99), percentile(rl, 0.99)
    if results["nbdkit"]:
        nl, _ = pooled(results["nbdkit"])
        n99 = percentile(nl, 0.99)
        nbd_note = (
            f"; the same job into `nbdkit memory` over NBD (a C server that stores nothing: "
            f"what QEMU's NBD path costs): p50 {fmt_s(percentile(nl, 0.5))}, p99 "
            f"{fmt_s(n99)}; vmafs p99 = {ratio(v99, n99)} of it"
        )
    else:
        nbd_note = "; no nbdkit on PATH, so no NBD reference"
    vextra = results["vmafs"][-1][2]
    per_round = ", ".join(
        f"{fmt_s(percentile(v[0], 0.99))}/{fmt_s(percentile(r[0], 0.99))}"
        for v, r in zip(results["vmafs"], results["raw"], strict=True)
    )
    ctx.facts["latency_vmafs_summary"] = vextra
    return [
        Row(
            f"guest 4 KiB write latency during a throttled backup ({size >> 20} MiB disk, "
            f"{speed >> 20} MiB/s, {rounds} x {writes} writes via HMP qemu-io)",
            "the same job into a raw file target",
            f"p50 {fmt_s(percentile(rl, 0.5))}, p99 {fmt_s(r99)} ({ra} ahead of the job)",
            f"p50 {fmt_s(percentile(vl, 0.5))}, p99 {fmt_s(v99)} ({va} ahead of the job)",
            ratio(v99, r99),
            "p99 <= 2x",
            v99 <= 2 * r99,
            "each write timed as one QMP human-monitor-command round trip on a second "
            "monitor; 'ahead' = writes to clusters past the job's offset at that moment; "
            "every job with vmafs backup's x-perf "
            f"({', '.join(f'{k}={v}' for k, v in JOB_PERF.items())}); "
            f"{rounds} alternated rounds, samples pooled (p99 per round, vmafs/raw: "
            f"{per_round})" + nbd_note + "".join(f"; {r}" for r in retried),
        )
    ]


# --- fleecing: guest write latency with the writer out of the guest's path ---------------


_PEAK = re.compile(r"fleecing images peaked at ([0-9.]+ [KMGT]?i?B)")


def fig_fleecing(ctx: Ctx) -> list[Row]:
    """Issue 16: guest 4 KiB write p99 during a throttled backup - fleecing, push
    mode, and no backup at all - on a PC whose virtio disk the writes go through."""
    need("qemu-system-x86_64")
    base, size, speed, writes = _latency_setup(ctx)
    scratch = os.path.join(ctx.work, "fleecing-scratch.img")
    disk = _ScratchDisk(base, scratch, writes)
    out = os.path.join(ctx.work, "fleecing-out.vma")
    fleece = os.path.join(ctx.work, "fleecing")
    os.makedirs(fleece, exist_ok=True)
    cases: list[tuple[str, JobStarter | None]] = [
        ("fleecing", _vmafs_backup_job(out, ("--fleecing", fleece))),
        ("push", _vmafs_backup_job(out)),
        ("none", None),
    ]
    rounds = 3 if ctx.sizes.label == "full" else 1
    results: dict[str, list] = {name: [] for name, _ in cases}
    for _ in range(rounds):  # alternated, pooled, as in fig_latency
        for name, job in cases:
            disk.reset()
            results[name].append(
                trio.run(
                    functools.partial(
                        _write_latency, ctx, scratch, job, speed, writes, guest_device=True
                    )
                )
            )
            if os.path.exists(out):
                os.unlink(out)
    disk.remove()
    pooled = {k: sorted(x for r in v for x in r[0]) for k, v in results.items()}
    p99 = {k: percentile(v, 0.99) for k, v in pooled.items()}
    p50 = {k: percentile(v, 0.5) for k, v in pooled.items()}
    peaks = [
        m.group(1) for r in results["fleecing"] for m in [_PEAK.search(" ".join(r[2] or []))] if m
    ]
    ctx.facts["fleecing_p99"] = {k: round(v * 1e3, 2) for k, v in p99.items()}
    label = (
        f"guest 4 KiB write latency through a virtio-blk device during a throttled backup "
        f"({size >> 20} MiB disk, {speed >> 20} MiB/s, {rounds} x {writes} writes)"
    )

    def value(k: str) -> str:
        return f"p50 {fmt_s(p50[k])}, p99 {fmt_s(p99[k])}"

    return [
        Row(
            label + ": fleecing",
            "the same writes with no backup running",
            value("none"),
            value("fleecing"),
            ratio(p99["fleecing"], p99["none"]),
            "p99 <= 1.5x",
            p99["fleecing"] <= 1.5 * p99["none"],
            f"fleecing images peaked at {', '.join(peaks) or '?'} per round for "
            f"{writes} x 4 KiB = {writes * 4} KiB written by the guest, each write in its own "
            "64 KiB cluster (a cluster's first overwrite copies the whole cluster); "
            f"push mode on the same VM: {value('push')}, "
            f"{ratio(p99['push'], p99['none'])} of no backup (the push-vs-raw-file target "
            "is the latency row's); p99 per round, fleecing/push/none: "
            + ", ".join(
                "/".join(fmt_s(percentile(r[0], 0.99)) for r in rnd)
                for rnd in zip(*(results[k] for k in ("fleecing", "push", "none")), strict=True)
            ),
        )
    ]


# --- archive size --------------------------------------------------------------------


def fig_size(ctx: Ctx) -> list[Row]:
    from vmafs.format import CLUSTER_SIZE, Header

    archive = ctx.get("archive")
    image = ctx.get("image")
    with open(archive, "rb") as f:
        head = f.read(1 << 20)
    hsize = Header.peek_size(head)
    clusters = (os.path.getsize(image) + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    blocks = ds.nonzero_blocks(image)
    expect = hsize + 512 * -(-clusters // 58) + 4096 * blocks
    actual = os.path.getsize(archive)
    dev = (actual - expect) / expect
    return [
        Row(
            f"archive size from `vmafs create` ({ctx.sizes.disk >> 30} GiB ext4 disk)",
            "Proxmox rules: header + 512 B per 58 clusters + 4 KiB per non-zero block",
            f"{expect:,} B",
            f"{actual:,} B",
            f"{dev * 100:+.3f}%",
            "within 1%",
            abs(dev) <= 0.01,
            f"{blocks:,} non-zero 4 KiB blocks in the source",
        )
    ]
