"""Edges of ``vmafs backup``/``create``: socket paths, SIGHUP, a hung QEMU, fake QMP peers.

- a TMPDIR too long for a Unix socket path is one clear line, never a trio
  ``ExceptionGroup``;
- SIGHUP (an ssh session dropping) aborts as cleanly as SIGTERM;
- a QEMU that stops answering during the abort's clean-up: the wait is
  bounded, a third signal cuts it short, and the warning says what may be
  left in QEMU;
- a QMP peer that is not QEMU gets a message saying what the peer did.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio
import vmafs.writer.backup as wb
from conftest import vmafs_cmd
from test_backup_support import (
    TIMEOUT,
    MiB,
    finish,
    leftovers,
    one_line_error,
    random_raw,
    start_backup,
    vm,
)
from vmafs.writer.backup import (
    BackupInterrupted,
    _Abort,
    _on_signal,
    backup,
    parse_drive_spec,
    resolve_disks,
    signal_guard,
)
from vmafs.writer.output import ArchiveOutput
from vmafs.writer.qmp import QemuError, QmpConnection

# --- helpers ------------------------------------------------------------------------------


def long_dir(base: Path) -> Path:
    """A directory whose mkdtemp'd ``vmafs-nbd-XXXXXXXX/nbd.sock`` exceeds 107 bytes."""
    d = base / ("x" * max(1, 100 - len(str(base))))
    d.mkdir()
    assert len(str(d)) + len("/vmafs-nbd-xxxxxxxx/nbd.sock") > 107
    return d


class Lines:
    """A child's stderr, read line by line in a thread, so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._t = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._t.start()

    def _read(self, stream) -> None:
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} on stderr: {''.join(self.seen)}")

    def rest(self) -> str:
        self._t.join(TIMEOUT)
        while (line := self._q.get_nowait() if not self._q.empty() else None) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


# --- 1. socket path too long; exception groups ----------------------------------------------


def test_long_tmpdir_create_is_one_clear_line(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=21)
    tmp = long_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        vmafs_cmd("create", out / "x.vma", f"d={src}:raw"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    assert proc.returncode == 1, proc.stderr
    line = one_line_error(proc.stderr)
    assert "ExceptionGroup" not in line
    assert f"{tmp}/vmafs-nbd-" in line and "nbd.sock" in line and "TMPDIR" in line, line
    assert leftovers(out) == [] and list(tmp.iterdir()) == []


def test_long_tmpdir_backup_is_one_clear_line(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=22)
    tmp = long_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        env = dict(os.environ, TMPDIR=str(tmp))
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", out / "x.vma", "drive-scsi0", env=env)
        )
        assert rc == 1, err
        line = one_line_error(err)
        assert "ExceptionGroup" not in line and "--socket-dir" in line, line
        assert machine.our_nodes() == []
    assert leftovers(out) == [] and list(tmp.iterdir()) == []


class _NoQmp:
    """Enough of a QmpConnection for a backup that fails before its first command."""

    def __init__(self) -> None:
        self.lost = trio.Event()
        self.lost_reason = ""

    async def execute(self, *args, **kw):
        raise AssertionError("no QMP command expected")


def test_error_from_the_nbd_server_nursery_is_not_a_group(tmp_path, monkeypatch):
    """What fails inside backup()'s nurseries comes out as itself (here bind's error)."""
    # past the early check, so that bind() itself fails inside the nursery
    monkeypatch.setattr(wb, "MAX_SOCKET_PATH", 4096, raising=False)
    tmp = long_dir(tmp_path)
    disk = wb.SourceDisk("drive-scsi0", "src0", 1 * MiB, "scsi0")
    output = ArchiveOutput(str(tmp_path / "g.vma"))

    async def main():
        await backup(_NoQmp(), [disk], output, socket_dir=str(tmp))

    with pytest.raises(OSError) as info:
        trio.run(main)
    assert not isinstance(info.value, BaseExceptionGroup)
    assert info.value.errno == errno.ENAMETOOLONG
    assert str(tmp) in str(info.value) and "107" in str(info.value)
    assert leftovers(tmp_path) == [] and list(tmp.iterdir()) == []


def test_signal_guard_unwraps_a_group_of_one():
    async def fn():
        raise ExceptionGroup("from a nursery", [ExceptionGroup("inner", [OSError(5, "boom")])])

    with pytest.raises(OSError, match="boom"):
        trio.run(signal_guard().run, fn)

    async def two():
        raise ExceptionGroup("two", [OSError(5, "a"), ValueError("b")])

    with pytest.raises(ExceptionGroup):  # more than one cause: nothing to choose
        trio.run(signal_guard().run, two)


# --- 2. SIGHUP ----------------------------------------------------------------------------


def test_sighup_aborts_create_cleanly(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 8 * MiB, seed=23)
    tmp = tmp_path / "t"
    tmp.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        vmafs_cmd("create", "-v", "--speed", "1M", out / "sg.vma", f"d1={src}:raw"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    lines = Lines(proc)
    try:
        lines.wait_for("backup jobs started")
        proc.send_signal(signal.SIGHUP)
    finally:
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = lines.rest()
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "vmafs: error: interrupted by SIGHUP; backup cancelled" in err
    assert leftovers(out) == [] and list(tmp.iterdir()) == []


def test_sighup_aborts_backup_cleanly(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=24)
    out = tmp_path / "out"
    out.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", out / "h.vma", "--speed", "1M", "drive-scsi0"
        )
        try:
            machine.wait_job_running()
            proc.send_signal(signal.SIGHUP)
        finally:
            rc, _, err = finish(proc)
        assert rc == 129, err
        assert "interrupted by SIGHUP" in one_line_error(err)
        assert machine.wait_event("BLOCK_JOB_CANCELLED")["data"]["device"].startswith("vmafs-")
        assert machine.our_jobs() == [] and machine.our_nodes() == []
    assert leftovers(out) == []


# --- 3. QEMU hangs during the clean-up ----------------------------------------------------


def test_more_signals_during_the_abort():
    """Second signal: a warning only (the full clean-up goes on); third: stop waiting."""

    async def main():
        abort = _Abort()
        _on_signal(abort, signal.SIGINT)
        assert abort.cause and abort.signum == signal.SIGINT
        _on_signal(abort, signal.SIGINT)
        assert not abort.cleanup_scope.cancel_called
        _on_signal(abort, signal.SIGTERM)
        assert abort.cleanup_scope.cancel_called
        assert abort.cleanup_stopped
        assert abort.signum == signal.SIGINT  # the first signal is the exit status

    trio.run(main)


def test_third_signal_stops_waiting_for_a_stopped_qemu(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=25)
    out = tmp_path / "out"
    out.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        qemu = machine.proc.pid
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", out / "s.vma", "-v", "--speed", "1M", "drive-scsi0"
        )
        lines = Lines(proc)
        try:
            machine.wait_job_running()
            os.kill(qemu, signal.SIGSTOP)
            proc.send_signal(signal.SIGINT)
            lines.wait_for("aborting the backup: interrupted by SIGINT")
            proc.send_signal(signal.SIGINT)
            lines.wait_for("send it again to stop waiting")
            proc.send_signal(signal.SIGTERM)
            # without the third signal this waits CANCEL_TIMEOUT (60 s) for QEMU
            proc.wait(wb.CANCEL_TIMEOUT / 2)
        finally:
            os.kill(qemu, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err = lines.rest()
        assert proc.returncode == 130, err
        assert "vmafs: error: interrupted by SIGINT; backup cancelled" in err
        warning = next(line for line in err.splitlines() if "stopped by a signal" in line)
        assert "-j0" in warning and "-t0" in warning and "may be left in QEMU" in warning
        # what was left goes away: the job fails on the closed socket, and the next
        # backup removes the node
        wait_until(lambda: machine.our_jobs() == [], "the orphaned job never ended")
        assert machine.our_nodes() != []
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", out / "n.vma", "drive-scsi0")
        )
        assert rc == 0, err
        assert "removed node" in err and machine.our_nodes() == []
    assert leftovers(out) == ["n.vma"]


def test_clean_up_timeout_names_what_is_left(require_qemu, tmp_path, monkeypatch, caplog):
    """One signal and a QEMU that never answers: the full (bounded) wait, then a warning
    that says so and names the job and node - not ``cleaning up in QEMU failed: ``."""
    monkeypatch.setattr(wb, "CANCEL_TIMEOUT", 1.5)
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=26)
    out = tmp_path / "out"
    out.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        qemu = machine.proc.pid

        async def main():
            qmp = await QmpConnection.open(str(machine.qmp_path))
            try:
                disks = await resolve_disks(qmp, [parse_drive_spec("drive-scsi0")])
                guard = signal_guard()
                output = ArchiveOutput(str(out / "t.vma"))

                async def interrupt():
                    await trio.to_thread.run_sync(machine.wait_job_running)
                    os.kill(qemu, signal.SIGSTOP)
                    guard.delegate(signal.SIGINT)  # as SignalGuard does on a real SIGINT

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(interrupt)
                    with pytest.raises(BackupInterrupted):
                        await backup(qmp, disks, output, speed=MiB, signals=guard)
            finally:
                os.kill(qemu, signal.SIGCONT)
                await qmp.aclose()

        with caplog.at_level("WARNING", logger="writer.backup"):
            trio.run(main)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "QEMU did not answer within 1.5 s" in text, text
        assert "-j0" in text and "-t0" in text and "may be left in QEMU" in text
        assert "failed: ;" not in text and not text.rstrip().endswith(":")
    assert leftovers(out) == []


def test_nbd_server_failing_mid_backup_aborts_and_cleans_up_qemu(
    require_qemu, tmp_path, monkeypatch
):
    """The NBD server dying while it serves (say EMFILE in accept) takes the abort
    path: a BackupError naming it, the job cancelled, our node deleted, no file."""
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=27)
    out = tmp_path / "out"
    out.mkdir()
    serve = wb.NbdServer.serve

    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:

        async def failing_serve(self, task_status=trio.TASK_STATUS_IGNORED):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, self)
                task_status.started()
                await trio.to_thread.run_sync(machine.wait_job_running)
                raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(wb.NbdServer, "serve", failing_serve)

        async def main():
            qmp = await QmpConnection.open(str(machine.qmp_path))
            try:
                disks = await resolve_disks(qmp, [parse_drive_spec("drive-scsi0")])
                output = ArchiveOutput(str(out / "t.vma"))
                with pytest.raises(wb.BackupError) as info:
                    await backup(qmp, disks, output, speed=MiB)
                return info.value
            finally:
                await qmp.aclose()

        err = trio.run(main)
        assert "the NBD server failed" in str(err) and "Too many open files" in str(err)
        assert machine.our_jobs() == [] and machine.our_nodes() == []
    assert leftovers(out) == []


# --- 4. QMP peers that are not QEMU -------------------------------------------------------

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
    b'"capabilities": []}}\r\n'
)


@contextlib.contextmanager
def fake_peer(path: Path, behaviour):
    """A Unix socket server at *path* that runs *behaviour(conn)* for one client."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    done = threading.Event()

    def serve():
        conn, _ = srv.accept()
        with conn:
            behaviour(conn, done)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield str(path)
    finally:
        done.set()
        srv.close()
        t.join(TIMEOUT)


def open_error(address: str, timeout: float = 10) -> str:
    async def main():
        with pytest.raises(QemuError) as info:
            await QmpConnection.open(address, timeout=timeout)
        return info.value

    e = trio.run(main)
    assert e.lost
    assert "\n" not in str(e)
    return str(e)


def test_peer_that_closes_at_once(tmp_path):
    with fake_peer(tmp_path / "fake.sock", lambda conn, done: None) as addr:
        msg = open_error(addr)
    assert msg.startswith(f"cannot connect to QMP at {addr}: ")
    assert "closed the connection without sending a QMP greeting" in msg, msg


def test_peer_that_greets_but_never_negotiates(tmp_path):
    def greet_then_hang(conn, done):
        conn.sendall(GREETING)
        done.wait(TIMEOUT)

    with fake_peer(tmp_path / "fake.sock", greet_then_hang) as addr:
        msg = open_error(addr, timeout=1)
    assert "no greeting" not in msg
    assert "greeting but did not answer qmp_capabilities within 1 s" in msg, msg


def test_peer_that_greets_then_hangs_up(tmp_path):
    def greet_then_close(conn, done):
        conn.sendall(GREETING)
        conn.recv(4096)

    with fake_peer(tmp_path / "fake.sock", greet_then_close) as addr:
        msg = open_error(addr)
    assert "closed the connection during capabilities negotiation" in msg, msg


def test_peer_that_speaks_something_else(tmp_path):
    def ssh(conn, done):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        done.wait(TIMEOUT)

    with fake_peer(tmp_path / "fake.sock", ssh) as addr:
        msg = open_error(addr)
    assert "greeting is not QMP" in msg and "SSH-2.0" in msg, msg


def test_peer_that_says_nothing(tmp_path):
    with fake_peer(tmp_path / "fake.sock", lambda conn, done: done.wait(TIMEOUT)) as addr:
        msg = open_error(addr, timeout=1)
    assert "no greeting within 1 s" in msg, msg
