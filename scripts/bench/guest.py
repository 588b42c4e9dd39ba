"""Issue 13's figure: one file out of a guest filesystem with ``vmafs get``.

``vmafs get --engine kernel`` (mounts the archive privately, loop-mounts the
volume's file ``ro,noload``, copies the file, takes it all down) against the
restore figure's baseline, ``vmafs extract`` + loop + ext4 mount + read, both
from a cold page cache, in one run.  The appliance engine is measured too,
with the share of its time that is the libguestfs launch alone (a launch and
shutdown over the same mounted disk, no filesystem work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from . import datasets as ds
from .ctx import DISK, Ctx, Row
from .read_figures import extract_and_read, ladder_phases, phases_str
from .util import VMAFS, Skip, drop_caches, fmt_s, run, timed, vmafs_mount

#: The bench disk is one ext4 on the whole drive: its volume is the drive.
VOLUME = "drive-scsi0"

#: The start of `vmafs get --engine kernel` as a ladder of processes, each doing
#: one more phase (what `get` imports before the mount is up, then the archive
#: opened and its drive scanned); the last rung is the whole command.
_GET_LADDER = [
    ("interpreter", "pass"),
    ("vmafs CLI + get", "import vmafs.cli, vmafs.commands.get"),
    (
        "numpy + the reader + volumes",
        "import vmafs.cli, vmafs.commands.get, vmafs.archive, vmafs.volumes, "
        "vmafs.guest.session, vmafs.guest.copy",
    ),
    (
        "pyfuse3 + trio + the mount",
        "import vmafs.cli, vmafs.commands.get, vmafs.archive, vmafs.volumes, "
        "vmafs.guest.session, vmafs.guest.copy, vmafs.fs, vmafs.mount.mounting",
    ),
    (
        "open the archive + scan its drive",
        "import sys, vmafs.cli, vmafs.commands.get, vmafs.guest.session, vmafs.guest.copy, "
        "vmafs.fs, vmafs.mount.mounting\n"
        "from vmafs.archive import Archive\nfrom vmafs.volumes import scan_volumes\n"
        "a = Archive.open(sys.argv[1]); scan_volumes(a); a.close()",
    ),
]

_LAUNCH_ONLY = r"""
import sys
from vmafs.guest.appliance import Appliance
Appliance([sys.argv[1]]).close()
"""


def _get(archive: str, out: str, engine: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    drop_caches()
    argv = [*VMAFS, "get", "--engine", engine, archive, f"{VOLUME}:/{ds.RESTORE_FILE}", out]
    return timed(argv)[0]


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
        "`vmafs get` one file, appliance engine (libguestfs), cold cache",
        "the kernel engine (row above)",
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


def fig_get(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise Skip("needs root (loop devices, drop_caches)")
    archive = ctx.get("archive")
    want = ds.sha256_file(os.path.join(ctx.get("files"), ds.RESTORE_FILE))
    out = os.path.join(ctx.work, "get-out")
    name = os.path.basename(ds.RESTORE_FILE)
    times = []
    for _ in range(3 if ctx.sizes.label == "full" else 2):
        times.append(_get(archive, out, "kernel"))
        if ds.sha256_file(os.path.join(out, name)) != want:
            raise RuntimeError("file restored by `vmafs get` differs from the original")
    kernel = sorted(times)[len(times) // 2]

    def whole() -> float:
        return _get(archive, out, "kernel")

    cold = ladder_phases(
        _GET_LADDER,
        archive,
        ("whole `vmafs get` (mount, loop, ext4, copy, teardown, exit)", whole),
        cold=True,
        reps=1 if ctx.sizes.label == "quick" else 3,
    )
    ctx.facts["get_phases_cold"] = cold
    drop_caches()
    base, _ = extract_and_read(ctx, archive)
    rows = [
        Row(
            f"`vmafs get --engine kernel` one file ({ctx.sizes.restore_file >> 20} MiB), "
            "cold cache",
            "`vmafs extract` + loop + ext4 ro,noload + read",
            fmt_s(base),
            fmt_s(kernel),
            f"1/{base / kernel:.0f}",
            "<= 1/20",
            kernel * 20 <= base,
            f"median of {len(times)} ({', '.join(fmt_s(t) for t in times)}); start by "
            "phase (separate processes, each one phase more than the one before, "
            f"after drop_caches, medians): {phases_str(cold)}",
        )
    ]
    try:
        rows.append(_appliance_row(ctx, archive, out, want, kernel))
    except (Skip, RuntimeError, subprocess.SubprocessError) as e:
        rows.append(
            Row("`vmafs get`, appliance engine", "-", "-", f"not measured: {e}", "-", "-", None)
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows
