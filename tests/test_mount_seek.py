"""lseek(SEEK_DATA/SEEK_HOLE) on mounted disks: holes come from the offset map.

The search itself (``DeviceMap.next_cluster``) is checked against brute
force on maps bigger than its chunks; the rest goes through the real kernel
FUSE: every cluster boundary of a sparse disk, the ragged end, ENXIO, an
incomplete archive's missing cluster (data, never a hole), configs, and
``qemu-img map`` seeing the same holes.  This needs a pyfuse3 with the
lseek handler (contrib/pyfuse3); scripts/setup builds one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import _unavailable
from test_mount_support import GUARD, mounted
from vmafactory import build_archive, missing_cluster, sparse_disk

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE, Device
from vmafs.index import DeviceMap, pack


@pytest.fixture
def mnt(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def require_lseek(require_fuse):
    from vmafs.fs import SEEK_HOLE_SUPPORTED  # imports pyfuse3

    if not SEEK_HOLE_SUPPORTED:
        _unavailable("pyfuse3 without the lseek handler (run scripts/setup: contrib/pyfuse3)")


def _seek(fd: int, off: int, whence: int) -> int | str:
    try:
        return os.lseek(fd, off, whence)
    except OSError as e:
        return errno.errorcode[e.errno]


def _model(holes: list[bool], size: int, off: int, whence: int) -> int | str:
    """What lseek must answer for a disk whose cluster i is a hole iff holes[i]."""
    if off >= size:
        return "ENXIO"
    want_hole = whence == os.SEEK_HOLE
    for c in range(off // CLUSTER_SIZE, len(holes)):
        if holes[c] == want_hole:
            return min(max(off, c * CLUSTER_SIZE), size)
    return size if want_hole else "ENXIO"


# --- the search over the map ------------------------------------------------------------


def test_next_cluster_matches_brute_force():
    rng = np.random.default_rng(7)
    n = 3_000_000  # past several of the search's growing chunks
    packed = np.zeros(n, dtype=np.uint64)
    # Mostly holes, a few long data runs, a few missing clusters (0 = never written).
    packed[:] = pack(512, 0)
    for start in (0, 5, 300, 70_000, 1_500_000, n - 3):
        packed[start : start + 2] = pack(4096, 0xFFFF)
    packed[2_000_000:2_000_010] = 0
    packed[rng.integers(0, n, 40)] = pack(8192, 1)
    dm = DeviceMap(Device(1, "d", n * CLUSTER_SIZE), packed)
    hole = (packed & np.uint64(0xFFFF) == 0) & (packed != 0)
    probes = [0, 1, 4, 6, 7, 299, 302, 69_999, 1_499_999, 1_999_999, 2_000_010, n - 4, n - 1]
    probes += rng.integers(0, n, 60).tolist()
    for start in probes:
        for want in (True, False):
            hits = np.flatnonzero(hole[start:] == want)
            expected = int(hits[0]) + start if hits.size else None
            assert dm.next_cluster(start, hole=want) == expected, (start, want)
    assert dm.next_cluster(n, hole=True) is None


# --- through the mount ---------------------------------------------------------------


def test_seek_data_and_hole_follow_the_map(mnt, tmp_path, require_lseek):
    size = 61 * CLUSTER_SIZE + 4096 + 512  # ragged end
    content = sparse_disk(size, 21, zero_clusters=0.4)
    # A long hole in the middle and a hole as the last whole cluster.
    content = bytearray(content)
    content[20 * CLUSTER_SIZE : 33 * CLUSTER_SIZE] = bytes(13 * CLUSTER_SIZE)
    content[60 * CLUSTER_SIZE : 61 * CLUSTER_SIZE] = bytes(CLUSTER_SIZE)
    content = bytes(content)
    configs = [("qemu-server.conf", b"memory: 512\n")]
    b = build_archive({"drive-scsi0": content}, configs=configs, order="shuffled", seed=3)
    archive = b.write(tmp_path / "sparse.vma")
    nclusters = -(-size // CLUSTER_SIZE)
    holes = [not any(content[c * CLUSTER_SIZE : (c + 1) * CLUSTER_SIZE]) for c in range(nclusters)]
    assert any(holes) and not all(holes) and holes[60]
    offsets = sorted(
        {c * CLUSTER_SIZE + d for c in range(nclusters + 1) for d in (0, 1, CLUSTER_SIZE - 1)}
        | {size - 1, size, size + 1, size + CLUSTER_SIZE}
    )
    with mounted(archive, mnt):
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                got = [_seek(fd, off, whence) for off in offsets]
                want = [_model(holes, size, off, whence) for off in offsets]
                assert got == want, whence
            # Walking data/hole pairs and reading what they span gives the disk back.
            rebuilt = bytearray(size)
            pos = 0
            while (start := _seek(fd, pos, os.SEEK_DATA)) != "ENXIO":
                end = os.lseek(fd, start, os.SEEK_HOLE)
                rebuilt[start:end] = os.pread(fd, end - start, start)
                pos = end
                if pos >= size:
                    break
            assert bytes(rebuilt) == content
        finally:
            os.close(fd)
        conf = mnt / "qemu-server.conf"
        fd = os.open(conf, os.O_RDONLY)
        try:
            assert _seek(fd, 0, os.SEEK_DATA) == 0
            assert _seek(fd, 3, os.SEEK_HOLE) == len(configs[0][1])
            assert _seek(fd, len(configs[0][1]), os.SEEK_DATA) == "ENXIO"
        finally:
            os.close(fd)


def test_missing_cluster_is_data_not_a_hole(mnt, tmp_path, require_lseek):
    content = bytes(8 * CLUSTER_SIZE)  # all zero: every written cluster is a hole
    b = build_archive({"drive-scsi0": content})
    archive = missing_cluster(b, dev_id=1, cluster=5).write(tmp_path / "incomplete.vma")
    with mounted(archive, mnt, "allow_incomplete"):
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            assert _seek(fd, 0, os.SEEK_HOLE) == 0
            assert _seek(fd, 0, os.SEEK_DATA) == 5 * CLUSTER_SIZE
            assert _seek(fd, 5 * CLUSTER_SIZE + 7, os.SEEK_HOLE) == 6 * CLUSTER_SIZE
            assert _seek(fd, 6 * CLUSTER_SIZE, os.SEEK_DATA) == "ENXIO"
        finally:
            os.close(fd)


@pytest.mark.qemu
def test_qemu_img_map_sees_the_holes(mnt, tmp_path, require_lseek, require_qemu):
    content = sparse_disk(300 * CLUSTER_SIZE, 5, zero_clusters=0.5)
    b = build_archive({"drive-scsi0": content}, order="shuffled", seed=1)
    archive = b.write(tmp_path / "map.vma")
    with Archive.open(archive) as a:
        expected = list(a.allocated_ranges(1))
    assert len(expected) > 10
    disk = mnt / "disk-drive-scsi0.raw"
    with mounted(archive, mnt):
        proc = subprocess.run(
            [require_qemu.qemu_img, "map", "--output=json", "-f", "raw", disk],
            capture_output=True,
            text=True,
            check=True,
            timeout=GUARD,
        )
    data = []
    for r in json.loads(proc.stdout):
        if not r["data"]:
            continue
        if data and data[-1][0] + data[-1][1] == r["start"]:
            data[-1] = (data[-1][0], data[-1][1] + r["length"])
        else:
            data.append((r["start"], r["length"]))
    assert data == expected


@pytest.mark.parametrize("supported", [True, False])
@pytest.mark.parametrize(
    "flag, said_word",
    [
        ("SEEK_HOLE_SUPPORTED", "lseek"),
        ("READ_SEGMENTS_SUPPORTED", "pieces of the archive"),
        ("READ_MAPS_SUPPORTED", "from the offset map"),
    ],
)
def test_mount_log_says_what_this_pyfuse3_lacks(
    flag, said_word, supported, tmp_path, monkeypatch, caplog
):
    """One start-up line per missing pyfuse3 extension (contrib/pyfuse3), none when present."""
    import logging

    import vmafs.fs
    from vmafs.fs import VmaFS
    from vmafs.mount import MountOptions
    from vmafs.mount.mounting import _log_start

    archive = build_archive({"drive-scsi0": sparse_disk(CLUSTER_SIZE, 1)}).write(tmp_path / "a.vma")
    monkeypatch.setattr(vmafs.fs, "READ_SEGMENTS_SUPPORTED", True)  # read maps need them
    monkeypatch.setattr(vmafs.fs, flag, supported)
    with Archive.open(archive) as a, caplog.at_level(logging.INFO, logger="vmafs.mount"):
        _log_start(str(archive), "/mnt", MountOptions(), VmaFS(a))
    said = [r.getMessage() for r in caplog.records if said_word in r.getMessage()]
    assert len(said) == (0 if supported else 1)
    assert all("contrib/pyfuse3" in m for m in said)
