"""Issue 13's figure: one file out of a guest filesystem with ``vmafs get``.

``vmafs get --engine kernel`` (mounts the archive privately, loop-mounts the
volume's file ``ro,noload``, copies the file, takes it all down) against the
restore figure's baseline, ``vmafs extract`` + loop + ext4 mount + read, in
one run, twice: with the archive cold (its pages evicted, Python's files
left in the page cache, as on a host that ran Python lately: issue 13's
"archive cold") and with every cache dropped (``.pyc`` and ``.so`` files
read from disk too).  Each get is also split into phases from its own
events (:mod:`.timeline`), and the fixed floor under it is measured alone:
the interpreter, and the interpreter importing numpy, pyfuse3 and trio.
The appliance engine is measured too, with the share of its time that is
the libguestfs launch alone (a launch and shutdown over the same mounted
disk, no filesystem work).
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from . import datasets as ds
from . import timeline
from .ctx import DISK, Ctx, Row
from .read_figures import extract_and_read, ladder_phases
from .util import VMAFS, Skip, drop_caches, evict, fmt_s, run, vmafs_mount

#: The bench disk is one ext4 on the whole drive: its volume is the drive.
VOLUME = "drive-scsi0"

#: What the get needs before it can serve anything, measured alone.
_FLOOR = [("interpreter", "pass"), ("+ numpy, pyfuse3, trio", "import numpy, pyfuse3")]

_LAUNCH_ONLY = r"""
import sys
from vmafs.guest.appliance import Appliance
Appliance([sys.argv[1]]).close()
"""


def _get_argv(archive: str, out: str, engine: str) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    return ["get", "--engine", engine, archive, f"{VOLUME}:/{ds.RESTORE_FILE}", out]


def _get(archive: str, out: str, engine: str, prepare: Callable[[], None] = drop_caches) -> float:
    """Seconds of one ``vmafs get`` into a fresh *out*, after *prepare* (caches made cold)."""
    argv = _get_argv(archive, out, engine)
    prepare()
    t0 = time.perf_counter()
    subprocess.run([*VMAFS, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _appliance_row(ctx: Ctx, archive: str, out: str, want: str, kernel: float) -> Row:
    from vmafs.guest.appliance import unavailable_reason

    why = unavailable_reason()
    if why:
        raise Skip(why)
    total = _get(archive, out, "appliance")
    if ds.sha256_file(os.path.join(out, os.path.basename(ds.RESTORE_FILE))) != want:
        raise RuntimeError("file restored by the appliance differs from the original")
    mnt = ctx.mnt("guest-launch")
    drop_caches()
    with vmafs_mount(archive, mnt):
        t0 = time.perf_counter()
        run([sys.executable, "-c", _LAUNCH_ONLY, os.path.join(mnt, DISK)])
        launch = time.perf_counter() - t0
    accel = "TCG (no usable KVM)" if "force_tcg" in _backend_settings() else "KVM"
    return Row(
        "`vmafs get` one file, appliance engine (libguestfs), all caches dropped",
        "the kernel engine, all caches dropped (row above)",
        fmt_s(kernel),
        fmt_s(total),
        f"{total / kernel:.1f}x",
        "reported",
        None,
        f"launch + shutdown alone {fmt_s(launch)} = {launch / total:.0%} of the get; "
        f"appliance on {accel}",
    )


def _backend_settings() -> str:
    from vmafs.guest.accel import libguestfs_env

    return libguestfs_env().get("LIBGUESTFS_BACKEND_SETTINGS", "")


def _cold_steps(archive: str) -> list[tuple[str, str, Callable[[], None]]]:
    """(label, how, step) per way of making the caches cold before each run; the
    last is all caches dropped, as the appliance's run is."""
    return [
        (
            "archive cold",
            "the archive's pages evicted (POSIX_FADV_DONTNEED), Python's files warm",
            functools.partial(evict, archive),
        ),
        (
            "all caches dropped",
            "drop_caches: the archive, .pyc and .so files all read from disk",
            drop_caches,
        ),
    ]


def fig_get(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise Skip("needs root (loop devices, drop_caches)")
    archive = ctx.get("archive")
    want = ds.sha256_file(os.path.join(ctx.get("files"), ds.RESTORE_FILE))
    out = os.path.join(ctx.work, "get-out")
    log = os.path.join(ctx.work, "get-timeline.tsv")
    name = os.path.basename(ds.RESTORE_FILE)
    reps = 2 if ctx.sizes.label == "quick" else 3
    stored = os.path.getsize(archive)
    rows, facts = [], {}
    for label, how, prepare in _cold_steps(archive):
        times, phases = [], []
        for _ in range(reps):
            # plain runs for the figure, hooked runs for the phases, alternated
            times.append(_get(archive, out, "kernel", prepare))
            if ds.sha256_file(os.path.join(out, name)) != want:
                raise RuntimeError("file restored by `vmafs get` differs from the original")
            argv = _get_argv(archive, out, "kernel")
            prepare()
            phases.append(timeline.timed_get(argv, archive, log)[1])
        get = statistics.median(times)
        floor = ladder_phases(_FLOOR, archive, None, prepare, reps)
        prepare()
        base, got = extract_and_read(ctx, archive)
        if got != want:
            raise RuntimeError("restored file differs from the original (extract)")
        split = timeline.median_phases(phases)
        facts[label] = {"get": times, "phases": split, "floor": floor, "extract": base}
        rows.append(
            Row(
                f"`vmafs get --engine kernel` one file ({ctx.sizes.restore_file >> 20} MiB) "
                f"from a {stored / 1e9:.1f} GB archive, {label}",
                "`vmafs extract` + loop + ext4 ro,noload + read",
                fmt_s(base),
                fmt_s(get),
                f"1/{base / get:.0f}",
                "<= 1/20",
                get * 20 <= base,
                f"{how}, before each run of both; get median of {reps} ("
                f"{', '.join(fmt_s(t) for t in times)}); by phase (its own events, medians "
                f"of {reps} more runs): {timeline.phases_text(split)}; measured alone: "
                + ", ".join(f"{n} {fmt_s(t)}" for n, t in floor)
                + f" (1/20 of the baseline: {fmt_s(base / 20)})",
            )
        )
    ctx.facts["get"] = facts
    try:
        kernel = statistics.median(facts["all caches dropped"]["get"])  # as the appliance runs
        rows.append(_appliance_row(ctx, archive, out, want, kernel))
    except (Skip, RuntimeError, subprocess.SubprocessError) as e:
        rows.append(
            Row("`vmafs get`, appliance engine", "-", "-", f"not measured: {e}", "-", "-", None)
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows
