"""Disk reads answered as pieces of the archive file (spliced by libfuse) or as bytes.

pyfuse3 built with contrib/pyfuse3/read-segments.patch lets ``VmaFS.read``
return ``(fd, offset, length)`` pieces (:meth:`vmafs.archive.Archive.segments`)
that libfuse reads or splices itself; stock pyfuse3 gets bytes.  Both paths
serve the same archive here through the real kernel FUSE, buffered and
direct_io, and every read must equal the disk.  The filesystem runs in a child
process built for the test (``VmaFS(read_segments=...)``), where the bytes
path is made to fail when the pieces path is under test, so a silent fall back
to bytes cannot pass.
"""

from __future__ import annotations

import ast
import errno
import os
import subprocess
from pathlib import Path

import pytest
from conftest import _unavailable
from test_mount_support import check_reads, start_fs, stop_fs
from vmafactory import build_archive, missing_cluster, sparse_disk

from vmafs.format import BLOCK_SIZE, CLUSTER_SIZE

pytestmark = pytest.mark.fuse

_SERVE = r"""
import collections, sys
from vmafs.archive import Archive
from vmafs.fs import VmaFS
from vmafs.mount import MountOptions, fuse_options, serve

archive, mnt, segments, direct_io = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
replies = collections.Counter()  # what disk reads returned, by type
read = VmaFS.read


async def counted(self, fh, off, size):
    reply = await read(self, fh, off, size)
    replies[type(reply).__name__] += 1
    return reply


VmaFS.read = counted
with Archive.open(archive, allow_incomplete=True) as a:
    fs = VmaFS(a, read_segments=segments, direct_io=direct_io)
    ready = lambda message: print(message or "ready", flush=True)
    status = serve(fs, mnt, fuse_options(MountOptions(), archive), ready, 1024)
print(dict(replies), flush=True)
sys.exit(status)
"""


@pytest.fixture
def require_read_segments(require_fuse):
    from vmafs.fs import READ_SEGMENTS_SUPPORTED  # imports pyfuse3

    if not READ_SEGMENTS_SUPPORTED:
        _unavailable("pyfuse3 without read segments (run scripts/setup: contrib/pyfuse3)")


def _serve(archive: Path, mnt: Path, segments: bool, direct_io: bool) -> subprocess.Popen:
    return start_fs(_SERVE, archive, mnt, int(segments), int(direct_io))


def _stop(proc: subprocess.Popen, mnt: Path) -> dict[str, int]:
    """Unmount; the count of disk-read replies by type (``list``: pieces)."""
    return ast.literal_eval(stop_fs(proc, mnt))


# The pieces path only with the patched pyfuse3; the bytes path always.
PATHS = [
    pytest.param(True, id="segments"),
    pytest.param(False, id="bytes"),
]


# Whole stored clusters in archive order: every read of the disk is at most a
# few pieces, so the pieces path must answer all of them.  Mixed: holes,
# clusters with zero blocks, shuffled order and a ragged end: every kind of
# piece, and reads with more pieces than a pipe holds (answered as bytes).
CONTENTS = {
    "in-order": (
        sparse_disk(200 * CLUSTER_SIZE, 20, zero_clusters=0.0, zero_blocks=0.0),
        "in-order",
    ),
    "mixed": (
        sparse_disk(96 * CLUSTER_SIZE + 3 * BLOCK_SIZE + 512, 21, zero_blocks=0.2),
        "shuffled",
    ),
}


@pytest.mark.parametrize("kind", list(CONTENTS))
@pytest.mark.parametrize("direct_io", [False, True], ids=["buffered", "direct_io"])
@pytest.mark.parametrize("segments", PATHS)
def test_reads_equal_the_disk(segments, direct_io, kind, tmp_path, request, require_fuse):
    if segments:
        request.getfixturevalue("require_read_segments")
    content, order = CONTENTS[kind]
    archive = build_archive({"drive-scsi0": content}, order=order, seed=4).write(tmp_path / "a.vma")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _serve(archive, mnt, segments, direct_io)
    try:
        check_reads(mnt / "disk-drive-scsi0.raw", content, seed=5)
    finally:
        replies = _stop(proc, mnt)
    if not segments:
        assert "list" not in replies, replies
    elif kind == "in-order":
        assert set(replies) == {"list"}, replies  # never the bytes path
    else:
        assert replies["list"] > 0 and replies["memoryview"] > 0, replies  # pieces, zeros


@pytest.mark.parametrize("segments", PATHS)
def test_missing_cluster_is_eio_and_the_rest_reads(segments, tmp_path, request, require_fuse):
    if segments:
        request.getfixturevalue("require_read_segments")
    content = sparse_disk(8 * CLUSTER_SIZE, 3, zero_clusters=0.0, zero_blocks=0.0)
    b = build_archive({"drive-scsi0": content, "drive-scsi1": content})
    archive = missing_cluster(b, dev_id=1, cluster=2).write(tmp_path / "incomplete.vma")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = _serve(archive, mnt, segments, True)  # direct_io: each pread is one request
    try:
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, 10, 2 * CLUSTER_SIZE + 5)
            assert e.value.errno == errno.EIO
            assert os.pread(fd, 2 * CLUSTER_SIZE, 0) == content[: 2 * CLUSTER_SIZE]
            assert os.pread(fd, 5 * CLUSTER_SIZE, 3 * CLUSTER_SIZE) == content[3 * CLUSTER_SIZE :]
        finally:
            os.close(fd)
    finally:
        replies = _stop(proc, mnt)
    assert ("list" in replies) == segments, replies


class _Ops:
    def __init__(self, max_pages: int | None) -> None:
        if max_pages is not None:
            self.max_pages = max_pages


@pytest.mark.parametrize(
    "readahead, max_pages, want",
    [
        (1024, 240, 960),  # 960 KiB requests: the window is one request, not 960 + 64
        (4096, 240, 3840),
        (512, 240, 512),  # below one request: as asked
        (0, 240, 0),  # 0: the kernel's value
        (1024, 0, 1024),  # no cap (CAP_SYS_RESOURCE)
        (1024, None, 1024),  # stock pyfuse3: no max_pages at all
    ],
)
def test_readahead_is_whole_requests(readahead, max_pages, want):
    from vmafs.mount.mounting import whole_requests

    assert whole_requests(readahead, _Ops(max_pages)) == want


def test_mount_readahead_matches_the_request_size(tmp_path, require_read_segments):
    from test_mount_support import mounted

    from vmafs.fs import SplicePipe
    from vmafs.mount import DEFAULT_READAHEAD_KB
    from vmafs.mount.mounting import whole_requests

    if os.geteuid() != 0:
        pytest.skip("only root sets a mount's readahead")
    pipe = SplicePipe.probe()
    assert pipe is not None
    want = whole_requests(DEFAULT_READAHEAD_KB, _Ops(pipe.max_pages))
    archive = build_archive({"drive-scsi0": sparse_disk(4 * CLUSTER_SIZE, 1)}).write(
        tmp_path / "a.vma"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(archive, mnt):
        dev = os.stat(mnt).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert int(bdi.read_text()) == want
