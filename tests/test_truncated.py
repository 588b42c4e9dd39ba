"""Archives cut short, in every container vzdump writes.

A plain ``.vma`` cut short lists as incomplete and opens with allow_incomplete;
so must a ``.vma.zst`` (one frame, ``--long``, seekable), ``.vma.gz`` and
``.vma.lzo`` cut anywhere: inside a frame or block, inside a container
header, just after a frame or block boundary, inside a trailer.  The
reference for what must be served is the plain archive cut where the
compressed one's usable data ends: the same offset map, and every cluster
it holds reads as in the whole archive.  Archives come from the project's
test writer and are compressed with the real tools.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_cli_support import assert_one_line_error, build, patterned_disk, run_cli
from test_mount_support import mounted, run_vmafs

from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.errors import (
    HeaderTruncatedError,
    MissingClusterError,
    StreamTruncatedError,
    TruncatedError,
    VmaError,
)
from vmafs.format import CLUSTER_SIZE
from vmafs.source import open_source
from vmafs.zstd_seekable import SeekTable

KINDS = ["zst", "zst-long", "zst-seekable", "gz", "lzo"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """(plain archive path, its bytes, its disks): two disks, many extents."""
    d = tmp_path_factory.mktemp("whole")
    b = build(
        d / "a.vma",
        {
            "drive-scsi0": patterned_disk(96 * CLUSTER_SIZE, 5),
            "drive-scsi1": patterned_disk(40 * CLUSTER_SIZE + 4096, 6, zero_every=4),
        },
        slots=8,
    )
    return b.path, b.path.read_bytes(), b.disks


def compress(kind: str, plain: Path, out_dir: Path) -> Path:
    """*plain* compressed as *kind* with the real tool (seekable: ``vmafs recompress``)."""
    out = out_dir / f"{plain.name}.{kind}"
    if kind == "zst-seekable":
        proc = run_cli("recompress", plain, out)
        assert proc.returncode == 0, proc.stderr
        return out
    argv = {
        "zst": ["zstd", "-q", "-3", "-c"],
        "zst-long": ["zstd", "-q", "-3", "--long=27", "-c"],
        "gz": ["gzip", "-c"],
        "lzo": ["lzop", "-c"],
    }[kind]
    with open(out, "wb") as f:
        subprocess.run([*argv, plain], stdout=f, check=True, timeout=120)
    return out


def boundaries(kind: str, path: Path) -> list[int]:
    """Compressed offsets where a frame (zstd) or block (lzop) ends, inside the file."""
    if kind == "zst-seekable":
        with open(path, "rb") as f:
            table = SeekTable.from_tail(
                lambda off, n: os.pread(f.fileno(), n, off), path.stat().st_size
            )
        return np.cumsum(table.compressed_sizes).tolist()[:-1]
    if kind == "lzo":
        with open_source(path) as src:
            src.scan(lambda off, chunk: None)
            t = src._table
            return (t["coff"] + t["clen"].astype(np.int64)).tolist()[:-1]
    return []


def cuts(kind: str, path: Path) -> dict[str, int]:
    """Where to cut *path*: {what: file length}."""
    size = path.stat().st_size
    out = {"mid-stream": size // 2, "two-thirds": size * 2 // 3, "near-end": size - 2}
    ends = boundaries(kind, path)
    if ends:
        k = ends[len(ends) // 2]
        out["after-boundary"] = k  # the next frame's or block's header is all gone
        out["next-header"] = k + 5  # ... or partly there
    return out


def cut_copy(path: Path, length: int, out_dir: Path, name: str) -> Path:
    dst = out_dir / f"{name}-{path.name}"
    with open(path, "rb") as f:
        dst.write_bytes(f.read(length))
    return dst


def check_against_plain(
    cut: Path, plain: bytes, disks: dict, tmp_path: Path, *, cut_seen: bool = True
) -> int:
    """Open *cut* with and without allow_incomplete; compare with plain cut alike.

    *cut_seen*: the file does not end on a frame or member boundary (where a
    shorter file is a whole one), so the cut itself is what is refused.
    Returns the length of the usable stream.
    """
    with Archive.open(cut, allow_incomplete=True, use_sidecar=False) as a:
        n = a.source.size
        assert 0 < n <= len(plain) and not a.index.complete
        assert (a.source.truncation is not None) == cut_seen
        # The bytes before the cut are the whole archive's.
        assert a.source.pread(0, n) == plain[:n]
        ref_path = tmp_path / "ref.vma"
        ref_path.write_bytes(plain[:n])
        with Archive.open(ref_path, allow_incomplete=True) as ref:
            assert ref.index.truncated_at in (None, a.index.truncated_at)
            for dev in a.devices:
                assert np.array_equal(
                    a.index.maps[dev.dev_id].packed, ref.index.maps[dev.dev_id].packed
                ), dev.name
        check_reads(a, disks)
    with pytest.raises(VmaError) as ei:
        Archive.open(cut, use_sidecar=False)
    e = ei.value
    assert e.readable_in_part and e.path == str(cut) and "Error" not in str(e), str(e)
    if cut_seen:
        assert isinstance(e, StreamTruncatedError) and e.offset == n, repr(e)
        assert 0 <= e.compressed_offset <= cut.stat().st_size, str(e)
        assert f"compressed offset {e.compressed_offset}" in str(e), str(e)
    else:  # what the plain archive cut there gives
        with pytest.raises(VmaError) as ref_e:
            Archive.open(ref_path)
        assert type(e) is type(ref_e.value) and e.unnamed() == ref_e.value.unnamed()
    return n


def check_reads(a: Archive, disks: dict) -> int:
    """Every cluster *a* holds reads as the whole disk; the others fail. Returns how many held."""
    held = 0
    for dev in a.devices:
        data = disks[dev.name]
        packed = a.index.maps[dev.dev_id].packed
        for c in range(dev.clusters):
            lo = c * CLUSTER_SIZE
            size = min(CLUSTER_SIZE, dev.size - lo)
            if packed[c] == 0:
                with pytest.raises(MissingClusterError):
                    a.read(dev.dev_id, lo, size)
            else:
                assert a.read(dev.dev_id, lo, size) == data[lo : lo + size], (dev.name, c)
                held += 1
    return held


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_cut_anywhere_serves_what_lies_before(kind, whole, tmp_path, require_compressors):
    plain_path, plain, disks = whole
    comp = compress(kind, plain_path, tmp_path)
    lengths = {}
    for what, length in cuts(kind, comp).items():
        cut = cut_copy(comp, length, tmp_path, what)
        # A seekable file cut where a frame ends is a whole zstd file (of fewer frames).
        seen = not (kind == "zst-seekable" and what == "after-boundary")
        lengths[what] = check_against_plain(cut, plain, disks, tmp_path, cut_seen=seen)
    assert lengths["mid-stream"] < lengths["two-thirds"] < len(plain)
    if "after-boundary" in lengths:
        # Cut just after a frame or block: everything up to that boundary is there.
        assert lengths["after-boundary"] == lengths["next-header"]


@pytest.mark.parametrize("kind", ["zst", "gz", "lzo"])
def test_cut_inside_the_container_header_leaves_nothing(kind, whole, tmp_path, require_compressors):
    comp = compress(kind, whole[0], tmp_path)
    magic = {"zst": 4, "gz": 2, "lzo": 9}[kind]  # shorter: not recognised as the container
    for length in (magic + 2, magic + 8, magic + 14):
        cut = cut_copy(comp, length, tmp_path, f"h{length}")
        for allow in (False, True):
            with pytest.raises(HeaderTruncatedError) as ei:
                Archive.open(cut, allow_incomplete=allow, use_sidecar=False)
            assert not ei.value.readable_in_part  # nothing to read: no allow_incomplete hint
            assert "compressed offset" in str(ei.value), str(ei.value)


def test_gzip_cut_on_a_member_boundary_is_a_plain_cut(whole, tmp_path, require_compressors):
    # pigz --independent, cat a.gz b.gz: a file cut where a member ends is a
    # whole gzip file; the VMA stream in it ends early, as a plain archive
    # cut there does (same error, same offset map with allow_incomplete).
    import gzip

    plain_path, plain, disks = whole
    split = len(plain) // 2 + 1000  # inside an extent
    first = gzip.compress(plain[:split], mtime=0)
    path = tmp_path / "two.vma.gz"
    path.write_bytes(first + gzip.compress(plain[split:], mtime=0))
    with Archive.open(path, use_sidecar=False) as a:
        assert a.index.complete
    cut = cut_copy(path, len(first), tmp_path, "member")
    assert check_against_plain(cut, plain, disks, tmp_path, cut_seen=False) == split
    with pytest.raises(TruncatedError):  # inside an extent, as the plain archive says
        Archive.open(cut, use_sidecar=False)
    # A few bytes into the next member: a cut of the container, data up to the boundary.
    cut = cut_copy(path, len(first) + 6, tmp_path, "member6")
    assert check_against_plain(cut, plain, disks, tmp_path) == split


@pytest.mark.parametrize("kind", ["zst", "gz", "lzo"])
def test_side_index_keeps_the_cut(kind, whole, tmp_path, monkeypatch, require_compressors):
    plain_path, plain, disks = whole
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    comp = compress(kind, plain_path, tmp_path)
    cut = cut_copy(comp, comp.stat().st_size * 3 // 5, tmp_path, "c")
    with Archive.open(cut, allow_incomplete=True) as a:  # scans, saves a side index
        packed = {d: m.packed.copy() for d, m in a.index.maps.items()}
        n = a.source.size
    with open_source(cut) as src:
        assert sidecar.find(src, allow_incomplete=True) is not None
    with Archive.open(cut, allow_incomplete=True) as a:  # from the side index
        assert not a.stream_checked and not a.index.complete and a.source.size == n
        assert all(np.array_equal(m.packed, packed[d]) for d, m in a.index.maps.items())
        assert check_reads(a, disks) > 0
        assert a.source.pread(0, n) == plain[:n]
    # Without allow_incomplete the side index refuses as the scan does, without a scan.
    monkeypatch.setattr(type(open_source(cut)), "scan", _no_scan)
    with pytest.raises(StreamTruncatedError) as ei:
        Archive.open(cut)
    assert ei.value.readable_in_part and ei.value.offset == n


def _no_scan(*args, **kw):
    raise AssertionError("scanned although the side index knew the cut")


# --- the commands ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_commands_on_a_cut_archive(kind, whole, tmp_path, monkeypatch, require_compressors):
    plain_path, plain, disks = whole
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    comp = compress(kind, plain_path, tmp_path)
    cut = cut_copy(comp, comp.stat().st_size // 2, tmp_path, "c")

    line = assert_one_line_error(run_cli("index", cut))
    assert "; --allow-incomplete reads what is there (missing clusters read as errors)" in line
    obj = json.loads(run_cli("list", "--json", cut).stdout)
    assert obj["complete"] is False
    line = assert_one_line_error(run_cli("verify", cut))
    assert f"{cut}: verify failed: " in line and "compressed offset" in line, line
    assert "mount -o allow_incomplete or extract --allow-incomplete reads what is there" in line
    assert "Error" not in line, line

    out = tmp_path / "out"
    line = assert_one_line_error(run_cli("extract", cut, out))
    assert "--allow-incomplete reads what is there" in line and "compressed offset" in line, line
    assert not out.exists()
    proc = run_cli("extract", "--allow-incomplete", cut, out)
    assert proc.returncode == 0, proc.stderr
    assert "clusters were never written; extracted as zeros" in proc.stderr
    with Archive.open(cut, allow_incomplete=True) as a:
        for dev in a.devices:
            got = (out / f"disk-{dev.name}.raw").read_bytes()
            packed = a.index.maps[dev.dev_id].packed
            for c in range(dev.clusters):
                lo, hi = c * CLUSTER_SIZE, min((c + 1) * CLUSTER_SIZE, dev.size)
                want = disks[dev.name][lo:hi] if packed[c] else bytes(hi - lo)
                assert got[lo:hi] == want, (dev.name, c)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    p = tmp_path / "mnt"
    p.mkdir()
    return p


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zst", "zst-seekable", "gz", "lzo"])
def test_mount_a_cut_archive(kind, whole, tmp_path, mnt, monkeypatch, require_fuse):
    plain_path, plain, disks = whole
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))
    comp = compress(kind, plain_path, tmp_path)
    cut = cut_copy(comp, comp.stat().st_size // 2, tmp_path, "c")

    proc = run_vmafs("mount", cut, mnt)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vmafs: error: "), proc.stderr
    assert "mount -o allow_incomplete reads what is there" in proc.stderr, proc.stderr
    assert os.listdir(mnt) == []

    with Archive.open(cut, allow_incomplete=True) as a:
        packed = a.index.maps[1].packed.copy()
    held = np.flatnonzero(packed).tolist()
    lost = np.flatnonzero(packed == 0).tolist()
    assert held and lost
    data = disks["drive-scsi0"]
    with mounted(cut, mnt, "allow_incomplete"):
        fd = os.open(mnt / "disk-drive-scsi0.raw", os.O_RDONLY)
        try:
            for c in held:
                got = os.pread(fd, CLUSTER_SIZE, c * CLUSTER_SIZE)
                assert got == data[c * CLUSTER_SIZE : (c + 1) * CLUSTER_SIZE], c
            with pytest.raises(OSError) as ei:
                os.pread(fd, 4096, lost[0] * CLUSTER_SIZE)
            assert ei.value.errno == errno.EIO
        finally:
            os.close(fd)
