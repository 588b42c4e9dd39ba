"""The read-path figures: restore one file, index build and memory, sequential
and random reads, qemu-img convert from the mount."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from . import datasets as ds
from .ctx import DISK, Ctx, Row, mounted_disk, ratio
from .util import (
    VMAFS,
    Skip,
    drop_caches,
    evict,
    ext4_ro,
    fmt_rate,
    fmt_s,
    loop_ro,
    need,
    run,
    timed,
    umount,
    vmafs_mount,
    warm,
)

# --- restore one file --------------------------------------------------------------


def _read_guest_file(disk: str, gmnt: str) -> str:
    with loop_ro(disk) as dev, ext4_ro(dev, gmnt):
        return ds.sha256_file(os.path.join(gmnt, ds.RESTORE_FILE))


#: the start of `vmafs mount` as a ladder of commands, each doing one more phase
_LADDER = [
    ("interpreter", "pass"),
    ("vmafs CLI", "import vmafs.cli"),
    ("numpy + the reader", "import vmafs.cli, vmafs.mount, vmafs.archive"),
    ("pyfuse3 + trio", "import vmafs.cli, vmafs.mount, vmafs.archive, vmafs.fs"),
    (
        "open the archive",
        "import sys, vmafs.cli, vmafs.mount, vmafs.fs\n"
        "from vmafs.archive import Archive\nArchive.open(sys.argv[1]).close()",
    ),
]


def start_phases(archive: str, mnt: str, cold: bool, reps: int = 3) -> list[tuple[str, float]]:
    """The start of `vmafs mount` phase by phase: (rung, seconds) for each rung of
    :data:`_LADDER` (a process doing one more phase than the rung before) and for
    the whole mount, each the median of *reps* runs.  *cold*: the page cache
    dropped before each run (the .pyc and .so files read from disk)."""

    def whole() -> float:
        with vmafs_mount(archive, mnt) as t:
            return t

    prepare = drop_caches if cold else _nothing
    return ladder_phases(_LADDER, archive, ("`vmafs mount` until ready", whole), prepare, reps)


def _nothing() -> None:
    pass


def ladder_phases(
    ladder: list[tuple[str, str]],
    archive: str,
    last: tuple[str, Callable[[], float]] | None,
    prepare: Callable[[], None],
    reps: int = 3,
) -> list[tuple[str, float]]:
    """(rung, median seconds of *reps* runs) for each rung of *ladder* (``python -c
    CODE ARCHIVE``, each doing one phase more than the one before) and for *last*
    (a name and a function timing the whole command), if given.  *prepare* runs
    before each run (e.g. drop_caches: the .pyc and .so files read from disk)."""
    out = []
    rungs = [(name, lambda code=code: timed([sys.executable, "-c", code, archive])[0])
             for name, code in ladder]  # fmt: skip
    for name, fn in [*rungs, *([last] if last else [])]:
        samples = []
        for _ in range(reps):
            prepare()
            samples.append(fn())
        out.append((name, statistics.median(samples)))
    return out


def phases_str(rungs: list[tuple[str, float]]) -> str:
    """Each rung with what it adds to the one before (the mount imports pyfuse3 and
    trio while it opens the archive, so it can take less than the last rung)."""
    parts, prev = [], 0.0
    for name, t in rungs:
        parts.append(f"{name} {fmt_s(t)} ({'+' if t >= prev else '-'}{fmt_s(abs(t - prev))})")
        prev = t
    return "; ".join(parts)


def extract_and_read(ctx: Ctx, archive: str) -> tuple[float, str]:
    """The restore baseline: ``vmafs extract``, loop, ext4 ro,noload, read the file.

    Returns (wall seconds, sha256 of the file read); the caller drops caches first.
    """
    out = os.path.join(ctx.work, "restore-extract")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        run([*VMAFS, "extract", archive, out])
        got = _read_guest_file(os.path.join(out, DISK), ctx.mnt("guest"))
        return time.perf_counter() - t0, got
    finally:
        shutil.rmtree(out, ignore_errors=True)


def fig_restore(ctx: Ctx) -> list[Row]:
    archive = ctx.get("archive")
    want = ds.sha256_file(os.path.join(ctx.get("files"), ds.RESTORE_FILE))
    gmnt = ctx.mnt("guest")
    mnt = ctx.mnt("restore")
    times, phases = [], []
    for _ in range(3 if ctx.sizes.label == "full" else 2):
        drop_caches()
        t0 = time.perf_counter()
        with vmafs_mount(archive, mnt) as t_mount:
            with loop_ro(mounted_disk(mnt)) as dev, ext4_ro(dev, gmnt):
                t_ext4 = time.perf_counter() - t0 - t_mount
                got = ds.sha256_file(os.path.join(gmnt, ds.RESTORE_FILE))
            times.append(time.perf_counter() - t0)
            phases.append((t_mount, t_ext4, times[-1] - t_mount - t_ext4))
        if got != want:
            raise RuntimeError("restored file differs from the original (through the mount)")
    vm = sorted(times)[len(times) // 2]
    ph = phases[times.index(vm)]

    # the mount's start, phase by phase, with the page cache cold and warm
    cold = start_phases(archive, mnt, cold=True, reps=1 if ctx.sizes.label == "quick" else 3)
    warm_ = start_phases(archive, mnt, cold=False)
    ctx.facts["restore_phases"] = {"cold": cold, "warm": warm_}

    drop_caches()
    base, got = extract_and_read(ctx, archive)
    if got != want:
        raise RuntimeError("restored file differs from the original (extract)")
    note = (
        f"vmafs median of {len(times)} ({', '.join(fmt_s(t) for t in times)}); of the median: "
        f"`vmafs mount` {fmt_s(ph[0])}, losetup + ext4 mount {fmt_s(ph[1])}, file read + "
        f"loop/ext4 teardown {fmt_s(ph[2])}; `vmafs mount` start by phase (separate "
        f"processes, each one phase more than the one before, medians), after "
        f"drop_caches: {phases_str(cold)}; warm: {phases_str(warm_)}"
    )
    if shutil.which("vma") is None:
        note += "; no Proxmox `vma` binary on PATH, so no `vma extract` baseline"
    return [
        Row(
            "restore one file (mount + loop + ext4 ro,noload + read "
            f"{ctx.sizes.restore_file >> 20} MiB file), cold cache",
            "`vmafs extract` + loop + read",
            fmt_s(base),
            fmt_s(vm),
            f"1/{base / vm:.0f}",
            "<= 1/20",
            vm * 20 <= base,
            note,
        )
    ]


# --- index ------------------------------------------------------------------------

_INDEX_CHILD = r"""
import json, os, sys, time
import numpy  # imported before the baseline RSS: the index needs it anyway
from vmafs.archive import Archive
import vmafs.index, vmafs.source
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def hwm():  # VmHWM: this process's peak (ru_maxrss would include the parent's: fork)
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmHWM:")).split()[1]) * 1024
if len(sys.argv) > 2:  # warm-up: lazy imports and one-time state are not the index
    Archive.open(sys.argv[2]).close()
r0 = rss()
c0, t0 = time.process_time(), time.perf_counter()
a = Archive.open(sys.argv[1])
t1, c1 = time.perf_counter(), time.process_time()
r1 = rss(); p1 = hwm()
clusters = sum(d.clusters for d in a.devices)
print(json.dumps({"wall": t1 - t0, "cpu": c1 - c0, "rss": r1 - r0, "peak": p1 - r0,
                  "clusters": clusters, "extents": a.index.extents}))
"""


def fig_index(ctx: Ctx) -> list[Row]:
    path, facts = ctx.get("sparse")
    size_label = f"{ctx.sizes.sparse_disk >> 30} GiB"
    warm(path)
    runs = []
    for _ in range(3):
        out = run(
            [sys.executable, "-c", _INDEX_CHILD, path, ctx.get("archive")],
            stdout=subprocess.PIPE,
        ).stdout
        runs.append(json.loads(out))
    best = min(runs, key=lambda r: r["wall"])
    clusters = best["clusters"]
    rate, cpu_rate = clusters / best["wall"], clusters / best["cpu"]
    mem = min(r["rss"] for r in runs) / clusters
    peak = min(r["peak"] for r in runs) / clusters

    spath, _ = ctx.get("sparse-shuffled")
    warm(spath)
    out = run(
        [sys.executable, "-c", _INDEX_CHILD, spath, ctx.get("archive")], stdout=subprocess.PIPE
    ).stdout
    shuffled = json.loads(out)
    ctx.facts["index_shuffled"] = shuffled

    mnt = ctx.mnt("index")
    ready = []
    for cold in (False, True):
        if cold:
            drop_caches()
        with vmafs_mount(path, mnt) as t:
            ready.append(t)
            os.stat(mounted_disk(mnt))
    ctx.facts["index"] = {"runs": runs, "ready_warm_cold": ready, **facts}
    extents = best["extents"]
    return [
        Row(
            f"index build ({size_label} disk, {clusters / 1e6:.1f} M clusters, "
            f"{extents} extents, archive warm)",
            "clusters/s",
            "-",
            f"{rate / 1e6:.1f} M/s wall, {cpu_rate / 1e6:.1f} M/s CPU",
            "-",
            ">= 10 M/s",
            rate >= 10e6,
            f"clusters in live-backup order (1 MiB runs shuffled in windows of 64, 0.5% "
            f"early); best of 3 Archive.open in a fresh process: {fmt_s(best['wall'])} wall, "
            f"{fmt_s(best['cpu'])} CPU; the same disk with every cluster shuffled (worst "
            f"case): {shuffled['clusters'] / shuffled['wall'] / 1e6:.1f} M/s wall, "
            f"{shuffled['clusters'] / shuffled['cpu'] / 1e6:.1f} M/s CPU",
        ),
        Row(
            f"`vmafs mount` time-to-ready, {size_label} disk",
            "seconds",
            "-",
            f"{fmt_s(ready[0])} warm, {fmt_s(ready[1])} cold",
            "-",
            "<= 3 s",
            ready[0] <= 3.0,
            "command start to return (mount answering); cold = after drop_caches",
        ),
        Row(
            f"index memory ({size_label} disk)",
            "bytes/cluster (RSS delta)",
            "-",
            f"{mem:.2f} B/cluster",
            "-",
            "<= 10",
            mem <= 10,
            f"peak during the build {peak:.2f} B/cluster",
        ),
    ]


# --- sequential reads -----------------------------------------------------------------


def _ratarmount_dd(ctx: Ctx, tar: str, disk_bytes: int) -> float:
    exe = shutil.which("ratarmount") or os.path.join(os.path.dirname(sys.executable), "ratarmount")
    if not os.path.exists(exe):
        raise Skip("ratarmount is not installed (pip install 'vmafs[bench]')")
    mnt = ctx.mnt("ratar")
    umount(mnt)
    # index once (kept beside the tar), then a fresh mount for the timed read
    run([exe, tar, mnt])
    umount(mnt)
    warm(tar)
    run([exe, tar, mnt])
    try:
        for _ in range(100):
            if os.path.exists(os.path.join(mnt, DISK)):
                break
            time.sleep(0.05)
        t = timed(["dd", f"if={os.path.join(mnt, DISK)}", "of=/dev/null", "bs=1M", "status=none"])
        return t[0]
    finally:
        umount(mnt)
        evict(tar)


def _vmafs_dd(archive: str, mnt: str) -> float:
    """Seconds of a ``dd bs=1M`` of the disk in a fresh mount, archive warm."""
    warm(archive)
    with vmafs_mount(archive, mnt):
        return timed(["dd", f"if={mounted_disk(mnt)}", "of=/dev/null", "bs=1M", "status=none"])[0]


def fig_seq(ctx: Ctx) -> list[Row]:
    """The 8 GiB ext4 disk read through the mount against ratarmount (the same kind
    of tool); the data-path rows against bindfs and pyfuse3 are :mod:`.datapath_figures`."""
    mnt = ctx.mnt("seq")
    reps = 1 if ctx.sizes.label == "quick" else 2
    archive = ctx.get("archive")
    disk_bytes = ctx.sizes.disk
    vm = min(_vmafs_dd(archive, mnt) for _ in range(reps))
    rows = []
    ctx.facts["seq"] = {"ext4": vm}
    try:
        tar = ctx.get("tar")
        ratar = _ratarmount_dd(ctx, tar, disk_bytes)
        rows.append(
            Row(
                f"sequential `dd bs=1M` of the {disk_bytes >> 30} GiB ext4 disk through the "
                "mount, warm",
                "ratarmount serving an uncompressed tar of the extracted raw disk",
                f"{fmt_s(ratar)} ({fmt_rate(disk_bytes / ratar)})",
                f"{fmt_s(vm)} ({fmt_rate(disk_bytes / vm)})",
                f"{ratar / vm:.2f}x",
                ">= 1.2x ratarmount",
                ratar / vm >= 1.2,
                "tar warm in page cache, fresh ratarmount mount",
            )
        )
    except Skip as e:
        rows.append(
            Row(
                "sequential read vs ratarmount",
                "ratarmount",
                "-",
                f"{fmt_s(vm)}",
                "-",
                ">= 1.2x ratarmount",
                None,
                str(e),
            )
        )
    return rows


# --- qemu-img convert ----------------------------------------------------------------


def _sync_split(cmd: list[str]) -> tuple[float, float]:
    """Seconds of *cmd* and of the ``sync`` after it (the writeback it left)."""
    t0 = time.perf_counter()
    run(cmd)
    t1 = time.perf_counter()
    os.sync()
    return t1 - t0, time.perf_counter() - t1


def _sync_timed(cmd: list[str]) -> float:
    return sum(_sync_split(cmd))


def _convert_file(disk: str, out: str, src_cache: str = "") -> tuple[float, float]:
    """``qemu-img convert -O qcow2`` of *disk*: seconds of qemu-img and of the sync after.
    *src_cache* "none": qemu-img opens *disk* with O_DIRECT (``-T none``)."""
    cmd = ["qemu-img", "convert", *(["-T", src_cache] if src_cache else [])]
    try:
        return _sync_split([*cmd, "-f", "raw", "-O", "qcow2", disk, out])
    finally:
        if os.path.exists(out):
            os.unlink(out)


def _convert(archive: str, mnt: str, out: str, options=(), src_cache=""):
    """((qemu-img seconds, sync seconds), data bytes) of a convert from a fresh mount."""
    warm(archive)
    with vmafs_mount(archive, mnt, options):
        disk = mounted_disk(mnt)
        split = _convert_file(disk, out, src_cache)
        map_cmd = ["qemu-img", "map", "-f", "raw", "--output=json", disk]
        ranges = json.loads(run(map_cmd, stdout=subprocess.PIPE).stdout)
    return split, sum(r["length"] for r in ranges if r["data"])


def _extract_timed(archive: str, xdir: str, keep: bool = False) -> float:
    """Seconds of ``vmafs extract`` into *xdir* and a sync; *keep*: leave the output."""
    shutil.rmtree(xdir, ignore_errors=True)
    warm(archive)
    try:
        return _sync_timed([*VMAFS, "extract", archive, xdir])
    finally:
        if not keep:
            shutil.rmtree(xdir, ignore_errors=True)


def fig_convert(ctx: Ctx) -> list[Row]:
    from vmafs.fs import SEEK_HOLE_SUPPORTED

    need("qemu-img")
    archive = ctx.get("archive")
    mnt = ctx.mnt("convert")
    out = os.path.join(ctx.work, "convert.qcow2")
    xdir = os.path.join(ctx.work, "convert-extract")
    # Convert and extract alternated, the median of each taken: both fill
    # new page cache, whose first touch costs this VM 2-3x from one run to
    # the next (benchmarks.md), so a single pair can land either way.
    pairs = 1 if ctx.sizes.label == "quick" else 3
    convs, syncs, exts, seen = [], [], [], 0
    for i in range(pairs):
        (qemu_s, sync_s), seen = _convert(archive, mnt, out)
        convs.append(qemu_s + sync_s)
        syncs.append(sync_s)
        exts.append(_extract_timed(archive, xdir, keep=i == pairs - 1))
    conv, ext = statistics.median(convs), statistics.median(exts)
    # The bounds, in the same run: the same convert of the extracted raw file
    # from the page cache (what no filesystem beats), from a direct_io mount,
    # and from the default mount opened with O_DIRECT (qemu-img -T none).
    try:
        conv_raw = sum(_convert_file(os.path.join(xdir, DISK), out))
    finally:
        shutil.rmtree(xdir, ignore_errors=True)
    conv_dio = sum(_convert(archive, mnt, out, ("direct_io",))[0])
    conv_odirect = sum(_convert(archive, mnt, out, src_cache="none")[0])
    ctx.facts["convert_s"] = {
        "default": convs,
        "sync": syncs,
        "extract": exts,
        "page cache": conv_raw,
        "direct_io": conv_dio,
        "O_DIRECT": conv_odirect,
    }
    how = (
        "SEEK_DATA/SEEK_HOLE answered from the index"
        if SEEK_HOLE_SUPPORTED
        else "this pyfuse3 has no lseek handler: all data"
    )
    return [
        Row(
            "`qemu-img convert -O qcow2` from the mount",
            "`vmafs extract` of the same archive",
            fmt_s(ext),
            fmt_s(conv),
            ratio(conv, ext),
            "<= 0.7x",
            conv <= 0.7 * ext,
            f"median of {pairs} alternated pairs (convert {', '.join(map(fmt_s, convs))}, "
            f"of which the sync after qemu-img {', '.join(map(fmt_s, syncs))}; extract "
            f"{', '.join(map(fmt_s, exts))}); archive warm; both timed to the end of a "
            f"following sync; qemu-img map through the mount: {seen / 1e9:.2f} GB of the "
            f"{ctx.sizes.disk >> 30} GiB disk is data ({how}). Same run: the same convert of "
            f"the extracted raw file from the page cache (the ceiling) {fmt_s(conv_raw)} "
            f"({ratio(conv_raw, ext)}); from a `-o direct_io` mount {fmt_s(conv_dio)} "
            f"({ratio(conv_dio, ext)}); `qemu-img convert -T none` (an O_DIRECT open) from "
            f"the default mount {fmt_s(conv_odirect)} ({ratio(conv_odirect, ext)})",
        )
    ]
