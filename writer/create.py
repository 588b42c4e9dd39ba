"""``vmafs create``: an archive from image files, through a private qemu-storage-daemon.

Any image QEMU reads (raw, qcow2, vmdk, a block device, a qcow2 with its
backing chain when its format is given: :func:`_source_node` says why a
guessed format never follows one) becomes a disk of the archive by the same
path as a live backup (:mod:`vmafs.writer.backup`): a qemu-storage-daemon is
started with only a QMP monitor on one end of a socketpair (no socket file,
no race on a path), each image is added read-only with ``blockdev-add`` (so
a bad image is a clean QMP error, not daemon stderr to parse), and the
daemon runs the same ``blockdev-backup`` transaction into the writer's NBD
server.

The daemon is stopped in every path: on success, on error, on Ctrl-C, and,
through ``PR_SET_PDEATHSIG``, even when vmafs itself is killed.

The kernel sends the death signal when the *thread* that forked the daemon
exits, not the process.  So the daemon is forked with :class:`subprocess.Popen`
from the thread running the trio loop (which outlives the daemon), never from
a worker thread: ``trio.lowlevel.open_process`` forks in one of trio's worker
threads, which trio retires after 10 s idle - and the daemon died with it.
Its exit is awaited through a pidfd (``os.pidfd_open`` +
``trio.lowlevel.wait_readable``), so no thread waits either.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from vmafs.errors import BackupError

from .backup import BackupResult, DriveSpec, ProgressFn, SignalGuard, backup, resolve_disks
from .packer import ArchiveOutput, check_names
from .qmp import QmpConnection

__all__ = ["ImageSpec", "StorageDaemon", "create", "parse_image_spec", "probe_format"]

log = logging.getLogger("writer.create")

#: image formats accepted after the last ':' of DEVNAME=IMAGE:FORMAT (QEMU's format drivers)
FORMATS = frozenset("raw qcow2 qcow qed vmdk vdi vhdx vpc parallels dmg cloop bochs luks".split())
#: formats whose blockdev-add takes ``"backing": null`` (no backing chain opened)
_BACKING_FORMATS = frozenset({"qcow2", "qcow", "qed", "vmdk"})
#: seconds the daemon gets to exit after SIGTERM before SIGKILL
STOP_TIMEOUT = 10.0

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ImageSpec:
    """``DEVNAME=IMAGE[:FORMAT]`` from the command line; ``fmt`` None = probe."""

    devname: str
    path: str
    fmt: str | None = None


def parse_image_spec(text: str) -> ImageSpec:
    """Split ``DEVNAME=IMAGE[:FORMAT]``.

    ``:FORMAT`` is taken only when it names a QEMU image format and the whole
    text is not itself an existing file, so paths with colons still work.
    """
    devname, sep, rest = text.partition("=")
    if not sep or not devname or not rest:
        raise ValueError(f"bad image {text!r}: expected DEVNAME=IMAGE[:FORMAT]")
    path, fmt = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and head and not os.path.exists(rest):
        if tail not in FORMATS:
            raise ValueError(
                f"bad image {text!r}: unknown format {tail!r} (one of {', '.join(sorted(FORMATS))})"
            )
        path, fmt = head, tail
    return ImageSpec(devname, path, fmt)


async def probe_image(path: str) -> dict:
    """``qemu-img info`` of *path*: the format it detects and what the image refers to.

    qemu-img gets an absolute path: a relative one with a colon (``c:d.raw``)
    would be taken as a protocol prefix.  It does not open backing files.
    """
    try:
        proc = await trio.run_process(
            ["qemu-img", "info", "--output=json", os.path.abspath(path)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    except FileNotFoundError as e:
        raise BackupError("qemu-img not found (Debian package qemu-utils)") from e
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BackupError(f"{path}: {msg[-1] if msg else 'qemu-img info failed'}")
    return json.loads(proc.stdout)


async def probe_format(path: str) -> str:
    """The image format ``qemu-img info`` detects for *path*."""
    return (await probe_image(path))["format"]


def _other_files(info: dict) -> list[str]:
    """Files besides itself that a probed image would make QEMU read."""
    out = []
    if info.get("backing-filename"):
        out.append(f"backing file {info['backing-filename']}")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        out.append(f"data file {data['data-file']}")
    own = os.path.realpath(info.get("filename", ""))
    for extent in data.get("extents") or []:  # vmdk: a descriptor names its extent files
        name = extent.get("filename", "")
        if name and os.path.realpath(name) != own and f"extent {name}" not in out:
            out.append(f"extent {name}")
    return out


async def _source_node(i: int, img: ImageSpec) -> dict:
    """The read-only ``blockdev-add`` arguments for *img* (format checked or probed).

    The format of an image is only guessed when the user did not name it,
    and a guess must never make vmafs read a file other than the one named:
    a guest owns the bytes of its disk and can write a qcow2 header with a
    backing file such as /etc/shadow into it.  So a block device (LVM, ZFS,
    RBD volume: guest-written raw) without a FORMAT is raw, and a regular
    file that probes as an image referring to other files is refused until
    the user writes IMAGE:FORMAT.
    """
    file_node = _file_node(img.path)
    node = {"node-name": f"src{i}", "read-only": True, "file": file_node}
    if img.fmt is not None:
        return {"driver": img.fmt, **node}
    if file_node["driver"] == "host_device":
        return {"driver": "raw", **node}
    info = await probe_image(img.path)
    fmt = info["format"]
    others = _other_files(info)
    if others:
        raise BackupError(
            f"{img.path}: probed as {fmt} with {', '.join(others)}; an image whose format "
            f"is guessed may not pull in other files: write {img.devname}={img.path}:{fmt} "
            "to follow them"
        )
    if fmt in _BACKING_FORMATS:
        node["backing"] = None  # and none may appear between the probe and the open
    return {"driver": fmt, **node}


def _pdeathsig_hook():
    """A preexec_fn that sets PR_SET_PDEATHSIG=SIGTERM in the child.

    libc's ``prctl`` is looked up here, in the parent: the child (between fork
    and exec) only calls it.  If the parent is already gone by then, the
    signal would never come, so the child exits instead of exec'ing.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return hook


class StorageDaemon:
    """A private qemu-storage-daemon with a QMP monitor, as an async context manager.

    ``async with StorageDaemon() as qsd: await qsd.qmp.execute(...)``.
    Leaving stops it (QMP closed, SIGTERM, SIGKILL after ``STOP_TIMEOUT``).
    """

    def __init__(self, binary: str = "qemu-storage-daemon") -> None:
        self.binary = binary
        self.qmp: QmpConnection | None = None
        self.process: subprocess.Popen | None = None
        self._pidfd: int | None = None
        self._stderr = None

    async def __aenter__(self) -> StorageDaemon:
        path = shutil.which(self.binary)
        if path is None:
            raise BackupError(f"{self.binary} not found (Debian package qemu-system-common)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stderr = tempfile.TemporaryFile()
        try:
            # Popen here, in the trio thread: see the module docs (PDEATHSIG).
            # Forking takes a few ms; nothing else is running in this loop yet.
            self.process = subprocess.Popen(
                [
                    path,
                    "--chardev",
                    f"socket,id=vmafs-qmp,fd={theirs.fileno()}",
                    "--monitor",
                    "chardev=vmafs-qmp",
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                preexec_fn=_pdeathsig_hook(),
                # its own session: a terminal's Ctrl-C goes to vmafs only, which
                # then cancels the jobs cleanly before it stops the daemon
                start_new_session=True,
            )
            try:
                self._pidfd = os.pidfd_open(self.process.pid)
            except (AttributeError, OSError):  # no pidfds: wait() polls
                self._pidfd = None
            theirs.close()
            try:
                self.qmp = await QmpConnection.open(ours, name="qemu-storage-daemon")
            except BackupError as e:
                raise BackupError(f"qemu-storage-daemon did not start: {self._tail() or e}") from e
        except BaseException:
            theirs.close()
            ours.close()
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    def _tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    async def wait(self) -> int:
        """Wait (without a thread) until the daemon has exited; its return code."""
        proc = self.process
        if self._pidfd is not None:
            if proc.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
            return proc.wait()  # exited (pidfd readable): reaps without blocking
        while proc.poll() is None:  # no pidfd (kernel < 5.3): poll
            await trio.sleep(0.05)
        return proc.returncode

    async def aclose(self) -> None:
        if self.qmp is not None:
            await self.qmp.aclose()
            self.qmp = None
        proc = self.process
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(STOP_TIMEOUT):
                    await self.wait()
                if proc.poll() is None:
                    log.warning("qemu-storage-daemon ignored SIGTERM; killing it")
                    proc.kill()
                    await self.wait()
            if proc is not None and proc.returncode not in (0, -signal.SIGTERM):
                log.info("qemu-storage-daemon exited with %s: %s", proc.returncode, self._tail())
        finally:
            if self._pidfd is not None:
                trio.lowlevel.notify_closing(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = None
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


def _file_node(path: str) -> dict:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BackupError(f"{path}: {e.strerror}") from e
    if stat.S_ISBLK(st.st_mode):
        driver = "host_device"
    elif stat.S_ISREG(st.st_mode):
        driver = "file"
    else:
        raise BackupError(f"{path}: not a regular file or block device")
    return {"driver": driver, "filename": os.path.abspath(path)}


async def create(
    output: ArchiveOutput,
    images: Sequence[ImageSpec],
    configs: Iterable[tuple[str, bytes]] = (),
    *,
    speed: int = 0,
    progress: ProgressFn | None = None,
    signals: SignalGuard | None = None,
) -> BackupResult:
    """Write *images* into *output* (which this owns: committed or aborted)."""
    try:
        if not images:
            raise BackupError("no images given")
        if len({i.devname for i in images}) != len(images):
            raise BackupError("two images have the same device name")
        configs = list(configs)
        check_names(
            [i.devname for i in images], [os.path.basename(os.fsdecode(n)) for n, _ in configs]
        )
        nodes = [await _source_node(i, img) for i, img in enumerate(images)]
        async with StorageDaemon() as qsd:
            for img, node in zip(images, nodes, strict=True):
                try:
                    await qsd.qmp.execute("blockdev-add", node)
                except BackupError as e:
                    raise BackupError(
                        f"{img.path}: {e.message.removeprefix('blockdev-add: ')}"
                    ) from e
            sizes = {
                n["node-name"]: n["image"]["virtual-size"]
                for n in await qsd.qmp.execute("query-named-block-nodes", {"flat": True})
            }
            for img, node in zip(images, nodes, strict=True):
                if sizes.get(node["node-name"], 0) <= 0:  # an archive has no empty disks
                    raise BackupError(f"{img.path} (device {img.devname}): the image is empty")
            specs = [
                DriveSpec(n["node-name"], img.devname) for img, n in zip(images, nodes, strict=True)
            ]
            disks = await resolve_disks(qsd.qmp, specs)
            disks = [
                type(d)(d.devname, d.node, d.size, img.path)
                for d, img in zip(disks, images, strict=True)
            ]
            return await backup(
                qsd.qmp,
                disks,
                output,
                configs,
                speed=speed,
                progress=progress,
                signals=signals,
            )
    except BaseException:
        output.abort()
        raise
