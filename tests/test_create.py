"""``vmafs create``: image files -> private qemu-storage-daemon -> the backup path -> archive."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import loop_device, unmount, vmafs_cmd
from test_backup_support import (
    MiB,
    archive_disks,
    file_sha256,
    image_sha256,
    leftovers,
    mixed_qcow2,
    one_line_error,
    random_raw,
    run,
    vmafs_verify,
)

from vmafs.archive import Archive

pytestmark = pytest.mark.qemu

TIMEOUT = 120


def create(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        vmafs_cmd("create", *args), capture_output=True, text=True, timeout=TIMEOUT, **kw
    )


def holders(path: Path) -> list[int]:
    """PIDs of processes that have *path* open (e.g. a leaked qemu-storage-daemon)."""
    target = os.path.realpath(path)
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def wait_no_holders(path: Path, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (pids := holders(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_two_disks_efi_size_and_configs(require_qemu, tmp_path):
    """64 MiB + 4608 (qcow2, probed) and 540672 (raw, given): one archive, exact contents."""
    big_raw = random_raw(
        tmp_path / "big.raw", 64 * MiB + 4608, seed=11, zero_ranges=[(16 * MiB, 32 * MiB)]
    )
    big = tmp_path / "big.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", big_raw, big)
    efi = random_raw(tmp_path / "efi.raw", 540672, seed=12, zero_ranges=[(4096, 200000)])
    conf = tmp_path / "qemu-server.conf"
    conf.write_text("efidisk0: local:100/vm-100-disk-1.raw,size=528K\n")
    fw = tmp_path / "qemu-server.fw"
    fw.write_text("[OPTIONS]\nenable: 1\n")
    out = tmp_path / "vzdump-qemu-100-2026_01_01-00_00_00.vma"
    proc = create(out, "-c", conf, "-c", fw, f"drive-scsi0={big}", f"drive-efidisk0={efi}:raw")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert vmafs_verify(out).returncode == 0
    assert archive_disks(out) == {
        "drive-scsi0": (64 * MiB + 4608, file_sha256(big_raw)),
        "drive-efidisk0": (540672, file_sha256(efi)),
    }
    with Archive.open(out) as a:
        assert [d.name for d in a.devices] == ["drive-scsi0", "drive-efidisk0"]
        assert [c.name for c in a.header.configs] == ["qemu-server.conf", "qemu-server.fw"]
    assert leftovers(tmp_path) == [out.name]
    assert holders(big) == [] and holders(efi) == []


def test_mixed_qcow2_backing_chain_and_zstd(require_qemu, tmp_path):
    """A qcow2 overlay over a backing file; output as .vma.zst (read by the reader)."""
    base = mixed_qcow2(tmp_path / "base.qcow2", size=8 * MiB)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 128k", "-c", "write -z 4M 64k", top)
    want = image_sha256(top)
    out = tmp_path / "chain.vma.zst"
    proc = create(out, f"drive-virtio0={top}:qcow2")
    assert proc.returncode == 0, proc.stderr
    assert vmafs_verify(out).returncode == 0
    assert archive_disks(out) == {"drive-virtio0": (want[1], want[0])}


def test_stdout(require_qemu, tmp_path):
    img = random_raw(tmp_path / "d.raw", 1 * MiB, seed=13)
    out = tmp_path / "piped.vma"
    with open(out, "wb") as f:
        proc = subprocess.run(
            vmafs_cmd("create", "-", f"drive-scsi0={img}:raw"),
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
        )
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"drive-scsi0": (1 * MiB, file_sha256(img))}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("d=/nonexistent/x.qcow2", "No such file or directory"),
        ("d={raw}:qcow2", "qcow2"),  # QEMU's "Image is not in qcow2 format"
        ("d={raw}", None),  # ok, used as the control case
    ],
)
def test_errors_are_one_line_and_leave_nothing(require_qemu, tmp_path, spec, message):
    raw = random_raw(tmp_path / "r.raw", 1 * MiB, seed=14)
    out = tmp_path / "e.vma"
    proc = create(out, spec.format(raw=raw))
    if message is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1
    assert message in one_line_error(proc.stderr)
    assert leftovers(tmp_path) == []
    assert holders(raw) == []


def test_same_devname_twice_and_existing_target(require_qemu, tmp_path):
    raw = random_raw(tmp_path / "r.raw", 1 * MiB, seed=15)
    out = tmp_path / "e.vma"
    proc = create(out, f"d={raw}", f"d={raw}")
    assert proc.returncode == 1 and "same device name" in one_line_error(proc.stderr)
    out.write_bytes(b"keep")
    proc = create(out, f"d={raw}")
    assert proc.returncode == 1 and "already exists" in one_line_error(proc.stderr)
    assert "(-f replaces it)" in proc.stderr
    assert out.read_bytes() == b"keep"
    proc = create("--force", out, f"d={raw}")
    assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"d": (1 * MiB, file_sha256(raw))}


@pytest.mark.slow
def test_backup_longer_than_ten_seconds(require_qemu, tmp_path):
    """The daemon survives a backup that outlives trio's idle worker threads (10 s).

    Regression: the daemon was forked in a trio worker thread with
    PR_SET_PDEATHSIG, and the kernel killed it when that *thread* was retired
    after 10 s idle, so every `create` longer than ~10 s failed.  --speed 4M
    on 64 MiB makes the job take ~16 s (QEMU's rate limit; it cannot be faster).
    """
    img = random_raw(tmp_path / "long.raw", 64 * MiB, seed=18, zero_ranges=[(8 * MiB, 4 * MiB)])
    out = tmp_path / "long.vma"
    t0 = time.monotonic()
    proc = create("--speed", "4M", out, f"drive-scsi0={img}:raw")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # precondition of this test, not a performance check: the run did outlive 10 s
    assert elapsed > 11, f"create took only {elapsed:.1f} s; the test did not test anything"
    assert vmafs_verify(out).returncode == 0
    assert archive_disks(out) == {"drive-scsi0": (64 * MiB, file_sha256(img))}
    assert leftovers(tmp_path) == [out.name]
    assert holders(img) == []


def _start_slow_create(tmp_path: Path, **popen):
    img = random_raw(tmp_path / "slow.raw", 16 * MiB, seed=16)
    outdir = tmp_path / "out"
    outdir.mkdir()
    # TMPDIR: the private NBD socket directory of a SIGKILLed run stays in tmp_path
    popen.setdefault("env", {**os.environ, "TMPDIR": str(tmp_path)})
    proc = subprocess.Popen(
        vmafs_cmd("create", "--speed", "1M", outdir / "slow.vma", f"drive-scsi0={img}:raw"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.monotonic() + TIMEOUT
    # running: the temp file exists and the daemon has the image open
    while not (leftovers(outdir) and holders(img)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "create did not start"
        time.sleep(0.02)
    return proc, img, outdir


def test_sigterm_stops_the_daemon_and_removes_the_temp(require_qemu, tmp_path):
    proc, img, outdir = _start_slow_create(tmp_path)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in one_line_error(err)
    assert leftovers(outdir) == []
    assert holders(img) == []


def test_ctrl_c_on_the_process_group_is_a_clean_abort(require_qemu, tmp_path):
    """A terminal's Ctrl-C signals the whole foreground group; the daemon must not
    die first (it has its own session), so vmafs cancels cleanly and says why."""
    proc, img, outdir = _start_slow_create(tmp_path, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in one_line_error(err)
    assert leftovers(outdir) == []
    assert wait_no_holders(img) == []


def test_killed_writer_takes_its_daemon_along(require_qemu, tmp_path):
    """SIGKILL cannot clean up the temp file, but the daemon must not outlive vmafs."""
    proc, img, outdir = _start_slow_create(tmp_path)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert wait_no_holders(img) == []
    assert not (outdir / "slow.vma").exists()


# --- round trip through the mount ----------------------------------------------------


def test_round_trip_ext4_through_vmafs_mount(require_qemu, require_fuse, require_loop, tmp_path):
    """mkfs.ext4 -d -> qcow2 -> vmafs create -> vmafs mount -> losetup -r -> files match."""
    if importlib.util.find_spec("vmafs.mount") is None:
        pytest.skip("vmafs mount is not in this checkout yet")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("vmafs-guest\n")
    (tree / "data").mkdir()
    (tree / "data" / "random.bin").write_bytes(os.urandom(3 * MiB + 123))
    (tree / "data" / "empty").write_bytes(b"")
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", "-d", tree, raw)
    img = tmp_path / "guest.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
    out = tmp_path / "guest.vma"
    proc = create(out, f"drive-scsi0={img}")
    assert proc.returncode == 0, proc.stderr

    mnt = tmp_path / "mnt"
    fs = tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    try:
        run(*vmafs_cmd("mount", out, mnt))
        disk = mnt / "disk-drive-scsi0.raw"
        assert disk.stat().st_size == 32 * MiB
        with loop_device(disk) as dev:
            try:
                run("mount", "-o", "ro,noload", dev, fs)
                cmp = filecmp.dircmp(tree, fs, ignore=["lost+found"])
                assert cmp.left_only == [] and cmp.right_only == [], cmp.report()
                for rel in ("etc/hostname", "data/random.bin", "data/empty"):
                    assert (fs / rel).read_bytes() == (tree / rel).read_bytes(), rel
            finally:
                unmount(fs, fuse=False)
    finally:
        unmount(mnt)


def test_block_device_source(require_qemu, require_loop, tmp_path):
    """A block device (here a read-only loop device) is opened with host_device."""
    raw = random_raw(tmp_path / "lv.raw", 3 * MiB, seed=17, zero_ranges=[(MiB, MiB)])
    out = tmp_path / "blk.vma"
    with loop_device(raw) as dev:
        proc = create(out, f"drive-scsi0={dev}")
        assert proc.returncode == 0, proc.stderr
    assert archive_disks(out) == {"drive-scsi0": (3 * MiB, file_sha256(raw))}
