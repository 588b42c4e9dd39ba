"""The read lease a mount holds on a plain archive (vmafs/lease.py).

Spliced reads skip their size check while the lease is held; the lease must
make that safe: a process that truncates the archive waits until the mount
checks sizes again, so a read past the new end answers EIO, never zeros.
Where the kernel refuses the lease (here: the archive is open for writing),
the mount still answers EIO.  Real ``vmafs mount`` processes, real truncates.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import unmount, vmafs_cmd
from test_mount_segments import require_read_segments  # noqa: F401 - fixture
from test_mount_support import leases_on
from vmafactory import build_archive

from vmafs.archive import Archive
from vmafs.format import CLUSTER_SIZE

pytestmark = pytest.mark.fuse

CLUSTERS = 64
DISK = "disk-drive-scsi0.raw"


def _archive(tmp_path: Path) -> tuple[Path, bytes]:
    content = os.urandom(CLUSTERS * CLUSTER_SIZE)
    return build_archive({"drive-scsi0": content}).write(tmp_path / "a.vma"), content


def _last_cluster_offset(path: Path) -> tuple[int, int]:
    """The disk offset of the cluster stored last, and where it starts in the archive."""
    with Archive.open(path, use_sidecar=False) as a:
        dev = next(iter(a.index.maps))
        where = [(a.segments(dev, c * CLUSTER_SIZE, 1)[0][1], c) for c in range(CLUSTERS)]
    aoff, cluster = max(where)
    return cluster * CLUSTER_SIZE, aoff


def _mount(archive: Path, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    subprocess.run(vmafs_cmd("mount", archive, mnt), check=True, capture_output=True)


def _pread_uncached(path: Path, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one 4 KiB request, no readahead
        return os.pread(fd, 4096, off)
    finally:
        os.close(fd)


def test_lease_held_and_broken_by_a_truncate(tmp_path, require_read_segments):  # noqa: F811
    archive, content = _archive(tmp_path)
    off, aoff = _last_cluster_offset(archive)
    mnt = tmp_path / "mnt"
    _mount(archive, mnt)
    try:
        assert _pread_uncached(mnt / DISK, 0) == content[:4096]
        assert len(leases_on(archive)) == 1, "the mount holds no read lease on the archive"
        # truncate(2) breaks the lease and waits until the mount gives it up
        os.truncate(archive, aoff)
        assert leases_on(archive) == []
        with pytest.raises(OSError) as e:
            _pread_uncached(mnt / DISK, off)
        assert e.value.errno == errno.EIO
        assert _pread_uncached(mnt / DISK, 0) == content[:4096]  # before the cut: served
    finally:
        unmount(mnt)
    assert leases_on(archive) == []


def test_without_a_lease_reads_past_a_cut_still_fail(tmp_path, require_read_segments):  # noqa: F811
    archive, content = _archive(tmp_path)
    off, aoff = _last_cluster_offset(archive)
    mnt = tmp_path / "mnt"
    writer = os.open(archive, os.O_WRONLY)  # the kernel refuses a read lease meanwhile
    try:
        _mount(archive, mnt)
        try:
            assert leases_on(archive) == []
            assert _pread_uncached(mnt / DISK, 0) == content[:4096]
            os.ftruncate(writer, aoff)
            with pytest.raises(OSError) as e:
                _pread_uncached(mnt / DISK, off)
            assert e.value.errno == errno.EIO
        finally:
            unmount(mnt)
    finally:
        os.close(writer)
