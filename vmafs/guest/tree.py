"""``vmafs mount --guest ARCHIVE DIR`` and its ``vmafs umount DIR``.

The layout under DIR (a small read-only tmpfs, so nothing is written to the
directory the user gave and one umount removes every mount point):

    DIR/archive/                  the archive's own mount (disk-*.raw, volumes/, configs)
    DIR/drive-scsi0/p1/           each guest filesystem, read-only
    DIR/drive-scsi0/pve/root/
    DIR/drive-sata0/              a filesystem on a whole disk

Volume directories use the mount's safe names (vmafs.names.volume_paths:
the volume name itself whenever it is a plain name).  Swap, LVM physical
volumes and volumes without a filesystem the engine mounts are skipped with
a note.  Both engines read the disks from DIR/archive and give the same
layout:

- kernel: each volume's file is loop-mounted on its directory;
- appliance: ONE libguestfs launch over every disk that holds a volume;
  inside it each filesystem is mounted on its own mount point (made with
  mkmountpoint: the appliance has no root filesystem), the whole tree is
  shown through FUSE (libguestfs's mount_local) on a private directory,
  ``/run/vmafs/guest/<hash>.fs``, served by the detached worker, and each
  volume's directory there is bind-mounted read-only on DIR.  The worker
  and its QEMU carry a random tag in their environment, so umount finds
  them even after their pids were reused.

What was mounted is recorded, step by step as it happens, in
``/run/vmafs/guest/<hash of DIR>.json``; ``vmafs umount DIR`` reads it and
takes everything down in reverse order: guest filesystems (their loop
devices go with them; for the appliance, its bind mounts), the appliance's
FUSE mount and its processes, the archive's FUSE mount, the tmpfs.  That
works after the FUSE daemon or the appliance died, after ``vmafs mount
--guest`` itself was killed half-way, and after a step was already undone
by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from ..errors import EngineUnavailableError, GuestError, GuestMountError
from . import kernel

STATE_DIR = "/run/vmafs/guest"
ARCHIVE_DIR = "archive"
TMPFS_OPTIONS = "mode=0755,size=1m,nr_inodes=16384,nosuid,nodev,noexec"
#: Seconds umount waits for the appliance to shut down before it is killed.
APPLIANCE_EXIT_TIMEOUT = 30.0


@dataclass
class GuestTree:
    """What ``mount --guest`` made under ``dir`` (the state file's contents)."""

    dir: str
    archive: str
    archive_mount: str | None = None
    tmpfs: bool = False
    mounts: list[dict] = field(default_factory=list)  # kernel.KernelMount as dicts
    skipped: list[str] = field(default_factory=list)
    engine: str = "kernel"
    # the appliance engine: {"mount": its private FUSE directory, "tag": its processes' tag}
    appliance: dict | None = None


def _key(directory: str) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(directory))).hexdigest()[:32]


def state_path(directory: str) -> str:
    return os.path.join(STATE_DIR, _key(directory) + ".json")


def appliance_dir(directory: str) -> str:
    """Where the appliance's FUSE mount of the tree on *directory* goes (root's only)."""
    return os.path.join(STATE_DIR, _key(directory) + ".fs")


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


def require_root() -> None:
    if os.geteuid() != 0:
        raise EngineUnavailableError(
            "mount --guest needs root (a tmpfs on DIR and a mount per guest filesystem, "
            "with either engine); as another user, read with 'vmafs ls/cat/get "
            "--engine appliance'"
        )


def mount_tree(archive_path: str, directory: str, mount_options, engine: str) -> GuestTree:
    """Mount the archive and every guest filesystem under *directory* with *engine*
    (``kernel`` or ``appliance``); see the module doc.

    On any failure (or SIGTERM/SIGINT/SIGHUP) what was mounted so far is
    taken down again before the error is raised.
    """
    from ..archive import Archive  # noqa: PLC0415
    from ..common.signals import first_signal_raises  # noqa: PLC0415
    from ..mount.checks import check_mountpoint  # noqa: PLC0415
    from ..mount.errors import MountError  # noqa: PLC0415
    from ..mount.mounting import mount  # noqa: PLC0415
    from ..volumes import scan_volumes  # noqa: PLC0415
    from .session import NOT_FILES, disk_files, volume_files  # noqa: PLC0415

    require_root()
    if engine == "appliance":
        from .appliance import require  # noqa: PLC0415

        require()
    top = check_mountpoint(directory)
    if load(top) is not None:
        raise GuestMountError(f"{top}: a guest tree is recorded there; 'vmafs umount {top}' first")
    archive_path = os.path.abspath(archive_path)
    with Archive.open(archive_path) as archive:
        volumes = scan_volumes(archive)
        files = volume_files(archive, volumes)
        dirs = _relative_dirs(archive, volumes)
        disks = disk_files(archive)
    shared = _shared_vg_names(volumes) if engine == "appliance" else {}
    skipped = {}
    for v in volumes:
        why = _skip_reason(v, NOT_FILES, engine) or shared.get(v.name)
        if why is None and v.name not in files:
            why = "no file in the mount"
        if why:
            skipped[v.name] = why
            dirs.pop(v.name, None)
    archive_dir = ARCHIVE_DIR
    while any(d.split("/")[0] == archive_dir for d in dirs.values()):
        archive_dir += "~"  # a drive called "archive": the archive's mount steps aside
    tree = GuestTree(top, archive_path, engine=engine)

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
            chosen = [v for v in volumes if v.name not in skipped]
            if engine == "appliance":
                drives = {v.drive: os.path.join(amp, disks[v.drive]) for v in chosen}
                _mount_appliance(tree, chosen, dirs, drives)
            else:
                for v in chosen:
                    where = os.path.join(top, dirs[v.name])
                    m = kernel.mount_volume(
                        os.path.join(amp, files[v.name]), v.fstype, where, v.name
                    )
                    tree.mounts.append(asdict(m))
                    save(tree)
            save(tree)
        except BaseException:
            with contextlib.suppress(Exception):
                unmount_tree(tree)
            raise
    return tree


def _mount_appliance(tree: GuestTree, volumes, dirs: dict[str, str], drives: dict[str, str]):
    """One appliance over *drives* (drive name -> disk file) with every volume mounted
    inside it, shown on a private directory and bind-mounted on DIR/<volume dir>.

    A volume of a type vmafs does not recognise is tried, and noted in
    ``tree.skipped`` when the appliance cannot mount it either; any other
    failure is raised (the caller takes the tree down).
    """
    from .appliance import Appliance, device_for  # noqa: PLC0415

    if not volumes:
        return
    local = appliance_dir(tree.dir)
    tree.appliance = {"mount": local, "tag": secrets.token_hex(16)}
    save(tree)
    os.makedirs(local, mode=0o700, exist_ok=True)
    order = list(drives)
    mounted = []
    with Appliance([drives[d] for d in order], tag=tree.appliance["tag"]) as appliance:
        for v in volumes:
            try:
                device = device_for(appliance.info, order.index(v.drive), v)
                appliance.mount_at(device, "/" + dirs[v.name], v.fstype, v.name)
            except GuestError as e:
                if v.fstype != "unknown":
                    raise GuestMountError(str(e)) from None
                tree.skipped.append(f"{v.name}: not mounted: {e}")
                continue
            mounted.append(v)
        if not mounted:
            return
        appliance.mount_local(local)  # the worker serves it from now on, detached
    for v in mounted:
        m = _bind(os.path.join(local, dirs[v.name]), os.path.join(tree.dir, dirs[v.name]), v)
        tree.mounts.append(asdict(m))
        save(tree)


def _bind(source: str, target: str, volume) -> kernel.KernelMount:
    """Bind-mount *source* on *target* read-only, as the kernel engine mounts volumes."""
    proc = _run(["mount", "--bind", "-o", kernel.BASE_OPTIONS, source, target])
    if proc.returncode != 0:
        raise GuestMountError(
            f"{volume.name}: cannot bind-mount the appliance's {source} on {target}: "
            f"{kernel.first_line(proc)}"
        )
    return kernel.KernelMount(volume.name, volume.fstype, "", target)


def _shared_vg_names(volumes) -> dict[str, str]:
    """{LV name: why it is left out} for readable LVs whose VG name is also a VG name
    on another drive: one appliance sees every drive at once, and its LVM would
    merge or hide such VGs."""
    lvs = [v for v in volumes if v.kind == "lv" and v.readable]
    drives_of: dict[str, set[str]] = {}
    for v in lvs:
        drives_of.setdefault(_vg(v), set()).add(v.drive)
    return {
        v.name: (
            f"VG {_vg(v)!r} is also on another drive, which one appliance cannot tell "
            "apart; use --engine kernel, or 'vmafs ls/get' (one drive per appliance)"
        )
        for v in lvs
        if len(drives_of[_vg(v)]) > 1
    }


def _vg(volume) -> str:
    return volume.local_name.rpartition("/")[0]


def _skip_reason(volume, not_files: dict[str, str], engine: str) -> str | None:
    if not volume.readable:
        return volume.note
    if volume.fstype in not_files:
        return not_files[volume.fstype]
    if engine == "kernel" and volume.fstype not in kernel.MOUNT_TYPES:
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
    if tree.appliance is not None:
        _end_appliance(tree.appliance, lazy=lazy)
        tree.appliance = None
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
        kernel.unmount_path(tree.dir, "the guest tree", lazy=lazy)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(tree.dir))


def _end_appliance(appliance: dict, *, lazy: bool) -> None:
    """Unmount the appliance's private FUSE mount and see its processes gone.

    Unmounted, the worker shuts the appliance down and exits; a worker that
    was killed leaves a dead mount (umount needs no answer from it) and
    perhaps its QEMU, which holds the disk files of the archive's mount
    open: whatever carries the tag is ended.  Lazily, the worker serves
    whoever still uses the mount and exits after them.
    """
    from .appliance import end_tagged  # noqa: PLC0415

    local = appliance["mount"]
    if _mounted(local):
        kernel.unmount_path(local, "the appliance's mount", lazy=lazy)
    if not lazy:
        try:
            end_tagged(appliance["tag"], APPLIANCE_EXIT_TIMEOUT)
        except GuestError as e:
            raise GuestMountError(str(e)) from None
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(local)


def run_mount(args) -> int:
    """``vmafs mount --guest``: called by vmafs.mount.run."""
    from ..mount.errors import UsageError  # noqa: PLC0415
    from ..mount.options import parse_options  # noqa: PLC0415
    from .session import default_engine  # noqa: PLC0415

    if args.foreground:
        raise UsageError("--guest mounts detach; -f is not supported with it")
    options = parse_options(args.options)
    engine = args.engine or default_engine()  # as ls/cat/get: never the kernel unasked
    tree = mount_tree(args.archive, args.mountpoint, options, engine)
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
