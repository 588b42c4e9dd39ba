"""Bounded by design: a length field of a crafted file never sizes an allocation.

Each case runs ``vmafs`` in a subprocess under RLIMIT_AS of 1 GiB: a read or
buffer sized by the field would fail with MemoryError (a traceback, or an
"internal error" line) instead of the one-line error that names the field.
"""

from __future__ import annotations

import os
import resource
import subprocess
import zlib

from conftest import FIXTURES_DIR, vmafs_cmd

from vmafs.source.lzo import F_H_EXTRA_FIELD, LZOP_MAGIC

LIMIT = 1 << 30


def run_under_1gib(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    return subprocess.run(
        vmafs_cmd(*args), capture_output=True, text=True, timeout=60, preexec_fn=limit, env=env
    )


def _lzop_header(flags: int, extra_len: int) -> bytes:
    """An lzop 1.04 file header with a valid checksum, then an extra field's length."""
    raw = (
        (0x1040).to_bytes(2, "big")  # version
        + (0x2080).to_bytes(2, "big")  # lib version
        + (0x0940).to_bytes(2, "big")  # version needed
        + bytes([1, 5])  # method LZO1X-1, level
        + flags.to_bytes(4, "big")
        + (0o100644).to_bytes(4, "big")  # mode
        + bytes(8)  # mtime
        + bytes([0])  # no name
    )
    return LZOP_MAGIC + raw + zlib.adler32(raw).to_bytes(4, "big") + extra_len.to_bytes(4, "big")


def test_lzop_extra_field_length_is_capped(tmp_path):
    path = tmp_path / "huge-extra.vma.lzo"
    path.write_bytes(_lzop_header(F_H_EXTRA_FIELD, 0xFFFF_FFF0) + bytes(4096))
    for command in (("list", path), ("verify", path)):
        proc = run_under_1gib(*command)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "extra field of 4294967280 bytes" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr


def _long_window_zstd(path, window_log: int) -> None:
    """A one-frame .vma.zst whose header asks for a 2**window_log window (zstd --long)."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=window_log, enable_ldm=True, write_content_size=False
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    with open(path, "wb") as out, cctx.stream_writer(out) as w:
        w.write((FIXTURES_DIR / "two-disks.vma").read_bytes())


def test_zstd_window_above_the_limit_is_refused_with_the_way_to_raise_it(tmp_path):
    path = tmp_path / "long.vma.zst"
    _long_window_zstd(path, 31)
    proc = run_under_1gib("list", "--json", path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs a 2048 MiB window" in proc.stderr, proc.stderr
    assert "VMAFS_ZSTD_MAX_WINDOW_MIB=2048" in proc.stderr, proc.stderr
    # Raised as the message says, it reads (no memory limit here: it needs the window).
    raised = subprocess.run(
        vmafs_cmd("list", path),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VMAFS_ZSTD_MAX_WINDOW_MIB": "2048"},
    )
    assert raised.returncode == 0 and "DEV: dev_id=1" in raised.stdout, raised.stderr


def test_side_index_bigger_than_its_archive_justifies_is_not_read(tmp_path):
    # A side index's size is bounded by its archive's (sidecar.size_cap): one
    # of 2 GiB beside a 40 KiB archive is refused unread, not allocated (that
    # would fail under the limit, "out of memory") and then rebuilt.
    import shutil

    from vmafs import sidecar

    archive = tmp_path / "a.vma.zst"
    shutil.copyfile(FIXTURES_DIR / "two-disks.vma.zst", archive)
    cache = tmp_path / "cache"
    env = {**os.environ, "VMAFS_CACHE_DIR": str(cache)}
    cache.mkdir()
    crafted = sidecar.cache_path(str(archive), str(cache))
    with open(crafted, "wb") as f:
        f.truncate(2 << 30)  # sparse: costs no disk
    cap = sidecar.size_cap(archive.stat().st_size)
    assert cap < LIMIT < 2 << 30 < sidecar.MAX_SIZE

    proc = run_under_1gib("list", "--json", archive, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{2 << 30} bytes is more than a side index of this archive can be ({cap})" in (
        proc.stderr
    )
    assert "out of memory" not in proc.stderr and "Traceback" not in proc.stderr
    # Rebuilt by rename: a real side index now, within the cap, used by the next open.
    assert 0 < os.path.getsize(crafted) <= cap
    again = run_under_1gib("list", "--json", archive, env=env)
    assert again.returncode == 0 and again.stderr == "", again.stderr
