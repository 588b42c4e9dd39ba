"""The appliance engine: libguestfs reads the guest filesystems inside a small VM.

The disk files of the archive's FUSE mount are handed to libguestfs
read-only; partition tables, LVM and every filesystem are parsed by the
appliance's kernel, never by the host's.  That is the isolation Proxmox
Backup Server's file-restore and libguestfs's security guide ask for, and it
needs no root.  The price is the launch: ~3 s with KVM, ~15 s without.

libguestfs's Python binding exists only for Debian's /usr/bin/python3, and
vmafs runs in its own venv; so :class:`Appliance` runs
:mod:`vmafs.guest.appliance_worker` in that interpreter and speaks a small
JSON-lines protocol with it (see the worker's docstring).  A child process
also keeps libguestfs's QEMU, its signals and its output away from ours.

Device names: with the drives added in order, libguestfs calls them
``/dev/sda``, ``/dev/sdb``...; partition N of the first is ``/dev/sda<N>``
(logical MBR partitions from 5, as vmafs counts them) and an LV is
``/dev/<vg>/<lv>``.  :func:`device_for` maps a vmafs volume to that name and
refuses when libguestfs does not see it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import EngineUnavailableError, GuestError
from .accel import libguestfs_env
from .entry import Entry, kind_of

#: The interpreter that has libguestfs's binding (Debian's python3-guestfs);
#: VMAFS_GUESTFS_PYTHON names another one.
SYSTEM_PYTHON = "/usr/bin/python3"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "appliance_worker.py")
INSTALL_HINT = (
    "apt-get install --no-install-recommends libguestfs-tools python3-guestfs linux-image-amd64"
)
#: The environment variable that marks a detached worker and every process
#: it starts (libguestfs's QEMU inherits it): see :func:`tagged_processes`.
TAG_VARIABLE = "VMAFS_APPLIANCE_TAG"
#: Source and subtype of the appliance's FUSE mount (mount --guest), for findmnt.
FUSE_NAME = "vmafs-appliance"


def mount_options(fstype: str) -> str:
    """Options for mounting a guest filesystem of *fstype* inside the appliance.

    Read-only; the drives sit under libguestfs's throwaway overlays, so a
    dirty journal is replayed there (never into the backup), as the guest
    would on its next boot.  XFS gets ``nouuid`` because one appliance
    mounts several filesystems at once, and two disks cloned from one image
    hold XFS filesystems with one UUID (the kernel refuses the second).
    """
    return "ro,nouuid" if fstype == "xfs" else "ro"


def system_python() -> str:
    return os.environ.get("VMAFS_GUESTFS_PYTHON") or SYSTEM_PYTHON


def unavailable_reason() -> str | None:
    """Why the appliance engine cannot run here, with what to do; None when it can."""
    probe = [system_python(), "-I", "-c", "import guestfs"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return f"the appliance engine needs libguestfs for {system_python()}: {INSTALL_HINT}"
    kernels = glob.glob("/boot/vmlinuz-*")
    if not kernels:
        return (
            "the appliance engine needs a Linux kernel under /boot for its appliance: "
            "apt-get install --no-install-recommends linux-image-amd64"
        )
    if not any(os.access(k, os.R_OK) for k in kernels):
        return (
            f"the appliance engine cannot read the kernel {kernels[0]} as this user: "
            f"run as root, or make it readable (chmod 0644 {kernels[0]})"
        )
    return None


def require() -> None:
    """Raise EngineUnavailableError (what to install, or --engine kernel) unless usable."""
    reason = unavailable_reason()
    if reason:
        raise EngineUnavailableError(f"{reason}; or choose --engine kernel (root)")


@dataclass(frozen=True)
class LaunchInfo:
    devices: list[str]  # one per drive added, in order: /dev/sda, /dev/sdb...
    partitions: list[str]
    lvs: list[str]


def device_for(info: LaunchInfo, drive_index: int, volume) -> str:
    """The libguestfs device of vmafs *volume*, on the drive added *drive_index*-th."""
    disk = info.devices[drive_index]
    if volume.kind == "disk":
        return disk
    if volume.kind == "partition":
        number = volume.name.rsplit("/p", 1)[-1]
        device, seen = f"{disk}{number}", info.partitions
    else:  # "lv": <drive>/<vg>/<lv>
        device, seen = "/dev/" + volume.name[len(volume.drive) + 1 :], info.lvs
    if device not in seen:
        raise GuestError(
            f"{volume.name}: the appliance sees no {device} for it "
            f"(it sees {', '.join(seen) or 'nothing'}); try --engine kernel"
        )
    return device


class Appliance:
    """A launched libguestfs appliance over *drives* (raw image files), read-only.

    One launch per instance; close() shuts it down (also on ``with`` exit),
    unless :meth:`mount_local` handed it over to serve a host directory.
    *tag* marks the worker and its children (:func:`tagged_processes`), so
    they can be found after this process is gone.
    """

    def __init__(self, drives: Sequence[str], *, tag: str | None = None) -> None:
        require()
        self._log = tempfile.TemporaryFile()
        env = libguestfs_env()
        if tag is not None:
            env[TAG_VARIABLE] = tag
        self._proc = subprocess.Popen(
            [system_python(), "-I", WORKER, *drives],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # LIBGUESTFS_DEBUG=1: libguestfs's own log straight to our stderr
            stderr=None if os.environ.get("LIBGUESTFS_DEBUG") else self._log,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches us; we shut the appliance down
        )
        self._detached = False
        self._mountpoints: set[str] = set()
        try:
            launch = self._answer("launch")
        except GuestError as e:
            self.close()
            raise GuestError(
                f"{e} (run with LIBGUESTFS_DEBUG=1 to see libguestfs's log; "
                "or choose --engine kernel)"
            ) from None
        except BaseException:
            self.close()
            raise
        self.info = LaunchInfo(launch["devices"], launch["partitions"], launch["lvs"])

    # -- protocol ---------------------------------------------------------------------

    def call(self, op: str, *args):
        """Send one request and return its ``ok`` value (GuestError on ``error``)."""
        assert self._proc.stdin is not None
        line = json.dumps({"op": op, "args": list(args)}).encode() + b"\n"
        try:
            self._proc.stdin.write(line)
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(op) from None
        return self._answer(op)

    def pread(self, path: str, count: int, offset: int) -> bytes:
        n = self.call("pread", path, count, offset)
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(n)
        if len(data) != n:
            raise self._died("pread")
        return data

    def _answer(self, op: str):
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise self._died(op)
        reply = json.loads(line)
        if "error" in reply:
            raise GuestError(reply["error"], errno_=reply.get("errno"))
        return reply["ok"]

    def _died(self, op: str) -> GuestError:
        self._proc.wait()
        self._log.seek(0)
        tail = self._log.read()[-2000:].decode(errors="replace").strip().splitlines()
        last = tail[-1] if tail else "no output"
        return GuestError(
            f"the libguestfs appliance ended during {op} (exit {self._proc.returncode}): {last}"
        )

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Shut the appliance down and wait for it (its QEMU holds the disk files open)."""
        proc = self._proc
        if proc.poll() is None and not self._detached:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "quit", "args": []}\n')
                proc.stdin.close()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                # the worker's session holds libguestfs's QEMU too: end them together
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._log.close()

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def mount(self, device: str, volume: str) -> ApplianceFS:
        """Mount *device* read-only as the root that paths refer to (one at a time)."""
        try:
            self.call("mount", device)
        except GuestError as e:
            raise GuestError(f"{volume}: the appliance cannot mount {device}: {e}") from None
        return ApplianceFS(self, volume)

    # -- several filesystems on one host directory (mount --guest) -----------------------

    def mount_at(self, device: str, mountpoint: str, fstype: str, volume: str) -> None:
        """Mount *device* read-only on *mountpoint* inside the appliance, beside others.

        The mount point and its parents are made first (libguestfs's
        mkmountpoint: the appliance has no root filesystem to make them in).
        """
        parts = mountpoint.strip("/").split("/")
        try:
            for i in range(1, len(parts) + 1):
                path = "/" + "/".join(parts[:i])
                if path not in self._mountpoints:
                    self.call("mkmountpoint", path)
                    self._mountpoints.add(path)
            self.call("mount_at", device, mountpoint, mount_options(fstype))
        except GuestError as e:
            raise GuestError(f"{volume}: the appliance cannot mount {device}: {e}") from None

    def mount_local(self, directory: str) -> None:
        """Show what :meth:`mount_at` mounted on the host's *directory*, read-only, and
        leave the worker serving it until *directory* is unmounted.

        Everyone may enter (``allow_other``), and the kernel checks the guest's
        own modes and owners (``default_permissions``), as for a kernel mount.
        The mount table names it :data:`FUSE_NAME` (source and ``fuse.`` type).
        After this the instance is done with: close() leaves the worker running.
        """
        options = f"ro,allow_other,default_permissions,fsname={FUSE_NAME},subtype={FUSE_NAME}"
        self.call("mount_local", directory, options)
        self._detached = True
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()


def _entry(path: str, s: dict, target: str | None) -> Entry:
    return Entry(
        path=path,
        kind=kind_of(s["st_mode"]),
        mode=s["st_mode"],
        size=s["st_size"],
        uid=s["st_uid"],
        gid=s["st_gid"],
        nlink=s["st_nlink"],
        atime_ns=s["st_atime_sec"] * 1_000_000_000 + s["st_atime_nsec"],
        mtime_ns=s["st_mtime_sec"] * 1_000_000_000 + s["st_mtime_nsec"],
        target=target,
    )


class ApplianceFS:
    """A :class:`~vmafs.guest.entry.GuestFS` answered by the appliance."""

    def __init__(self, appliance: Appliance, volume: str) -> None:
        self.appliance = appliance
        self.volume = volume

    def _error(self, path: str, e: GuestError) -> GuestError:
        # libguestfs says "lstatns: /x: No such file or directory": keep its reason only
        reason = str(e).rsplit(": ", 1)[-1]
        return GuestError(f"{self.volume}:{path}: {reason}", errno_=e.errno)

    def lstat(self, path: str) -> Entry:
        try:
            s = self.appliance.call("lstat", path)
            target = None
            if kind_of(s["st_mode"]) == "symlink":
                target = self.appliance.call("readlink", path)
        except GuestError as e:
            raise self._error(path, e) from None
        return _entry(path, s, target)

    def scandir(self, path: str) -> list[Entry]:
        try:
            rows = self.appliance.call("scandir", path)
        except GuestError as e:
            raise self._error(path, e) from None
        base = path.rstrip("/")
        return sorted((_entry(f"{base}/{n}", s, t) for n, s, t in rows), key=lambda e: e.path)

    def read(self, path: str, chunk_size: int) -> Iterator[bytes]:
        offset = 0
        while True:
            try:
                data = self.appliance.pread(path, chunk_size, offset)
            except GuestError as e:
                raise self._error(path, e) from None
            if not data:
                return
            offset += len(data)
            yield data


def tagged_processes(tag: str) -> list[int]:
    """The pids of processes started with ``TAG_VARIABLE=tag``: a detached worker, the
    QEMU and recovery process of its appliance (they inherit its environment).

    Precise where a recorded pid is not: a pid can be reused, a random tag is
    not.  Reads /proc/PID/environ, so only this user's processes (all of them
    for root).
    """
    marker = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone meanwhile, or another user's
        if marker in environ.split(b"\0"):
            found.append(int(name))
    return found


def end_tagged(tag: str, timeout: float) -> None:
    """Wait up to *timeout* s for the processes tagged *tag* to exit, then kill them.

    A worker whose host directory was unmounted shuts its appliance down and
    exits by itself; one that hangs, or whose worker was killed and left its
    QEMU behind, is ended with SIGKILL (its QEMU holds the disk files open).
    """
    deadline = time.monotonic() + timeout
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):
        pids = tagged_processes(tag)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise GuestError(f"the appliance's processes {pids} (tag {tag}) survive SIGKILL")
