"""Tuning measurements (issue 5 point 3): request sizes, buffered vs direct_io,
inline vs worker-thread reads, and a slow-storage case.

Results go to ``ctx.notes`` (the "Tuning measurements" section), not the
target table.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from . import datasets as ds
from .ctx import Ctx, Row, mounted_disk
from .reads import pread_lat, random_offsets
from .throttle import Throttle, throttled
from .util import (
    READAHEAD,
    drop_caches,
    ext4_ro,
    fmt_rate,
    fmt_s,
    loop_ro,
    percentile,
    run,
    timed,
    umount,
    vmafs_mount,
    warm,
)


class _Probe:
    """A counting mount (bench.probe) for the duration of a with-block."""

    def __init__(self, archive: str, mnt: str, flags=()) -> None:
        self.archive, self.mnt, self.flags = archive, mnt, list(flags)
        self.stats = mnt.rstrip("/") + ".stats.json"
        self.sizes: dict[str, int] = {}

    def __enter__(self) -> _Probe:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.probe", self.archive, self.mnt, self.stats] + self.flags,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = self.proc.stdout.readline().decode().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"probe mount failed: {line}")
        return self

    def __exit__(self, *exc) -> None:
        umount(self.mnt)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with open(self.stats) as f:
            self.sizes = json.load(f)
        os.unlink(self.stats)

    def summary(self) -> str:
        total = sum(self.sizes.values())
        top = sorted(self.sizes.items(), key=lambda kv: -kv[1])[:4]
        return f"{total} reads: " + ", ".join(
            f"{int(k) // 1024} KiB x{v}" if int(k) >= 1024 else f"{k} B x{v}" for k, v in top
        )


def tune_requests(ctx: Ctx) -> list[Row]:
    """Which request sizes the fs sees for each workload, buffered and direct_io."""
    data = ctx.get("data-archive")
    archive = ctx.get("archive")
    count = _small_count(ctx)
    mnt = ctx.mnt("probe")
    gmnt = ctx.mnt("probe-guest")
    lines = [
        "| workload | mount | requests seen by the fs | time |",
        "|---|---|---|---|",
    ]
    dsize = ctx.sizes.writer_disk >> 20
    work: list[tuple[str, str, Callable[[str], float]]] = [
        (
            f"dd bs=1M, {dsize} MiB data disk",
            data,
            lambda d: timed(["dd", f"if={d}", "of=/dev/null", "bs=1M"])[0],
        ),
        (
            f"dd bs=4k, first {count * 4 >> 10} MiB of it",
            data,
            lambda d: timed(["dd", f"if={d}", "of=/dev/null", "bs=4k", f"count={count}"])[0],
        ),
        (
            f"qemu-img convert -O qcow2 of it ({dsize} MiB)",
            data,
            lambda d: _qemu_convert(d, ctx.work),
        ),
        (
            "losetup + mount ext4 + read the restore file (ext4 disk)",
            archive,
            lambda d: _loop_read(d, gmnt),
        ),
    ]
    for label, arch, fn in work:
        for flags in ((), ("direct_io",)):
            warm(arch)
            with _Probe(arch, mnt, flags) as p:
                t = fn(mounted_disk(mnt))
            lines.append(
                f"| {label} | {'direct_io' if flags else 'buffered'} | {p.summary()} | {fmt_s(t)} |"
            )
    ctx.note(
        "Request sizes (counting mount, archive warm, fresh mount per line)",
        [
            "\n".join(lines),
            "",
            "max_read is not set (it breaks pyfuse3's mount, issue 2); the kernel's FUSE "
            "readahead gives buffered reads their size.",
        ],
    )
    return []


def _small_count(ctx: Ctx) -> int:
    """Number of 4 KiB reads for the `dd bs=4k` cases (direct_io makes each a round trip)."""
    return 4096 if ctx.sizes.label == "quick" else 16384


def _loop_read(disk: str, gmnt: str) -> float:
    t0 = time.perf_counter()
    with loop_ro(disk) as dev, ext4_ro(dev, gmnt):
        ds.sha256_file(os.path.join(gmnt, ds.RESTORE_FILE))
    return time.perf_counter() - t0


def _qemu_convert(disk: str, work: str) -> float:
    out = os.path.join(work, "tune.qcow2")
    try:
        t0 = time.perf_counter()
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, out])
        return time.perf_counter() - t0
    finally:
        if os.path.exists(out):
            os.unlink(out)


def tune_modes(ctx: Ctx) -> list[Row]:
    """buffered vs direct_io, inline vs threads: sequential, random, convert, loop read."""
    data = ctx.get("data-archive")
    archive = ctx.get("archive")
    n = 1000 if ctx.sizes.label == "quick" else 4000
    offsets = random_offsets(data, n)
    count = _small_count(ctx)
    dsize = ctx.sizes.writer_disk
    mnt = ctx.mnt("modes")
    gmnt = ctx.mnt("modes-guest")
    lines = [
        f"Columns 1-4 on the {dsize >> 20} MiB random-data disk, column 5 on the ext4 disk.",
        "",
        f"| mount options | dd bs=1M | dd bs=4k {count * 4 >> 10} MiB | random 4 KiB "
        f"({n}) | qemu-img convert -O qcow2 | losetup + ext4 mount + file read |",
        "|---|---|---|---|---|---|",
    ]
    variants = [(), ("threads",), ("direct_io",), ("direct_io", "threads"), (READAHEAD + "1024",)]
    if ctx.sizes.label == "quick":
        variants.remove(("direct_io", "threads"))
    for opts in variants:
        cells = []
        warm(data)
        with vmafs_mount(data, mnt, opts):
            t = timed(["dd", f"if={mounted_disk(mnt)}", "of=/dev/null", "bs=1M"])[0]
            cells.append(f"{fmt_s(t)} ({fmt_rate(dsize / t)})")
        with vmafs_mount(data, mnt, opts):
            d = mounted_disk(mnt)
            t = timed(["dd", f"if={d}", "of=/dev/null", "bs=4k", f"count={count}"])[0]
            cells.append(f"{fmt_s(t)} ({fmt_rate(count * 4096 / t)})")
        with vmafs_mount(data, mnt, opts):
            lat, tt = pread_lat(mounted_disk(mnt), offsets)
            cells.append(f"{len(lat) / tt:,.0f} IOPS, p99 {fmt_s(percentile(lat, 0.99))}")
        with vmafs_mount(data, mnt, opts):
            cells.append(fmt_s(_qemu_convert(mounted_disk(mnt), ctx.work)))
        warm(archive)
        with vmafs_mount(archive, mnt, opts):
            cells.append(fmt_s(_loop_read(mounted_disk(mnt), gmnt)))
        label = ",".join(opts) or "(default: buffered, inline)"
        if opts and opts[0].startswith(READAHEAD):
            label = "buffered, inline, read_ahead_kb=1024 on the mount's bdi (root)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ctx.note(
        "Buffered vs direct_io, inline vs worker threads (archive warm, fresh mount per cell)",
        ["\n".join(lines)],
    )
    return []


# --- slow storage: the archive on a throttled loop device -------------------------------


def _slow_fs(ctx: Ctx) -> str:
    """An ext4 image holding a copy of the archive (built once, cached)."""
    return ds.ext4_holding(ctx.work, "slowfs.img", ctx.get("archive"))


def _mount_in(throttle: Throttle, archive: str, mnt: str, opts) -> None:
    cmd = [sys.executable, "-m", "vmafs", "mount", archive, mnt]
    if opts:
        cmd += ["-o", ",".join(opts)]
    subprocess.run(cmd, check=True, preexec_fn=throttle.join, capture_output=True)


def tune_slow(ctx: Ctx) -> list[Row]:
    """Inline vs threads when the archive sits on throttled storage (cold cache)."""
    iops, bps = 200, 40 << 20
    img = _slow_fs(ctx)
    smnt = ctx.mnt("slowfs")
    mnt = ctx.mnt("slow")
    archive_offsets = ctx.data.get("offsets") or random_offsets(
        ctx.get("archive"), ctx.sizes.random_reads
    )
    n = 30 if ctx.sizes.label == "quick" else 200
    lines = [
        f"The archive on ext4 on a loop device throttled with cgroup v1 blkio "
        f"(read {iops} IOPS, {bps >> 20} MiB/s) for the fs process; page cache dropped "
        "before each case. dm-delay is not available on this kernel (no device-mapper).",
        "",
        "| mount | 1 reader: random 4 KiB (stored data) | 4 readers: random 4 KiB "
        "| 4 KiB reads of holes while another reader streams stored data (1 MiB reads) |",
        "|---|---|---|---|",
    ]
    with loop_ro(img) as dev, ext4_ro(dev, smnt), throttled(dev, iops, bps) as throttle:
        archive = os.path.join(smnt, os.path.basename(ctx.get("archive")))
        for opts in ((), ("threads",)):
            cells = []
            # one reader
            drop_caches()
            _mount_in(throttle, archive, mnt, opts)
            try:
                lat, t = pread_lat(mounted_disk(mnt), archive_offsets[:n])
                cells.append(
                    f"{len(lat) / t:,.0f} IOPS, p50 {fmt_s(percentile(lat, 0.5))}, "
                    f"p99 {fmt_s(percentile(lat, 0.99))}"
                )
            finally:
                umount(mnt)
            # four readers
            if ctx.sizes.label == "quick":
                cells.append("(full run only)")
            else:
                drop_caches()
                _mount_in(throttle, archive, mnt, opts)
                try:
                    cells.append(_four_readers(mounted_disk(mnt), archive_offsets[n : 5 * n]))
                finally:
                    umount(mnt)
            # holes while a streaming reader keeps the fs busy
            drop_caches()
            _mount_in(throttle, archive, mnt, opts)
            try:
                cells.append(_holes_during_stream(ctx, archive, mnt))
            finally:
                umount(mnt)
            lines.append(f"| {','.join(opts) or 'inline (default)'} | " + " | ".join(cells) + " |")
    ctx.note("Slow storage: inline vs worker threads", lines)
    return []


def _four_readers(disk: str, offs: list[int]) -> str:
    res: list = [None] * 4

    def reader(i: int) -> None:
        res[i] = pread_lat(disk, offs[i::4])

    t0 = time.perf_counter()
    ths = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    t = time.perf_counter() - t0
    lat = sorted(x for r in res for x in r[0])
    return f"{len(lat) / t:,.0f} IOPS total, p99 {fmt_s(percentile(lat, 0.99))}"


def _holes_during_stream(ctx: Ctx, archive: str, mnt: str) -> str:
    """Latency of reads of holes (served without I/O) while another reader streams
    stored data (1 MiB reads that each wait for the throttled device)."""
    from vmafs.archive import Archive

    with Archive.open(archive) as a:
        ranges = list(a.allocated_ranges(1))
    gaps, prev = [], 0
    for off, length in ranges:
        if off - prev >= 1 << 20:
            gaps.append((prev, off - prev))
        prev = off + length
    rnd = random.Random(11)
    holes = []
    for _ in range(20 if ctx.sizes.label == "quick" else 60):
        start, length = rnd.choice(gaps)
        holes.append(start + rnd.randrange(length // 4096) * 4096)
    disk = mounted_disk(mnt)
    stop = threading.Event()

    def stream() -> None:
        fd = os.open(disk, os.O_RDONLY)
        try:
            for off, length in ranges:
                end = off + length
                while off < end and not stop.is_set():
                    os.pread(fd, min(1 << 20, end - off), off)
                    off += 1 << 20
        finally:
            os.close(fd)

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    try:
        time.sleep(0.3)
        lat = []
        fd = os.open(disk, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            deadline = time.perf_counter() + (5 if ctx.sizes.label == "quick" else 15)
            for off in holes:
                if not th.is_alive() or time.perf_counter() > deadline:
                    break
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.01)
        finally:
            os.close(fd)
    finally:
        stop.set()
        th.join()
    lat.sort()
    if not lat:
        return "stream ended too soon"
    return (
        f"{len(lat)} hole reads: p50 {fmt_s(percentile(lat, 0.5))}, "
        f"p99 {fmt_s(percentile(lat, 0.99))}"
    )


TUNING: dict[str, Callable[[Ctx], list[Row]]] = {
    "requests": tune_requests,
    "modes": tune_modes,
    "slow": tune_slow,
}
