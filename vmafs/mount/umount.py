"""``vmafs umount``: unmount with fusermount3, and say what holds a busy mount."""

from __future__ import annotations

import os
import subprocess

from .checks import mount_table, mountpoint_path
from .errors import MountError
from .running import EXIT_TIMEOUT, wait_released


def loop_devices_on(mountpoint: str) -> list[tuple[str, str]]:
    """[(/dev/loopN, backing file)] for loop devices reading files under *mountpoint*."""
    prefix = mountpoint.rstrip("/") + "/"
    out = []
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return out
    for name in names:
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(prefix):
            out.append((f"/dev/{name}", backing))
    return out


def umount(mountpoint: str, *, lazy: bool = False, timeout: float = EXIT_TIMEOUT) -> None:
    """Unmount a vmafs mount with fusermount3; raises MountError (also for other mounts).

    Returns once the filesystem process has exited, so the archive is
    closed and its filesystem can be unmounted next; after *timeout*
    seconds of waiting, raises MountError naming the process.  *lazy*
    (``-z``) detaches the mount and returns at once: the process serves
    whoever still uses it.
    """
    mp = mountpoint_path(mountpoint)
    fstype = mount_table().get(mp)
    if fstype is None:
        raise MountError(f"{mp}: not mounted")
    if fstype != "fuse.vmafs":  # the subtype set in fuse_options()
        raise MountError(f"{mp}: not a vmafs mount (filesystem type {fstype})")
    argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mp]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MountError("fusermount3 not found (Debian package fuse3)") from None
    if proc.returncode == 0:
        if not lazy:
            wait_released(mp, timeout)
        return
    loops = loop_devices_on(mp)
    if loops:
        devs = " ".join(dev for dev, _ in loops)
        raise MountError(
            f"{mp} is busy: loop device {devs} reads {loops[0][1]}; "
            f"unmount what uses it, then 'losetup -d {devs}', then retry"
        )
    detail = " ".join(proc.stderr.split()) or f"fusermount3 exited {proc.returncode}"
    if "busy" in detail.lower():
        detail += f" (see 'fuser -vm {mp}' for the processes using it)"
    raise MountError(detail)
