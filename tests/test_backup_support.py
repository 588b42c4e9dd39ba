"""Real-QEMU helpers shared by tests/test_backup*.py and tests/test_create*.py.

- :class:`Vm`: a ``qemu-system-x86_64 -machine none`` with ``-drive if=none``
  BlockBackends (so HMP ``qemu-io`` writes go through the backup's
  copy-before-write filter, like a guest's) and two QMP sockets: one for
  ``vmafs backup``, one for the test to watch jobs and do guest writes.
- image builders: a qcow2 with data, zero clusters, allocated zeros and
  unallocated clusters; random raw images of exact sizes.
- archive checks: sha256 per device through the reader, the archive's
  cluster order straight from the extent headers (vmafs.format only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import in_ci, vmafs_cmd
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmafs.archive import Archive
from vmafs.format import EXTENT_HEADER_SIZE, ExtentHeader, Header

MiB = 1 << 20
TIMEOUT = 60  # seconds for anything that should take one


# --- images ------------------------------------------------------------------------------


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, timeout=TIMEOUT, **kw
    )


def random_raw(path: Path, size: int, seed: int, zero_ranges=()) -> Path:
    """A raw image of exactly *size* bytes of seeded random data, with zeroed ranges."""
    import random

    data = bytearray(random.Random(seed).randbytes(size))
    for start, length in zero_ranges:
        data[start : start + length] = bytes(length)
    path.write_bytes(data)
    return path


def mixed_qcow2(path: Path, size: int = 20 * MiB) -> Path:
    """A qcow2 with every kind of cluster a real disk has.

    Random data (incompressible), qcow2 zero clusters (``write -z``),
    allocated clusters that hold zeros, unallocated clusters, a cluster with
    only 4 KiB written, and data in the very last cluster.
    """
    raw = path.with_suffix(".seed.raw")
    random_raw(raw, size, seed=1, zero_ranges=[(6 * MiB, 8 * MiB)])  # 8 MiB hole
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -z 1M 1M",  # zero clusters over data
        "-c",
        "write -P 0 3M 192k",  # allocated zeros (arrive as data)
        "-c",
        "write -P 0x5a 7M 4k",  # one block in the hole
        "-c",
        "write -z 9M 64k",  # a zero cluster in the hole
        "-c",
        f"write -P 0xa5 {size - 4096} 4k",  # the last block
        path,
    )
    return path


def image_sha256(path: Path, fmt: str = "qcow2") -> tuple[str, int]:
    """sha256 and size of the guest-visible contents (``qemu-img convert -O raw``)."""
    raw = path.with_name(path.name + ".check.raw")
    try:
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, raw)
        return file_sha256(raw), raw.stat().st_size
    finally:
        raw.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# --- archives ----------------------------------------------------------------------------


def archive_disks(path: Path) -> dict[str, tuple[int, str]]:
    """devname -> (size, sha256) read through the vmafs reader."""
    out = {}
    with Archive.open(path) as a:
        for dev in a.devices:
            h = hashlib.sha256()
            for off in range(0, dev.size, 8 * MiB):
                h.update(a.read(dev.dev_id, off, min(8 * MiB, dev.size - off)))
            out[dev.name] = (dev.size, h.hexdigest())
    return out


def cluster_order(path: Path) -> tuple[Header, list[tuple[int, int]]]:
    """Header and (dev_id, cluster) in the order the extents store them."""
    buf = path.read_bytes()
    header = Header.parse(buf)
    pos, order = header.header_size, []
    while pos < len(buf):
        ext = ExtentHeader.parse(buf[pos : pos + EXTENT_HEADER_SIZE], pos, header.uuid)
        order += [(s.dev_id, s.cluster) for s in ext.slots]
        pos += EXTENT_HEADER_SIZE + ext.block_count * 4096
    assert pos == len(buf)
    return header, order


def vmafs_verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        vmafs_cmd("verify", "--data", path), capture_output=True, text=True, timeout=TIMEOUT
    )


def leftovers(directory: Path) -> list[str]:
    """Names in *directory* that a failed run must not leave (archives, temp files)."""
    return sorted(p.name for p in directory.iterdir() if ".vma" in p.name)


# --- a VM without a guest ----------------------------------------------------------------


class Vm:
    """``qemu-system-x86_64 -machine none`` with drives and two QMP monitors.

    ``drives``: ``{drive_id: (image path, format)}``.  ``vm.qmp_path`` is for
    ``vmafs backup --qmp``; ``vm.mon`` is the test's own QMP client.
    """

    def __init__(
        self,
        qemu_system: str,
        tmp: Path,
        drives: dict[str, tuple[Path, str]],
        *,
        machine: str = "none",
        extra: tuple[str, ...] = (),
    ):
        self.qmp_path = tmp / "vm-vmafs.qmp"
        self.test_path = tmp / "vm-test.qmp"
        argv = [qemu_system, "-machine", machine, "-nodefaults", "-display", "none", *extra]
        for i, path in enumerate((self.qmp_path, self.test_path)):
            argv += ["-chardev", f"socket,id=qmp{i},path={path},server=on,wait=off"]
            argv += ["-mon", f"chardev=qmp{i},mode=control"]
        for drive_id, (image, fmt) in drives.items():
            # auto-read-only=off: with no guest device holding write permission,
            # QEMU would open the image read-only and reopen it read-write when a
            # job or qemu-io needs that, replacing the fd under reads in flight
            # (the job then fails with EBADF, as seen in the bench).
            argv += [
                "-drive",
                f"if=none,id={drive_id},file={image},format={fmt},cache=unsafe,auto-read-only=off",
            ]
        # qemu-io (HMP) prints its results on QEMU's stdout, not into the reply
        self.stdout_path = tmp / "vm-stdout.log"
        with open(self.stdout_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE
            )
        self.mon = self._connect(self.test_path)

    def _connect(self, path: Path) -> QEMUMonitorProtocol:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.proc.stderr.read().decode()}")
            if path.exists():
                mon = QEMUMonitorProtocol(str(path))
                try:
                    mon.connect(negotiate=True)
                    return mon
                except (OSError, Exception):  # noqa: BLE001 - retry until QEMU listens
                    mon.close()
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU's QMP socket did not come up")
            time.sleep(0.05)

    def cmd(self, name: str, **args):
        reply = self.mon.cmd_raw(name, args or None)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']['desc']}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def guest_write(self, drive: str, pattern: int, offset: int, length: int) -> None:
        """A guest-like write through the drive's BlockBackend (and any backup filter).

        Returns when the write has completed (or failed: qemu-io reports that
        only on QEMU's stdout, so tests check the data on the image instead).
        """
        self.hmp(f'qemu-io {drive} "write -P {pattern:#x} {offset} {length}"')

    def our_jobs(self) -> list[dict]:
        return [j for j in self.cmd("query-block-jobs") if j["device"].startswith("vmafs-")]

    def our_nodes(self) -> list[str]:
        return [
            n["node-name"]
            for n in self.cmd("query-named-block-nodes", flat=True)
            if n["node-name"].startswith("vmafs-")
        ]

    def wait_job_running(self, min_offset: int = 0) -> dict:
        """Poll until a vmafs backup job runs (and has copied at least *min_offset*)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            jobs = [j for j in self.our_jobs() if j["status"] == "running"]
            if jobs and jobs[0]["offset"] >= min_offset:
                return jobs[0]
            time.sleep(0.02)
        raise TimeoutError("no vmafs backup job started")

    def wait_event(self, name: str, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.mon.pull_event(wait=max(0.01, deadline - time.monotonic()))
            if ev is not None and ev["event"] == name:
                return ev
        raise TimeoutError(f"no {name} event")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mon.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.stderr.close()


@contextlib.contextmanager
def vm(qemu_system: str, tmp: Path, drives: dict[str, tuple[Path, str]], **kw):
    machine = Vm(qemu_system, tmp, drives, **kw)
    try:
        yield machine
    finally:
        machine.close()


def start_backup(*args, env=None) -> subprocess.Popen:
    """``vmafs backup ARGS`` in the background (its own process group)."""
    return subprocess.Popen(
        vmafs_cmd("backup", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return proc.returncode, out, err


def one_line_error(stderr: str) -> str:
    """The single ``vmafs: error:`` line of a failed run (asserts there is exactly one line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmafs: error: "), stderr
    return lines[0]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m", *, options: str = ""):
    """A tmpfs of *size* mounted on *path* (made here) for a disk-full case; unmounted after.

    Skips on a dev box that cannot mount, fails under CI=true.
    """
    path.mkdir()
    opts = f"size={size}" + (f",{options}" if options else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        (pytest.fail if in_ci() else pytest.skip)(
            f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def wait_for_pid_exit(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
