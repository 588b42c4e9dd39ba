"""The side index container (vmafs.sidecar): layout, checksum, identity, locations."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from conftest import FIXTURES_DIR

import vmafs.source.gzip  # registers the gzip magic
import vmafs.source.lzo  # noqa: F401 - registers the lzop magic
from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.errors import IndexCacheError
from vmafs.source import open_source


def _sample():
    ident = {"size": 5, "mtime_ns": 7, "head_sha256": "a" * 64, "tail_sha256": "b" * 64}
    state = {
        "meta": np.array([1, 2, 3], dtype=np.int64),
        "blob": b"\x00\x01window bytes",
        "empty": np.zeros(0, dtype=np.uint32),
        "matrix": np.arange(12, dtype=np.uint16).reshape(3, 4),
    }
    index = {
        "meta": np.array([9, 8, -1], dtype=np.int64),
        "packed_1": np.full(5, 0xFFFF, np.uint64),
    }
    return ident, state, index


def test_round_trip_keeps_types_and_values():
    ident, state, index = _sample()
    blob = sidecar.dumps(ident, "GzipSource", b"HDR" * 10, state, index)
    meta, arrays = sidecar.loads(blob)
    assert meta["identity"] == ident and meta["source"] == "GzipSource"
    assert arrays["header"].tobytes() == b"HDR" * 10
    assert (arrays["state/matrix"] == state["matrix"]).all()
    assert arrays["state/matrix"].shape == (3, 4)
    assert arrays["state/empty"].size == 0
    assert arrays["state/blob"].tobytes() == state["blob"]
    assert meta["state_bytes_keys"] == ["blob"]
    assert (arrays["index/packed_1"] == 0xFFFF).all()
    for d in meta["arrays"]:
        assert d["offset"] % 64 == 0


def test_every_flipped_byte_is_detected():
    ident, state, index = _sample()
    blob = sidecar.dumps(ident, "LzoSource", b"H", state, index)
    for at in range(0, len(blob), max(1, len(blob) // 97)):
        bad = bytearray(blob)
        bad[at] ^= 0x80
        with pytest.raises(IndexCacheError):
            sidecar.loads(bytes(bad))
    for n in (0, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IndexCacheError):
            sidecar.loads(blob[:n])


def test_wrong_version_and_forged_checksum_are_refused():
    ident, state, index = _sample()
    blob = bytearray(sidecar.dumps(ident, "x", b"H", state, index))
    blob[8] = sidecar.FORMAT_VERSION + 1  # a future format, checksum fixed up
    body = bytes(blob[:-32])
    with pytest.raises(IndexCacheError, match="format"):
        sidecar.loads(body + hashlib.sha256(body).digest())
    # An object-dtype array could only come from a forged file: never unpickled.
    blob = bytearray(sidecar.dumps(ident, "x", b"H", state, index))
    text_at = 20
    i = blob.index(b'"<i8"', text_at)
    blob[i : i + 5] = b'"|O" '
    body = bytes(blob[:-32])
    with pytest.raises(IndexCacheError):
        sidecar.loads(body + hashlib.sha256(body).digest())


def test_state_as_one_bytes_object_round_trips():
    ident, _, index = _sample()
    blob = sidecar.dumps(ident, "x", b"H", b"opaque state", index)
    meta, arrays = sidecar.loads(blob)
    assert meta["state_is_bytes"] and arrays["state/blob"].tobytes() == b"opaque state"


def test_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("VMAFS_CACHE_DIR", raising=False)
    assert sidecar.cache_dir() == "/var/cache/vmafs"  # root (as tests run)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as another user
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sidecar.cache_dir() == str(tmp_path / "xdg" / "vmafs")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sidecar.cache_dir() == str(tmp_path / "home" / ".cache" / "vmafs")
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "explicit"))
    assert sidecar.cache_dir() == str(tmp_path / "explicit")
    a = sidecar.cache_path("/srv/a.vma.gz")
    b = sidecar.cache_path("/srv/b.vma.gz")
    assert a != b and os.path.dirname(a) == str(tmp_path / "explicit")
    assert sidecar.beside_path("x.vma.gz") == os.path.abspath("x.vma.gz") + ".vmafs-index"


def test_identity_tracks_head_tail_size_mtime(tmp_path):
    p = tmp_path / "f.vma.gz"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.gz", p)
    src = open_source(p)
    try:
        one = sidecar.identity(src)
    finally:
        src.close()
    assert one["size"] == os.path.getsize(p)
    data = p.read_bytes()
    assert one["head_sha256"] == hashlib.sha256(data[: 64 << 10]).hexdigest()
    assert one["tail_sha256"] == hashlib.sha256(data[-(64 << 10) :]).hexdigest()


def test_save_then_load_gives_the_same_index(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "two-disks.vma.lzo"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.lzo", p)
    with Archive.open(p, use_sidecar=False) as a:
        dest = sidecar.save(a.source, a.header, a.index, strict=True)
        want = a.index.to_arrays()
        header = a.header
    assert dest == sidecar.cache_path(p)  # the cache, by default
    assert not os.path.exists(str(p) + ".vmafs-index")  # nothing beside the archive
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # temp file renamed away
    assert os.stat(dest).st_mode & 0o777 == 0o644
    src = open_source(p)
    try:
        found = sidecar.find(src)
        assert found is not None and found[0] == dest
        assert found[1] == header
        got = found[2].to_arrays()
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in want)
        assert src.pread(0, 4) == b"VMA\0"
        assert sidecar.find(src, beside=False)[0] == dest
    finally:
        src.close()


def test_save_strict_reports_unwritable_locations(tmp_path, monkeypatch):
    p = tmp_path / "two-disks.vma.gz"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.gz", p)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(blocker / "cache"))
    os.mkdir(str(p) + ".vmafs-index")
    with Archive.open(p, use_sidecar=False) as a:
        with pytest.raises(IndexCacheError, match="cannot write"):
            sidecar.save(a.source, a.header, a.index, strict=True)
        assert sidecar.save(a.source, a.header, a.index) is None  # not strict: logged only


def _indexed_copy(tmp_path, monkeypatch, name="two-disks.vma.gz"):
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / name
    shutil.copyfile(FIXTURES_DIR / name, p)
    Archive.open(p).close()
    side = sidecar.cache_path(p)
    assert os.path.isfile(side)
    return p, side


def test_forged_offset_map_with_valid_checksum_is_refused(tmp_path, monkeypatch, caplog):
    """A well-formed side index whose offsets point outside the extents is not used."""
    p, side = _indexed_copy(tmp_path, monkeypatch)
    meta, arrays = sidecar.loads(open(side, "rb").read())
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}
    for k in meta["state_bytes_keys"]:
        state[k] = state[k].tobytes()
    index = {k[6:]: v.copy() for k, v in arrays.items() if k.startswith("index/")}
    # Every stored offset 1 TiB further on (entries hold offset >> 9 above a 16-bit mask).
    index["packed_1"][index["packed_1"] != 0] += np.uint64((1 << 40 >> 9) << 16)
    forged = sidecar.dumps(
        meta["identity"], meta["source"], arrays["header"].tobytes(), state, index
    )
    with open(side, "wb") as f:
        f.write(forged)
    src = open_source(p)
    try:
        with caplog.at_level("WARNING", logger="vmafs.sidecar"):
            assert sidecar.find(src) is None
    finally:
        src.close()
    assert "points outside the extents" in caplog.text


def _rewrite(side: str, version: int, index_of) -> None:
    """Replace the side index with one of another *version* whose index arrays are
    ``index_of(saved index arrays)``, checksum fixed up."""
    meta, arrays = sidecar.loads(open(side, "rb").read())
    state = {k[6:]: v for k, v in arrays.items() if k.startswith("state/")}
    for k in meta["state_bytes_keys"]:
        state[k] = state[k].tobytes()
    index = index_of({k[6:]: v.copy() for k, v in arrays.items() if k.startswith("index/")})
    blob = bytearray(
        sidecar.dumps(meta["identity"], meta["source"], arrays["header"].tobytes(), state, index)
    )
    blob[8:12] = version.to_bytes(4, "little")
    body = bytes(blob[:-32])
    with open(side, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())


def _as_version_1(index: dict) -> dict:
    """The version 1 layout: uint64 offsets and uint16 masks per device."""
    out = {"meta": index.pop("meta")}
    for key, packed in index.items():
        dev = key.split("_")[1]
        out[f"offsets_{dev}"] = (packed >> np.uint64(16)) << np.uint64(9)
        out[f"masks_{dev}"] = (packed & np.uint64(0xFFFF)).astype(np.uint16)
    return out


@pytest.mark.parametrize("version", [1, sidecar.FORMAT_VERSION])
def test_side_index_of_the_old_layout_is_rebuilt_not_misread(
    tmp_path, monkeypatch, caplog, version
):
    """A side index with the version 1 arrays (offsets + masks) is never read as packed
    entries: refused by its version, or (forged as this version) by its array names."""
    p, side = _indexed_copy(tmp_path, monkeypatch)
    with Archive.open(p, use_sidecar=False) as a:
        want = {d.dev_id: a.read(d.dev_id, 0, d.size) for d in a.devices}
    _rewrite(side, version, _as_version_1)
    with caplog.at_level("WARNING", logger="vmafs.sidecar"):
        with Archive.open(p) as a:
            assert {d.dev_id: a.read(d.dev_id, 0, d.size) for d in a.devices} == want
    assert "not used, rebuilding" in caplog.text
    assert "format 1" in caplog.text if version == 1 else "does not fit" in caplog.text
    meta, arrays = sidecar.loads(open(side, "rb").read())  # rewritten in this format
    assert int.from_bytes(open(side, "rb").read()[8:12], "little") == sidecar.FORMAT_VERSION
    assert any(k.startswith("index/packed_") for k in arrays)
    assert not any(k.startswith(("index/offsets_", "index/masks_")) for k in arrays)


def test_side_index_of_a_stranger_is_ignored(tmp_path, monkeypatch, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    p, side = _indexed_copy(tmp_path, monkeypatch)
    os.chown(side, 54321, 54321)
    src = open_source(p)
    try:
        with caplog.at_level("WARNING", logger="vmafs.sidecar"):
            assert sidecar.find(src) is None
        assert "owned by uid 54321" in caplog.text
        os.chown(p, 54321, 54321)  # ... unless the archive is that user's too
        assert sidecar.find(src) is not None
    finally:
        src.close()
