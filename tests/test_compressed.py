"""Compressed input: gzip and lzop sources, side index reuse, damage, recompress.

The Proxmox-written fixtures are copied into tmp_path first: opening a
compressed archive writes a side index (into the cache), and the fixture directory
must stay clean.  VMAFS_CACHE_DIR points into tmp_path for the same reason.
"""

from __future__ import annotations

import gzip as stdgzip
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
from conftest import FIXTURES_DIR, load_manifest, unmount, vmafs_cmd
from test_source_zstd import expected_frames

import vmafs.source.gzip as vgzip
import vmafs.source.lzo as vlzo
from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.errors import (
    CorruptStreamError,
    HeaderTruncatedError,
    SourceError,
    StreamTruncatedError,
    VmaError,
)
from vmafs.source import open_source

GUARD = 120  # seconds: an open that takes longer than this is a hang

SUFFIXES = [".gz", ".lzo", ".zst"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))


def copy_fixture(tmp_path, name: str) -> str:
    dst = tmp_path / name
    shutil.copyfile(FIXTURES_DIR / name, dst)
    return str(dst)


def disk_sha256(archive: Archive, dev_id: int) -> str:
    h = hashlib.sha256()
    size = archive.device(dev_id).size
    off = 0
    while off < size:
        data = archive.read(dev_id, off, 1 << 20)
        assert data, f"short read at {off}"
        h.update(data)
        off += len(data)
    return h.hexdigest()


def assert_matches_manifest(archive: Archive, name: str) -> None:
    m = load_manifest(name)
    got = {d.dev_id: (d.name, d.size) for d in archive.devices}
    assert got == {d["dev_id"]: (d["name"], d["size"]) for d in m["devices"]}
    for d in m["devices"]:
        assert disk_sha256(archive, d["dev_id"]) == d["sha256"], d["name"]
    configs = {c.name: hashlib.sha256(c.data).hexdigest() for c in archive.header.configs}
    assert configs == {c["name"]: c["sha256"] for c in m["configs"]}


def open_guarded(path, **kw) -> Archive:
    """Archive.open in a thread; a hang fails the test instead of stalling the suite."""
    box: dict = {}

    def target():
        try:
            box["archive"] = Archive.open(path, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(GUARD)
    assert not t.is_alive(), f"Archive.open({path}) did not finish within {GUARD}s"
    if "error" in box:
        raise box["error"]
    return box["archive"]


def test_open_source_knows_every_container():
    """A fresh interpreter (as the CLI and mount run) recognises .gz, .lzo and .zst by magic."""
    code = (
        "import sys\n"
        "from vmafs.source import open_source\n"
        "for p in sys.argv[1:]:\n"
        "    s = open_source(p); print(type(s).__name__); s.close()\n"
    )
    names = [FIXTURES_DIR / f"two-disks.vma{s}" for s in SUFFIXES]
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, names)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]
    assert r.stdout.split() == ["GzipSource", "LzoSource", "ZstdSource"]


def test_import_container_imports_only_the_module_the_magic_asks_for(tmp_path):
    """What `vmafs mount` calls before its import thread starts (fresh interpreter)."""
    code = (
        "import json, sys\n"
        "from vmafs.source import import_container\n"
        "import_container(sys.argv[1])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vmafs.source.'))))\n"
    )
    zstd = ["checkpoint", "frame", "reads", "scan", "source", "state"]
    expect = {  # beyond vmafs.source.plain and .base, which the package always imports
        "two-disks.vma": [],
        "two-disks.vma.zst": [
            "vmafs.source.zstd",
            *(f"vmafs.source.zstd.{m}" for m in zstd),
        ],
        "two-disks.vma.gz": ["vmafs.source.gzip"],
    }
    for name, modules in expect.items():
        r = subprocess.run(
            [sys.executable, "-c", code, str(FIXTURES_DIR / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        always = ("vmafs.source.plain", "vmafs.source.base")
        got = [m for m in json.loads(r.stdout) if m not in always]
        assert got == modules, name
    from vmafs.source import import_container

    with pytest.raises(SourceError, match="cannot open"):
        import_container(tmp_path / "missing.vma")


# --- Proxmox-written fixtures -------------------------------------------------------------

COMPRESSED = [
    p.name
    for p in sorted(FIXTURES_DIR.iterdir())
    if p.name.endswith(tuple(".vma" + s for s in SUFFIXES))
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_fixture_reads_back_equal_to_manifest(tmp_path, name):
    path = copy_fixture(tmp_path, name)
    with open_guarded(path) as a:
        assert a.source.size == os.path.getsize(FIXTURES_DIR / name.rsplit(".", 1)[0])
        assert_matches_manifest(a, name)


@pytest.mark.parametrize("name", [n for n in COMPRESSED if not n.endswith(".zst")])
def test_second_open_uses_side_index_and_no_scan(tmp_path, name, monkeypatch):
    path = copy_fixture(tmp_path, name)
    with Archive.open(path) as a:
        first = a.index.to_arrays()
    assert os.path.exists(sidecar.cache_path(path))
    assert not os.path.exists(path + sidecar.SUFFIX)  # nothing beside the archive
    cls = type(open_source(path))

    def no_scan(self, *a, **k):
        raise AssertionError("scanned although a valid side index exists")

    monkeypatch.setattr(cls, "scan", no_scan)
    with Archive.open(path) as a:
        second = a.index.to_arrays()
        assert_matches_manifest(a, name)
    assert first.keys() == second.keys()
    for k in first:
        assert (first[k] == second[k]).all(), k


# --- gzip variants --------------------------------------------------------------------------


def _plain(name: str) -> bytes:
    return (FIXTURES_DIR / name).read_bytes()


def _gzip_variants(tmp_path, plain_name: str) -> dict[str, str]:
    src = str(FIXTURES_DIR / plain_name)
    data = _plain(plain_name)
    out = {}
    for label, argv in {
        "pigz-rsyncable": ["pigz", "--rsyncable", "-c", src],
        "pigz-independent": ["pigz", "-i", "-c", src],
        "gzip-rsyncable-9": ["gzip", "--rsyncable", "-9", "-c", src],
    }.items():
        p = tmp_path / f"{label}.vma.gz"
        with open(p, "wb") as f:
            subprocess.run(argv, stdout=f, check=True)
        out[label] = str(p)
    # Several members back to back (cat a.gz b.gz c.gz), the last ones tiny.
    p = tmp_path / "multi-member.vma.gz"
    cuts = [0, len(data) // 3, len(data) - 5000, len(data) - 1, len(data)]
    with open(p, "wb") as f:
        for a, b in zip(cuts, cuts[1:], strict=False):
            f.write(stdgzip.compress(data[a:b], compresslevel=1))
    out["multi-member"] = str(p)
    return out


@pytest.mark.parametrize("plain_name", ["two-disks.vma", "ext4-guest.vma"])
def test_gzip_variants_read_back(tmp_path, plain_name):
    for label, path in _gzip_variants(tmp_path, plain_name).items():
        with open_guarded(path) as a:
            assert isinstance(a.source, vgzip.GzipSource), label
            assert_matches_manifest(a, plain_name)


def _random_preads(source, ref: bytes, threads: int = 4, reads: int = 60) -> None:
    errors = []

    def worker(seed):
        r = random.Random(seed)
        try:
            for _ in range(reads):
                off = r.randrange(len(ref) + 100)
                n = r.choice([1, 512, 4096, 65536, 300_000])
                assert source.pread(off, n) == ref[off : off + n], (off, n)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(GUARD)
    assert not any(t.is_alive() for t in ts)
    if errors:
        raise errors[0]


def test_gzip_pread_with_dense_seek_points_from_threads(tmp_path):
    ref = _plain("ext4-guest.vma")
    path = _gzip_variants(tmp_path, "ext4-guest.vma")["multi-member"]
    src = vgzip.GzipSource(path, spacing=256 << 10)
    try:
        chunks = []
        src.scan(lambda off, c: chunks.append(bytes(c)))
        assert b"".join(chunks) == ref and src.size == len(ref)
        _random_preads(src, ref)
        # Sequential 128 KiB reads (what FUSE sends) inflate each span once.
        calls = []
        real = src._zran

        class Counting:
            def pread(self, n, off):
                calls.append((off, n))
                return real.pread(n, off)

            def __getattr__(self, name):
                return getattr(real, name)

        src._zran = Counting()
        src._cache.clear()
        got = b"".join(src.pread(off, 128 << 10) for off in range(0, len(ref), 128 << 10))
        assert got == ref
        assert len(calls) == len(src._bounds) - 1
        assert sum(n for _, n in calls) == len(ref)
        src._zran = real
        # The saved checkpoints work in a fresh source.
        state = src.checkpoint_state()
    finally:
        src.close()
    src2 = vgzip.GzipSource(path)
    try:
        src2.load_checkpoint_state(state)
        _random_preads(src2, ref, threads=2)
    finally:
        src2.close()


@pytest.mark.parametrize("helper", ["works", "fails", "lies"])
def test_gzip_seek_points_from_helper_process(tmp_path, monkeypatch, helper):
    """Seek points built by the helper process, or in-process when the helper fails."""
    monkeypatch.setattr(vgzip, "PARALLEL_MIN_SIZE", 0)
    if helper == "fails":
        monkeypatch.setattr(vgzip, "_CHILD", "import sys; sys.exit(3)")
    elif helper == "lies":  # exports the points of only the first 64 KiB
        monkeypatch.setattr(
            vgzip, "_CHILD", vgzip._CHILD.replace("z.build_full_index()", "z.seek(65536)")
        )
    ref = _plain("ext4-guest.vma")
    path = _gzip_variants(tmp_path, "ext4-guest.vma")["pigz-rsyncable"]
    src = vgzip.GzipSource(path, spacing=512 << 10)
    try:
        src.scan(lambda off, c: None)
        assert src._zran.npoints >= len(ref) // (512 << 10)
        _random_preads(src, ref, threads=2)
    finally:
        src.close()


def test_gzip_trailing_zeros_tolerated_garbage_refused(tmp_path):
    path = copy_fixture(tmp_path, "two-disks.vma.gz")
    with open(path, "ab") as f:
        f.write(bytes(1000))
    with open_guarded(path) as a:
        assert_matches_manifest(a, "two-disks.vma")
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(CorruptStreamError) as ei:
        open_guarded(path)
    assert ei.value.offset == len(_plain("two-disks.vma"))  # stream offset
    assert f"compressed offset {size - 1000}" in str(ei.value)
    assert "after the last member" in str(ei.value)


# --- lzop variants --------------------------------------------------------------------------


def _lzo_variants(tmp_path, plain_name: str) -> dict[str, str]:
    src = str(FIXTURES_DIR / plain_name)
    data = _plain(plain_name)
    out = {}
    for label, opts in {
        "crc32": ["--crc32"],
        "level9": ["-9"],
        "no-checksum": ["--no-checksum"],
        "level1": ["-1"],
    }.items():
        p = tmp_path / f"{label}.vma.lzo"
        with open(p, "wb") as f:
            subprocess.run(["lzop", *opts, "-c", src], stdout=f, check=True)
        out[label] = str(p)
    # Two lzop files back to back, from stdin (no name), different flags.
    p = tmp_path / "concatenated.vma.lzo"
    half = len(data) // 2
    with open(p, "wb") as f:
        for part, opts in ((data[:half], []), (data[half:], ["--crc32"])):
            f.write(subprocess.run(["lzop", *opts, "-c"], input=part, capture_output=True).stdout)
    out["concatenated"] = str(p)
    return out


@pytest.mark.parametrize("plain_name", ["two-disks.vma", "ext4-guest.vma"])
def test_lzo_variants_read_back(tmp_path, plain_name):
    for label, path in _lzo_variants(tmp_path, plain_name).items():
        with open_guarded(path) as a:
            assert isinstance(a.source, vlzo.LzoSource), label
            assert_matches_manifest(a, plain_name)


def test_lzo_pread_from_threads_and_block_table_state(tmp_path):
    ref = _plain("ext4-guest.vma")
    path = _lzo_variants(tmp_path, "ext4-guest.vma")["concatenated"]
    src = vlzo.LzoSource(path)
    try:
        src.scan(lambda off, c: None)
        _random_preads(src, ref)
        state = src.checkpoint_state()
    finally:
        src.close()
    src2 = vlzo.LzoSource(path)
    try:
        src2.load_checkpoint_state(state)
        _random_preads(src2, ref, threads=2)
        bad = dict(state)
        bad["ulen"] = bad["ulen"].copy()
        bad["ulen"][0] += 1
        with pytest.raises(SourceError):
            src2.load_checkpoint_state(bad)
    finally:
        src2.close()


def test_lzo_block_checksums_are_checked_on_random_reads(tmp_path):
    """Damage after the scan (side index in hand) still shows up as an error, not bad data."""
    path = copy_fixture(tmp_path, "ext4-guest.vma.lzo")
    with Archive.open(path) as a:
        assert_matches_manifest(a, "ext4-guest.vma")
        table = a.source.checkpoint_state()
    i = len(table["coff"]) // 2
    at = int(table["coff"][i]) + int(table["clen"][i]) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x55]))
    src = vlzo.LzoSource(path)
    try:
        src.load_checkpoint_state(table)
        with pytest.raises(CorruptStreamError) as ei:
            src.pread(int(table["uoff"][i]), 10)
        assert ei.value.offset == int(table["uoff"][i])
        assert f"compressed offset {int(table['coff'][i])}" in str(ei.value)
    finally:
        src.close()


def test_lzo_header_damage_and_unsupported_flags(tmp_path):
    path = copy_fixture(tmp_path, "two-disks.vma.lzo")
    data = bytearray(open(path, "rb").read())
    bad = bytearray(data)
    bad[20] ^= 0x01  # inside the header: its checksum catches it
    p = tmp_path / "badhdr.vma.lzo"
    p.write_bytes(bad)
    with pytest.raises(
        CorruptStreamError, match="header at compressed offset 0: checksum mismatch"
    ):
        open_guarded(p)
    # F_H_FILTER set (and the header checksum fixed up): refused, not misread.
    flags_at = 9 + 2 + 2 + 2 + 1 + 1
    flags = int.from_bytes(data[flags_at : flags_at + 4], "big") | vlzo.F_H_FILTER
    hdr = bytearray(data[:flags_at]) + flags.to_bytes(4, "big") + bytes(4)
    rest = data[flags_at + 4 :]
    name_at = 4 + 4 + 4  # mode, mtime low, mtime high, then name_len
    name_len = rest[name_at]
    hdr += rest[: name_at + 1 + name_len]
    hdr += zlib.adler32(bytes(hdr[9:])).to_bytes(4, "big")
    p.write_bytes(bytes(hdr) + bytes(rest[name_at + 1 + name_len + 4 :]))
    with pytest.raises(SourceError, match="filter"):
        open_guarded(p)


# --- truncated and corrupt input -------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_input_is_a_clean_error_naming_the_offset(tmp_path, suffix):
    name = "ext4-guest.vma" + suffix
    full = (FIXTURES_DIR / name).read_bytes()
    plain = _plain("ext4-guest.vma")
    for cut in (100, len(full) // 3, len(full) // 2 + 7, len(full) - 8, len(full) - 1):
        p = tmp_path / f"cut{cut}{suffix}"
        p.write_bytes(full[:cut])
        with pytest.raises(VmaError) as ei:
            open_guarded(p)
        e = ei.value
        # The error's offset is the position in the VMA stream; the message names
        # the compressed offset where the input ran out.  Cut inside the VMA
        # header: nothing to read; else what is there can be (allow_incomplete).
        assert isinstance(e, StreamTruncatedError | HeaderTruncatedError), (cut, repr(e))
        assert e.readable_in_part == isinstance(e, StreamTruncatedError), (cut, repr(e))
        assert e.offset is not None and 0 <= e.offset <= len(plain), (cut, str(e))
        m = re.search(r"compressed offset (\d+)", str(e))
        assert m and int(m.group(1)) <= cut, (cut, str(e))
        assert not os.path.exists(str(p) + sidecar.SUFFIX)


@pytest.mark.parametrize("suffix", [".gz", ".lzo"])
def test_corrupt_input_is_a_clean_error(tmp_path, suffix):
    name = "ext4-guest.vma" + suffix
    full = (FIXTURES_DIR / name).read_bytes()
    r = random.Random(4)
    for i in range(6):
        at = r.randrange(200, len(full) - 200)
        bad = bytearray(full)
        bad[at] ^= 1 << r.randrange(8)
        p = tmp_path / f"flip{i}{suffix}"
        p.write_bytes(bad)
        with pytest.raises(VmaError) as ei:
            open_guarded(p)
        assert ei.value.offset is not None, str(ei.value)


# --- stale and damaged side indexes ---------------------------------------------------------


def _scans(monkeypatch, cls) -> list:
    calls = []
    orig = cls.scan

    def counting(self, *a, **k):
        calls.append(self.path)
        return orig(self, *a, **k)

    monkeypatch.setattr(cls, "scan", counting)
    return calls


@pytest.mark.parametrize("name", ["ext4-guest.vma.gz", "ext4-guest.vma.lzo"])
def test_touched_archive_rebuilds_side_index(tmp_path, name, monkeypatch, caplog):
    path = copy_fixture(tmp_path, name)
    calls = _scans(monkeypatch, type(open_source(path)))
    Archive.open(path).close()
    Archive.open(path).close()
    assert len(calls) == 1
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with caplog.at_level(logging.INFO, logger="vmafs.sidecar"):
        with Archive.open(path) as a:
            assert_matches_manifest(a, name)
    assert len(calls) == 2
    assert "mtime_ns differs" in caplog.text
    Archive.open(path).close()  # the rewritten side index is valid again
    assert len(calls) == 2


def test_replaced_archive_same_size_and_mtime_is_detected(tmp_path, monkeypatch, caplog):
    """A different file with the same size and mtime: the head hash tells them apart."""
    path = copy_fixture(tmp_path, "ext4-guest.vma.gz")
    calls = _scans(monkeypatch, vgzip.GzipSource)
    Archive.open(path).close()
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    assert data[3] & 0x08  # FNAME: gzip stored the file name; change one letter of it
    data[10] ^= 0x20
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.INFO, logger="vmafs.sidecar"):
        Archive.open(path).close()
    assert len(calls) == 2
    assert "head_sha256 differs" in caplog.text


def test_replaced_by_another_archive(tmp_path, monkeypatch):
    path = copy_fixture(tmp_path, "ext4-guest.vma.gz")
    Archive.open(path).close()
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.gz", path)
    with Archive.open(path) as a:
        assert_matches_manifest(a, "two-disks.vma")


@pytest.mark.parametrize("name", ["ext4-guest.vma.gz", "ext4-guest.vma.lzo"])
def test_corrupted_side_index_is_rebuilt(tmp_path, name, monkeypatch, caplog):
    path = copy_fixture(tmp_path, name)
    calls = _scans(monkeypatch, type(open_source(path)))
    Archive.open(path).close()
    side = sidecar.cache_path(path)
    good = open(side, "rb").read()
    for n, at in enumerate((3, 40, len(good) // 2, len(good) - 40, len(good) - 1)):
        bad = bytearray(good)
        bad[at] ^= 0x01
        with open(side, "wb") as f:
            f.write(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vmafs.sidecar"):
            with Archive.open(path) as a:
                assert_matches_manifest(a, name)
        assert len(calls) == 2 + n, at
        assert "fails its checksum" in caplog.text, at
        assert open(side, "rb").read() == good  # rewritten, same content
    with open(side, "wb") as f:
        f.write(good[: len(good) // 3])  # cut short
    Archive.open(path).close()
    assert len(calls) == 7
    Archive.open(path).close()
    assert len(calls) == 7


def test_side_index_falls_back_to_cache_dir(tmp_path, monkeypatch):
    path = copy_fixture(tmp_path, "two-disks.vma.lzo")
    os.mkdir(path + sidecar.SUFFIX)  # the beside path cannot be written
    calls = _scans(monkeypatch, vlzo.LzoSource)
    Archive.open(path, index_beside=True).close()
    cached = sidecar.cache_path(path)
    assert cached.startswith(str(tmp_path / "cache"))
    assert os.path.isfile(cached)
    with Archive.open(path) as a:
        assert_matches_manifest(a, "two-disks.vma")
    assert len(calls) == 1


# --- recompress ---------------------------------------------------------------------------------


def _extent_starts(plain: bytes) -> set[int]:
    from vmafs.format import HEADER_STRUCT_SIZE, Header

    pos = Header.peek_size(plain[:HEADER_STRUCT_SIZE])
    starts = set()
    while pos < len(plain):
        starts.add(pos)
        pos += 512 + 4096 * int.from_bytes(plain[pos + 6 : pos + 8], "big")
    assert pos == len(plain)
    return starts


@pytest.mark.parametrize(
    "name", ["ext4-guest.vma", "ext4-guest.vma.gz", "ext4-guest.vma.lzo", "ext4-guest.vma.zst"]
)
def test_recompress_round_trips_through_zstd_d(tmp_path, name):
    from vmafs.writer.recompress import recompress

    from vmafs.zstd_seekable import SeekTable

    src = copy_fixture(tmp_path, name)
    out = str(tmp_path / "out.vma.zst")
    r = recompress(src, out, frame_target=512 << 10, frame_limit=1 << 20)
    plain = _plain("ext4-guest.vma")
    back = subprocess.run(["zstd", "-q", "-d", "-c", out], capture_output=True, check=True).stdout
    assert back == plain
    assert not os.path.exists(out + ".tmp")
    # Frames hold whole extents, grouped by the writer's rule (the header rides
    # in the first frame): exactly the frames that rule gives for these extents.
    blob = open(out, "rb").read()
    table = SeekTable.from_tail(lambda off, n: blob[off : off + n], len(blob))
    assert table is not None and len(table) == r["frames"] > 1
    starts = sorted(_extent_starts(plain))
    units = [starts[0]] + [b - a for a, b in zip(starts, [*starts[1:], len(plain)], strict=True)]
    assert table.decompressed_sizes == expected_frames(units, 512 << 10, 1 << 20)


def test_recompress_framer_any_chunking(tmp_path):
    # The framer holds back only an extent's first bytes until its length is
    # known: chunks cut anywhere (inside headers too) give the same frames.
    import io

    import zstandard
    from vmafs.writer.recompress import _Framer

    from vmafs.zstd_seekable import SeekableZstdWriter, SeekTable

    plain = _plain("two-disks.vma")
    starts = sorted(_extent_starts(plain))
    units = [starts[0]] + [b - a for a, b in zip(starts, [*starts[1:], len(plain)], strict=True)]
    want = expected_frames(units, 64 << 10, 256 << 10)
    rnd = random.Random(3)
    for sizes in ((1, 2, 9, 511, 513), (7, 512, 4096), (3, 100_000), (len(plain),)):
        buf = io.BytesIO()
        w = SeekableZstdWriter(buf, frame_target=64 << 10, frame_limit=256 << 10)
        framer = _Framer(w)
        pos = 0
        while pos < len(plain):
            n = rnd.choice(sizes)
            if sizes[0] == 1 and n > 2 and rnd.random() < 0.001:
                n = 1 << 20  # the tiny-chunk run also crosses whole extents now and then
            framer.feed(memoryview(plain)[pos : pos + n])
            pos += n
        framer.flush()
        w.close()
        raw = buf.getvalue()
        table = SeekTable.from_tail(lambda off, n, raw=raw: raw[off : off + n], len(raw))
        assert table.decompressed_sizes == want, sizes
        dctx = zstandard.ZstdDecompressor()
        assert dctx.stream_reader(io.BytesIO(raw), read_across_frames=True).read() == plain


def test_recompressed_output_opens_without_side_index(tmp_path):
    from vmafs.writer.recompress import recompress

    src = copy_fixture(tmp_path, "two-disks.vma.gz")
    out = str(tmp_path / "two-disks.vma.zst")
    recompress(src, out)
    with open_guarded(out) as a:
        assert not a.source.needs_scan
        assert_matches_manifest(a, "two-disks.vma")
    assert not os.path.exists(out + sidecar.SUFFIX)
    assert not os.path.exists(sidecar.cache_path(out))


def test_seekable_archive_is_indexed_without_whole_frame_decodes(tmp_path, monkeypatch):
    # Archive.open reads the extent headers only: no frame is decoded whole and
    # few compressed bytes are read, also where a frame holds several extents
    # (small extents of a sparse stretch are grouped).  Reads afterwards decode
    # whole frames, verify them, and return the disk.
    from test_cli_support import build
    from vmafs.writer.recompress import recompress

    from vmafs.source.zstd.reads import FrameReader
    from vmafs.zstd_seekable import SeekTable

    rnd = random.Random(9)
    sparse = bytearray(8 << 20)
    for c in range(0, len(sparse) >> 16, 5):  # one 4 KiB block in every 5th cluster
        sparse[c << 16 : (c << 16) + 4096] = rnd.randbytes(4096)
    disk = rnd.randbytes(8 << 20) + bytes(sparse) + bytes(4 << 20) + rnd.randbytes(1 << 20)
    b = build(tmp_path / "a.vma", {"drive-scsi0": disk}, slots=8)
    out = str(tmp_path / "a.vma.zst")
    recompress(str(b.path), out, frame_target=256 << 10, frame_limit=1 << 20)
    blob = open(out, "rb").read()
    table = SeekTable.from_tail(lambda off, n: blob[off : off + n], len(blob))
    ends = np.cumsum(table.decompressed_sizes)
    per_frame = np.bincount(np.searchsorted(ends, b.extent_offsets, side="right"))
    assert per_frame.max() > 2 and (per_frame == 1).sum() >= 3  # grouped and single extents

    decodes, read = [], [0]
    real_decode, real_pread = FrameReader.decode_frame, os.pread

    def decode(self, fi):
        decodes.append(fi)
        return real_decode(self, fi)

    def pread(fd, n, off):
        data = real_pread(fd, n, off)
        read[0] += len(data)
        return data

    monkeypatch.setattr(FrameReader, "decode_frame", decode)
    monkeypatch.setattr(os, "pread", pread)
    a = open_guarded(out)
    monkeypatch.setattr(os, "pread", real_pread)
    try:
        assert decodes == [] and len(a.source._cache) == 0
        assert read[0] < len(blob) // 4, (read[0], len(blob))
        assert a.read(1, 0, len(disk)) == disk
        assert sorted(set(decodes)) == list(range(len(table)))
    finally:
        a.close()

    # Damage inside a frame holding one extent, past the part its header is
    # decoded from: the open succeeds, a read of that frame fails on it.
    fi = int(np.flatnonzero(per_frame == 1)[1])
    comp = sum(table.compressed_sizes[:fi])
    bad = bytearray(blob)
    bad[comp + table.compressed_sizes[fi] * 3 // 4] ^= 0xFF
    open(out, "wb").write(bad)
    decodes.clear()
    a = open_guarded(out)
    try:
        assert decodes == []
        assert a.read(1, len(disk) - 4096, 4096) == disk[-4096:]  # an intact frame
        with pytest.raises(CorruptStreamError, match=f"compressed offset {comp}"):
            a.source.pread(int(ends[fi]) - 4096, 4096)
    finally:
        a.close()


def test_recompress_refuses_to_overwrite_and_cleans_up(tmp_path):
    from vmafs.writer.recompress import recompress

    src = copy_fixture(tmp_path, "two-disks.vma")
    out = tmp_path / "exists.vma.zst"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        recompress(src, str(out))
    assert out.read_bytes() == b"keep me"
    # A damaged input leaves neither OUT nor a temporary file behind.
    cut = tmp_path / "cut.vma"
    cut.write_bytes(_plain("two-disks.vma")[:-5000])
    out2 = tmp_path / "new.vma.zst"
    with pytest.raises(VmaError):
        recompress(str(cut), str(out2))
    assert not out2.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # A stale temporary file (the old fixed OUT.tmp, or a killed run's) neither
    # blocks the run nor is touched by it.
    (tmp_path / "new.vma.zst.tmp").write_bytes(b"someone else's")
    recompress(src, str(out2))
    assert (tmp_path / "new.vma.zst.tmp").read_bytes() == b"someone else's"


# --- the commands ---------------------------------------------------------------------------------


def test_index_command(tmp_path, capsys):
    from vmafs.cli import main

    path = copy_fixture(tmp_path, "ext4-guest.vma.gz")
    assert main(["index", "--no-progress", path]) == 0
    assert os.path.isfile(sidecar.cache_path(path))
    assert not os.path.exists(path + sidecar.SUFFIX)
    assert "written" in capsys.readouterr().out
    assert main(["index", path]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["index", "--force", path]) == 0
    assert "written" in capsys.readouterr().out
    cache = tmp_path / "elsewhere"
    assert main(["index", "--cache-dir", str(cache), path]) == 0
    assert os.path.isfile(sidecar.cache_path(path, str(cache)))
    assert main(["index", "--beside", "--force", path]) == 0
    assert os.path.isfile(path + sidecar.SUFFIX)
    seekable = tmp_path / "s.vma.zst"
    assert main(["recompress", "--no-progress", path, str(seekable)]) == 0
    capsys.readouterr()
    assert main(["index", str(seekable)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    cut = tmp_path / "cut.vma.gz"
    cut.write_bytes(open(path, "rb").read()[:-100])
    assert main(["index", str(cut)]) == 1
    assert "archive offset" in capsys.readouterr().err


def test_recompress_command(tmp_path, capsys):
    from vmafs.cli import main

    src = copy_fixture(tmp_path, "two-disks.vma.lzo")
    out = tmp_path / "o.vma.zst"
    assert main(["recompress", "--no-progress", "--level", "5", src, str(out)]) == 0
    back = subprocess.run(["zstd", "-q", "-d", "-c", str(out)], capture_output=True).stdout
    assert back == _plain("two-disks.vma")
    assert main(["recompress", src, str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


# --- the vzdump hook ---------------------------------------------------------------------------

HOOK = FIXTURES_DIR.parent.parent / "contrib" / "vzdump-hook-vmafs-index"


def _vmafs_wrapper(tmp_path) -> str:
    w = tmp_path / "vmafs-wrapper"
    w.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vmafs "$@"\n')
    w.chmod(0o755)
    return str(w)


def test_vzdump_hook_indexes_after_backup_and_never_fails_it(tmp_path):
    archive = copy_fixture(tmp_path, "two-disks.vma.lzo")
    env = dict(os.environ, VMAFS=_vmafs_wrapper(tmp_path), VMTYPE="qemu", TARGET=archive)
    env["VMAFS_DEFAULTS"] = str(tmp_path / "no-defaults")  # not this machine's settings
    env["PYTHONPATH"] = str(FIXTURES_DIR.parent.parent)

    def hook(phase, **extra):
        return subprocess.run(
            [str(HOOK), phase, "stop", "100"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=GUARD,
        )

    for phase in ("job-start", "backup-start", "log-end", "job-end"):
        assert hook(phase).returncode == 0
    assert not os.path.exists(archive + sidecar.SUFFIX)
    assert hook("backup-end", VMTYPE="lxc").returncode == 0
    assert not os.path.exists(archive + sidecar.SUFFIX)
    r = hook("backup-end")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(sidecar.cache_path(archive))  # the cache, not the dump directory
    assert not os.path.exists(archive + sidecar.SUFFIX)
    defaults = tmp_path / "vmafs-defaults"
    defaults.write_text("VMAFS_INDEX_BESIDE=1\n")  # the hook's setting, as in /etc/default/vmafs
    r = hook("backup-end", VMAFS_DEFAULTS=str(defaults))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(archive + sidecar.SUFFIX)
    # A broken archive or a missing vmafs: warned about, backup not failed.
    bad = tmp_path / "bad.vma.gz"
    bad.write_bytes((FIXTURES_DIR / "two-disks.vma.gz").read_bytes()[:-100])
    r = hook("backup-end", TARGET=str(bad))
    assert r.returncode == 0 and "WARNING" in r.stderr
    r = hook("backup-end", VMAFS=str(tmp_path / "no-such-vmafs"))
    assert r.returncode == 0 and "not found" in r.stderr


# --- through a real FUSE mount ------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.parametrize("kind", [".gz", ".lzo", ".zst", "recompressed"])
def test_mount_compressed_reads_back_equal_to_manifest(tmp_path, require_fuse, kind):
    pytest.importorskip("vmafs.mount", reason="vmafs mount has not landed yet")
    name = "ext4-guest.vma"
    if kind == "recompressed":
        from vmafs.writer.recompress import recompress

        archive = str(tmp_path / "seekable.vma.zst")
        recompress(copy_fixture(tmp_path, name + ".gz"), archive)
    else:
        archive = copy_fixture(tmp_path, name + kind)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, VMAFS_CACHE_DIR=str(tmp_path / "cache"))
    try:
        r = subprocess.run(
            vmafs_cmd("mount", archive, mnt), env=env, capture_output=True, text=True, timeout=GUARD
        )
        assert r.returncode == 0, r.stderr
        m = load_manifest(name)
        for d in m["devices"]:
            h = hashlib.sha256()
            with open(mnt / f"disk-{d['name']}.raw", "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            assert h.hexdigest() == d["sha256"], d["name"]
        for c in m["configs"]:
            assert hashlib.sha256((mnt / c["name"]).read_bytes()).hexdigest() == c["sha256"]
    finally:
        subprocess.run(vmafs_cmd("umount", mnt), capture_output=True, timeout=GUARD, check=False)
        unmount(mnt)
    assert not os.path.ismount(mnt)
    if kind == "recompressed":  # seekable zstd needs none
        assert not os.path.exists(archive + sidecar.SUFFIX)
    else:
        # Written by the filesystem process while serving, into the cache, and
        # complete once 'vmafs umount' has returned (it waits for the process).
        assert os.path.isfile(sidecar.cache_path(archive, str(tmp_path / "cache")))
        src = open_source(archive)
        try:
            assert sidecar.find(src, directory=str(tmp_path / "cache")) is not None
        finally:
            src.close()
    assert not os.path.exists(archive + sidecar.SUFFIX)


def test_deferred_side_index_is_written_only_when_asked(tmp_path):
    # What vmafs mount does: open inside deferred_saves(), write the side index
    # later (from the filesystem process's thread).
    path = copy_fixture(tmp_path, "two-disks.vma.zst")
    side = sidecar.cache_path(path)
    with sidecar.deferred_saves() as saves:
        a = Archive.open(path)  # in this thread (open_guarded would use another)
        assert not os.path.exists(side) and len(saves) == 1
        with sidecar.deferred_saves() as inner:  # nested: the inner block queues its own
            assert inner == []
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(saves[0]()))
        t.start()
        t.join(GUARD)
        assert out == [side] and os.path.isfile(side)
        with open_source(path) as src:
            assert sidecar.load(src) is not None
        # Outside the block saving is immediate again.
        os.unlink(side)
        assert sidecar.save(a.source, a.header, a.index) == side
    finally:
        a.close()
