"""``vmafs mount --guest ARCHIVE DIR`` and its ``vmafs umount DIR``.

The layout under DIR (a small read-only tmpfs, so nothing is written to the
directory the user gave and one umount removes every mount point):

    DIR/archive/                  the archive's own mount (disk-*.raw, volumes/, configs)
    DIR/drive-scsi0/p1/           each guest filesystem, read-only (kernel engine)
    DIR/drive-scsi0/pve/root/
    DIR/drive-sata0/              a filesystem on a whole disk

Volume directories use the mount's safe names (vmafs.names.volume_paths:
the volume name itself whenever it is a plain name).  Swap, LVM physical
volumes and volumes without a known filesystem are skipped with a note.

What was mounted is recorded, step by step as it happens, in
``/run/vmafs/guest/<hash of DIR>.json``; ``vmafs umount DIR`` reads it and
takes everything down in reverse order: guest filesystems (their loop
devices go with them), the archive's FUSE mount, the tmpfs.  That works
after the FUSE daemon died, after ``vmafs mount --guest`` itself was
killed half-way, and after a step was already undone by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from ..errors import GuestMountError
from . import kernel

STATE_DIR = "/run/vmafs/guest"
ARCHIVE_DIR = "archive"
TMPFS_OPTIONS = "mode=0755,size=1m,nr_inodes=16384,nosuid,nodev,noexec"


@dataclass
class GuestTree:
    """What ``mount --guest`` made under ``dir`` (the state file's contents)."""

    dir: str
    archive: str
    archive_mount: str | None = None
    tmpfs: bool = False
    mounts: list[dict] = field(default_factory=list)  # kernel.KernelMount as dicts
    skipped: list[str] = field(default_factory=list)


def state_path(directory: str) -> str:
    key = hashlib.sha256(os.fsencode(os.path.realpath(directory))).hexdigest()[:32]
    return os.path.join(STATE_DIR, key + ".json")


def save(tree: GuestTree) -> None:
    """Write the state file atomically (a crash leaves the old or the new one)."""
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    path = state_path(tree.dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(tree), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(directory: str) -> GuestTree | None:
    """The recorded guest tree on *directory*, or None when there is none."""
    try:
        with open(state_path(directory)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise GuestMountError(f"{state_path(directory)}: unreadable state file: {e}") from None
    return GuestTree(**data)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _mounted(path: str) -> bool:
    from ..mount.checks import mount_table  # noqa: PLC0415

    return path in mount_table()


def _relative_dirs(archive, volumes) -> dict[str, str]:
    """Volume name -> its directory under DIR (the mount's safe names)."""
    from ..names import drive_dir_names, volume_paths  # noqa: PLC0415

    drives = drive_dir_names(archive)
    paths = volume_paths(volumes)
    out = {}
    for v in volumes:
        if v.name in paths:
            parts = paths[v.name]
            parts = () if v.kind == "disk" else parts  # a whole-disk filesystem: DIR/<drive>/
            out[v.name] = os.path.join(drives[v.dev_id], *parts)
    return out


def mount_tree(archive_path: str, directory: str, mount_options) -> GuestTree:
    """Mount the archive and every guest filesystem under *directory*; see the module doc.

    On any failure (or SIGTERM/SIGINT/SIGHUP) what was mounted so far is
    taken down again before the error is raised.
    """
    from ..archive import Archive  # noqa: PLC0415
    from ..common.signals import first_signal_raises  # noqa: PLC0415
    from ..mount.checks import check_mountpoint  # noqa: PLC0415
    from ..mount.errors import MountError  # noqa: PLC0415
    from ..mount.mounting import mount  # noqa: PLC0415
    from ..volumes import scan_volumes  # noqa: PLC0415
    from .session import NOT_FILES, volume_files  # noqa: PLC0415

    kernel.require_root()
    top = check_mountpoint(directory)
    if load(top) is not None:
        raise GuestMountError(f"{top}: a guest tree is recorded there; 'vmafs umount {top}' first")
    archive_path = os.path.abspath(archive_path)
    with Archive.open(archive_path) as archive:
        volumes = scan_volumes(archive)
        files = volume_files(archive, volumes)
        dirs = _relative_dirs(archive, volumes)
    skipped = {}
    for v in volumes:
        why = _skip_reason(v, NOT_FILES)
        if why is None and v.name not in files:
            why = "no file in the mount"
        if why:
            skipped[v.name] = why
            dirs.pop(v.name, None)
    archive_dir = ARCHIVE_DIR
    while any(d.split("/")[0] == archive_dir for d in dirs.values()):
        archive_dir += "~"  # a drive called "archive": the archive's mount steps aside
    tree = GuestTree(top, archive_path)

    def interrupted(signum: int) -> BaseException:
        return KeyboardInterrupt(signal.Signals(signum).name)

    with first_signal_raises((signal.SIGTERM, signal.SIGHUP), interrupted):
        try:
            save(tree)
            proc = _run(["mount", "-t", "tmpfs", "-o", TMPFS_OPTIONS, "vmafs-guest", top])
            if proc.returncode != 0:
                raise GuestMountError(
                    f"{top}: cannot mount a tmpfs there: {kernel.first_line(proc)}"
                )
            tree.tmpfs = True
            save(tree)
            os.mkdir(os.path.join(top, archive_dir))
            for rel in dirs.values():
                os.makedirs(os.path.join(top, rel), exist_ok=True)
            _run(["mount", "-o", "remount,ro", top])
            amp = os.path.join(top, archive_dir)
            tree.archive_mount = amp
            save(tree)
            try:
                mount(archive_path, amp, mount_options)
            except MountError as e:
                raise GuestMountError(f"cannot mount the archive on {amp}: {e}") from None
            tree.skipped = [f"{name}: not mounted: {why}" for name, why in skipped.items()]
            for v in volumes:
                if v.name in skipped:
                    continue
                where = os.path.join(top, dirs[v.name])
                m = kernel.mount_volume(os.path.join(amp, files[v.name]), v.fstype, where, v.name)
                tree.mounts.append(asdict(m))
                save(tree)
            save(tree)
        except BaseException:
            with contextlib.suppress(Exception):
                unmount_tree(tree)
            raise
    return tree


def _skip_reason(volume, not_files: dict[str, str]) -> str | None:
    if not volume.readable:
        return volume.note
    if volume.fstype in not_files:
        return not_files[volume.fstype]
    if volume.fstype not in kernel.MOUNT_TYPES:
        return f"no filesystem the kernel engine mounts ({volume.fstype})"
    return None


def unmount_tree(tree: GuestTree, *, lazy: bool = False) -> None:
    """Take *tree* down in reverse order; steps already undone are passed over.

    Raises GuestMountError for the first step that fails (the state file
    then stays, so the command can be run again once the cause is gone).
    """
    from ..mount.errors import MountError  # noqa: PLC0415
    from ..mount.umount import umount  # noqa: PLC0415

    while tree.mounts:
        m = kernel.KernelMount(**tree.mounts[-1])
        if _mounted(m.mountpoint):
            kernel.unmount(m, lazy=lazy)
        tree.mounts.pop()
        save(tree)
    if tree.archive_mount is not None:
        left = kernel.wait_loops_released(tree.archive_mount)
        if left:
            raise GuestMountError(
                f"loop devices {' '.join(left)} still read {tree.archive_mount}: "
                f"'losetup -d {' '.join(left)}', then run vmafs umount again"
            )
        if _mounted(tree.archive_mount):
            try:
                umount(tree.archive_mount, lazy=lazy)
            except MountError as e:
                raise GuestMountError(str(e)) from None
        tree.archive_mount = None
        save(tree)
    if tree.tmpfs and _mounted(tree.dir):
        proc = _run(["umount", *(["-l"] if lazy else []), tree.dir])
        if proc.returncode != 0 and _mounted(tree.dir):
            raise GuestMountError(f"{tree.dir}: cannot unmount: {kernel.first_line(proc)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(tree.dir))


def run_mount(args) -> int:
    """``vmafs mount --guest``: called by vmafs.mount.run."""
    from ..mount.errors import UsageError  # noqa: PLC0415
    from ..mount.options import parse_options  # noqa: PLC0415

    if args.engine == "appliance":
        raise GuestMountError(
            "mount --guest mounts with the kernel engine only (one appliance per "
            "filesystem would take a launch each); use --engine kernel, or read with "
            "'vmafs ls/cat/get' through the appliance"
        )
    if args.foreground:
        raise UsageError("--guest mounts detach; -f is not supported with it")
    tree = mount_tree(args.archive, args.mountpoint, parse_options(args.options))
    for note in tree.skipped:
        sys.stderr.write(f"vmafs: note: {note}\n")
    return 0


def run_umount(args) -> int | None:
    """``vmafs umount DIR`` of a guest tree; None when DIR holds none (a plain mount)."""
    tree = load(args.mountpoint)
    if tree is None:
        return None
    unmount_tree(tree, lazy=args.lazy)
    return 0
