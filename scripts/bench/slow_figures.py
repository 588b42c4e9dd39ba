"""Cold first mount on slow backup storage (issue 18 point 3).

Archives of 1 GB and up with >= 20k extents each (a sparse disk whose data
lies in runs, as a used part of a disk does, archived in live-backup order)
sit on ext4 on a loop device that is throttled for the measured processes
to an HDD NAS's 200 IOPS and 40 MiB/s.  After dropping the page cache, each
archive is read three ways: ``cat ARCHIVE >/dev/null`` (the baseline), a
first ``vmafs mount`` with no side index (the header walk), and a first
mount with the side index that ``vmafs index`` (the vzdump hook) saved while
the archive was still in the page cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from . import datasets as ds
from .ctx import Ctx, Row
from .throttle import Throttle, throttled
from .util import VMAFS, drop_caches, ext4_ro, fmt_s, loop_ro, run, umount

IOPS, BPS = 200, 40 << 20
#: extents per GiB of archive data: 20k for the smallest archive
EXTENTS_PER_GIB = 20_000


def _archive(ctx: Ctx, data: int) -> tuple[str, dict]:
    """A plain archive with *data* bytes stored in runs of 256 MiB (a used part of
    a disk) over a disk sized for :data:`EXTENTS_PER_GIB` extents per GiB."""
    disk = EXTENTS_PER_GIB * 59 * data // (1 << 30) * 65536
    runs = max(1, data >> 28)
    return ds.direct_archive(
        ctx.work, f"cold-{data >> 20}M.vma", disk, data, runs=runs, full=True, seed=12
    )


def _timed_in(throttle: Throttle, cmd: list[str], env: dict | None = None) -> float:
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(
        cmd,
        check=True,
        preexec_fn=throttle.join,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    return time.perf_counter() - t0


def _mount_time(throttle: Throttle, archive: str, mnt: str, env: dict) -> float:
    try:
        return _timed_in(throttle, [*VMAFS, "mount", archive, mnt], env)
    finally:
        umount(mnt)


def cold_mounts(ctx: Ctx, data: int) -> dict:
    """cat, first mount without and with a side index, on the throttled device."""
    archive, facts = _archive(ctx, data)
    img = ds.ext4_holding(ctx.work, f"cold-{data >> 20}M.img", archive)
    cache = os.path.join(ctx.work, f"cold-index-{data >> 20}M")
    smnt, mnt = ctx.mnt("coldfs"), ctx.mnt("cold")
    no_index = {**os.environ, "VMAFS_CACHE_DIR": os.path.join(ctx.work, "cold-no-index")}
    with_index = {**os.environ, "VMAFS_CACHE_DIR": cache}
    with loop_ro(img) as dev, ext4_ro(dev, smnt), throttled(dev, IOPS, BPS) as throttle:
        arch = os.path.join(smnt, os.path.basename(archive))
        cat = _timed_in(throttle, ["cat", arch])
        first = _mount_time(throttle, arch, mnt, no_index)
        # what the vzdump hook does while the archive is still in the page cache
        shutil.rmtree(cache, ignore_errors=True)
        run([*VMAFS, "index", "--no-progress", "--cache-dir", cache, arch])
        indexed = _mount_time(throttle, arch, mnt, with_index)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "bytes": os.path.getsize(archive),
        "extents": facts["extents"],
        "cat": cat,
        "first": first,
        "indexed": indexed,
    }


def fig_coldmount(ctx: Ctx) -> list[Row]:
    sizes = [256 << 20] if ctx.sizes.label != "full" else [1 << 30, 2 << 30, 4 << 30]
    res = [cold_mounts(ctx, d) for d in sizes]
    ctx.facts["coldmount"] = res
    per_size = "; ".join(
        f"{r['bytes'] / 1e9:.2f} GB, {r['extents']:,} extents: cat {fmt_s(r['cat'])}, first "
        f"mount {fmt_s(r['first'])} ({r['first'] / r['cat']:.3f}x), with the side index "
        f"{fmt_s(r['indexed'])} ({r['indexed'] / r['cat']:.3f}x)"
        for r in res
    )
    big = res[-1]
    growth = ""
    if len(res) > 1:
        size_x = big["bytes"] / res[0]["bytes"]
        growth = (
            f"; from the smallest to the largest archive, size x{size_x:.1f}"
            f", first mount x{big['first'] / res[0]['first']:.1f}, with the side index "
            f"x{big['indexed'] / res[0]['indexed']:.1f}"
        )
    where = (
        f"archive on ext4 on a loop device throttled to {IOPS} IOPS and {BPS >> 20} MiB/s "
        f"(cgroup v1 blkio) for the measured process, page cache dropped before each"
    )
    what = f"{big['bytes'] / 1e9:.2f} GB archive ({big['extents']:,} extents) on slow storage"
    cases = [
        ("first", "no side index", f"{where}; {per_size}{growth}"),
        (
            "indexed",
            "with the side index `vmafs index` saved (the vzdump hook)",
            "the side index in a cache directory on unthrottled storage (VMAFS_CACHE_DIR)",
        ),
    ]
    return [
        Row(
            f"cold first `vmafs mount`, {how}, {what}",
            "`cat ARCHIVE >/dev/null` on the same device",
            fmt_s(big["cat"]),
            fmt_s(big[key]),
            f"{big[key] / big['cat']:.3f}x",
            "<= 0.1x",
            big[key] <= 0.1 * big["cat"],
            note,
        )
        for key, how, note in cases
    ]


if __name__ == "__main__":  # pragma: no cover - ad-hoc: python -m bench.slow_figures WORK MiB
    from .datasets import QUICK

    print(cold_mounts(Ctx(sys.argv[1], QUICK), int(sys.argv[2]) << 20))
