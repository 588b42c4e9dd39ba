"""The zstd source on its own: scan cost against ``zstd -d``, index size, random-read latency.

``fig_zstd`` (zstd_figures.py) reports these; ``python -m bench.zstd_source FILE...``
prints them as JSON lines.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable

from vmafs.source.zstd import ZstdSource


def benchmark(
    path: str,
    *,
    reads: int = 1000,
    read_size: int = 4096,
    seed: int = 0,
    zstd_cli: str = "zstd",
    on_chunk: Callable[[int, memoryview], None] | None = None,
) -> dict[str, float | int]:
    """Measure issue 4's source-level targets on one zstd file.

    - ``scan_ratio``: wall time of :meth:`ZstdSource.scan` (with *on_chunk*,
      default a no-op) over the wall time of ``zstd -q -d -c FILE >/dev/null``
      (run first, so both read a warm page cache);
    - ``index_ratio``: bytes of :meth:`ZstdSource.checkpoint_state` over the
      compressed file size;
    - ``read_p50_ms`` / ``read_p99_ms`` / ``read_max_ms``: *reads* random
      *read_size*-byte reads at 4 KiB-aligned offsets, on a fresh source that
      loaded the saved state (so its cache starts cold, as after a remount).

    The ``*_cpu*`` entries give the same in CPU seconds (the scan's include
    its checkpoint-testing thread), which a busy shared machine distorts less
    than wall time.
    """

    def child_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    with open(os.devnull, "wb") as null:
        c0, t0 = child_cpu(), time.perf_counter()
        subprocess.run([zstd_cli, "-q", "-d", "-c", path], stdout=null, check=True)
        zstd_s, zstd_cpu = time.perf_counter() - t0, child_cpu() - c0
    src = ZstdSource(path)
    scanned = src.needs_scan
    c0, t0 = time.process_time(), time.perf_counter()
    if scanned:
        src.scan(on_chunk or (lambda off, chunk: None))
    scan_s, scan_cpu = time.perf_counter() - t0, time.process_time() - c0
    state = src.checkpoint_state()
    index = sum(v.nbytes for v in state.values())
    stats = dict(src.scan_stats)
    size, csize, nframes = src.size, src.compressed_size, src.frames
    src.close()

    fresh = ZstdSource(path)
    if fresh.needs_scan:
        fresh.load_checkpoint_state(state)
    rnd = random.Random(seed)
    blocks = max(1, (size - read_size) // 4096)
    lat, cpu = [], []
    for _ in range(reads):
        off = rnd.randrange(blocks) * 4096
        c0, t0 = time.thread_time(), time.perf_counter()
        fresh.pread(off, read_size)
        lat.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    fresh.close()
    lat.sort()
    cpu.sort()
    return {
        "compressed_bytes": csize,
        "size": size,
        "frames": nframes,
        "checkpoints": len(state["cp_dec"]),
        "needed_scan": int(scanned),
        "zstd_d_s": round(zstd_s, 3),
        "scan_s": round(scan_s, 3),
        "scan_ratio": round(scan_s / zstd_s, 3) if scanned else 0.0,
        "index_bytes": index,
        "index_ratio": round(index / csize, 5),
        "read_p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
        "read_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, 2),
        "read_max_ms": round(lat[-1] * 1e3, 2),
        "read_cpu_p99_ms": round(cpu[min(len(cpu) - 1, int(len(cpu) * 0.99))] * 1e3, 2),
        "zstd_d_cpu_s": round(zstd_cpu, 3),
        "scan_cpu_s": round(scan_cpu, 3),
        "scan_cpu_ratio": round(scan_cpu / zstd_cpu, 3) if scanned and zstd_cpu else 0.0,
        **{f"scan_{k}": v for k, v in stats.items()},
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps({"file": arg, **benchmark(arg)}))
