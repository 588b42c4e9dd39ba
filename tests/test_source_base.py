"""What the sources share: the declared protocol, the block cache, error naming."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from conftest import FIXTURES_DIR
from serve_support import evict
from vmafs.writer.recompress import recompress

from vmafs import sidecar
from vmafs.archive import Archive
from vmafs.errors import CorruptStreamError, IndexCacheError, SourceError, naming_archive
from vmafs.source import Source, open_source
from vmafs.source.base import BlockCache, SourceBase

SUFFIXES = ("", ".zst", ".gz", ".lzo")


def _members(protocol) -> set[str]:
    names = set()
    for cls in protocol.__mro__:
        if cls.__name__ in ("Protocol", "Generic", "object"):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_source_has_every_declared_member(suffix):
    members = _members(Source)
    assert {"pread_into", "header_reader", "fileno", "kind", "checkpoint_state"} <= members
    src = open_source(FIXTURES_DIR / f"two-disks.vma{suffix}")
    try:
        assert isinstance(src, SourceBase)
        missing = [m for m in sorted(members) if not hasattr(src, m)]
        assert not missing, missing
        assert src.compressed == bool(suffix)
        assert isinstance(src.fileno(), int) and src.fileno() >= 0
    finally:
        src.close()


def test_block_cache_is_lru_bounded_by_count_and_bytes():
    cache = BlockCache(max_blocks=2)
    cache.put("a", b"1")
    cache.put("b", b"2")
    assert cache.get("a") == b"1"  # a is now the most recent
    cache.put("c", b"3")
    assert cache.peek("b") is None and cache.peek("a") == b"1" and len(cache) == 2
    cache.peek("c")  # a peek does not count as a use
    cache.put("d", b"4")
    assert cache.peek("c") == b"3" and cache.peek("a") is None

    cache = BlockCache(max_bytes=10)
    cache.put(1, bytes(6))
    cache.put(2, bytes(6))  # 12 > 10: the oldest goes
    assert len(cache) == 1 and cache.get(2) is not None
    cache.put(3, bytes(50))  # bigger than the bound alone: kept, it is about to be used
    assert len(cache) == 1 and cache.get(3) is not None
    cache.put(3, b"other")  # a racing reader's copy does not replace it
    assert cache.get(3) == bytes(50)
    cache.clear()
    assert len(cache) == 0


def test_sources_without_a_scan_say_so():
    src = open_source(FIXTURES_DIR / "two-disks.vma")
    try:
        assert src.header_reader() is src and not src.needs_scan
        with pytest.raises(SourceError, match="has no scan"):
            src.scan(lambda off, chunk: None)
        # its side index keeps only the offset map
        assert src.checkpoint_state() == {}
        src.load_checkpoint_state({})
        with pytest.raises(IndexCacheError):
            src.load_checkpoint_state({"cp_dec": np.zeros(1)})
    finally:
        src.close()


def test_cached_reads_only_from_the_page_cache(tmp_path):
    path = tmp_path / "two-disks.vma"
    shutil.copy(FIXTURES_DIR / "two-disks.vma", path)
    with Archive.open(path) as a:
        buf = memoryview(bytearray(65536))
        evict(path)
        with pytest.raises(BlockingIOError):
            a.readinto(1, 0, buf, cached_only=True)
        want = a.read(1, 0, 65536)  # this one waits for the disk, and caches it
        buf[:] = bytes(65536)
        assert a.readinto(1, 0, buf, cached_only=True) == 65536 and buf == want
        end = a.source.pread(a.source.size - 10, 10)
        assert a.source.pread_into_cached(a.source.size - 10, buf) == 10  # the end: short
        assert buf[:10] == end
    gz = open_source(FIXTURES_DIR / "two-disks.vma.gz")
    try:
        with pytest.raises(BlockingIOError):  # a container decodes: never "at once"
            gz.pread_into_cached(0, memoryview(bytearray(512)))
    finally:
        gz.close()


@pytest.mark.parametrize("suffix", [".gz", ".lzo", ".zst"])
def test_read_errors_name_the_archive_once(tmp_path, suffix):
    """A read that finds the file changed since the scan: the path in front, once."""
    path = tmp_path / f"a.vma{suffix}"
    shutil.copy(FIXTURES_DIR / f"ext4-guest.vma{suffix}", path)
    src = open_source(path)
    try:
        src.scan(lambda off, chunk: None)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(CorruptStreamError) as ei:
            src.pread(src.size - 4096, 4096)
    finally:
        src.close()
    text = str(ei.value)
    assert text.startswith(f"{path}: ") and text.count(str(path)) == 1, text
    assert ei.value.unnamed() == text.removeprefix(f"{path}: ")


def test_unnamed_gives_the_error_without_the_archive_name():
    with pytest.raises(SourceError) as ei, naming_archive("x.vma"):
        raise SourceError("bad thing", offset=5)
    assert str(ei.value) == "x.vma: bad thing (archive offset 5)"
    assert ei.value.unnamed() == "bad thing (archive offset 5)"
    assert str(ei.value) == "x.vma: bad thing (archive offset 5)"  # unchanged by the call
    named = SourceError("cannot open x.vma: gone").name_archive("x.vma")
    assert named.unnamed() == str(named) == "cannot open x.vma: gone"


def test_stream_checked_says_whether_opening_decoded_the_whole_stream(tmp_path):
    for suffix in SUFFIXES:
        with Archive.open(FIXTURES_DIR / f"two-disks.vma{suffix}", use_sidecar=False) as a:
            # plain: no container; .gz, .lzo and one-frame .zst: scanned in full
            assert a.stream_checked, suffix
            assert a.compressed == bool(suffix)
    # a side index serves the second open: the stream was not decoded this time
    path = tmp_path / "two-disks.vma.gz"
    shutil.copy(FIXTURES_DIR / "two-disks.vma.gz", path)
    Archive.open(path).close()
    assert any(os.path.exists(p) for p in sidecar.candidate_paths(str(path)))
    with Archive.open(path) as a:
        assert not a.stream_checked
    # seekable zstd: indexed from the extent headers alone
    seekable = tmp_path / "seekable.vma.zst"
    recompress(str(FIXTURES_DIR / "two-disks.vma"), str(seekable))
    with Archive.open(seekable) as a:
        assert a.compressed and not a.stream_checked and not a.source.needs_scan
