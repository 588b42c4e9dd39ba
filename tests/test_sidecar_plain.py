"""The side index of a plain archive: the offset map saved by ``vmafs index`` so
that an open on storage that seeks reads one file instead of every extent header."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import FIXTURES_DIR

from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.cli import main
from vmafs.errors import IndexCacheError, VmaError
from vmafs.format import EXTENT_HEADER_SIZE, Header
from vmafs.source import open_source


@pytest.fixture
def plain(tmp_path) -> str:
    dst = tmp_path / "ext4-guest.vma"
    shutil.copyfile(FIXTURES_DIR / "ext4-guest.vma", dst)
    return str(dst)


def _middle_header(path: str) -> int:
    """Offset of an extent header well away from the 64 KiB edges the side index hashes."""
    with open(path, "rb") as f:
        data = f.read()
    pos = Header.peek_size(data[: 1 << 20])
    size = len(data)
    while pos < size:
        if sidecar.EDGE + 4096 < pos < size - sidecar.EDGE - 4096:
            return pos
        pos += EXTENT_HEADER_SIZE + 4096 * int.from_bytes(data[pos + 6 : pos + 8], "big")
    raise AssertionError("no extent header in the middle of the fixture")


def _damage_keeping_identity(path: str, offset: int) -> None:
    """Flip the magic of the extent header at *offset*; size and mtime stay as they were."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"XXXX")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _arrays(a: Archive) -> dict:
    return a.index.to_arrays()


def _side_index_path(archive: str) -> str:
    """Where the side index of *archive* is, found by the side index's own lookup."""
    source = open_source(archive)
    try:
        found = sidecar.find(source)
    finally:
        source.close()
    assert found is not None, "no valid side index"
    return found[0]


def test_index_command_saves_the_offset_map_of_a_plain_archive(plain, capsys):
    assert main(["index", "--no-progress", plain]) == 0
    assert "written" in capsys.readouterr().out
    assert os.path.isfile(_side_index_path(plain))
    assert main(["index", plain]) == 0
    assert "up to date" in capsys.readouterr().out
    with Archive.open(plain) as a, Archive.open(plain, use_sidecar=False) as b:
        assert a.header.uuid == b.header.uuid
        for key, arr in _arrays(b).items():
            assert np.array_equal(_arrays(a)[key], arr), key
        dev = a.devices[0].dev_id
        assert a.read(dev, 0, 1 << 20) == b.read(dev, 0, 1 << 20)


def test_open_uses_the_side_index_instead_of_the_headers(plain):
    """Proof that the walk is skipped: a damaged header in the middle (which the
    side index's identity check does not cover) fails only the walk."""
    assert main(["index", "--no-progress", plain]) == 0
    _damage_keeping_identity(plain, _middle_header(plain))
    with pytest.raises(VmaError):
        Archive.open(plain, use_sidecar=False)
    with Archive.open(plain) as a:
        assert a.stored_bytes(a.devices[0].dev_id) > 0


def test_a_changed_archive_is_walked_again(plain):
    assert main(["index", "--no-progress", plain]) == 0
    _damage_keeping_identity(plain, _middle_header(plain))
    os.utime(plain)  # now its mtime differs from the indexed one
    with pytest.raises(VmaError):
        Archive.open(plain)


def test_opening_a_plain_archive_never_writes_a_side_index(plain, tmp_path, monkeypatch):
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    with Archive.open(plain):
        pass
    assert main(["list", plain]) == 0
    assert not os.path.exists(plain + sidecar.SUFFIX)
    assert not os.path.exists(tmp_path / "cache")
    source = open_source(plain)
    try:
        assert sidecar.find(source) is None
    finally:
        source.close()


def test_the_side_index_of_a_plain_archive_is_its_offset_map_alone(plain):
    assert main(["index", "--no-progress", plain]) == 0
    with open(_side_index_path(plain), "rb") as f:
        meta, arrays = sidecar.loads(f.read())
    assert meta["source"] == "plain"
    assert [k for k in arrays if k.startswith("state/")] == []
    assert any(k.startswith("index/") for k in arrays)
    source = open_source(plain)
    try:
        with pytest.raises(IndexCacheError):
            source.load_checkpoint_state({"x": np.zeros(1)})
    finally:
        source.close()
