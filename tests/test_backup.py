"""``vmafs backup`` against a real QEMU: content, point in time, and every failure path.

The VM is ``qemu-system-x86_64 -machine none`` with ``-drive if=none`` drives
(tests/test_backup_support.py); "guest writes" are HMP ``qemu-io`` writes on
the drive's BlockBackend, which pass through the backup job's
copy-before-write filter exactly like a guest's.
"""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
from conftest import vmafs_cmd
from test_backup_support import (
    MiB,
    archive_disks,
    cluster_order,
    file_sha256,
    finish,
    image_sha256,
    leftovers,
    mixed_qcow2,
    one_line_error,
    random_raw,
    small_tmpfs,
    start_backup,
    vm,
    vmafs_verify,
)
from vmafs.writer.backup import JOB_PERF, default_devname, parse_drive_spec
from vmafs.writer.cli import parse_rate
from vmafs.writer.create import parse_image_spec

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE

pytestmark = pytest.mark.qemu

# --- argument parsing (no QEMU) --------------------------------------------------------


@pytest.mark.parametrize(
    "text, drive, devname",
    [
        ("scsi0", "scsi0", "drive-scsi0"),
        ("drive-scsi0", "drive-scsi0", "drive-scsi0"),
        ("drive0=drive-efidisk0", "drive0", "drive-efidisk0"),
        ("#block123=x", "#block123", "x"),
    ],
)
def test_drive_spec(text, drive, devname):
    spec = parse_drive_spec(text)
    assert (spec.drive, spec.devname) == (drive, devname)
    assert default_devname("virtio1") == "drive-virtio1"


@pytest.mark.parametrize("text", ["", "=x", "scsi0="])
def test_bad_drive_spec(text):
    with pytest.raises(ValueError):
        parse_drive_spec(text)


def test_image_spec(tmp_path):
    odd = tmp_path / "a:b.img"
    odd.write_bytes(b"")
    assert parse_image_spec("d=x.qcow2:qcow2").fmt == "qcow2"
    assert parse_image_spec("d=x.qcow2").fmt is None
    assert parse_image_spec(f"d={odd}").path == str(odd)  # an existing path keeps its colon
    with pytest.raises(ValueError, match="unknown format"):
        parse_image_spec("d=x.img:nosuchformat")
    with pytest.raises(ValueError):
        parse_image_spec("x.img")


@pytest.mark.parametrize(
    "text, value", [("0", 0), ("512", 512), ("4K", 4096), ("1.5M", 3 << 19), ("2MiB/s", 2 * MiB)]
)
def test_parse_rate(text, value):
    assert parse_rate(text) == value


# --- content --------------------------------------------------------------------------


def test_qcow2_with_data_zero_and_unallocated_clusters(require_qemu, tmp_path):
    """Every kind of qcow2 cluster -> archive -> verify passes, sha256 equals the source."""
    src = mixed_qcow2(tmp_path / "src.qcow2")
    want_sha, size = image_sha256(src)
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(b"scsi0: local:100/vm-100-disk-0.qcow2,size=20M\n")
    out = tmp_path / "vzdump-qemu-100.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "qcow2")}) as machine:
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", out, "-c", conf, "drive-scsi0")
        )
        assert rc == 0, err
        assert err == ""
        assert machine.our_jobs() == [] and machine.our_nodes() == []
    assert leftovers(tmp_path) == [out.name]
    check = vmafs_verify(out)
    assert check.returncode == 0, check.stderr
    assert archive_disks(out) == {"drive-scsi0": (size, want_sha)}
    with Archive.open(out) as a:
        assert [(c.name, c.data) for c in a.header.configs] == [
            ("qemu-server.conf", conf.read_bytes())
        ]
        dm = a.index.maps[1]
        zero = int(((dm.offsets != 0) & (dm.masks == 0)).sum())
    # the 8 MiB hole (minus the one 4 KiB write), the 1 MiB write -z and the
    # allocated zeros are all stored as zero clusters (metadata only)
    assert zero >= (8 * MiB + 1 * MiB + 192 * 1024) // CLUSTER_SIZE - 1
    assert out.stat().st_size < size - 8 * MiB


def test_two_drives_by_drive_id_and_node_name(require_qemu, tmp_path):
    """DRIVE=DEVNAME, a node name as DRIVE, and an odd size: one transaction."""
    a = random_raw(tmp_path / "a.raw", 4 * MiB + 4608, seed=2)
    b = random_raw(tmp_path / "b.raw", 540672, seed=3)
    out = tmp_path / "two.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"d0": (a, "raw"), "d1": (b, "raw")}) as machine:
        node_b = next(x for x in machine.cmd("query-block") if x["device"] == "d1")["inserted"][
            "node-name"
        ]
        rc, _, err = finish(
            start_backup(
                "--qmp", machine.qmp_path, "-o", out, "d0=drive-scsi0", f"{node_b}=drive-efidisk0"
            )
        )
        assert rc == 0, err
    assert archive_disks(out) == {
        "drive-scsi0": (a.stat().st_size, file_sha256(a)),
        "drive-efidisk0": (b.stat().st_size, file_sha256(b)),
    }


def test_drives_by_guest_device_id(require_qemu, tmp_path):
    """A paused PC with virtio disks: one on a named -drive, one on an anonymous
    -blockdev (how libvirt and modern setups attach disks); both found by the
    guest device's id, default devnames drive-<id>."""
    a = random_raw(tmp_path / "a.raw", 2 * MiB, seed=20)
    b = random_raw(tmp_path / "b.raw", 1 * MiB + 512, seed=21)
    extra = (
        "-S",
        "-drive", f"if=none,id=drive-virtio0,file={a},format=raw",
        "-device", "virtio-blk-pci,drive=drive-virtio0,id=virtio0",
        "-blockdev",
        f'{{"driver":"raw","node-name":"n1","file":{{"driver":"file","filename":"{b}"}}}}',
        "-device", "virtio-blk-pci,drive=n1,id=virtio1",
    )  # fmt: skip
    out = tmp_path / "pc.vma"
    with vm(require_qemu.qemu_system, tmp_path, {}, machine="pc", extra=extra) as machine:
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", out, "virtio0", "virtio1")
        )
        assert rc == 0, err
    assert archive_disks(out) == {
        "drive-virtio0": (2 * MiB, file_sha256(a)),
        "drive-virtio1": (1 * MiB + 512, file_sha256(b)),
    }


# --- point in time --------------------------------------------------------------------


def test_point_in_time_under_guest_writes(require_qemu, tmp_path):
    """Guest writes to clusters not yet copied: the archive holds the ORIGINAL data.

    The backup is throttled (QEMU's job speed) so the background copy is still
    near the start when the guest overwrites clusters near the end; each such
    write makes QEMU push the cluster's old data first, so those clusters are
    stored early and out of order.
    """
    size = 16 * MiB
    src = random_raw(tmp_path / "src.raw", size, seed=4)
    original = file_sha256(src)
    out = tmp_path / "pit.vma"
    targets = [12 * MiB + i * 256 * 1024 for i in range(16)]  # 16 clusters in the last 4 MiB
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup("--qmp", machine.qmp_path, "-o", out, "--speed", "4M", "drive-scsi0")
        try:
            machine.wait_job_running()
            for off in targets:
                machine.guest_write("drive-scsi0", 0xAB, off, CLUSTER_SIZE)
            jobs = machine.our_jobs()
            # the writes happened while the job was still far from them
            assert jobs and jobs[0]["offset"] < 12 * MiB, jobs
        finally:
            rc, _, err = finish(proc)
        assert rc == 0, err
    # the guest's writes really landed on the disk
    with open(src, "rb") as f:
        for off in targets:
            f.seek(off)
            assert f.read(CLUSTER_SIZE) == b"\xab" * CLUSTER_SIZE
    assert vmafs_verify(out).returncode == 0
    assert archive_disks(out) == {"drive-scsi0": (size, original)}

    _, order = cluster_order(out)
    clusters = [c for _, c in order]
    assert sorted(clusters) == list(range(size // CLUSTER_SIZE))
    assert clusters != sorted(clusters), "cluster order is ascending: no copy-before-write seen"
    pos = {c: i for i, c in enumerate(clusters)}
    written = [off // CLUSTER_SIZE for off in targets]
    # every overwritten cluster was stored before the background copy reached 12 MiB
    assert max(pos[c] for c in written) < pos[12 * MiB // CLUSTER_SIZE - 1]


# --- failures --------------------------------------------------------------------------


def test_writer_killed_fails_the_job_and_leaves_no_archive(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=5)
    out = tmp_path / "killed.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup("--qmp", machine.qmp_path, "-o", out, "--speed", "1M", "drive-scsi0")
        try:
            job = machine.wait_job_running()
        finally:
            proc.kill()
            proc.communicate()
        ev = machine.wait_event("BLOCK_JOB_COMPLETED")
        assert ev["data"]["device"] == job["device"]
        assert ev["data"].get("error"), ev  # the job failed, it did not "complete"
        assert machine.our_jobs() == []
        # guest writes work again once the job is gone
        machine.guest_write("drive-scsi0", 0x11, 15 * MiB, CLUSTER_SIZE)
        # the killed writer's target node is still there; the next backup removes it
        stale = machine.our_nodes()
        assert len(stale) == 1
        rc, _, err = finish(start_backup("--qmp", machine.qmp_path, "-o", out, "drive-scsi0"))
        assert rc == 0 and f"removed node {stale[0]} left behind by a killed vmafs" in err
        assert machine.our_nodes() == []
        out.unlink()
    assert not out.exists()
    with open(src, "rb") as f:
        f.seek(15 * MiB)
        assert f.read(CLUSTER_SIZE) == b"\x11" * CLUSTER_SIZE


def test_qemu_killed_writer_exits_nonzero_and_removes_its_temp(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=6)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "gone.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup("--qmp", machine.qmp_path, "-o", out, "--speed", "1M", "drive-scsi0")
        try:
            machine.wait_job_running(min_offset=1)
            assert leftovers(outdir), "no temp file while the backup runs"
            machine.kill()
        finally:
            rc, _, err = finish(proc)
    assert rc == 1
    line = one_line_error(err)
    assert "QEMU went away" in line, line
    assert leftovers(outdir) == []


def test_disk_full_is_a_clean_error_and_guest_writes_never_fail(require_qemu, tmp_path):
    """The archive's file system fills up while the guest keeps writing to
    clusters not yet copied: vmafs fails with one line and cleans up, and every
    guest write lands (an aborting writer acknowledges instead of failing the
    copy-before-write a guest write waits on)."""
    size = 16 * MiB
    src = random_raw(tmp_path / "src.raw", size, seed=7)
    blocks = []
    with small_tmpfs(tmp_path / "small") as small:
        out = small / "full.vma"
        with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
            proc = start_backup(
                "--qmp", machine.qmp_path, "-o", out, "--speed", "8M", "drive-scsi0"
            )
            try:
                machine.wait_job_running()
                # one 4 KiB block per write, each in a different place, walking
                # down from the end so the first write to each cluster is a CBW
                for i in range(8 * MiB // 4096):
                    if proc.poll() is not None:
                        break
                    off = size - (i + 1) * 4096 * 17 % (8 * MiB) - 4096
                    machine.guest_write("drive-scsi0", 0xEE, off, 4096)
                    blocks.append(off)
            finally:
                rc, _, err = finish(proc)
            assert machine.our_jobs() == [] and machine.our_nodes() == []
        assert rc == 1
        assert "No space left on device" in one_line_error(err)
        assert leftovers(small) == []
    assert blocks, "the backup failed before the guest could write"
    with open(src, "rb") as f:
        for off in blocks:
            f.seek(off)
            assert f.read(4096) == b"\xee" * 4096, f"guest write at {off} failed"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_cancels_jobs_removes_nodes_and_temp(require_qemu, tmp_path, sig, status):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=8)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "sig.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup("--qmp", machine.qmp_path, "-o", out, "--speed", "1M", "drive-scsi0")
        try:
            machine.wait_job_running()
            proc.send_signal(sig)
        finally:
            rc, _, err = finish(proc)
        assert rc == status, err
        assert f"interrupted by {sig.name}" in one_line_error(err)
        ev = machine.wait_event("BLOCK_JOB_CANCELLED")
        assert ev["data"]["device"].startswith("vmafs-")
        assert machine.our_jobs() == [] and machine.our_nodes() == []
    assert leftovers(outdir) == []


def test_unknown_drive_and_existing_target(require_qemu, tmp_path):
    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=9)
    out = tmp_path / "x.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = subprocess.run(
            vmafs_cmd("backup", "--qmp", machine.qmp_path, "-o", out, "nosuch"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        line = one_line_error(proc.stderr)
        assert "no drive or block node 'nosuch'" in line and "drive-scsi0" in line
        assert leftovers(tmp_path) == []
        out.write_bytes(b"precious")
        proc = subprocess.run(
            vmafs_cmd("backup", "--qmp", machine.qmp_path, "-o", out, "drive-scsi0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1 and "already exists" in one_line_error(proc.stderr)
        assert "(-f replaces it)" in proc.stderr
        assert out.read_bytes() == b"precious"
        assert machine.our_nodes() == []


def test_qmp_over_tcp(require_qemu, tmp_path):
    """--qmp HOST:PORT (QEMU listening on TCP) works like a socket path."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=13)
    extra = ("-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off")
    out = tmp_path / "tcp.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}, extra=extra):
        rc, _, err = finish(start_backup("--qmp", f"127.0.0.1:{port}", "-o", out, "drive-scsi0"))
        assert rc == 0, err
    assert archive_disks(out) == {"drive-scsi0": (1 * MiB, file_sha256(src))}


def test_qmp_socket_busy_with_another_client(require_qemu, tmp_path):
    """QEMU serves one client per QMP socket; a second one gets no greeting."""
    import trio
    from vmafs.writer.qmp import QemuError, QmpConnection

    src = random_raw(tmp_path / "src.raw", 1 * MiB, seed=14)
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:

        async def second_client():
            with pytest.raises(QemuError, match="another client connected"):
                await QmpConnection.open(str(machine.test_path), timeout=1)

        trio.run(second_client)
        assert machine.cmd("query-block-jobs") == []  # the first client still works


def test_no_qemu_listening(tmp_path):
    proc = subprocess.run(
        vmafs_cmd("backup", "--qmp", tmp_path / "none.qmp", "-o", tmp_path / "x.vma", "scsi0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot connect to QMP" in one_line_error(proc.stderr)
    assert leftovers(tmp_path) == []


def test_speed_really_throttles(require_qemu, tmp_path):
    """--speed reaches QEMU's job (what the point-in-time test relies on)."""
    src = random_raw(tmp_path / "src.raw", 4 * MiB, seed=10)
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", tmp_path / "s.vma", "--speed", "1M", "drive-scsi0"
        )
        try:
            job = machine.wait_job_running()
            assert job["speed"] == MiB
        finally:
            proc.send_signal(signal.SIGINT)
            finish(proc)


def test_job_copies_in_small_requests(require_qemu, tmp_path):
    """The job runs with JOB_PERF: copies of at most 256 KiB (QEMU's default is
    1 MiB), so a guest write's copy-before-write never queues behind more than
    max-workers x 256 KiB of backup data (docs/backup.md)."""
    src = random_raw(tmp_path / "src.raw", 4 * MiB, seed=11)
    out = tmp_path / "small.vma"
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        rc, _, err = finish(start_backup("--qmp", machine.qmp_path, "-o", out, "-v", "drive-scsi0"))
    assert rc == 0, err
    requests = int(re.search(r"over (\d+) requests", err).group(1))
    assert requests >= 4 * MiB // JOB_PERF["max-chunk"], err
    assert archive_disks(out) == {"drive-scsi0": (4 * MiB, file_sha256(src))}


def test_job_cancelled_by_someone_else(require_qemu, tmp_path):
    """block-job-cancel from another monitor: an error, nodes removed, no archive."""
    src = random_raw(tmp_path / "src.raw", 16 * MiB, seed=11)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        proc = start_backup(
            "--qmp", machine.qmp_path, "-o", outdir / "c.vma", "--speed", "1M", "drive-scsi0"
        )
        try:
            job = machine.wait_job_running()
            machine.cmd("block-job-cancel", device=job["device"], force=True)
        finally:
            rc, _, err = finish(proc)
        assert rc == 1
        assert "backup job of drive-scsi0 was cancelled" in one_line_error(err)
        assert machine.our_jobs() == [] and machine.our_nodes() == []
    assert leftovers(outdir) == []


def test_refused_transaction_removes_the_target_nodes(require_qemu, tmp_path):
    """QEMU refuses the transaction (the drive is busy in another backup job)."""
    src = random_raw(tmp_path / "src.raw", 4 * MiB, seed=12)
    with vm(require_qemu.qemu_system, tmp_path, {"drive-scsi0": (src, "raw")}) as machine:
        machine.cmd("blockdev-add", driver="null-co", **{"node-name": "other", "size": 4 * MiB})
        machine.cmd(
            "blockdev-backup",
            device="drive-scsi0",
            target="other",
            sync="full",
            speed=1,
            **{"job-id": "other-job"},
        )
        rc, _, err = finish(
            start_backup("--qmp", machine.qmp_path, "-o", tmp_path / "b.vma", "drive-scsi0")
        )
        assert rc == 1
        line = one_line_error(err)
        assert "transaction" in line and "busy" in line, line
        assert machine.our_nodes() == []
        assert [j["device"] for j in machine.cmd("query-block-jobs")] == ["other-job"]
        machine.cmd("block-job-cancel", device="other-job", force=True)
    assert leftovers(tmp_path) == []
