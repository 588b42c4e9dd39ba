"""Edge cases around opening an archive: odd side index files, odd file names,
pipes, empty files, and errors that must name the archive they are about."""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import FIXTURES_DIR, _unavailable, vmafs_cmd
from test_cli_support import assert_one_line_error, run_cli
from vmafactory import build_archive, flip_bit, sparse_disk

from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.errors import (
    CorruptStreamError,
    DuplicateClusterError,
    HeaderError,
    IndexCacheError,
    SourceError,
    VmaError,
)
from vmafs.format import CLUSTER_SIZE
from vmafs.source import open_source
from vmafs.source.plain import PlainSource
from vmafs.zstd_seekable import SeekableZstdWriter

BAD_NAME = os.fsdecode(b"bad\xffname.vma.zst")  # not valid UTF-8


def require_tool(name: str) -> str:
    """The path of the command-line tool *name*; skips (fails under CI=true) without it."""
    path = shutil.which(name)
    if path is None:
        _unavailable(f"{name} is not installed")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Side indexes land here, never in the machine's cache.
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(tmp_path / "cache"))


def copy_fixture(name: str, dest: Path) -> Path:
    shutil.copyfile(FIXTURES_DIR / name, dest)
    return dest


def run_limited(*args, timeout: float = 30, mem: int = 3 << 30) -> subprocess.CompletedProcess:
    """``vmafs ARGS`` with a time limit and an address-space limit (a runaway read fails fast)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    env = dict(os.environ)
    env.pop("VMAFS_DEBUG", None)
    return subprocess.run(
        vmafs_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=limit,
    )


# --- 1. pzstd output: its side index is used -------------------------------------------


@pytest.fixture
def pzstd_archive(tmp_path) -> Path:
    pzstd = require_tool("pzstd")
    raw = copy_fixture("two-disks.vma", tmp_path / "raw.vma")
    out = tmp_path / "pz.vma.zst"
    subprocess.run([pzstd, "-q", "-p", "2", "-f", str(raw), "-o", str(out)], check=True)
    assert out.read_bytes()[:4] != zstandard.FRAME_HEADER  # starts with a skippable frame
    return out


def test_side_index_of_pzstd_output_is_used(pzstd_archive, caplog):
    with Archive.open(pzstd_archive) as a:
        expect = a.read(1, 0, 3 * CLUSTER_SIZE)
    side = Path(sidecar.cache_path(str(pzstd_archive)))
    assert side.is_file()
    src = open_source(pzstd_archive)
    try:
        with caplog.at_level("WARNING", logger="vmafs.sidecar"):
            found = sidecar.find(src)
        assert "not used" not in caplog.text
        assert found is not None and found[0] == str(side)
    finally:
        src.close()
    inode, data = side.stat().st_ino, side.read_bytes()
    with Archive.open(pzstd_archive) as a:  # through the side index: same bytes, no rewrite
        assert a.read(1, 0, 3 * CLUSTER_SIZE) == expect
    assert side.stat().st_ino == inode and side.read_bytes() == data  # (a rewrite renames)


def _scanned_state(path: Path) -> dict:
    src = open_source(path)
    try:
        src.scan(lambda off, view: None)
        return {k: np.array(v) for k, v in src.checkpoint_state().items()}
    finally:
        src.close()


def _load(path: Path, state: dict) -> None:
    src = open_source(path)
    try:
        src.load_checkpoint_state(state)
    finally:
        src.close()


def test_frame_table_must_start_at_the_first_zstd_frame(pzstd_archive, tmp_path):
    state = _scanned_state(pzstd_archive)
    first = int(state["frame_comp"][0])
    assert first > 0  # pzstd: a skippable frame comes first
    _load(pzstd_archive, state)  # the real table fits
    for wrong in (0, first - 1, first + 1, first + 4):
        bad = dict(state, frame_comp=state["frame_comp"].copy())
        bad["frame_comp"][0] = wrong
        with pytest.raises(IndexCacheError, match="frame offsets are inconsistent"):
            _load(pzstd_archive, bad)
    # A file that starts with its data frame has nothing to skip.
    one = tmp_path / "one.vma.zst"
    one.write_bytes(
        zstandard.ZstdCompressor().compress((FIXTURES_DIR / "two-disks.vma").read_bytes())
    )
    state = _scanned_state(one)
    _load(one, state)
    state["frame_comp"] = state["frame_comp"] + np.uint64(4)
    state["frame_csize"] = state["frame_csize"] - np.uint64(4)
    with pytest.raises(IndexCacheError, match="frame offsets are inconsistent"):
        _load(one, state)


# --- 2. a side index that is not a regular file ----------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero", "link-to-file"])
def test_side_index_that_is_no_regular_file_is_skipped_and_replaced(tmp_path, kind):
    archive = copy_fixture("two-disks.vma.zst", tmp_path / "a.vma.zst")
    side = Path(sidecar.cache_path(str(archive)))
    side.parent.mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim"
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "link-to-dev-zero":
        side.symlink_to("/dev/zero")
    else:
        victim.write_bytes(b"not yours")
        side.symlink_to(victim)
    proc = run_limited("list", "--json", archive)
    assert proc.returncode == 0, proc.stderr
    assert "not a regular file" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one warning, nothing else
    # The rebuilt side index replaced the entry by rename, without writing through it.
    assert side.is_file() and not side.is_symlink()
    if kind == "link-to-file":
        assert victim.read_bytes() == b"not yours"
    again = run_limited("list", "--json", archive)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert again.stdout == proc.stdout


def test_side_index_is_not_read_past_its_size(tmp_path, monkeypatch):
    archive = copy_fixture("two-disks.vma.zst", tmp_path / "a.vma.zst")
    Archive.open(archive).close()
    side = sidecar.cache_path(str(archive))
    monkeypatch.setattr(sidecar, "MAX_SIZE", os.path.getsize(side) - 1)
    src = open_source(archive)
    try:
        assert sidecar.find(src) is None
    finally:
        src.close()


# --- 3. an archive whose name is not valid UTF-8 -----------------------------------------


def test_cache_path_of_a_name_that_is_not_utf8():
    a = sidecar.cache_path("/srv/" + BAD_NAME, "/c")
    b = sidecar.cache_path("/srv/" + os.fsdecode(b"bad\xfename.vma.zst"), "/c")
    assert a != b and a.startswith("/c/") and a.endswith(sidecar.SUFFIX)


def test_archive_named_not_utf8_lists_indexes_and_extracts(tmp_path):
    archive = copy_fixture("two-disks.vma.zst", tmp_path / BAD_NAME)
    kw = {"errors": "surrogateescape"}  # the name comes back in messages as it is
    proc = run_cli("list", "--json", archive, **kw)
    assert proc.returncode == 0, proc.stderr
    assert '"size"' in proc.stdout
    proc = run_cli("index", "--cache-dir", tmp_path / "elsewhere", archive, **kw)
    assert proc.returncode == 0, proc.stderr
    assert len(os.listdir(tmp_path / "elsewhere")) == 1
    proc = run_cli("extract", archive, tmp_path / "out", **kw)
    assert proc.returncode == 0, proc.stderr
    assert any(n.startswith("disk-") for n in os.listdir(tmp_path / "out"))


# --- 4. a pipe instead of a file ---------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "fixture"), [("list", "two-disks.vma.zst"), ("verify", "two-disks.vma")]
)
def test_pipe_as_input_is_refused_clearly(command, fixture):
    data = (FIXTURES_DIR / fixture).read_bytes()
    r, w = os.pipe()

    def feed() -> None:
        try:
            os.write(w, data)
        except OSError:
            pass  # the reader went away: expected
        finally:
            os.close(w)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        name = f"/dev/fd/{r}"
        proc = run_cli(command, name, pass_fds=(r,))
    finally:
        os.close(r)
        writer.join(10)
    line = assert_one_line_error(proc)
    assert name in line and "pipe" in line and "save the stream to a file" in line, line
    assert line.count(name) == 1, line


def test_plain_source_on_a_pipe_is_a_source_error():
    r, w = os.pipe()
    try:
        with pytest.raises(SourceError, match="cannot seek"):
            PlainSource(f"/dev/fd/{r}")
    finally:
        os.close(r)
        os.close(w)


def test_fifo_without_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "b.vma"
    os.mkfifo(fifo)
    proc = run_limited("list", fifo, timeout=30)
    line = assert_one_line_error(proc)
    assert str(fifo) in line and "pipe" in line, line
    with pytest.raises(SourceError, match="regular file or block device"):
        open_source(fifo)


# --- 5. errors name the archive, once ------------------------------------------------------


def _zst(path: Path, data: bytes) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


def _named_once(line: str, path: Path) -> None:
    assert line.count(str(path)) == 1, line
    assert f"error: {path}: " in line, line


@pytest.mark.slow
def test_truncated_zstd_stream_names_the_file(tmp_path):
    t = tmp_path / "t.zst"
    t.write_bytes((FIXTURES_DIR / "two-disks.vma.zst").read_bytes()[:5000])
    for args in (["list"], ["list", "--json"], ["index"], ["extract"]):
        extra = [tmp_path / "out"] if args == ["extract"] else []
        line = assert_one_line_error(run_cli(*args, t, *extra))
        _named_once(line, t)
        assert "truncated zstd stream" in line, line
    line = assert_one_line_error(run_cli("verify", t))
    assert line.count(str(t)) == 1 and f"{t}: verify failed: " in line, line
    assert "ends inside the VMA header: truncated zstd stream" in line, line


@pytest.mark.slow
def test_structural_errors_name_the_file(tmp_path):
    elf = _zst(tmp_path / "elf.vma.zst", b"\x7fELF" + bytes(70000))
    for args in (["list"], ["list", "--json"], ["index"]):
        line = assert_one_line_error(run_cli(*args, elf))
        _named_once(line, elf)
        assert "bad magic" in line, line
    # A cluster stored twice: found while indexing, plain and compressed.
    disk = sparse_disk(3 * CLUSTER_SIZE, 7, zero_clusters=0)
    b = build_archive(
        {"drive-scsi0": disk}, extra=[(1, 1, 0xFFFF, disk[CLUSTER_SIZE : 2 * CLUSTER_SIZE])]
    )
    plain = b.write(tmp_path / "dup.vma")
    packed = _zst(tmp_path / "dup.vma.zst", b.data)
    for args, path in (
        (["list", "--json"], plain),
        (["list", "--json"], packed),
        (["extract"], packed),
    ):
        extra = [tmp_path / "out"] if args == ["extract"] else []
        line = assert_one_line_error(run_cli(*args, path, *extra))
        _named_once(line, path)
        assert "stored twice" in line, line
    with pytest.raises(DuplicateClusterError) as info:
        Archive.open(packed)
    assert info.value.path == str(packed)
    assert str(info.value).startswith(f"{packed}: ") and str(info.value).count(str(packed)) == 1
    # A damaged header of a plain archive: `list` reads only the header.
    bad = tmp_path / "md5.vma"
    bad.write_bytes(flip_bit(b.data, 40))  # inside the header's md5 field
    line = assert_one_line_error(run_cli("list", bad))
    _named_once(line, bad)


def test_errors_that_name_the_file_already_are_not_prefixed_again(tmp_path):
    gz = tmp_path / "t.vma.gz"
    gz.write_bytes(gzip.compress((FIXTURES_DIR / "two-disks.vma").read_bytes())[:50000])
    with pytest.raises(VmaError) as info:
        Archive.open(gz)
    assert str(info.value).count(str(gz)) == 1
    assert info.value.path == str(gz)
    missing = tmp_path / "nope.vma"
    with pytest.raises(SourceError) as info:
        Archive.open(missing)
    assert str(info.value) == f"cannot open {missing}: No such file or directory"
    e = HeaderError("x").name_archive("a")
    assert str(e) == "a: x" and str(e.name_archive("b")) == "a: x"
    assert str(HeaderError("x", offset=3).name_archive("ab")) == "ab: x (archive offset 3)"
    assert str(HeaderError("in a.b").name_archive("a")) == "a: in a.b"  # a word, not a part


def test_read_errors_name_the_file_once(tmp_path):
    """A seekable .vma.zst decodes frames on read: a bad frame is a read error."""
    disk = sparse_disk(40 * CLUSTER_SIZE, 3, zero_clusters=0)
    b = build_archive({"drive-scsi0": disk}, slots=8)
    unit = 64 << 10
    starts = []
    path = tmp_path / "seek.vma.zst"
    with open(path, "wb") as f, SeekableZstdWriter(f, level=1) as w:
        for a in range(0, b.size, unit):
            starts.append((a, f.tell()))
            w.write_frame(b.data[a : a + unit])
    # a frame well away from every extent header (the header walk reads up to
    # 64 KiB from each): only reading its data decodes it
    _, comp = next(
        (a, c) for a, c in starts if not any(e - unit <= a <= e + 2 * unit for e in b.extents)
    )
    raw = bytearray(path.read_bytes())
    raw[comp] ^= 0xFF  # its magic
    path.write_bytes(raw)
    with Archive.open(path) as a:
        with pytest.raises(CorruptStreamError) as info:
            a.read(1, 0, len(disk))
    assert str(info.value).startswith(f"{path}: ") and str(info.value).count(str(path)) == 1
    assert str(path) not in info.value.message  # callers may wrap it in their own words
    line = assert_one_line_error(run_cli("verify", "--data", path))
    assert line.count(str(path)) == 1 and f"{path}: verify failed: reading" in line, line
    line = assert_one_line_error(run_cli("extract", path, tmp_path / "out"))
    _named_once(line, path)
    assert "zstd" in line, line
    # Named by a read, then raised out of an open: the open's rule (in the message) wins.
    e = CorruptStreamError("bad").name_archive("p", in_message=False)
    assert (str(e), e.message) == ("p: bad", "bad")
    assert (str(e.name_archive("p")), e.message) == ("p: bad", "p: bad")


# --- 6. an empty file ------------------------------------------------------------------------


def test_empty_file_is_called_empty(tmp_path):
    empty = tmp_path / "empty.vma"
    empty.write_bytes(b"")
    for cmd in ("list", "verify"):
        line = assert_one_line_error(run_cli(cmd, empty))
        assert "empty" in line and line.count(str(empty)) == 1, line
    with pytest.raises(SourceError, match="is empty"):
        open_source(empty)
    one = tmp_path / "one.vma"  # one byte is not empty: the first bytes are reported
    one.write_bytes(b"V")
    with pytest.raises(SourceError, match="first bytes 56;"):
        open_source(one)


def test_header_and_index_errors_after_a_scan_name_the_file(tmp_path):
    """`list` of a compressed archive parses the header after its scan, and `index`
    finds duplicates after it: both errors still name the file."""
    disk = sparse_disk(3 * CLUSTER_SIZE, 7, zero_clusters=0)
    b = build_archive(
        {"drive-scsi0": disk}, extra=[(1, 1, 0xFFFF, disk[CLUSTER_SIZE : 2 * CLUSTER_SIZE])]
    )
    bad_header = _zst(tmp_path / "md5.vma.zst", flip_bit(b.data, 40))
    line = assert_one_line_error(run_cli("list", bad_header))
    _named_once(line, bad_header)
    dup = _zst(tmp_path / "dup.vma.zst", b.data)
    line = assert_one_line_error(run_cli("index", dup))
    _named_once(line, dup)
    assert "stored twice" in line, line


def test_mount_log_of_an_archive_named_not_utf8(tmp_path, require_fuse):
    name = os.fsdecode(b"bad\xffname.vma")
    archive = tmp_path / name
    shutil.copy(FIXTURES_DIR / "two-disks.vma", archive)
    mnt, log = tmp_path / "mnt", tmp_path / "mount.log"
    mnt.mkdir()
    proc = run_cli("mount", "-o", f"logfile={log}", archive, mnt)
    try:
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    text = log.read_text(errors="replace")
    assert "Logging error" not in proc.stderr + text
    assert "bad\\xffname.vma" in text, text
