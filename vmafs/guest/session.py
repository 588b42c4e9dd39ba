"""One archive mounted privately, and its guest filesystems opened by one engine.

``vmafs ls/cat/get`` (and the tests) work through a :class:`GuestSession`:

1. the archive is opened once, here, to find its volumes (vmafs.volumes: no
   kernel partition scanning, nothing activated on the host); finding a
   volume scans only its drive, and the mount below scans the rest first;
2. at the first :meth:`GuestSession.open` that open archive is mounted
   with FUSE in a private directory (``/run/vmafs/`` for root, else
   ``$XDG_RUNTIME_DIR`` or the temp dir), as ``vmafs mount`` does, but
   without opening it again; pyfuse3 and trio, which only the mount needs,
   are imported in a thread from the start;
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
import logging
import os
import tempfile

from ..errors import GuestError, GuestMountError
from . import appliance as appliance_mod
from . import kernel
from .entry import GuestFS

log = logging.getLogger("vmafs.guest")

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
        self._scanned: dict[int, list] = {}  # dev_id -> its volumes (scan_drive)
        self.disk_files: dict[str, str] = {}  # drive name -> file name in the mount
        self.volume_files: dict[str, str] = {}  # volume name -> file path in the mount
        self.archive = None
        self._saves: list = []  # side index writes the open queued: the mount runs them
        self._importing = None
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
        from ..common.imports import BackgroundImport  # noqa: PLC0415
        from ..warmup import HeaderWarmer  # noqa: PLC0415

        # Cold, the start waits for the disk twice: the imports, then the walk of
        # the extent headers.  Both go on at once: the headers are read into the
        # page cache meanwhile (plain archives), and pyfuse3 and trio, which
        # only the mount needs, are imported in a thread too.
        warmer = HeaderWarmer(self.archive_path)
        try:
            self._importing = BackgroundImport("pyfuse3", "trio")
            from ..archive import Archive  # noqa: PLC0415 - numpy: not for `vmafs -h`
            from ..sidecar import deferred_saves  # noqa: PLC0415

            # Kept open for find() and served by the mount as it is.  A side index
            # this open makes is written by the filesystem process once the mount
            # is up (as for `vmafs mount`), not before the first file is read.
            with deferred_saves() as self._saves:
                self.archive = Archive.open(self.archive_path, progress=self.progress)
        finally:
            warmer.stop()
        self.disk_files = disk_files(self.archive)

    def _mount(self) -> str:
        """The archive's private mount point; mounted at the first call."""
        if self.mountpoint is not None:
            return self.mountpoint
        from ..mount.errors import MountError  # noqa: PLC0415
        from ..mount.mounting import mount  # noqa: PLC0415
        from ..mount.options import MountOptions  # noqa: PLC0415

        # Every drive is scanned now, while nothing else reads the archive: the
        # filesystem process shares its file descriptors (a gzip source's file
        # offset too), so this process reads nothing of it from now on.
        self._scan_all()
        if self._importing is not None:
            self._importing.join()
        self.workdir = tempfile.mkdtemp(prefix="vmafs-guest-", dir=runtime_dir())
        mp = os.path.join(self.workdir, "archive")
        os.mkdir(mp)
        try:
            mount(self.archive_path, mp, MountOptions(), archive=self.archive, saves=self._saves)
        except MountError as e:
            raise GuestMountError(f"cannot mount the archive on {mp}: {e}") from None
        self._saves = []  # the filesystem process has them
        self.mountpoint = mp
        return mp

    def _drive_volumes(self, dev_id: int) -> list:
        """The volumes of one drive, scanned once (later calls read nothing)."""
        from ..volumes import scan_drive  # noqa: PLC0415

        if dev_id not in self._scanned:
            assert self.archive is not None
            volumes = scan_drive(self.archive, dev_id)
            self._scanned[dev_id] = volumes
            self.volume_files.update(volume_files(self.archive, volumes))
        return self._scanned[dev_id]

    @property
    def volumes(self) -> list:
        """Every volume of every drive (each drive scanned at its first use)."""
        return self._scan_all()

    def _scan_all(self) -> list:
        assert self.archive is not None
        return [
            v
            for dev in self.archive.devices
            if not dev.is_vmstate
            for v in self._drive_volumes(dev.dev_id)
        ]

    def find(self, name: str):
        """The volume called *name* (``scsi0/p1`` means ``drive-scsi0/p1``);
        VolumeNotFoundError lists the names there are."""
        from ..volumes import find_volume  # noqa: PLC0415

        assert self.archive is not None
        return find_volume(self.archive, name, scan=self._drive_volumes)

    # -- opening a volume ------------------------------------------------------------------

    def open(self, volume) -> GuestFS:
        """A GuestFS for *volume*; an earlier one of the appliance is no longer valid."""
        if not volume.readable:
            raise GuestError(f"{volume.name}: cannot be read: {volume.note}")
        if volume.fstype in NOT_FILES:
            raise GuestError(f"{volume.name}: {NOT_FILES[volume.fstype]}")
        if self.engine == "appliance":
            return self._open_appliance(volume)
        if volume.fstype == "unknown":
            raise GuestError(
                f"{volume.name}: no filesystem vmafs recognises; --engine appliance "
                "may still read it"
            )
        mountpoint = self._mount()
        assert self.workdir is not None  # _mount() scanned every drive: volume_files is full
        where = os.path.join(self.workdir, f"fs{len(self._mounts)}")
        os.mkdir(where)
        self._mounts.append(
            kernel.mount_volume(
                os.path.join(mountpoint, self.volume_files[volume.name]),
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
            disk = os.path.join(self._mount(), self.disk_files[volume.drive])
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
        if self._importing is not None:
            self._importing.join()  # a daemon thread, but not one to leave importing
            self._importing = None
        # Never mounted (a volume not found, say): the side index is written here.
        if self._saves:
            from ..sidecar import run_saves  # noqa: PLC0415 - imported already by the open

            run_saves(self._saves)
        self._saves = []
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
