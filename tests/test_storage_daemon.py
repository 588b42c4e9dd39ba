"""vmafs.writer.storage_daemon: how vmafs starts a qemu-storage-daemon (create, bench, tests)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import vmafs_cmd
from test_backup_support import MiB, archive_disks, file_sha256, random_raw
from vmafs.writer.storage_daemon import (
    daemon_argv,
    raw_image_nodes,
    start_storage_daemon,
    stop_storage_daemon,
)

from vmafs.errors import BackupError


def test_argv_has_one_monitor_and_one_blockdev_per_node():
    argv = daemon_argv("qsd", "fd=7", raw_image_nodes("/x.raw"))
    # the nodes first: the monitor's socket appears only once they opened
    assert argv[0] == "qsd" and argv[1:5:2] == ["--blockdev", "--blockdev"]
    assert '"node-name": "src"' in argv[4] and '"read-only": true' in argv[4]
    assert argv[5:] == ["--chardev", "socket,id=vmafs-qmp,fd=7", "--monitor", "chardev=vmafs-qmp"]


def test_a_daemon_by_path_is_what_vmafs_backup_copies(require_qemu, tmp_path):
    image = random_raw(tmp_path / "disk.raw", 2 * MiB, seed=7, zero_ranges=[(MiB, 64 << 10)])
    sock = str(tmp_path / "qsd.sock")
    out = tmp_path / "out.vma"
    qsd = start_storage_daemon(sock, raw_image_nodes(str(image)))
    try:
        assert os.path.exists(sock) and qsd.poll() is None
        proc = subprocess.run(
            vmafs_cmd("backup", "--qmp", sock, "-o", out, "--no-progress", "src=drive-scsi0"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        stop_storage_daemon(qsd)
    assert qsd.returncode is not None
    assert archive_disks(out) == {"drive-scsi0": (2 * MiB, file_sha256(image))}


def test_a_daemon_that_cannot_start_says_why(require_qemu, tmp_path):
    sock = str(tmp_path / "qsd.sock")
    with pytest.raises(BackupError, match="did not start: .*missing.raw"):
        start_storage_daemon(sock, raw_image_nodes(str(tmp_path / "missing.raw")))
    assert not os.path.exists(sock)
