"""The extent-header prefetch that overlaps a cold walk with the imports (vmafs.warmup)."""

from __future__ import annotations

import shutil

from conftest import FIXTURES_DIR as FIXTURES
from vmafactory import build_archive, sparse_disk

from vmafs.archive import Archive
from vmafs.format import BLOCK_SIZE, CLUSTER_SIZE
from vmafs.warmup import HeaderWarmer


def _built(tmp_path, slots: int):
    disks = {
        "drive-scsi0": sparse_disk(40 * CLUSTER_SIZE + 3 * BLOCK_SIZE, 31, zero_clusters=0.5),
        "drive-scsi1": sparse_disk(9 * CLUSTER_SIZE, 32),
    }
    path = tmp_path / f"a{slots}.vma"
    path.write_bytes(build_archive(disks, order="shuffled", slots=slots, seed=3).data)
    return path


def _warmed(path) -> int:
    w = HeaderWarmer(str(path))
    w.wait()
    w.stop()  # after the walk ended by itself: nothing to stop, still fine
    return w.headers


def test_reads_every_extent_header_of_a_plain_archive(tmp_path):
    for slots in (1, 7, 59):  # many data-less extents back to back, and full ones
        path = _built(tmp_path, slots)
        w = HeaderWarmer(str(path))
        w.wait()  # the walk ends by itself at the end of the file
        with Archive.open(path) as a:
            assert w.headers == a.index.extents
        w.stop()


def test_stops_at_what_is_not_a_header_and_leaves_compressed_archives_alone(tmp_path):
    path = _built(tmp_path, 7)
    with Archive.open(path) as a:
        extents = a.index.extents
    data = bytearray(path.read_bytes())
    damaged = tmp_path / "damaged.vma"
    # the third extent's magic gone: two headers read, then it stops (no error)
    cut = data.find(b"VMAE", data.find(b"VMAE", data.find(b"VMAE") + 1) + 1)
    data[cut : cut + 4] = b"XXXX"
    damaged.write_bytes(bytes(data))
    assert _warmed(damaged) == 2 < extents
    truncated = tmp_path / "truncated.vma"
    truncated.write_bytes(bytes(path.read_bytes()[: cut + 100]))
    assert _warmed(truncated) <= 3
    zst = tmp_path / "two-disks.vma.zst"
    shutil.copy(FIXTURES / "two-disks.vma.zst", zst)
    assert _warmed(zst) == 0
    assert _warmed(tmp_path / "missing.vma") == 0


def test_stop_ends_the_walk_early(tmp_path):
    path = _built(tmp_path, 1)  # one extent per cluster: many headers
    w = HeaderWarmer(str(path))
    w.stop()
    with Archive.open(path) as a:
        assert w.headers <= a.index.extents
    assert w._thread is None
