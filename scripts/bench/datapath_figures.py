"""The data-path figures (issue 18 point 2): random 4 KiB reads and ``dd bs=1M``
through vmafs against bindfs, a minimal pyfuse3 filesystem and the page cache,
all reading the same 2 GiB random-data disk (archive and extracted raw warm),
each in a fresh mount, readers alternated round by round and medians taken."""

from __future__ import annotations

import statistics

from .baselines import readers
from .ctx import Ctx, Row, ratio
from .reads import pread_lat, random_offsets
from .util import evict, fmt_rate, fmt_s, percentile, timed, warm

VMAFS = "vmafs"


def _dd(path: str) -> float:
    return timed(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])[0]


def measure(ctx: Ctx, rounds: int, names: list[str] | None = None) -> dict[str, dict]:
    """Per reader: random-read IOPS/p50/p99 and dd seconds, each the median of
    *rounds* alternated fresh-mount runs."""
    archive, raw = ctx.get("data-archive"), ctx.get("data-raw")
    all_readers = readers(archive, raw)
    names = names or list(all_readers)
    offsets = random_offsets(archive, ctx.sizes.random_reads, seed=8)
    mnt = ctx.mnt("datapath")
    samples: dict[str, dict[str, list]] = {
        n: {"iops": [], "p50": [], "p99": [], "dd": []} for n in names
    }
    warm(archive)
    warm(raw)
    for r in range(rounds):
        # Each round starts one reader later: what runs just before a reader
        # (another mount's 2 GiB dd, its freed page cache) moves it by 1.5x
        # on this VM, so no reader may keep one place.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            reader = all_readers[name]
            with reader(mnt) as disk:
                lat, t = pread_lat(disk, offsets)
            s = samples[name]
            s["iops"].append(len(lat) / t)
            s["p50"].append(percentile(lat, 0.5))
            s["p99"].append(percentile(lat, 0.99))
            with reader(mnt) as disk:
                s["dd"].append(_dd(disk))
    evict(raw)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    for n in med:
        med[n]["samples"] = samples[n]
    return med


def _rnd(m: dict) -> str:
    return f"{m['iops']:,.0f} IOPS, p50 {fmt_s(m['p50'])}, p99 {fmt_s(m['p99'])}"


def _seq(m: dict, size: int) -> str:
    return f"{fmt_s(m['dd'])} ({fmt_rate(size / m['dd'])})"


def fig_datapath(ctx: Ctx) -> list[Row]:
    rounds = 1 if ctx.sizes.label == "quick" else 5
    m = measure(ctx, rounds)
    ctx.facts["datapath"] = m
    size = ctx.sizes.writer_disk
    v, mini, bind, pc = m[VMAFS], m["minimal pyfuse3"], m["bindfs"], m["page cache"]
    dio = m["vmafs -o direct_io"]
    what = (
        f"{size >> 20} MiB disk of random data, archive and extracted raw warm, fresh mount "
        f"per run, median of {rounds} alternated rounds"
    )
    all_rnd = "; ".join(f"{n}: {_rnd(x)}" for n, x in m.items())
    all_seq = "; ".join(f"{n}: {_seq(x, size)}" for n, x in m.items())
    random_rows = [
        Row(
            f"random 4 KiB preads through the mount ({ctx.sizes.random_reads} distinct offsets)"
            + ("" if i == 0 else " (same runs)"),
            baseline,
            _rnd(base),
            _rnd(v),
            ratio(v["iops"], base["iops"]),
            f">= {factor}x",
            v["iops"] >= factor * base["iops"],
            note,
        )
        for i, (baseline, base, factor, note) in enumerate(
            [
                (
                    "minimal pyfuse3 fs (one `os.pread` per read) over the extracted raw",
                    mini,
                    0.95,
                    f"{what}; FADV_RANDOM; every read a FUSE request except for the page "
                    f"cache. All readers: {all_rnd}; vmafs = {v['iops'] / pc['iops']:.3f} of "
                    "the page cache",
                ),
                ("bindfs (C libfuse, multithreaded) over the extracted raw", bind, 0.5, what),
            ]
        )
    ]
    return [
        *random_rows,
        Row(
            "sequential `dd bs=1M` through the mount",
            "bindfs over the extracted raw",
            _seq(bind, size),
            _seq(v, size),
            ratio(bind["dd"], v["dd"]),
            ">= 0.8x",
            bind["dd"] >= 0.8 * v["dd"],
            f"{what}; ratio = bindfs time / vmafs time; readahead 1024 KiB on every FUSE "
            f"mount. All readers: {all_seq}; vmafs -o direct_io = "
            f"{ratio(bind['dd'], dio['dd'])} of bindfs; vmafs = "
            f"{pc['dd'] / v['dd']:.2f} of the page cache",
        ),
    ]
