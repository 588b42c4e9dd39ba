"""The kernel engine: a guest volume on a read-only loop device, mounted by the host.

Fast and simple, but the host kernel parses the guest filesystem: use it for
backups you trust (docs/restore.md).  Root only.  Every mount is
``ro,nosuid,nodev,noexec`` and never replays a journal or log, since there
is nothing to write it to (the volume file is read-only) and a replay would
run the guest's own, untrusted recovery code: ext2/3/4 ``noload``, XFS
``norecovery,nouuid`` (two backups of one VM share UUIDs), btrfs
``rescue=nologreplay``; NTFS goes through ntfs-3g read-only; vfat as is.

Loop devices: attached read-only with LO_FLAGS_AUTOCLEAR set from the
start (:mod:`vmafs.guest.loopdev`, by ioctl, no losetup), so the kernel
frees the device when the mount lets go of it: unmounting frees the loop
device by itself, and a crash between two steps of a teardown leaks
nothing.  Mounts and unmounts are system calls too, except ntfs-3g's
(a FUSE helper that mount(8) starts).
"""

from __future__ import annotations

import errno
import os
import stat as st
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import EngineUnavailableError, GuestError, GuestMountError
from .entry import Entry, kind_of

BASE_OPTIONS = "ro,nosuid,nodev,noexec"

#: fstype (as vmafs.volumes names it) -> (mount -t type, extra options).
MOUNT_TYPES: dict[str, tuple[str, str]] = {
    "ext2": ("ext4", "noload"),
    "ext3": ("ext4", "noload"),
    "ext4": ("ext4", "noload"),
    "xfs": ("xfs", "norecovery,nouuid"),
    "btrfs": ("btrfs", "rescue=nologreplay"),
    "ntfs": ("ntfs-3g", ""),
    "vfat": ("vfat", ""),
}

#: Filesystems that are not mounted, and why (``vmafs mount --guest`` says so).
SKIPPED = {
    "swap": "swap space holds no files",
    "lvm2": "an LVM physical volume: its logical volumes are listed on their own",
}


def require_root() -> None:
    if os.geteuid() != 0:
        raise EngineUnavailableError(
            "the kernel engine needs root (loop devices and mount); run as root, "
            "or use --engine appliance"
        )


def mount_spec(fstype: str, volume: str) -> tuple[str, str]:
    """The filesystem type and options to mount *fstype* with; GuestMountError if unsupported."""
    if fstype in SKIPPED:
        raise GuestMountError(f"{volume}: not mounted: {SKIPPED[fstype]}")
    if fstype not in MOUNT_TYPES:
        raise GuestMountError(
            f"{volume}: filesystem type {fstype!r} is not one the kernel engine mounts "
            f"({', '.join(sorted(MOUNT_TYPES))}); try --engine appliance"
        )
    kind, extra = MOUNT_TYPES[fstype]
    return kind, BASE_OPTIONS + ("," + extra if extra else "")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise EngineUnavailableError(f"{argv[0]} not found (util-linux)") from None


@dataclass(frozen=True)
class KernelMount:
    """One guest filesystem mounted on the host (what teardown needs).

    ``loop`` is the loop device the kernel engine mounted, or "" for the
    appliance's bind mounts in a ``mount --guest`` tree (vmafs.guest.tree).
    """

    volume: str
    fstype: str
    loop: str
    mountpoint: str


def mount_volume(volume_file: str, fstype: str, mountpoint: str, volume: str) -> KernelMount:
    """Attach *volume_file* to a read-only loop device and mount it on *mountpoint*."""
    from . import loopdev  # noqa: PLC0415 - ctypes, only for the kernel engine

    require_root()
    kind, options = mount_spec(fstype, volume)  # refuses unsupported types first
    try:
        # Autoclear from the start: the device goes when its mount does, or
        # when this fd closes if the mount fails (nothing to detach by hand).
        loop, fd = loopdev.attach(volume_file)
    except OSError as e:
        raise GuestMountError(f"{volume}: no read-only loop device: {e.strerror or e}") from None
    try:
        if kind == "ntfs-3g":  # a FUSE filesystem: mount(8) starts its helper
            proc = _run(["mount", "-t", kind, "-o", options, loop, mountpoint])
            error = first_line(proc) if proc.returncode != 0 else None
        else:
            try:
                loopdev.mount(loop, mountpoint, kind, options)
                error = None
            except OSError as e:
                error = e.strerror or str(e)
    finally:
        os.close(fd)
    if error is not None:
        raise GuestMountError(
            f"{volume}: mounting its {fstype} read-only failed: {error} "
            "(a damaged or unsupported filesystem; --engine appliance may read it)"
        )
    return KernelMount(volume, fstype, loop, mountpoint)


def unmount(mount: KernelMount, *, lazy: bool = False) -> None:
    """Unmount *mount* (its loop device then detaches itself); GuestMountError if busy."""
    unmount_path(mount.mountpoint, mount.volume, lazy=lazy)


def unmount_path(path: str, what: str, *, lazy: bool = False) -> None:
    """umount2(2) *path*; GuestMountError naming *what* unless it is unmounted after.

    Works on a FUSE mount whose process died (unmounting needs no answer from it).
    """
    from . import loopdev  # noqa: PLC0415 - ctypes, only for host mounts

    try:
        loopdev.umount(path, lazy=lazy)
    except OSError as e:
        if _is_mounted(path):
            raise GuestMountError(
                f"{what}: cannot unmount {path}: {e.strerror or e} (see 'fuser -vm {path}')"
            ) from None


def wait_loops_released(prefix: str, timeout: float = 10.0) -> list[str]:
    """Wait until no loop device reads a file under *prefix*; detach stragglers.

    A loop device is freed when its last user closes it: after umount of a
    kernel filesystem at once, after ntfs-3g's process has exited.  Returns
    the loop devices still there after *timeout* (the caller reports them).
    """
    from ..mount.umount import loop_devices_on  # noqa: PLC0415 - pulls in the mount package

    deadline = time.monotonic() + timeout
    while True:
        loops = loop_devices_on(prefix)
        if not loops:
            return []
        if time.monotonic() > deadline:
            for dev, _ in loops:
                _run(["losetup", "--detach", dev])
            return [dev for dev, _ in loop_devices_on(prefix)]
        time.sleep(0.05)


def _is_mounted(path: str) -> bool:
    from ..mount.checks import mount_table  # noqa: PLC0415

    return os.path.realpath(path) in mount_table()


def first_line(proc: subprocess.CompletedProcess) -> str:
    return " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"


class KernelFS:
    """A :class:`~vmafs.guest.entry.GuestFS` over a host mount point.

    Paths are joined to the mount point only after :func:`vmafs.guest.paths.resolve`
    checked each component (no symlink on the way), and files are opened
    with O_NOFOLLOW: nothing here can reach outside the guest filesystem.
    """

    def __init__(self, root: str, volume: str) -> None:
        self.root = root.rstrip("/")
        self.volume = volume

    def _host(self, path: str) -> str:
        return self.root + path if path != "/" else self.root + "/"

    def _error(self, path: str, e: OSError) -> GuestError:
        return GuestError(f"{self.volume}:{path}: {e.strerror or e}", errno_=e.errno)

    def _entry(self, path: str, s: os.stat_result) -> Entry:
        target = None
        if st.S_ISLNK(s.st_mode):
            target = os.readlink(self._host(path))
        return Entry(
            path=path,
            kind=kind_of(s.st_mode),
            mode=s.st_mode,
            size=s.st_size,
            uid=s.st_uid,
            gid=s.st_gid,
            nlink=s.st_nlink,
            atime_ns=s.st_atime_ns,
            mtime_ns=s.st_mtime_ns,
            target=target,
        )

    def lstat(self, path: str) -> Entry:
        try:
            return self._entry(path, os.lstat(self._host(path)))
        except OSError as e:
            raise self._error(path, e) from None

    def scandir(self, path: str) -> list[Entry]:
        base = path.rstrip("/")
        try:
            with os.scandir(self._host(path)) as it:
                found = [(f"{base}/{d.name}", d.stat(follow_symlinks=False)) for d in it]
            return sorted((self._entry(p, s) for p, s in found), key=lambda e: e.path)
        except OSError as e:
            raise self._error(path, e) from None

    def read(self, path: str, chunk_size: int) -> Iterator[bytes]:
        try:
            fd = os.open(self._host(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                e = OSError(errno.ELOOP, "is a symbolic link")
            raise self._error(path, e) from None
        try:
            while True:
                try:
                    data = os.read(fd, chunk_size)
                except OSError as e:
                    raise self._error(path, e) from None
                if not data:
                    return
                yield data
        finally:
            os.close(fd)
