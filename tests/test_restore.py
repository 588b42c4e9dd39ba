"""``vmafs restore`` (qemu-img convert from the exports) and ``vmafs restore --live``
(instant restore: a VM runs on qcow2 images backed by the served backup while
block-stream copies it in), against real QEMU.

The "guest" is HMP ``qemu-io`` on the VM's drive, whose reads and writes take
the same path through the block layer as a guest device's."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import vmafs_cmd
from serve_support import TIMEOUT, compare, extract
from test_backup_support import MiB, one_line_error, vm

pytestmark = pytest.mark.qemu

SIZE = 16 * MiB
#: (pattern, offset, length) written into the source disk before the backup
CONTENT = [(0x11, 0, 4 * MiB), (0x22, 8 * MiB, 2 * MiB), (0x33, 15 * MiB, 1 * MiB)]


def make_archive(tmp: Path, qemu_img: str) -> Path:
    src = tmp / "src.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(src), str(SIZE)], check=True)
    cmds = [a for p, off, n in CONTENT for a in ("-c", f"write -P {p:#x} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(src)], check=True, capture_output=True)
    archive = tmp / "vzdump-qemu-100.vma"
    subprocess.run(
        vmafs_cmd("create", archive, f"drive-scsi0={src}:qcow2"), check=True, capture_output=True
    )
    return archive


def start_live(archive: Path, image: Path, qmp: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        vmafs_cmd(
            "restore", "--live", archive, f"scsi0={image}", "--qmp", qmp, "--no-progress", *extra
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # the images exist and are served
        if line.startswith("ready:"):
            return proc
    proc.wait(TIMEOUT)
    raise AssertionError(f"restore --live never got ready: {proc.stderr.read()}")


def qemu_io_log(machine, since: int) -> str:
    return machine.stdout_path.read_text()[since:]


def io(machine, cmd: str) -> str:
    """Run one qemu-io command on the VM's drive; its output (QEMU prints it on stdout)."""
    before = len(machine.stdout_path.read_text())
    machine.hmp(f'qemu-io d0 "{cmd}"')
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        out = qemu_io_log(machine, before)
        if "\n" in out:
            return out
        time.sleep(0.02)
    raise TimeoutError(f"qemu-io {cmd}: no output")


def job_of(machine) -> dict | None:
    jobs = [j for j in machine.cmd("query-jobs") if j["id"] == "vmafs-restore-scsi0"]
    return jobs[0] if jobs else None


def wait_streaming(machine) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        job = job_of(machine)
        if job and job["status"] == "running" and job["current-progress"] > 0:
            return
        time.sleep(0.05)
    raise TimeoutError("the block-stream job did not start")


def backing_of(qemu_img: str, image: Path) -> str | None:
    info = subprocess.run(
        [qemu_img, "info", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(info).get("backing-filename")


def test_slow_restore_into_qcow2_and_raw(require_qemu, tmp_path):
    archive = make_archive(tmp_path, require_qemu.qemu_img)
    ref = extract(archive, tmp_path / "ref") / "disk-drive-scsi0.raw"
    for name in ("a.qcow2", "b.raw"):
        proc = subprocess.run(
            vmafs_cmd("restore", archive, f"scsi0={tmp_path / name}", "--no-progress"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr
        fmt = name.rsplit(".", 1)[1]
        compare(require_qemu.qemu_img, tmp_path / name, ref, fmt_a=fmt)
    assert backing_of(require_qemu.qemu_img, tmp_path / "a.qcow2") is None


@pytest.mark.slow
def test_live_restore_guest_reads_and_writes_during_the_job(require_qemu, tmp_path):
    archive = make_archive(tmp_path, require_qemu.qemu_img)
    ref = extract(archive, tmp_path / "ref") / "disk-drive-scsi0.raw"
    image = tmp_path / "vm-100-disk-0.qcow2"
    qmp = tmp_path / "vm-vmafs.qmp"  # the Vm's first monitor, for vmafs
    restore = start_live(archive, image, qmp, "--speed", "1M")
    try:
        assert "nbd+unix" in backing_of(require_qemu.qemu_img, image)
        with vm(require_qemu.qemu_system, tmp_path, {"d0": (image, "qcow2")}) as machine:
            wait_streaming(machine)
            # the guest reads the backup's bytes where nothing was copied yet
            for p, off, n in CONTENT:
                out = io(machine, f"read -P {p:#x} {off} {n}")
                assert f"read {n}/{n} bytes" in out and "failed" not in out, out
            assert "failed" not in io(machine, f"read -P 0 {12 * MiB} {MiB}")
            # and writes: into a hole, and a partial cluster inside the backup's data
            writes = [(0x44, 12 * MiB, 64 * 1024), (0x55, 9 * MiB + 4096, 4096)]
            for p, off, n in writes:
                assert f"wrote {n}/{n} bytes" in io(machine, f"write -P {p:#x} {off} {n}")
            assert job_of(machine)["status"] == "running"  # all that happened during the job
            machine.cmd("block-job-set-speed", device="vmafs-restore-scsi0", speed=0)
            out, err = restore.communicate(timeout=TIMEOUT * 2)
            assert restore.returncode == 0, err
            assert "done: the images no longer need the backup" in out
            assert job_of(machine) is None  # dismissed
            # the backup is no longer needed: gone, and the guest reads everything
            archive.unlink()
            for p, off, n in CONTENT:
                if off <= writes[1][1] < off + n:
                    continue
                assert "failed" not in io(machine, f"read -P {p:#x} {off} {n}")
            for p, off, n in writes:
                assert "failed" not in io(machine, f"read -P {p:#x} {off} {n}")
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.communicate()
    assert backing_of(require_qemu.qemu_img, image) is None
    # the slow way: the backup extracted, the same writes applied on top
    cmds = [a for p, off, n in writes for a in ("-c", f"write -P {p:#x} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, str(ref)], check=True, capture_output=True)
    compare(require_qemu.qemu_img, image, ref)


@pytest.mark.slow
def test_server_killed_mid_restore_fails_the_job_and_keeps_guest_writes(require_qemu, tmp_path):
    archive = make_archive(tmp_path, require_qemu.qemu_img)
    image = tmp_path / "vm-100-disk-0.qcow2"
    restore = start_live(archive, image, tmp_path / "vm-vmafs.qmp", "--speed", "256K")
    try:
        with vm(require_qemu.qemu_system, tmp_path, {"d0": (image, "qcow2")}) as machine:
            wait_streaming(machine)
            assert "wrote" in io(machine, f"write -P 0x66 {14 * MiB} 65536")
            restore.send_signal(signal.SIGKILL)  # the NBD server dies with it
            restore.communicate(timeout=TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while (job := job_of(machine)) and job["status"] != "concluded":
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job is not None and job.get("error"), job  # failed, and says so
            # reads of what was never copied fail; the guest's own write is intact
            assert "failed" in io(machine, f"read -P 0x33 {15 * MiB} 65536")
            out = io(machine, f"read -P 0x66 {14 * MiB} 65536")
            assert "read 65536/65536" in out and "failed" not in out, out
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.communicate()
    # on disk too, read without the (gone) backing file
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}, "backing": None}
    out = subprocess.run(
        ["qemu-io", "-r", "-c", f"read -P 0x66 {14 * MiB} 65536", "json:" + json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "read 65536/65536" in out and "failed" not in out


def test_live_errors_before_anything_starts(require_qemu, tmp_path):
    archive = make_archive(tmp_path, require_qemu.qemu_img)
    (tmp_path / "exists.qcow2").write_text("")
    for args, message in [
        (["--live", "scsi0=x.qcow2"], "--live needs --qmp"),
        (["scsi0=x.qcow2", "--qmp", "q"], "--qmp is for --live"),
        (["--live", "--qmp", "q", "scsi0=x.raw:raw"], "qcow2 images only"),
        (["--live", "--qmp", "q", "sata3=x.qcow2"], "sata3: no such disk"),
        (["--live", "--qmp", "q", f"scsi0={tmp_path / 'exists.qcow2'}"], "exists"),
        (["scsi0=/nonexistent/dir/x.raw"], "does not exist"),
    ]:
        proc = subprocess.run(
            vmafs_cmd("restore", archive, *args), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert proc.returncode == 1, (args, proc.stderr)
        assert message in one_line_error(proc.stderr), args
    assert not list(tmp_path.glob("x.*"))


def test_live_restore_waits_for_qemu_and_says_which_image_is_not_open(require_qemu, tmp_path):
    archive = make_archive(tmp_path, require_qemu.qemu_img)
    image = tmp_path / "disk.qcow2"
    restore = start_live(archive, image, tmp_path / "vm-vmafs.qmp", "--wait", "3")
    with vm(require_qemu.qemu_system, tmp_path, {}):  # a VM without that disk
        out, err = restore.communicate(timeout=TIMEOUT)
    assert restore.returncode == 1
    assert f"has not opened {image}" in one_line_error(err)
