"""Issue 14's figures: ``vmafs serve`` against ``vmafs extract`` and against
``nbdkit file`` (the C reference) serving the extracted raw disk.

Same client (qemu-img; fio's nbd engine, libnbd), same socket kind (Unix),
archive and raw disk warm in the page cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import time

from .ctx import DISK, Ctx, Row
from .ctx import ratio as _ratio
from .read_figures import _extract_timed, _sync_timed
from .util import VMAFS, fmt_rate, fmt_s, need, process_cpu, run, warm


@contextlib.contextmanager
def _vmafs_serve(archive: str, sock: str):
    """``vmafs serve`` (detached, as a user runs it); yields the URI of drive-scsi0
    and the server's pid."""
    pidfile = sock + ".pid"
    run([*VMAFS, "serve", archive, "--socket", sock, "--pidfile", pidfile, "--no-progress"])
    with open(pidfile) as f:
        pid = int(f.read())
    try:
        yield f"nbd+unix:///drive-scsi0?socket={sock}", pid
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(500):
            if not os.path.exists(pidfile):
                break
            time.sleep(0.01)


@contextlib.contextmanager
def _nbdkit_file(raw: str, sock: str):
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(
        [need("nbdkit"), "-f", "-r", "-U", sock, "file", raw],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError("nbdkit exited")
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def _fio(uri: str, out: str, *args: str) -> dict:
    """One fio job with the nbd engine; its read statistics."""
    run(
        [need("fio"), "--name=r", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         f"--output={out}", *args],
    )  # fmt: skip
    with open(out) as f:
        return json.load(f)["jobs"][0]["read"]


def fig_serve(ctx: Ctx) -> list[Row]:
    need("qemu-img")
    archive = ctx.get("archive")
    raw = ctx.get("raw")
    sock = os.path.join(ctx.work, "serve.sock")
    ksock = os.path.join(ctx.work, "nbdkit.sock")
    out = os.path.join(ctx.work, "serve-convert.qcow2")
    xdir = os.path.join(ctx.work, "serve-extract")
    fio_out = os.path.join(ctx.work, "fio.json")
    quick = ctx.sizes.label == "quick"
    pairs = 1 if quick else 3
    runtime = "3" if quick else "10"
    warm(archive)
    warm(raw)

    def convert(served) -> tuple[float, float]:
        """(seconds to the end of a sync, the server's CPU seconds) of one convert."""
        uri, pid = served
        try:
            cpu = process_cpu(pid)
            seconds = _sync_timed(["qemu-img", "convert", "-O", "qcow2", uri, out])
            return seconds, process_cpu(pid) - cpu
        finally:
            if os.path.exists(out):
                os.unlink(out)

    # The same convert from `nbdkit file` on the extracted raw disk, alternated
    # with ours: what qemu-img's NBD client and its in-order writes cost with a
    # C server, so the target row reads against the protocol's ceiling.
    # Which server goes first alternates too: the first convert of a round
    # follows the previous round's extract (its writeback, its freed pages).
    convs, kconvs, exts = [], [], []
    cpus: dict[str, list[float]] = {"vmafs": [], "nbdkit": []}
    for i in range(pairs):
        for who in ("vmafs", "nbdkit") if i % 2 == 0 else ("nbdkit", "vmafs"):
            if who == "vmafs":
                warm(archive)
                with _vmafs_serve(archive, sock) as served:
                    seconds, cpu = convert(served)
                convs.append(seconds)
            else:
                warm(raw)
                with _nbdkit_file(raw, ksock) as served:
                    seconds, cpu = convert(served)
                kconvs.append(seconds)
            cpus[who].append(cpu)
        exts.append(_extract_timed(archive, xdir))
    conv, kconv, ext = statistics.median(convs), statistics.median(kconvs), statistics.median(exts)

    rand = ["--rw=randread", "--bs=4k", "--iodepth=16", f"--runtime={runtime}", "--time_based"]
    seq = ["--rw=read", "--bs=1M", "--iodepth=4"]
    results: dict[str, dict[str, list[dict]]] = {"vmafs": {}, "nbdkit": {}}
    # alternated, so a burst of load on the shared machine hits both alike
    for _ in range(pairs):
        for who in ("vmafs", "nbdkit"):
            # warm again: the extracts above (and anything else on the machine) may
            # have pushed either file out of the page cache meanwhile
            warm(archive if who == "vmafs" else raw)
            server = _vmafs_serve(archive, sock) if who == "vmafs" else _nbdkit_file(raw, ksock)
            with server as (uri, _):
                for name, args in (("rand", rand), ("seq", seq)):
                    r = _fio(uri, fio_out, *args)
                    results[who].setdefault(name, []).append(r)
    iops = {w: statistics.median(r["iops"] for r in results[w]["rand"]) for w in results}
    bw = {w: statistics.median(r["bw_bytes"] for r in results[w]["seq"]) for w in results}
    p99 = {
        w: statistics.median(
            r["clat_ns"]["percentile"]["99.000000"] / 1e9 for r in results[w]["rand"]
        )
        for w in results
    }
    load = os.getloadavg()[0]
    return [
        Row(
            "`qemu-img convert -O qcow2` from `vmafs serve`",
            "`vmafs extract` of the same archive",
            fmt_s(ext),
            fmt_s(conv),
            _ratio(conv, ext),
            "<= 0.8x",
            conv <= 0.8 * ext,
            f"median of {pairs} alternated pairs (convert {', '.join(map(fmt_s, convs))}; "
            f"extract {', '.join(map(fmt_s, exts))}); archive warm; both timed to the end of a "
            f"following sync; holes skipped through base:allocation; server CPU per convert "
            f"{', '.join(map(fmt_s, cpus['vmafs']))}; load {load:.1f}",
        ),
        Row(
            f"`qemu-img convert -O qcow2` from `nbdkit file` on the extracted {DISK}",
            "`vmafs extract` of the same archive",
            fmt_s(ext),
            fmt_s(kconv),
            _ratio(kconv, ext),
            "reported",
            None,
            f"the C reference for the row above, in the same {pairs} alternated rounds "
            f"(convert {', '.join(map(fmt_s, kconvs))}; server CPU "
            f"{', '.join(map(fmt_s, cpus['nbdkit']))}); `vmafs serve`'s convert is "
            f"{_ratio(conv, kconv)} of it; load {load:.1f}",
        ),
        Row(
            "random 4 KiB reads over NBD (fio nbd engine, qd 16, Unix socket)",
            f"`nbdkit file` on the extracted {DISK}",
            f"{iops['nbdkit']:,.0f} IOPS",
            f"{iops['vmafs']:,.0f} IOPS",
            _ratio(iops["vmafs"], iops["nbdkit"]),
            ">= 0.5x",
            iops["vmafs"] >= 0.5 * iops["nbdkit"],
            f"median of {pairs} alternated {runtime} s runs over the whole disk (holes "
            f"included); p99 completion {fmt_s(p99['vmafs'])} vs {fmt_s(p99['nbdkit'])}; "
            f"load {load:.1f}",
        ),
        Row(
            "sequential reads over NBD (fio nbd engine, 1 MiB, qd 4, Unix socket)",
            f"`nbdkit file` on the extracted {DISK}",
            fmt_rate(bw["nbdkit"]),
            fmt_rate(bw["vmafs"]),
            _ratio(bw["vmafs"], bw["nbdkit"]),
            ">= 0.7x",
            bw["vmafs"] >= 0.7 * bw["nbdkit"],
            f"median of {pairs} alternated whole-disk passes; vmafs answers holes as "
            f"OFFSET_HOLE chunks, nbdkit reads the sparse file's zeros; load {load:.1f}",
        ),
    ]
