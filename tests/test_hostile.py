"""Hostile input: each damage gives its own error, naming where it is; never a hang or crash.

The corruption table lives in tests/vmafactory.py (``hostile_cases``): each
case is a damaged archive plus the error class and the archive offset, dev
and cluster the message must name.  Every case goes through Archive.open
(what mount, extract and verify use), through the stream walker used for
compressed archives, and through ``vmafs verify``; a fuzzer then damages
headers behind valid checksums and checks that nothing but a VmaError ever
comes out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import unmount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmafactory import (
    HOSTILE_CONFIG_NAMES,
    Damaged,
    fix_all_md5,
    hostile_base,
    hostile_cases,
    hostile_names_archive,
    missing_cluster,
    truncated_in_extent_data,
)

from vmafs.archive import Archive
from vmafs.errors import (
    ConsistencyError,
    FormatError,
    VmaError,
)
from vmafs.format import CLUSTER_SIZE
from vmafs.index import StreamIndexer

REPO = Path(__file__).resolve().parent.parent
BASE = hostile_base()
CASES = hostile_cases(BASE)
TIMEOUT = 30  # seconds: far beyond what any case needs; reaching it means a hang


class Hang(Exception):
    """The code under test did not answer within TIMEOUT (not a VmaError on purpose)."""


@contextlib.contextmanager
def deadline(seconds: float = TIMEOUT):
    """Raise Hang in this (main) thread if the block runs longer than *seconds*."""

    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_error(path, **kw) -> VmaError:
    """The VmaError Archive.open raises for *path* (anything else fails the test)."""
    with deadline():
        with pytest.raises(VmaError) as e:
            Archive.open(path, **kw).close()
    return e.value


def stream(data: bytes, seed: int = 0, **kw):
    """Feed *data* to a StreamIndexer in random chunks; returns the index."""
    rng = random.Random(seed)
    si = StreamIndexer(**kw)
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 40000)
        si.feed(pos, data[pos : pos + n])
        pos = min(pos + n, len(data))
    return si.finish(len(data))


def assert_names_location(exc: VmaError, case: Damaged) -> None:
    msg = str(exc)
    for piece in case.location():
        assert piece in msg, (piece, msg)
    if case.match:
        assert case.match in msg, (case.match, msg)
    assert (exc.offset, exc.dev_id, exc.cluster) == (case.offset, case.dev_id, case.cluster)


def test_table_is_sound(tmp_path):
    # The undamaged base opens and reads back; every case really changes it; names are unique.
    with Archive.open(BASE.write(tmp_path / "base.vma")) as a:
        for dev_id, content in BASE.disks.items():
            assert a.read(dev_id, 0, len(content)) == content
    assert len({c.name for c in CASES}) == len(CASES)
    assert all(c.data != BASE.data for c in CASES)
    assert len(BASE.extents) >= 5 and BASE.vmstate_id is not None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_open_refuses_with_specific_error(tmp_path, case):
    exc = open_error(case.write(tmp_path / "bad.vma"))
    assert type(exc) is case.error, (type(exc), exc)
    assert_names_location(exc, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_allow_incomplete_tolerates_only_missing_data(tmp_path, case):
    # allow_incomplete forgives clusters never written and a cut final extent, nothing else.
    path = case.write(tmp_path / "bad.vma")
    forgiven = case.error.readable_in_part  # the class decides, as the CLI's hint does
    if not forgiven:
        exc = open_error(path, allow_incomplete=True)
        assert type(exc) is case.error
        return
    with deadline(), Archive.open(path, allow_incomplete=True) as a:
        assert not a.index.complete
        assert sum(a.missing_clusters(d) for d in BASE.disks) > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stream_walker_agrees(case):
    # Compressed archives are indexed by StreamIndexer: same error, same place.
    with deadline(), pytest.raises(VmaError) as e:
        stream(case.data, seed=len(case.data))
    expected = case.stream_error or case.error
    assert type(e.value) is expected, (type(e.value), e.value)
    if case.stream_error is None and (case.offset is None or case.offset >= BASE.header_size):
        assert_names_location(e.value, case)


@pytest.mark.parametrize("fmt", ["zst", "gz"])
def test_compressed_archives_give_the_same_errors(tmp_path, fmt):
    # The same damaged streams, compressed as vzdump does: the scan path must agree.
    import gzip

    import zstandard

    for case in CASES:
        if fmt == "zst":
            blob = zstandard.ZstdCompressor().compress(case.data)
        else:
            blob = gzip.compress(case.data, compresslevel=1)
        path = tmp_path / f"{case.name}.vma.{fmt}"
        path.write_bytes(blob)
        exc = open_error(path, use_sidecar=False)
        expected = case.stream_error or case.error
        assert type(exc) is expected, (case.name, type(exc), exc)
        if case.stream_error is None and (case.offset is None or case.offset >= BASE.header_size):
            assert_names_location(exc, case)


def test_hostile_config_names_parse(tmp_path):
    # Names are the filesystem's and extract's problem: the reader returns them as written.
    b = hostile_names_archive()
    with Archive.open(b.write(tmp_path / "names.vma")) as a:
        assert [c.name for c in a.header.configs] == HOSTILE_CONFIG_NAMES
        assert [c.data for c in a.header.configs] == [
            f"config {i}\n".encode() for i in range(len(HOSTILE_CONFIG_NAMES))
        ]
        assert a.read(1, 0, 1 << 20) == b.disks[1]


# --- vmafs verify: exit 1 and one line naming the error --------------------------------------


def run_vmafs(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("VMAFS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "vmafs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_verify_reports_error(tmp_path, case):
    path = case.write(tmp_path / "bad.vma")
    proc = run_vmafs("verify", path)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmafs: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not re.search(r"\b[A-Z][a-z]+[A-Za-z]*Error\b", lines[0]), lines[0]  # no class names
    if issubclass(case.error, (FormatError, ConsistencyError)):
        assert lines[0].endswith(
            ("restore from another copy of this backup", "(missing clusters read as errors)")
        ), lines[0]
    for piece in case.location():
        assert piece in lines[0], (piece, lines[0])


def test_verify_accepts_base(tmp_path):
    proc = run_vmafs("verify", "--data", BASE.write(tmp_path / "base.vma"))
    assert proc.returncode == 0, proc.stderr


# --- fuzz: damage behind valid checksums never gives anything but a VmaError ------------------

_HEADER_FIELDS = [48, 52, 56, 2044, 2048, 3068, 3072, 4096 + 32, 4096 + 32 + 8, 4096 + 64]


@st.composite
def mutations(draw) -> bytes:
    data = bytearray(BASE.data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["header-field", "extent-header", "byte", "cut", "append"]))
        if kind == "header-field":
            off = draw(st.sampled_from(_HEADER_FIELDS))
            data[off : off + 4] = draw(st.binary(min_size=4, max_size=4))
        elif kind == "extent-header":
            ext = draw(st.sampled_from(BASE.extents))
            rel = draw(st.integers(4, 511))
            if ext + rel < len(data):
                data[ext + rel] = draw(st.integers(0, 255))
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        else:
            data += draw(st.binary(max_size=1100))
    return fix_all_md5(bytes(data)) if draw(st.booleans()) else bytes(data)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=mutations())
def test_fuzzed_archives_fail_cleanly(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "f.vma")
        path.write_bytes(data)
        for allow in (False, True):
            try:
                with deadline():
                    a = Archive.open(path, allow_incomplete=allow)
            except VmaError:
                continue
            with a, deadline():
                for dev in a.devices:  # sizes may be fuzzed up to 256 TiB: read windows
                    for off in (0, dev.size // 2, max(0, dev.size - (1 << 20))):
                        try:
                            got = a.read(dev.dev_id, off, 1 << 20)
                        except VmaError:
                            continue
                        assert len(got) == min(1 << 20, dev.size - off)
        with deadline():
            try:
                stream(data)
            except VmaError:
                pass


# --- vmafs mount: refused before detaching; allow_incomplete serves EIO -----------------------

#: One case per error class (each refusal costs a process start).
MOUNT_CASES = list({c.error: c for c in reversed(CASES)}.values())[::-1]


@pytest.mark.fuse
@pytest.mark.parametrize("case", MOUNT_CASES, ids=lambda c: c.name)
def test_mount_refuses_before_detaching(tmp_path, require_fuse, case):
    path = case.write(tmp_path / "bad.vma")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = run_vmafs("mount", path, mnt)  # no -f: errors must come before the fork
        assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmafs: error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        for piece in case.location():
            assert piece in lines[0], (piece, lines[0])
        if case.match:
            assert case.match in lines[0], (case.match, lines[0])
        assert not os.path.ismount(mnt)
    finally:
        unmount(mnt)


@pytest.mark.fuse
@pytest.mark.parametrize("how", ["missing-cluster", "cut-final-extent"])
def test_mount_allow_incomplete_serves_eio(tmp_path, require_fuse, how):
    b = BASE
    if how == "missing-cluster":
        case = missing_cluster(b, 1, 2)
        lost = {(1, 2)}
    else:
        k = len(b.extents) - 1
        case = truncated_in_extent_data(b, k)
        lost = {(d, c) for d, c, _ in b.slots[k]}
    path = case.write(tmp_path / "inc.vma")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        refused = run_vmafs("mount", path, mnt)
        assert refused.returncode == 1 and not os.path.ismount(mnt), refused.stderr
        proc = run_vmafs("mount", "-o", "allow_incomplete", path, mnt)
        assert proc.returncode == 0, proc.stderr
        assert os.path.ismount(mnt)
        for dev_id, content in b.disks.items():
            dev = b.header.devices[dev_id]
            name = "vmstate.bin" if dev.is_vmstate else f"disk-{dev.name}.raw"
            fd = os.open(mnt / name, os.O_RDONLY)
            try:
                assert os.fstat(fd).st_size == len(content)
                for c in range(dev.clusters):
                    off = c * CLUSTER_SIZE
                    if (dev_id, c) in lost:
                        with pytest.raises(OSError) as e:
                            os.pread(fd, 4096, off)
                        assert e.value.errno == errno.EIO
                    else:
                        assert os.pread(fd, CLUSTER_SIZE, off) == content[off : off + CLUSTER_SIZE]
            finally:
                os.close(fd)
    finally:
        unmount(mnt)
