"""zstd sources: seekable frames, multi-frame scans and mid-frame checkpoints.

Compressed test data is made with the real ``zstd``/``pzstd`` CLIs (what
vzdump and users run), never with a mock; every read is compared with the
original bytes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import random
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
import zstandard

from vmafs.errors import CorruptStreamError, IndexCacheError, SourceError, StreamTruncatedError
from vmafs.source import open_source
from vmafs.source.zstd import (
    ZstdSource,
    parse_frame_header,
    put_resume_prefix,
    resume_prefix_size,
    window_descriptor_for,
)
from vmafs.zstd_seekable import SeekableZstdWriter, SeekTable

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


# --- test data ------------------------------------------------------------------


def mixed_data(size: int, seed: int = 1) -> bytes:
    """Disk-like bytes: random, word text, zeros and short repeated patterns, in runs."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        kind = rnd.random()
        n = rnd.choice((4096, 65536, 262144, 1 << 20))
        if kind < 0.25:
            out += rnd.randbytes(n)
        elif kind < 0.7:
            text = b" ".join(rnd.choices(words, k=n // 8 + 1))
            out += text[:n]
        elif kind < 0.85:
            out += bytes(n)
        else:
            pat = rnd.randbytes(rnd.randint(1, 64))
            out += (pat * (n // len(pat) + 1))[:n]
    return bytes(out[:size])


def record_data(size: int, seed: int = 3) -> bytes:
    """100-byte records that each differ from the previous in a byte or two.

    zstd codes this almost only with repeat offsets carried from block to
    block, so a fresh decoder cannot start at these block boundaries.
    """
    rnd = random.Random(seed)
    rec = bytearray(rnd.randbytes(100))
    out = bytearray()
    while len(out) < size:
        for _ in range(rnd.randint(0, 2)):
            rec[rnd.randrange(100)] = rnd.randrange(256)
        out += rec
    return bytes(out[:size])


def zstd_cli(tmp_path, name: str, data: bytes, *args: str) -> str:
    raw = tmp_path / f"{name}.raw"
    raw.write_bytes(data)
    out = tmp_path / f"{name}.zst"
    subprocess.run(["zstd", "-q", "-f", *args, str(raw), "-o", str(out)], check=True)
    raw.unlink()
    return str(out)


def scan_all(src: ZstdSource) -> bytes:
    parts = []
    pos = [0]

    def on_chunk(off: int, chunk: memoryview) -> None:
        assert off == pos[0], "chunks must arrive in order, without gaps"
        parts.append(bytes(chunk))
        pos[0] += len(chunk)

    src.scan(on_chunk)
    return b"".join(parts)


def check_random_reads(src, data: bytes, n: int = 300, seed: int = 7) -> None:
    rnd = random.Random(seed)
    size = len(data)
    for _ in range(n):
        off = rnd.randrange(size)
        length = rnd.choice((1, 512, 4096, 65536, 3 << 20))
        assert src.pread(off, length) == data[off : off + length], (off, length)
    # the end of the stream: short reads, then nothing
    assert src.pread(size - 10, 100) == data[-10:]
    assert src.pread(size, 100) == b""
    assert src.pread(size + 5, 1) == b""


def run_with_timeout(fn, seconds: float = 120):
    """Run *fn* in a thread; fail (instead of hanging the suite) if it does not finish."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "zstd source hung"
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.fixture(scope="module")
def mixed32() -> bytes:
    return mixed_data(32 << 20)


# --- frame header helpers -----------------------------------------------------------


def test_window_descriptor_is_smallest_that_fits():
    for size in (1, 1023, 1024, 1025, 3 << 20, (1 << 21) + 1, 5 << 20, 1 << 27):
        wd = window_descriptor_for(size)
        hdr = parse_frame_header(b"\x28\xb5\x2f\xfd\x00" + bytes([wd]), 0)
        assert hdr.window_size >= size
        if wd & 7 or wd >> 3:  # one step smaller would not fit
            smaller = wd - 1
            assert (
                parse_frame_header(b"\x28\xb5\x2f\xfd\x00" + bytes([smaller]), 0).window_size < size
            )


def test_frame_header_fields():
    data = mixed_data(300_000)
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    hdr = parse_frame_header(frame[:18], 0)
    assert hdr.content_size == len(data)
    assert hdr.checksum
    assert hdr.dict_id == 0
    assert hdr.window_size >= len(data)


# --- seekable format ---------------------------------------------------------------


@needs_zstd
@pytest.mark.parametrize("keep", [0, 1, 128 << 10, (128 << 10) + 1, 2 << 20])
def test_resume_prefix_is_a_valid_frame_start(tmp_path, keep):
    # The window as raw blocks after a synthetic frame header: closed with an
    # empty last block, it is a whole frame that the zstd CLI decodes to the
    # window itself (so the layout is zstd's, not just python-zstandard's).
    window = random.Random(keep).randbytes(keep)
    buf = bytearray(resume_prefix_size(keep) + 2)
    end = put_resume_prefix(buf, 2, window_descriptor_for(2 << 20), memoryview(window))
    assert end == len(buf) and buf[:2] == bytes(2)
    path = tmp_path / "prefix.zst"
    path.write_bytes(bytes(buf[2:]) + (1).to_bytes(3, "little"))  # last block, raw, empty
    out = subprocess.run(["zstd", "-d", "-c", str(path)], capture_output=True, check=True)
    assert out.stdout == window


@needs_zstd
def test_seekable_round_trip_and_zstd_cli_identity(tmp_path):
    data = mixed_data(12 << 20, seed=5)
    rnd = random.Random(2)
    path = tmp_path / "s.zst"
    cuts = sorted(rnd.sample(range(1, len(data)), 9))
    bounds = [0, *cuts, len(data)]
    with open(path, "wb") as f:
        with SeekableZstdWriter(f, level=3) as w:
            for a, b in zip(bounds, bounds[1:], strict=False):
                w.write_frame(data[a:b])
            w.write_frame(b"")  # ignored: no empty frames in the table
        assert w.frames == 10
        assert w.size == len(data)

    # zstd -d ignores the seek table and yields the data byte for byte
    out = subprocess.run(["zstd", "-d", "-c", str(path)], check=True, capture_output=True).stdout
    assert out == data

    table = SeekTable.from_tail(lambda o, n: path.read_bytes()[o : o + n], path.stat().st_size)
    assert table is not None
    assert table.decompressed_sizes == [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    assert table.checksums is not None and len(table.checksums) == 10

    src = open_source(path)
    assert isinstance(src, ZstdSource)
    assert not src.needs_scan  # the seek table says everything
    assert src.size == len(data)
    assert src.frames == 10
    check_random_reads(src, data)
    # a scan of a seekable file works too and finds the same frames
    assert scan_all(src) == data
    # (Checkpoints inside a frame are not asserted: the scan makes one when a
    # frame takes more than the spacing's 35 ms of CPU to decode, which a
    # loaded machine reaches; the suite saw one at load 4.)
    assert src.frames == 10
    src.close()


def expected_frames(units: list[int], target: int, limit: int) -> list[int]:
    """The frame sizes the writer's rule gives for units of these sizes, in order."""
    frames, cur = [], 0
    for u in units:
        if cur and (cur >= target or cur + u > limit):
            frames.append(cur)
            cur = 0
        k = -(-u // limit)  # a unit over the limit: k near-equal pieces, 4 KiB multiples
        ends = [u % 4096 + 4096 * (u // 4096 * i // k) for i in range(1, k + 1)]
        for a, b in zip([0, *ends], ends[:-1], strict=False):
            frames.append(cur + b - a)
            cur = 0
        cur += u - (ends[-2] if k > 1 else 0)
    return [*frames, cur] if cur else frames


@needs_zstd
@pytest.mark.parametrize("pieces", [False, True])
def test_seekable_writer_groups_units_into_frames(tmp_path, pieces):
    # Units as a VMA writer sends them: a header, full extents, runs of empty
    # extents, partly filled ones; frames never split one and stay within the limit.
    rnd = random.Random(7)
    units = [12800]
    for _ in range(60):
        units.append(
            rnd.choice((512, 512, 512 + 59 * 65536, 512 + rnd.randrange(1, 59 * 16) * 4096))
        )
    target, limit = 256 << 10, 1 << 20
    data = mixed_data(sum(units), seed=9)
    path = tmp_path / "u.zst"
    with open(path, "wb") as f:
        w = SeekableZstdWriter(f, frame_target=target, frame_limit=limit)
        pos = 0
        for u in units:
            if pieces:  # announced, then fed in pieces of any size
                w.unit(u)
                end = pos + u
                while pos < end:
                    n = min(end - pos, rnd.choice((1, 7, 4096, 100_000, 1 << 20)))
                    w.feed(memoryview(data)[pos : pos + n])
                    pos += n
            else:
                w.write(data[pos : pos + u])
                pos += u
        w.close()
    raw = path.read_bytes()
    table = SeekTable.from_tail(lambda o, n: raw[o : o + n], len(raw))
    want = expected_frames(units, target, limit)
    assert table.decompressed_sizes == want
    assert len(want) > 10 and max(want) <= limit + 8192
    # a frame ends inside a unit only to cut one over the limit (which starts
    # a frame), a multiple of 4 KiB before the unit's end (VMA blocks stay whole)
    starts = set(itertools.accumulate(want, initial=0))
    for a, b in itertools.pairwise(itertools.accumulate(units, initial=0)):
        inner = [x for x in starts if a < x < b]
        assert (b - a > limit) == bool(inner) == (bool(inner) and a in starts)
        assert all((b - x) % 4096 == 0 for x in inner)
    out = subprocess.run(["zstd", "-d", "-c", str(path)], check=True, capture_output=True).stdout
    assert out == data
    src = ZstdSource(str(path))
    check_random_reads(src, data)
    src.close()


def test_seekable_writer_write_frame_ends_the_collected_frame():
    buf = io.BytesIO()
    w = SeekableZstdWriter(buf, frame_target=1 << 20)
    w.write(b"a" * 1000)
    w.write(b"b" * 1000)
    w.write_frame(b"c" * 500)  # the two units become a frame first
    w.end_frame()  # nothing collected: no empty frame
    w.write(b"d" * 10)
    w.close()
    w.close()
    raw = buf.getvalue()
    table = SeekTable.from_tail(lambda o, n: raw[o : o + n], len(raw))
    assert table.decompressed_sizes == [2000, 500, 10]
    with pytest.raises(ValueError):
        w.feed(b"x")
    with pytest.raises(ValueError):
        w.write_frame(b"x")


def test_seek_table_rejects_inconsistent_footer(tmp_path):
    data = mixed_data(1 << 20)
    buf = io.BytesIO()
    w = SeekableZstdWriter(buf)
    w.write_frame(data[:300_000])
    w.write_frame(data[300_000:])
    w.close()
    raw = bytearray(buf.getvalue())
    size = len(raw)
    assert SeekTable.from_tail(lambda o, n: bytes(raw[o : o + n]), size) is not None
    bad = bytearray(raw)
    bad[-9] += 1  # one frame more than the table holds
    assert SeekTable.from_tail(lambda o, n: bytes(bad[o : o + n]), size) is None
    bad = bytearray(raw)
    bad[-5] = 0x84  # a reserved descriptor bit
    assert SeekTable.from_tail(lambda o, n: bytes(bad[o : o + n]), size) is None
    # a table whose frame sizes do not tile the file: scanned instead, still read right
    p2 = tmp_path / "u.zst"
    p2.write_bytes(zstandard.ZstdCompressor().compress(b"x" * 1000) + bytes(raw))
    src2 = ZstdSource(str(p2))
    assert src2.needs_scan
    assert scan_all(src2) == b"x" * 1000 + data
    src2.close()


# --- one big frame: checkpoints -------------------------------------------------------


@pytest.mark.slow
@needs_zstd
def test_single_frame_checkpoints_random_reads(tmp_path, mixed32):
    path = zstd_cli(tmp_path, "one", mixed32, "--threads=1", "-3")
    src = open_source(path)
    assert isinstance(src, ZstdSource) and src.needs_scan and src.size is None
    with pytest.raises(SourceError):
        src.pread(0, 10)
    src._spacing = 0.0  # as many checkpoints as the candidates allow
    src._budget = 100.0
    assert scan_all(src) == mixed32
    assert src.frames == 1 and src.size == len(mixed32)
    assert src.checkpoints >= 2, src.scan_stats
    assert src.scan_stats["candidates"] >= src.checkpoints
    check_random_reads(src, mixed32)
    assert not any(src._reads.bad)

    # checkpoint_state round trip: a second source needs no scan and reads the same
    state = src.checkpoint_state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    # Each stored window is exactly the output before its checkpoint (no masking
    # with this budget), also past the first wraps of the scan's ring buffer
    # (window + 3 batches of 32 blocks, ~14 MiB here).
    blob = state["cp_windows"].tobytes()
    bounds = [*state["cp_boff"].tolist(), len(blob)]
    dctx = zstandard.ZstdDecompressor()
    for i, dec in enumerate(state["cp_dec"].tolist()):
        window = dctx.decompress(blob[bounds[i] : bounds[i + 1]])
        assert window == mixed32[dec - len(window) : dec], i
    assert max(state["cp_dec"].tolist()) > 20 << 20
    other = ZstdSource(path, cache_bytes=1 << 20)
    other.load_checkpoint_state(state)
    assert not other.needs_scan and other.size == len(mixed32)
    assert other.checkpoints == src.checkpoints
    check_random_reads(other, mixed32, seed=11)
    # reads starting at each checkpoint decode from it correctly
    for off in state["cp_dec"].tolist():
        assert other.pread(off, 4096) == mixed32[off : off + 4096]
        assert other.pread(off - 1, 2) == mixed32[off - 1 : off + 1]
    src.close()
    other.close()


@needs_zstd
def test_default_spacing_respects_index_budget(tmp_path, mixed32):
    path = zstd_cli(tmp_path, "budget", mixed32, "--threads=1")
    src = ZstdSource(path, spacing=0.0, index_budget=0.02)
    assert scan_all(src) == mixed32
    windows = src.checkpoint_state()["cp_windows"].nbytes
    # the budget may be overrun by at most one checkpoint
    assert windows <= 0.02 * src.compressed_size + src.scan_stats["window_bytes"] / max(
        1, src.checkpoints
    )
    check_random_reads(src, mixed32, n=100)
    src.close()


def test_proxmox_fixture_single_frame():
    path = os.path.join(FIXTURES, "ext4-guest.vma.zst")
    with open(os.path.join(FIXTURES, "ext4-guest.vma"), "rb") as f:
        plain = f.read()
    src = ZstdSource(path, spacing=0.0, index_budget=100.0)
    assert scan_all(src) == plain
    assert src.frames == 1
    check_random_reads(src, plain)
    state = src.checkpoint_state()
    again = ZstdSource(path)
    again.load_checkpoint_state(state)
    check_random_reads(again, plain, seed=3)
    src.close()
    again.close()


@pytest.mark.slow
@needs_zstd
def test_scan_falls_back_past_unresumable_boundaries(tmp_path):
    # Stretches of repeat-offset records (no block there can start a resume)
    # between stretches of ordinary data, where checkpoints land.
    rnd = random.Random(9)
    parts = []
    for i in range(8):
        parts.append(record_data(3 << 20, seed=i))
        parts.append(mixed_data(rnd.choice((1 << 20, 2 << 20)), seed=100 + i))
    data = b"".join(parts)
    path = zstd_cli(tmp_path, "rec", data, "--threads=1", "-3")
    src = ZstdSource(path, spacing=0.0, index_budget=100.0, cache_bytes=2 << 20)
    assert scan_all(src) == data
    stats = src.scan_stats
    assert stats["rejected_test"] + stats["rejected_header"] > 0, stats
    assert src.checkpoints > 0, stats
    # no checkpoint lies inside a record stretch (their tests must have failed there)
    check_random_reads(src, data, n=200)
    # reads in record stretches decode from a checkpoint before the stretch
    off = 0
    for p in parts:
        if len(p) == 3 << 20:
            mid = off + len(p) // 2
            assert src.pread(mid, 4096) == data[mid : mid + 4096]
        off += len(p)
    src.close()


@needs_zstd
def test_records_only_no_checkpoint_but_correct(tmp_path):
    data = record_data(12 << 20)
    path = zstd_cli(tmp_path, "reconly", data, "--threads=1", "-3")
    src = ZstdSource(path, spacing=0.0, index_budget=100.0)
    assert scan_all(src) == data
    stats = src.scan_stats
    assert stats["rejected_test"] > 0
    # Boundaries here need repeat offsets from before them, except where zstd
    # itself starts afresh (at 8 MiB in this stream): whether that one gets
    # tested depends on timing.  A kept checkpoint must then decode exactly
    # to the end of the stream, not only over the span its test covered.
    assert src.checkpoints < stats["candidates"], stats
    state = src.checkpoint_state()
    for dec in state["cp_dec"].tolist():
        other = ZstdSource(path, cache_bytes=1 << 20)
        other.load_checkpoint_state(state)
        assert other.pread(dec, len(data) - dec) == data[dec:], dec
        assert not any(other._reads.bad)
        other.close()
    check_random_reads(src, data, n=40)
    src.close()


# --- several frames -----------------------------------------------------------------------


@needs_zstd
def test_concatenated_frames(tmp_path, mixed32):
    a = zstd_cli(tmp_path, "a", mixed32[: 20 << 20], "--threads=1")
    b = zstd_cli(tmp_path, "b", mixed32[20 << 20 :], "--threads=1", "-1")
    path = tmp_path / "ab.zst"
    with open(path, "wb") as out:
        for p in (a, b):
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
    src = ZstdSource(str(path), spacing=0.0, index_budget=100.0)
    assert src.needs_scan
    assert scan_all(src) == mixed32
    assert src.frames == 2
    assert int(src.checkpoint_state()["frame_dec"][1]) == 20 << 20
    check_random_reads(src, mixed32)
    src.close()


@needs_zstd
def test_stdin_frames_without_content_size(tmp_path):
    data = mixed_data(6 << 20, seed=4)
    path = tmp_path / "pipe.zst"
    with open(path, "wb") as out:
        for part in (data[:1000], data[1000 : 3 << 20], b"", data[3 << 20 :]):
            # from a pipe: no content size in the frame header
            out.write(
                subprocess.run(
                    ["zstd", "-q", "-c"], input=part, capture_output=True, check=True
                ).stdout
            )
    src = ZstdSource(str(path))
    assert scan_all(src) == data
    assert src.frames == 4
    assert int(src.checkpoint_state()["frame_dsize"][2]) == 0
    check_random_reads(src, data)
    src.close()


@pytest.mark.skipif(shutil.which("pzstd") is None, reason="pzstd not installed")
def test_pzstd_frames(tmp_path, mixed32):
    raw = tmp_path / "p.raw"
    raw.write_bytes(mixed32)
    subprocess.run(
        ["pzstd", "-q", "-p", "2", "-f", str(raw), "-o", str(tmp_path / "p.zst")], check=True
    )
    src = open_source(tmp_path / "p.zst")  # pzstd output starts with a skippable frame
    assert isinstance(src, ZstdSource)
    assert scan_all(src) == mixed32
    assert src.frames >= 2
    check_random_reads(src, mixed32)
    src.close()


# --- damage ----------------------------------------------------------------------------------


@pytest.fixture(params=["mapped", "pread"])
def scan_io(request, monkeypatch) -> str:
    """Run a test with the scan reading the mapped file, and again as where mmap fails."""
    if request.param == "pread":

        def refuse(*args, **kwargs):
            raise OSError(errno.ENODEV, "No such device")

        monkeypatch.setattr("vmafs.source.zstd.scan.mmap.mmap", refuse)
    return request.param


@needs_zstd
def test_scan_reads_mapped_or_by_pread_alike(tmp_path, mixed32, scan_io):
    path = zstd_cli(tmp_path, "io", mixed32, "--threads=1", "-3")
    src = ZstdSource(path)
    src._spacing = 0.0
    src._budget = 100.0
    assert scan_all(src) == mixed32
    # the mapping ends with the scan (a mount forks its daemon right after)
    with open("/proc/self/maps") as maps:
        assert os.path.realpath(path) not in maps.read()
    assert src.checkpoints >= 2, src.scan_stats
    check_random_reads(src, mixed32)
    src.close()


@needs_zstd
@pytest.mark.parametrize("cut", [3, 9, 1000, 0.5, -3, -1])
def test_truncated_single_frame(tmp_path, mixed32, cut, scan_io):
    path = zstd_cli(tmp_path, "trunc", mixed32[: 8 << 20], "--threads=1")
    full = open(path, "rb").read()
    keep = int(len(full) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(full) + cut)
    with open(path, "wb") as f:
        f.write(full[:keep])
    if keep < 4:
        with pytest.raises(SourceError):
            ZstdSource(path)
        return
    # A cut is not an error of the scan: it ends with the last whole block,
    # says where the cut is, and what it yields is the original's front.
    src = ZstdSource(path)
    src._spacing, src._budget = 0.0, 100.0  # checkpoints inside the cut frame too
    got = run_with_timeout(lambda: scan_all(src))
    cut_at = src.truncation
    assert isinstance(cut_at, StreamTruncatedError) and cut_at.readable_in_part
    assert re.search(rf"compressed offset {cut_at.compressed_offset}\b", str(cut_at))
    assert cut_at.compressed_offset <= keep and cut_at.offset == len(got) == src.size
    assert got == mixed32[: len(got)]
    if keep > len(full) // 2:  # whole blocks before the cut are served, not only whole frames
        assert len(got) > (4 << 20), len(got)
    if got:
        check_random_reads(src, got, n=60)
        # The side index keeps the cut frame and the cut.
        again = ZstdSource(path)
        again.load_checkpoint_state(src.checkpoint_state())
        assert again.truncation.compressed_offset == cut_at.compressed_offset
        check_random_reads(again, got, n=60, seed=3)
        again.close()
    src.close()


@needs_zstd
def test_corrupt_byte_and_checksum(tmp_path, mixed32):
    path = zstd_cli(tmp_path, "bad", mixed32[: 4 << 20], "--threads=1")
    full = bytearray(open(path, "rb").read())
    for pos in (len(full) // 3, len(full) - 2):  # inside a block; inside the checksum
        bad = bytearray(full)
        bad[pos] ^= 0x55
        with open(path, "wb") as f:
            f.write(bad)
        src = ZstdSource(path)
        with pytest.raises(CorruptStreamError, match="compressed offset"):
            run_with_timeout(lambda src=src: scan_all(src))
        src.close()


def test_header_reader_decodes_only_what_is_asked(tmp_path, monkeypatch):
    # Frames cut anywhere (not at any structure): reads at random offsets give
    # the stream's bytes, at least min(size, 64 KiB, rest) of them, crossing
    # frames when needed, without a whole-frame decode or touching the cache.
    from vmafs.source.zstd.reads import HEAD_CHUNK, FrameReader

    data = mixed_data(6 << 20, seed=11)
    rnd = random.Random(4)
    bounds = [0, *sorted(rnd.sample(range(1, len(data)), 7)), len(data)]
    path = tmp_path / "s.zst"
    with open(path, "wb") as f, SeekableZstdWriter(f) as w:
        for a, b in zip(bounds, bounds[1:], strict=False):
            w.write_frame(data[a:b])
    src = ZstdSource(str(path))
    whole = []
    monkeypatch.setattr(FrameReader, "decode_frame", lambda self, fi: whole.append(fi))
    reader = src.header_reader()
    assert reader.size == len(data)
    offsets = sorted(rnd.randrange(len(data)) for _ in range(200))
    offsets += [b - 3 for b in bounds[1:]]  # across a frame end (or the stream's)
    for off in offsets + offsets[::7]:  # forward, then backwards in a frame
        size = rnd.choice((1, 512, 4096, 1 << 20))
        got = reader.pread(off, size)
        assert len(got) >= min(size, HEAD_CHUNK, len(data) - off)
        assert got == data[off : off + len(got)]
    assert reader.pread(len(data), 512) == b"" and reader.pread(len(data) + 9, 1) == b""
    assert whole == [] and len(src._cache) == 0
    # a frame in the cache is served from it
    monkeypatch.undo()
    assert src.pread(bounds[2], 10) == data[bounds[2] : bounds[2] + 10]
    assert reader.pread(bounds[2] + 1, 100) == data[bounds[2] + 1 : bounds[2] + 101]
    src.close()


def test_header_reader_reports_damage(tmp_path):
    data = mixed_data(3 << 20, seed=12)
    path = tmp_path / "s.zst"
    with open(path, "wb") as f, SeekableZstdWriter(f) as w:
        w.write_frame(data)
    raw = bytearray(path.read_bytes())
    raw[parse_frame_header(bytes(raw[:18]), 0).size] |= 0x06  # first block: reserved type
    path.write_bytes(raw)
    src = ZstdSource(str(path))
    with pytest.raises(CorruptStreamError, match="compressed offset 0"):
        src.header_reader().pread(0, 512)
    src.close()


def test_truncated_after_indexing_fails_reads_cleanly(tmp_path):
    data = mixed_data(6 << 20, seed=8)
    path = tmp_path / "s.zst"
    with open(path, "wb") as f, SeekableZstdWriter(f) as w:
        for i in range(0, len(data), 1 << 20):
            w.write_frame(data[i : i + (1 << 20)])
    src = ZstdSource(str(path))
    state = src.checkpoint_state()
    src.close()
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    # the footer is gone: this is no longer a seekable file, and the old state does not fit
    src = ZstdSource(str(path))
    assert src.needs_scan
    with pytest.raises(IndexCacheError):
        src.load_checkpoint_state(state)
    # a rescan reads the whole frames before the cut (the cut one as far as its blocks go)
    got = run_with_timeout(lambda: scan_all(src))
    assert src.truncation is not None and got == data[: len(got)] and len(got) > 1 << 20
    src.close()
    # same size, corrupted frame: reads raise CorruptStreamError naming the offset
    bad = bytearray(full)
    bad[len(full) // 2] ^= 0xFF
    path.write_bytes(bad)
    src = ZstdSource(str(path))
    with pytest.raises(CorruptStreamError, match="compressed offset"):
        for i in range(0, len(data), 1 << 20):
            src.pread(i, 10)
    src.close()


def test_state_validation(tmp_path):
    data = mixed_data(16 << 20, seed=6)
    path = tmp_path / "one.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    src = ZstdSource(str(path), spacing=0.0, index_budget=100.0)
    scan_all(src)
    state = src.checkpoint_state()
    assert src.checkpoints >= 2

    def tampered(key, fn):
        s = {k: np.array(v, copy=True) for k, v in state.items()}
        s[key] = fn(s[key])
        return s

    bad_states = [
        tampered("zstd_version", lambda a: a + np.array([1, 0, 0, 0], dtype=a.dtype)),
        tampered("zstd_version", lambda a: a + np.array([0, 1, 0, 0], dtype=a.dtype)),
        tampered("zstd_version", lambda a: a + np.array([0, 0, 0, 1 << 40], dtype=a.dtype)),
        tampered("frame_dsize", lambda a: a + 1),
        tampered("cp_dec", lambda a: a[::-1].copy()),
        tampered("cp_comp", lambda a: a + (1 << 40)),
        tampered("cp_frame", lambda a: a + 1),
        {k: v for k, v in state.items() if k != "cp_windows"},
    ]
    for i, s in enumerate(bad_states):
        fresh = ZstdSource(str(path))
        with pytest.raises(IndexCacheError, match="zstd index state"):
            fresh.load_checkpoint_state(s)
        assert fresh.needs_scan, i
        fresh.close()
    src.close()


def test_not_zstd(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"VMA\0" + bytes(100))
    with pytest.raises(SourceError):
        ZstdSource(str(p))


def test_concurrent_reads(tmp_path, mixed32):
    data = mixed32[: 16 << 20]
    path = tmp_path / "c.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    src = ZstdSource(str(path), spacing=0.0, index_budget=100.0, cache_bytes=4 << 20)
    scan_all(src)
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(60):
                off = rnd.randrange(len(data))
                if src.pread(off, 8192) != data[off : off + 8192]:
                    errors.append(off)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    src.close()


def test_checksum_of_scanned_output_matches():
    # the scan hands every byte exactly once: the sha256 of the chunks is the file's
    path = os.path.join(FIXTURES, "two-disks.vma.zst")
    with open(os.path.join(FIXTURES, "two-disks.vma"), "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    h = hashlib.sha256()
    src = open_source(path)
    src.scan(lambda off, chunk: h.update(chunk))
    assert h.hexdigest() == want
    src.close()


def test_file_truncated_under_an_open_source(tmp_path):
    data = mixed_data(12 << 20, seed=12)
    path = tmp_path / "one.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    src = ZstdSource(str(path), spacing=0.0, index_budget=100.0, cache_bytes=1 << 20)
    scan_all(src)
    assert src.checkpoints >= 1
    full = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(len(full) // 2)
    with pytest.raises(CorruptStreamError, match="truncated"):
        run_with_timeout(lambda: src.pread(len(data) - 5000, 4096))
    src.close()


@needs_zstd
def test_single_frame_from_multithreaded_zstd(tmp_path, mixed32):
    # vzdump runs zstd --threads=N: still one frame, blocks from several jobs
    path = zstd_cli(tmp_path, "mt", mixed32, "--threads=2")
    src = ZstdSource(path, spacing=0.0, index_budget=100.0, cache_bytes=2 << 20)
    assert scan_all(src) == mixed32
    assert src.frames == 1 and src.checkpoints >= 1, src.scan_stats
    check_random_reads(src, mixed32, n=150)
    src.close()


@pytest.mark.slow
@needs_zstd
def test_masked_windows_still_read_right(tmp_path, monkeypatch):
    # Force window masking (normally only under index-budget pressure): the
    # incompressible segments no match copies from are stored as zeros, and
    # every read through such a checkpoint must still be exact.
    from vmafs.source.zstd import checkpoint, scan

    monkeypatch.setattr(scan, "_MASK_WHEN_BUDGET_USED", -1.0)
    monkeypatch.setattr(checkpoint, "_TRIM_LADDER", ())  # keep whole windows: random runs inside
    # runs of random bytes (never matched) between runs of text (matched locally)
    rnd = random.Random(21)
    data = b"".join(
        rnd.randbytes(192 << 10)
        + b" ".join(rnd.choices([b"alpha", b"beta", b"gamma", b"delta"], k=60000))[: 320 << 10]
        for i in range(48)
    )
    path = zstd_cli(tmp_path, "mask", data, "--threads=1")
    src = ZstdSource(path, spacing=0.0, index_budget=100.0, cache_bytes=1 << 20)
    assert scan_all(src) == data
    state = src.checkpoint_state()
    blob = state["cp_windows"].tobytes()
    bounds = [*state["cp_boff"].tolist(), len(blob)]
    masked = 0
    for j, end in enumerate(state["cp_dec"].tolist()):
        window = zstandard.ZstdDecompressor().decompress(blob[bounds[j] : bounds[j + 1]])
        original = data[end - len(window) : end]
        for a in range(0, len(window), 64 << 10):
            seg, orig = window[a : a + (64 << 10)], original[a : a + (64 << 10)]
            if seg != orig:
                assert seg == bytes(len(seg)), "a window differs only by zeroed segments"
                masked += 1
    assert src.checkpoints >= 1 and masked > 0, src.scan_stats
    check_random_reads(src, data)
    for off in state["cp_dec"].tolist():
        assert src.pread(off, 70000) == data[off : off + 70000]
    src.close()
