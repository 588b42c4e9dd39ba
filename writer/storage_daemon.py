"""qemu-storage-daemon, started the one way vmafs starts it.

``vmafs create`` runs a private daemon (:class:`StorageDaemon`, async): its
QMP monitor is one end of a socketpair (no socket file, no race on a path).
The bench and tests drive a daemon by a socket path instead
(:func:`start_storage_daemon`, synchronous), e.g. as the QEMU that ``vmafs
backup --qmp`` connects to.  Both build the command line with
:func:`daemon_argv`.

The private daemon is stopped in every path: on success, on error, on Ctrl-C,
and, through ``PR_SET_PDEATHSIG``, even when vmafs itself is killed.

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
import subprocess
import tempfile
import time
from collections.abc import Iterable

import trio

from vmafs.errors import BackupError

from .qmp import QmpConnection

__all__ = [
    "StorageDaemon",
    "daemon_argv",
    "raw_image_nodes",
    "start_storage_daemon",
    "stop_storage_daemon",
]

log = logging.getLogger("writer.create")

BINARY = "qemu-storage-daemon"
#: seconds the daemon gets to exit after SIGTERM before SIGKILL
STOP_TIMEOUT = 10.0
#: seconds :func:`start_storage_daemon` waits for the monitor socket to appear
START_TIMEOUT = 10.0

_PR_SET_PDEATHSIG = 1
_MONITOR = "vmafs-qmp"


def daemon_argv(binary: str, chardev: str, blockdevs: Iterable[dict] = ()) -> list[str]:
    """The daemon's command line: one ``--blockdev`` per node, then a QMP monitor on
    the socket *chardev* describes (``fd=N`` or ``path=P,server=on,wait=off``).

    The daemon processes its options in order: the monitor's socket appears
    only once every node has opened, so a client that finds it finds them too.
    """
    argv = [binary]
    for node in blockdevs:
        argv += ["--blockdev", json.dumps(node)]
    return argv + [
        "--chardev",
        f"socket,id={_MONITOR},{chardev}",
        "--monitor",
        f"chardev={_MONITOR}",
    ]


def raw_image_nodes(image: str, node_name: str = "src") -> list[dict]:
    """Block nodes serving the raw file *image* read-only as *node_name* (file + raw)."""
    return [
        {"driver": "file", "filename": image, "node-name": f"{node_name}-file", "read-only": True},
        {"driver": "raw", "file": f"{node_name}-file", "node-name": node_name, "read-only": True},
    ]


def start_storage_daemon(
    qmp_path: str, blockdevs: Iterable[dict] = (), *, binary: str = BINARY
) -> subprocess.Popen:
    """Start a daemon whose QMP monitor listens on the Unix socket *qmp_path*.

    Returns once the socket exists (a client may connect); raises
    :class:`~vmafs.errors.BackupError` if the daemon exits or the socket does
    not appear within ``START_TIMEOUT``.  Stop it with :func:`stop_storage_daemon`.
    """
    path = shutil.which(binary)
    if path is None:
        raise BackupError(f"{binary} not found (Debian package qemu-system-common)")
    if os.path.lexists(qmp_path):
        os.unlink(qmp_path)
    proc = subprocess.Popen(
        daemon_argv(path, f"path={qmp_path},server=on,wait=off", blockdevs),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(qmp_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_storage_daemon(proc)
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise BackupError(f"{binary} did not start: {err or f'exit {proc.returncode}'}")
        time.sleep(0.01)
    proc.stderr.close()  # nobody reads it from here on: it must not fill and block the daemon
    return proc


def stop_storage_daemon(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after *timeout* seconds; reaps it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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

    def __init__(self, binary: str = BINARY) -> None:
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
                daemon_argv(path, f"fd={theirs.fileno()}"),
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
