"""One archive mounted privately, and its guest filesystems opened by one engine.

``vmafs ls/cat/get`` (and the tests) work through a :class:`GuestSession`:

1. the archive is opened once here to find its volumes (vmafs.volumes: no
   kernel partition scanning, nothing activated on the host), which also
   leaves the side index a compressed archive needs for the next open;
2. it is mounted with FUSE in a private directory (``/run/vmafs/`` for root,
   else ``$XDG_RUNTIME_DIR`` or the temp dir), as ``vmafs mount`` does;
3. :meth:`GuestSession.open` gives a :class:`~vmafs.guest.entry.GuestFS` for a
   volume: the appliance engine launches libguestfs once over the drive's
   disk file (again only for a volume on another drive); the kernel engine
   loop-mounts the volume's file from the mount.

Leaving the ``with`` block takes everything down in order: guest mounts,
then the appliance (its QEMU holds the disk files), then the loop devices,
then the FUSE mount, then the directory; also when the block raised.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from ..errors import GuestError, GuestMountError
from . import appliance as appliance_mod
from . import kernel
from .entry import GuestFS

ENGINES = ("appliance", "kernel")

#: Filesystem types neither engine opens (the volume holds no files).
NOT_FILES = {
    "swap": "swap space, no files",
    "lvm2": "an LVM physical volume; its logical volumes are listed as volumes of their own",
}


def default_engine() -> str:
    """``appliance`` when libguestfs can run here; else EngineUnavailableError saying why."""
    appliance_mod.require()
    return "appliance"


def runtime_dir() -> str:
    """Where private mounts go: /run/vmafs for root (gone at reboot), else a user dir."""
    if os.geteuid() == 0:
        base = "/run/vmafs"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    os.makedirs(base, mode=0o755, exist_ok=True)
    return base


def volume_files(archive, volumes) -> dict[str, str]:
    """Volume name -> the path of its read-only file in the archive's mount, relative
    to the mount point (``volumes/<drive>/p1``; docs/mount.md)."""
    from ..names import drive_dir_names, volume_paths  # noqa: PLC0415 - the mount's names

    dirs = drive_dir_names(archive)
    paths = volume_paths(volumes)
    return {
        v.name: os.path.join("volumes", dirs[v.dev_id], *paths[v.name])
        for v in volumes
        if v.name in paths
    }


def disk_files(archive) -> dict[str, str]:
    """Drive name -> the file name of its disk in the archive's mount (``disk-<drive>.raw``)."""
    from ..names import safe_entry_names  # noqa: PLC0415 - the mount's names

    by_dev = {e.dev_id: name for name, e in safe_entry_names(archive).items()}
    return {dev.name: by_dev[dev.dev_id] for dev in archive.devices if not dev.is_vmstate}


class GuestSession:
    """``with GuestSession(path, engine) as s: fs = s.open(s.find("scsi0/p1"))``."""

    def __init__(self, archive_path: str, engine: str, *, progress=None) -> None:
        if engine not in ENGINES:
            raise GuestError(f"unknown engine {engine!r} (choose {' or '.join(ENGINES)})")
        self.archive_path = os.path.abspath(archive_path)
        self.engine = engine
        self.progress = progress
        self.volumes: list = []
        self.disk_files: dict[str, str] = {}  # drive name -> file name in the mount
        self.volume_files: dict[str, str] = {}  # volume name -> file path in the mount
        self.archive = None
        self.workdir: str | None = None
        self.mountpoint: str | None = None
        self._appliance: appliance_mod.Appliance | None = None
        self._appliance_drive: str | None = None
        self._mounts: list[kernel.KernelMount] = []

    # -- set-up ----------------------------------------------------------------------

    def __enter__(self) -> GuestSession:
        if self.engine == "appliance":
            appliance_mod.require()
        else:
            kernel.require_root()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        from ..archive import Archive  # noqa: PLC0415 - numpy: not for `vmafs -h`
        from ..mount.errors import MountError  # noqa: PLC0415
        from ..mount.mounting import mount  # noqa: PLC0415
        from ..mount.options import MountOptions  # noqa: PLC0415
        from ..volumes import scan_volumes  # noqa: PLC0415

        # Kept open for find(); the mount below opens its own (from the side
        # index this open leaves for a compressed archive).
        self.archive = archive = Archive.open(self.archive_path, progress=self.progress)
        self.volumes = scan_volumes(archive)
        self.volume_files = volume_files(archive, self.volumes)
        self.disk_files = disk_files(archive)
        self.workdir = tempfile.mkdtemp(prefix="vmafs-guest-", dir=runtime_dir())
        mp = os.path.join(self.workdir, "archive")
        os.mkdir(mp)
        try:
            mount(self.archive_path, mp, MountOptions())
        except MountError as e:
            raise GuestMountError(f"cannot mount the archive on {mp}: {e}") from None
        self.mountpoint = mp

    def find(self, name: str):
        """The volume called *name* (``scsi0/p1`` means ``drive-scsi0/p1``);
        VolumeNotFoundError lists the names there are."""
        from ..volumes import find_volume  # noqa: PLC0415

        assert self.archive is not None
        return find_volume(self.archive, name)

    # -- opening a volume ------------------------------------------------------------------

    def open(self, volume) -> GuestFS:
        """A GuestFS for *volume*; an earlier one of the appliance is no longer valid."""
        if not volume.readable:
            raise GuestError(f"{volume.name}: cannot be read: {volume.note}")
        if volume.fstype in NOT_FILES:
            raise GuestError(f"{volume.name}: {NOT_FILES[volume.fstype]}")
        assert self.mountpoint is not None
        if self.engine == "appliance":
            return self._open_appliance(volume)
        if volume.fstype == "unknown":
            raise GuestError(
                f"{volume.name}: no filesystem vmafs recognises; --engine appliance "
                "may still read it"
            )
        assert self.workdir is not None
        where = os.path.join(self.workdir, f"fs{len(self._mounts)}")
        os.mkdir(where)
        self._mounts.append(
            kernel.mount_volume(
                os.path.join(self.mountpoint, self.volume_files[volume.name]),
                volume.fstype,
                where,
                volume.name,
            )
        )
        return kernel.KernelFS(where, volume.name)

    def _open_appliance(self, volume) -> GuestFS:
        if self._appliance is None or self._appliance_drive != volume.drive:
            if self._appliance is not None:
                self._appliance.close()
                self._appliance = None
            disk = os.path.join(self.mountpoint or "", self.disk_files[volume.drive])
            self._appliance = appliance_mod.Appliance([disk])
            self._appliance_drive = volume.drive
        device = appliance_mod.device_for(self._appliance.info, 0, volume)
        return self._appliance.mount(device, volume.name)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Take everything down in order; the first failure is raised after trying all."""
        errors: list[BaseException] = []
        if self._appliance is not None:
            with _collect(errors):
                self._appliance.close()
            self._appliance = None
        while self._mounts:
            m = self._mounts.pop()
            with _collect(errors):
                kernel.unmount(m)
        if self.mountpoint is not None:
            with _collect(errors):
                left = kernel.wait_loops_released(self.mountpoint)
                if left:
                    raise GuestMountError(f"loop devices {' '.join(left)} still read the archive")
            with _collect(errors):
                from ..mount.umount import umount  # noqa: PLC0415

                umount(self.mountpoint)
                self.mountpoint = None
        if self.workdir is not None and self.mountpoint is None and not self._mounts:
            # rmdir, never rmtree: nothing mounted below may ever be walked into
            for name in sorted(os.listdir(self.workdir)):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(self.workdir, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)
            self.workdir = None
        if self.archive is not None:
            self.archive.close()
            self.archive = None
        if errors:
            first = errors[0]
            if isinstance(first, (GuestError, OSError)):
                raise first
            raise GuestMountError(str(first)) from first  # vmafs.mount's MountError

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _collect(errors: list[BaseException]):
    try:
        yield
    except Exception as e:  # noqa: BLE001 - teardown goes on; the first error is raised after
        errors.append(e)
