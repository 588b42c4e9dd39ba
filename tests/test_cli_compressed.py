"""The CLI on compressed archives (.vma.zst, .vma.gz, .vma.lzo, seekable zstd).

Fixtures are copied into tmp_path first: opening a compressed archive saves
a side index beside it, which must not land in tests/fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time

import pytest
from conftest import fixture_archives, load_manifest
from test_cli_support import assert_one_line_error, build, run_cli

COMPRESSED = [p for p in fixture_archives() if not p.name.endswith(".vma")]


def _copy(archive, tmp_path):
    dst = tmp_path / archive.name
    shutil.copyfile(archive, dst)
    return dst


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_there_are_compressed_fixtures():
    assert {p.name.rsplit(".", 1)[1] for p in COMPRESSED} == {"zst", "gz", "lzo"}


@pytest.mark.parametrize("archive", COMPRESSED, ids=lambda p: p.name)
def test_list_and_config_read_only_the_header(archive, tmp_path):
    path = _copy(archive, tmp_path)
    m = load_manifest(archive)
    proc = run_cli("list", path, env={"TZ": "UTC"})
    assert proc.returncode == 0, proc.stderr
    with open(archive.with_suffix(""), "rb") as f:  # the plain .vma beside it
        ctime = struct.unpack(">q", f.read(32)[24:32])[0]
    expected = [f"CFG: size: {c['size']} name: {c['name']}" for c in m["configs"]]
    expected += [
        f"DEV: dev_id={d['dev_id']} size: {d['size']} devname: {d['name']}" for d in m["devices"]
    ]
    expected.append("CTIME: " + time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(ctime)))
    assert proc.stdout.splitlines() == expected
    conf = run_cli("config", path)
    assert conf.returncode == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".vmafs-index")]  # no full scan


@pytest.mark.parametrize("archive", COMPRESSED, ids=lambda p: p.name)
def test_verify_and_extract(archive, tmp_path):
    path = _copy(archive, tmp_path)
    proc = run_cli("verify", "--data", path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    proc = run_cli("extract", path, out)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(archive)
    for d in m["devices"]:
        assert _sha256(out / f"disk-{d['name']}.raw") == d["sha256"]
    for c in m["configs"]:
        assert _sha256(out / c["name"]) == c["sha256"]
    obj = json.loads(run_cli("list", "--json", path).stdout)
    assert [d["size"] for d in obj["devices"]] == [d["size"] for d in m["devices"]]


@pytest.mark.parametrize("suffix", ["zst", "gz", "lzo"])
def test_corrupt_stream_is_named(suffix, tmp_path):
    archive = [p for p in COMPRESSED if p.name == f"two-disks.vma.{suffix}"][0]
    path = _copy(archive, tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff\x00\xff\x00" * 8)
    line = assert_one_line_error(run_cli("verify", "--data", path))
    assert "verify failed" in line
    # The container's own check (zstd/gzip/lzop checksums) or, if damage slips
    # through it, the VMA md5s; either way a specific error, never a crash.
    assert "corrupt" in line or "checksum" in line or "md5" in line, line
    assert not re.search(r"[A-Z][a-z]+Error\b", line), line  # no internal class names
    assert line.endswith("restore from another copy of this backup"), line


@pytest.mark.parametrize("suffix", ["zst", "gz", "lzo"])
def test_truncated_stream_is_refused(suffix, tmp_path):
    # A cut compressed file is an incomplete archive, as a cut plain one is
    # (tests/test_truncated.py reads what it holds).
    archive = [p for p in COMPRESSED if p.name == f"two-disks.vma.{suffix}"][0]
    path = _copy(archive, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)
    line = assert_one_line_error(run_cli("verify", path))
    assert "truncated" in line and not re.search(r"[A-Z][a-z]+Error\b", line), line
    assert "mount -o allow_incomplete or extract --allow-incomplete reads what is there" in line
    line = assert_one_line_error(run_cli("extract", path, tmp_path / "out"))
    assert "--allow-incomplete reads what is there" in line, line
    assert not (tmp_path / "out").exists()
    assert json.loads(run_cli("list", "--json", path).stdout)["complete"] is False


def test_seekable_zstd_data_damage(tmp_path):
    # Several frames: damage inside a later frame's data is found and located.
    b = build(tmp_path / "big.vma", {"drive-scsi0": os.urandom(20 << 20)})
    seekable = tmp_path / "big.vma.zst"
    assert run_cli("recompress", b.path, seekable).returncode == 0
    assert run_cli("verify", "--data", seekable).returncode == 0
    with open(seekable, "r+b") as f:
        f.seek(seekable.stat().st_size * 3 // 4)
        f.write(b"\xff\xff\xff\xff")
    line = assert_one_line_error(run_cli("verify", "--data", seekable))
    assert line.endswith("restore from another copy of this backup"), line
    assert re_offset(line) > 0
    # Without --data too: the archive is indexed from its extent headers only,
    # but verify still decompresses every frame (and checks its checksum).
    line = assert_one_line_error(run_cli("verify", seekable))
    assert line.endswith("restore from another copy of this backup"), line
    assert re_offset(line) > 0


def re_offset(line: str) -> int:
    import re

    m = re.search(r"archive offset (\d+)", line)
    assert m, line
    return int(m.group(1))
