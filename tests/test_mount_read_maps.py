"""Disk reads that pyfuse3 answers in C from the offset map (contrib/pyfuse3/read-maps.patch).

While a mount holds its read lease on a plain archive, ``VmaFS.hold_size``
hands every disk's offset map to ``pyfuse3.set_read_map``: a read whose
clusters are all stored whole never reaches ``VmaFS.read``.  The filesystem
runs in a child process that counts the disk reads Python answers, through
the real kernel FUSE; every read must equal the disk, and exactly the reads
the map cannot answer (holes, clusters with zero blocks, the ragged end) may
reach Python.  Without read maps every read reaches Python, so a silent fall
back fails the in-order case.  What happens when the lease breaks is in
tests/test_mount_lease.py (a truncate: reads past the cut answer EIO).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import _unavailable
from test_mount_support import check_reads, leases_on, start_fs, stop_fs, wait_until
from vmafactory import build_archive, sparse_disk

from vmafs.archive import Archive
from vmafs.format import BLOCK_SIZE, CLUSTER_SIZE, FULL_MASK

pytestmark = pytest.mark.fuse

DISK = "disk-drive-scsi0.raw"

_SERVE = r"""
import sys
from vmafs.archive import Archive
from vmafs.fs import VmaFS
from vmafs.mount import MountOptions, fuse_options, serve

archive, mnt, maps, direct_io = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
python_reads = 0  # disk reads that reached VmaFS.read
read = VmaFS.read


async def counted(self, fh, off, size):
    global python_reads
    if self.entries[fh].dev_id is not None:
        python_reads += 1
    return await read(self, fh, off, size)


VmaFS.read = counted
with Archive.open(archive) as a:
    fs = VmaFS(a, read_maps=maps, direct_io=direct_io)
    ready = lambda message: print(message or "ready", flush=True)
    status = serve(
        fs, mnt, fuse_options(MountOptions(), archive), ready, 1024, alongside=fs.background_tasks()
    )
print(python_reads, flush=True)
sys.exit(status)
"""


@pytest.fixture
def require_read_maps(require_fuse):
    from vmafs.fs import READ_MAPS_SUPPORTED  # imports pyfuse3

    if not READ_MAPS_SUPPORTED:
        _unavailable("pyfuse3 without read maps (run scripts/setup: contrib/pyfuse3)")


def _serve(archive: Path, mnt: Path, maps: bool, direct_io: bool) -> subprocess.Popen:
    mnt.mkdir()
    proc = start_fs(_SERVE, archive, mnt, int(maps), int(direct_io))
    # The maps go to pyfuse3 once the lease is held (a task started beside the loop).
    wait_until(lambda: leases_on(archive), 10, "the mount's read lease")
    return proc


def _stop(proc: subprocess.Popen, mnt: Path) -> int:
    """Unmount; how many disk reads reached VmaFS.read."""
    return int(stop_fs(proc, mnt))


def _full_clusters(archive: Path) -> set[int]:
    """The clusters of drive-scsi0 stored whole (what a read map answers)."""
    with Archive.open(archive, use_sidecar=False) as a:
        masks = next(iter(a.index.maps.values())).masks
        return {int(c) for c in (masks == FULL_MASK).nonzero()[0]}


IN_ORDER = sparse_disk(200 * CLUSTER_SIZE, 20, zero_clusters=0.0, zero_blocks=0.0)
MIXED = sparse_disk(96 * CLUSTER_SIZE + 3 * BLOCK_SIZE + 512, 21, zero_blocks=0.2)


@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct_io"])
@pytest.mark.parametrize("maps", [True, False], ids=["maps", "no-maps"])
def test_whole_clusters_never_reach_python(maps, direct_io, tmp_path, request, require_fuse):
    if maps:
        request.getfixturevalue("require_read_maps")
    archive = build_archive({"drive-scsi0": IN_ORDER}, order="in-order", seed=3).write(
        tmp_path / "a.vma"
    )
    mnt = tmp_path / "mnt"
    proc = _serve(archive, mnt, maps, direct_io)
    try:
        check_reads(mnt / DISK, IN_ORDER, seed=6)
    finally:
        python_reads = _stop(proc, mnt)
    if maps:
        # Stored in disk order, every request is one run of the archive.  (One
        # that needs more runs than a spliced reply holds goes to Python: a
        # shuffled disk's 960 KiB readahead requests often do.)
        assert python_reads == 0
    else:
        assert python_reads > 0


def test_only_what_the_map_cannot_answer_reaches_python(tmp_path, require_read_maps):
    archive = build_archive({"drive-scsi0": MIXED}, order="shuffled", seed=4).write(
        tmp_path / "a.vma"
    )
    full = _full_clusters(archive)
    clusters = (len(MIXED) + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    other = sorted(set(range(clusters)) - full)
    assert full and other  # the content has both kinds
    mnt = tmp_path / "mnt"
    proc = _serve(archive, mnt, maps=True, direct_io=True)  # one request per pread
    expect = 0
    try:
        fd = os.open(mnt / DISK, os.O_RDONLY)
        try:
            rng = random.Random(7)
            for i in range(400):
                mapped = i % 2 == 0
                c = rng.choice(sorted(full) if mapped else other)
                start = c * CLUSTER_SIZE
                end = min(start + CLUSTER_SIZE, len(MIXED))
                off = rng.randrange(start, end)
                n = rng.randint(1, end - off)  # within the one cluster
                assert os.pread(fd, n, off) == MIXED[off : off + n], (c, off, n)
                expect += not mapped
        finally:
            os.close(fd)
    finally:
        python_reads = _stop(proc, mnt)
    assert python_reads == expect


@pytest.mark.parametrize(
    "table, why",
    [
        (memoryview(bytes(64)).cast("I"), "64-bit"),  # 32-bit entries
        (memoryview(bytes(64)).cast("Q", (2, 4)), "one-dimensional"),
    ],
)
def test_set_read_map_refuses_a_table_of_the_wrong_shape(table, why, require_read_maps):
    import pyfuse3

    with pytest.raises(ValueError, match=why):
        pyfuse3.set_read_map(99, 0, table, 1, 1, block_bits=16, flag_bits=16, unit_bits=9,
                             max_pieces=1)  # fmt: skip
    pyfuse3.clear_read_maps(99)


def test_one_worker_task_unless_handlers_wait(tmp_path):
    """Inline handlers run to their end: one pyfuse3 worker; threaded reads wait: many."""
    from vmafs.fs import VmaFS

    archive = build_archive({"drive-scsi0": IN_ORDER[: 4 * CLUSTER_SIZE]}).write(tmp_path / "a.vma")
    with Archive.open(archive) as a:
        assert VmaFS(a).worker_tasks == 1
        assert VmaFS(a, threaded=True).worker_tasks > 1
