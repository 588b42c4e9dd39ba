"""``vmafs config``: configuration files byte for byte, like ``vma config``."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from conftest import FIXTURES_DIR, fixture_archives, load_manifest, vmafs_cmd
from test_cli_support import CLUSTER_SIZE, assert_one_line_error, build, run_cli


def _config_bytes(*args) -> bytes:
    proc = subprocess.run(vmafs_cmd("config", *args), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    return proc.stdout


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_every_config_matches_manifest(archive):
    for cfg in load_manifest(archive)["configs"]:
        data = _config_bytes(archive, "-c", cfg["name"])
        assert len(data) == cfg["size"]
        assert hashlib.sha256(data).hexdigest() == cfg["sha256"]


def test_default_is_qemu_server_conf():
    archive = FIXTURES_DIR / "two-disks.vma"
    want = [c for c in load_manifest(archive)["configs"] if c["name"] == "qemu-server.conf"]
    assert hashlib.sha256(_config_bytes(archive)).hexdigest() == want[0]["sha256"]


def test_several_configs_in_given_order():
    archive = FIXTURES_DIR / "two-disks.vma"
    conf = _config_bytes(archive, "-c", "qemu-server.conf")
    fw = _config_bytes(archive, "-c", "qemu-server.fw")
    assert _config_bytes(archive, "-c", "qemu-server.fw", "--config", "qemu-server.conf") == (
        fw + conf
    )


def test_missing_config_names_what_exists():
    line = assert_one_line_error(run_cli("config", FIXTURES_DIR / "two-disks.vma", "-c", "x.fw"))
    assert "'x.fw'" in line
    assert "qemu-server.conf, qemu-server.fw" in line


def test_no_default_config(tmp_path):
    b = build(tmp_path / "a.vma", {"d": bytes(CLUSTER_SIZE)}, [("other.conf", b"z")])
    proc = run_cli("config", b.path)
    assert proc.stdout == ""
    assert "'qemu-server.conf'" in assert_one_line_error(proc)


def test_binary_config_is_exact(tmp_path):
    blob = bytes(range(256)) * 10 + b"\r\n\0tail"
    b = build(tmp_path / "a.vma", {"d": bytes(CLUSTER_SIZE)}, [("qemu-server.conf", blob)])
    assert _config_bytes(b.path) == blob


def test_empty_config(tmp_path):
    b = build(tmp_path / "a.vma", {"d": bytes(CLUSTER_SIZE)}, [("qemu-server.conf", b"")])
    assert _config_bytes(b.path) == b""
