"""``vmafs list``: Proxmox ``vma list`` lines, exactly, and the --json form."""

from __future__ import annotations

import json
import struct
import time

import pytest
from conftest import fixture_archives, load_manifest
from test_cli_support import CLUSTER_SIZE, assert_one_line_error, build, patterned_disk, run_cli

UTC = {"TZ": "UTC"}


def _raw_ctime(path) -> int:
    """ctime straight from header bytes 24-31 (independent of vmafs.format)."""
    with open(path, "rb") as f:
        head = f.read(32)
    return struct.unpack(">q", head[24:32])[0]


def _c_ctime_utc(t: int) -> str:
    """What glibc's ctime(3) prints in UTC: 'Thu Jan  1 00:00:00 1970'."""
    return time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(t))


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_list_matches_proxmox_format(archive):
    m = load_manifest(archive)
    expected = [f"CFG: size: {c['size']} name: {c['name']}" for c in m["configs"]]
    expected += [
        f"DEV: dev_id={d['dev_id']} size: {d['size']} devname: {d['name']}"
        for d in sorted(m["devices"], key=lambda d: d["dev_id"])
    ]
    expected.append(f"CTIME: {_c_ctime_utc(_raw_ctime(archive))}")
    proc = run_cli("list", archive, env=UTC)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(line + "\n" for line in expected)
    assert proc.stderr == ""


def test_ctime_is_local_time_like_ctime3(tmp_path):
    b = build(tmp_path / "a.vma", {"drive-scsi0": bytes(CLUSTER_SIZE)}, ctime=0)
    assert run_cli("list", b.path, env=UTC).stdout.endswith("CTIME: Thu Jan  1 00:00:00 1970\n")
    # Proxmox prints local time; so do we.
    out = run_cli("list", b.path, env={"TZ": "Asia/Tokyo"}).stdout
    assert out.endswith("CTIME: Thu Jan  1 09:00:00 1970\n")


def test_vmstate_line(tmp_path):
    disks = {"drive-virtio0": patterned_disk(2 * CLUSTER_SIZE, 1), "vmstate": b"\1" * 100000}
    b = build(tmp_path / "a.vma", disks, ctime=1_700_000_000)
    proc = run_cli("list", b.path, env=UTC)
    assert proc.stdout.splitlines() == [
        "CFG: size: 12 name: qemu-server.conf",
        f"DEV: dev_id=1 size: {2 * CLUSTER_SIZE} devname: drive-virtio0",
        "VMSTATE: dev_id=2 memory: 100000",
        "CTIME: Tue Nov 14 22:13:20 2023",
    ]


def test_names_cannot_forge_lines(tmp_path):
    configs = [("evil\nDEV: dev_id=9 size: 1 devname: fake", b"x"), ("t\x1b[2Jx", b"y")]
    b = build(tmp_path / "a.vma", {"drive-scsi0": bytes(CLUSTER_SIZE)}, configs)
    lines = run_cli("list", b.path, env=UTC).stdout.splitlines()
    assert lines[0] == "CFG: size: 1 name: evil\\nDEV: dev_id=9 size: 1 devname: fake"
    assert lines[1] == "CFG: size: 1 name: t\\x1b[2Jx"
    assert len(lines) == 4


def test_list_reads_only_the_header(tmp_path):
    # Like vma list: a damaged extent stream does not stop listing...
    b = build(tmp_path / "a.vma", {"drive-scsi0": patterned_disk(4 * CLUSTER_SIZE, 2)})
    with open(b.path, "r+b") as f:
        f.truncate(b.extent_offsets[0] + 1000)
    proc = run_cli("list", b.path, env=UTC)
    assert proc.returncode == 0
    assert "DEV: dev_id=1" in proc.stdout
    # ...but a damaged header does.
    with open(b.path, "r+b") as f:
        f.seek(4096 + 40)
        f.write(b"\xff")
    assert "header md5 mismatch" in assert_one_line_error(run_cli("list", b.path))


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_list_json(archive):
    m = load_manifest(archive)
    proc = run_cli("list", "--json", archive)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["ctime"] == _raw_ctime(archive)
    with open(archive, "rb") as f:
        f.seek(8)
        raw_uuid = f.read(16)
    assert obj["uuid"].replace("-", "") == raw_uuid.hex()
    assert obj["complete"] is True
    assert obj["configs"] == [{"name": c["name"], "size": c["size"]} for c in m["configs"]]
    assert [(d["dev_id"], d["name"], d["size"]) for d in obj["devices"]] == [
        (d["dev_id"], d["name"], d["size"]) for d in m["devices"]
    ]
    for d in obj["devices"]:
        assert d["missing_clusters"] == 0
        assert 0 <= d["stored_bytes"] <= d["clusters"] * CLUSTER_SIZE
        assert d["stored_bytes"] % 4096 == 0


def test_list_json_stored_and_missing(tmp_path):
    data = patterned_disk(6 * CLUSTER_SIZE, 3)  # clusters 0,3 zero; 2,5 half; 1,4 full
    b = build(tmp_path / "a.vma", {"drive-scsi0": data}, skip={(1, 4), (1, 5)})
    obj = json.loads(run_cli("list", "--json", b.path).stdout)
    dev = obj["devices"][0]
    assert obj["complete"] is False
    assert dev["missing_clusters"] == 2
    assert dev["stored_bytes"] == (16 + 8) * 4096  # cluster 1 full, cluster 2 half
    assert dev["vmstate"] is False and dev["clusters"] == 6


def test_zero_disk_stores_nothing():
    archive = [p for p in fixture_archives(compressed=False) if p.name == "zero-disk.vma"][0]
    obj = json.loads(run_cli("list", "--json", archive).stdout)
    assert obj["devices"][0]["stored_bytes"] == 0


def test_absurd_ctime_does_not_crash(tmp_path):
    b = build(tmp_path / "a.vma", {"drive-scsi0": bytes(CLUSTER_SIZE)}, ctime=2**62)
    proc = run_cli("list", b.path, env=UTC)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(f"CTIME: (invalid time {2**62})\n")
    obj = json.loads(run_cli("list", "--json", b.path).stdout)
    assert obj["ctime"] == 2**62 and obj["ctime_iso"] is None
