"""The side-index cache (vmafs.sidecar_cache): default place, size cap, LRU, --list/--prune."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import FIXTURES_DIR, is_mounted, vmafs_cmd
from test_mount_support import GUARD, cleanup

from vmafs import sidecar, sidecar_cache
from vmafs.archive import Archive
from vmafs.cli import main
from vmafs.source import open_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("VMAFS_CACHE_DIR", str(path))
    return path


def _copies(tmp_path, n: int, name: str = "two-disks.vma.gz") -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"{i}-{name}"
        shutil.copyfile(FIXTURES_DIR / name, p)
        out.append(str(p))
    return out


def _age(path: str, seconds_ago: int) -> None:
    t = os.stat(path).st_mtime_ns - seconds_ago * 10**9
    os.utime(path, ns=(t, t))


def test_nothing_is_written_beside_the_archive(tmp_path, cache):
    (p,) = _copies(tmp_path, 1)
    Archive.open(p).close()
    assert set(os.listdir(tmp_path)) == {"cache", os.path.basename(p)}
    assert os.path.isfile(sidecar.cache_path(p))


def test_the_side_index_just_written_is_kept_even_over_the_cap(tmp_path, cache, monkeypatch):
    first, second = _copies(tmp_path, 2)
    Archive.open(first).close()
    monkeypatch.setenv("VMAFS_CACHE_MAX_MIB", "0")  # room for nothing
    Archive.open(second).close()
    assert [e.path for e in sidecar_cache.entries(str(cache))] == [sidecar.cache_path(second)]


def test_evict_order_is_last_use(tmp_path, cache):
    paths = _copies(tmp_path, 3)
    for p in paths:
        Archive.open(p).close()
    sides = [sidecar.cache_path(p) for p in paths]
    size = os.path.getsize(sides[0])
    for s, ago in zip(sides, (300, 200, 100), strict=True):
        _age(s, ago)
    src = open_source(paths[0])
    try:
        assert sidecar.load(src) is not None  # used now: the newest
    finally:
        src.close()
    removed = sidecar_cache.evict(str(cache), cap=2 * size)
    assert removed == [sides[1]]
    assert sorted(e.path for e in sidecar_cache.entries(str(cache))) == sorted([sides[0], sides[2]])


def test_index_list_and_prune(tmp_path, cache, capsys):
    keep, gone, changed = _copies(tmp_path, 3)
    for p in (keep, gone, changed):
        assert main(["index", "--no-progress", p]) == 0
    capsys.readouterr()
    os.unlink(gone)
    with open(changed, "ab") as f:
        f.write(b"x")
    assert main(["index", "--list"]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: 3 side indexes" in out
    assert keep in out and f"{gone}  (archive gone" in out and f"{changed}  (archive changed" in out
    assert main(["index", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "2 removed, 1 left" in out
    assert [e.archive for e in sidecar_cache.entries(str(cache))] == [keep]


def test_index_list_usage_errors(tmp_path, cache):
    proc = subprocess.run(vmafs_cmd("index", "--list", "x.vma.gz"), capture_output=True, text=True)
    assert proc.returncode == 2 and "take no ARCHIVE" in proc.stderr
    proc = subprocess.run(vmafs_cmd("index"), capture_output=True, text=True)
    assert proc.returncode == 2 and "give the ARCHIVE" in proc.stderr


def test_root_default_cache_is_var_cache(monkeypatch):
    monkeypatch.delenv("VMAFS_CACHE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert sidecar_cache.cache_dir() == "/var/cache/vmafs"


@pytest.mark.fuse
def test_mount_option_index_beside(tmp_path, cache, require_fuse):
    (archive,) = _copies(tmp_path, 1, "two-disks.vma.zst")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for options in ((), ("-o", "index_beside")):
            proc = subprocess.run(
                vmafs_cmd("mount", *options, archive, mnt),
                capture_output=True,
                text=True,
                timeout=GUARD,
            )
            assert proc.returncode == 0, proc.stderr
            proc = subprocess.run(vmafs_cmd("umount", mnt), capture_output=True, timeout=GUARD)
            assert proc.returncode == 0 and not is_mounted(mnt)
            if not options:  # the first mount: into the cache only
                assert not os.path.exists(archive + sidecar.SUFFIX)
                os.unlink(sidecar.cache_path(archive))  # so the second one scans again
        assert os.path.isfile(archive + sidecar.SUFFIX)
        assert not os.path.exists(sidecar.cache_path(archive))
    finally:
        cleanup(archive, mnt)
