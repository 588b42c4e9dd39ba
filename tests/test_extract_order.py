"""Extracting compressed archives in archive order: one pass, any cluster order."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from test_cli_support import run_cli
from vmafactory import build_archive, sparse_disk

from vmafs.archive import Archive
from vmafs.commands._archive_order import prefers_archive_order, write_in_archive_order
from vmafs.commands.extract import write_sparse

COMPRESSORS = {
    "zst": ["zstd", "-q", "-T1", "-c"],
    "gz": ["gzip", "-c"],
    "lzo": ["lzop", "-c"],
}


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A plain archive in shuffled order (two disks, one with a ragged end, and RAM
    state; zero clusters and partly stored clusters), with its disks' contents."""
    d = tmp_path_factory.mktemp("order")
    disks = {
        "drive-scsi0": sparse_disk((3 << 20) + 4608, 1, zero_clusters=0.2, zero_blocks=0.3),
        "drive-scsi1": sparse_disk(1 << 20, 2),
    }
    ram = sparse_disk(512 << 10, 3, zero_clusters=0.0)
    built = build_archive(disks, vmstate=ram, order="shuffled", seed=7)
    path = d / "shuffled.vma"
    path.write_bytes(built.data)
    return path, {**disks, "vmstate": ram}


def _compress(plain, suffix: str, tmp_path):
    tool = COMPRESSORS[suffix]
    if shutil.which(tool[0]) is None:
        pytest.fail(f"{tool[0]} is not installed (scripts/setup installs it)")
    out = tmp_path / f"{plain.name}.{suffix}"
    with open(plain, "rb") as src, open(out, "wb") as dst:
        subprocess.run(tool, stdin=src, stdout=dst, check=True)
    return out


class _Recorder:
    """A source wrapper that records the preads reaching it."""

    def __init__(self, source) -> None:
        self._source = source
        self.reads: list[tuple[int, int]] = []

    def pread(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self._source.pread(offset, size)

    def close(self) -> None:
        self._source.close()


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_one_forward_pass_writes_every_disk(shuffled, suffix, tmp_path):
    plain, contents = shuffled
    path = _compress(plain, suffix, tmp_path)
    with Archive.open(path, use_sidecar=False) as archive:
        assert prefers_archive_order(archive)
        rec = archive.source = _Recorder(archive.source)
        targets, names = {}, {}
        for dev in archive.devices:
            fd = os.open(tmp_path / f"dev{dev.dev_id}", os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, dev.size)
            targets[dev.dev_id] = (fd, dev.size)
            names[dev.dev_id] = dev.name
        covered = []
        try:
            write_in_archive_order(archive, targets, write_sparse, covered.append)
            for dev_id, (fd, size) in targets.items():
                assert os.pread(fd, size + 1, 0) == contents[names[dev_id]], names[dev_id]
        finally:
            for fd, _ in targets.values():
                os.close(fd)
        expect = sum(n for d in targets for _, n in archive.allocated_ranges(d))
        assert sum(covered) == expect
    # one pass: every read starts past the end of the one before
    ends = [o + n for o, n in rec.reads]
    assert all(o >= e for (o, _), e in zip(rec.reads[1:], ends, strict=False)), rec.reads


def test_plain_archives_keep_disk_order(shuffled):
    with Archive.open(shuffled[0]) as archive:
        assert not prefers_archive_order(archive)


@pytest.mark.parametrize("suffix", sorted(COMPRESSORS))
def test_cli_extract_of_shuffled_compressed_archive(shuffled, suffix, tmp_path):
    plain, contents = shuffled
    path = _compress(plain, suffix, tmp_path)
    out = tmp_path / "out"
    proc = run_cli("extract", path, out)
    assert proc.returncode == 0, proc.stderr
    for name, data in contents.items():
        fname = "vmstate.bin" if name == "vmstate" else f"disk-{name}.raw"
        assert (out / fname).read_bytes() == data, fname
    # the ragged disk is sparse where it stores nothing
    st = os.stat(out / "disk-drive-scsi0.raw")
    assert st.st_blocks * 512 < len(contents["drive-scsi0"])
