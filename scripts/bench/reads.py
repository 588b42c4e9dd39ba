"""Reading a disk the way the figures measure it: random 4 KiB offsets in stored
data, timed preads."""

from __future__ import annotations

import os
import random
import time

from .util import fmt_s, percentile


def random_offsets(archive: str, n: int, seed: int = 5) -> list[int]:
    from vmafs.archive import Archive

    with Archive.open(archive) as a:
        dev = next(d for d in a.devices if not d.is_vmstate)
        ranges = list(a.allocated_ranges(dev.dev_id))
    blocks = []
    for off, length in ranges:
        blocks.append((off // 4096, length // 4096))
    total = sum(b[1] for b in blocks)
    rnd = random.Random(seed)
    picks = sorted(rnd.sample(range(total), min(n, total)))
    out, i, base = [], 0, 0
    for p in picks:
        while p >= base + blocks[i][1]:
            base += blocks[i][1]
            i += 1
        out.append((blocks[i][0] + p - base) * 4096)
    rnd.shuffle(out)
    return out


def pread_lat(path: str, offsets: list[int]) -> tuple[list[float], float]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        lat = []
        pread, clock = os.pread, time.perf_counter
        t0 = clock()
        for off in offsets:
            a = clock()
            pread(fd, 4096, off)
            lat.append(clock() - a)
        total = clock() - t0
    finally:
        os.close(fd)
    lat.sort()
    return lat, total


def lat_str(lat: list[float], total: float) -> str:
    return (
        f"{len(lat) / total:,.0f} IOPS, p50 {fmt_s(percentile(lat, 0.5))}, "
        f"p99 {fmt_s(percentile(lat, 0.99))}"
    )
