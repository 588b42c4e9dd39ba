"""writer.packer: clusters in any order -> a VMA archive that Proxmox and vmafs read."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard
from conftest import fixture_archives, unmount
from vmafs.writer.output import ArchiveOutput
from vmafs.writer.packer import Packer

from vmafs.archive import Archive
from vmafs.errors import (
    ConflictingClusterError,
    IncompleteArchiveError,
    WriteRangeError,
    WriterError,
)
from vmafs.format import (
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    SLOTS_PER_EXTENT,
    ExtentHeader,
    Header,
)

REPO = Path(__file__).resolve().parent.parent
UUID = bytes(range(16))
CTIME = 1_700_000_000


def make_disk(size: int, seed: int) -> bytes:
    """Random data with an all-zero cluster, a zero 4 KiB block and a zero tail."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    if size > 3 * CLUSTER_SIZE:
        data[CLUSTER_SIZE : 2 * CLUSTER_SIZE] = bytes(CLUSTER_SIZE)  # zero cluster
        data[2 * CLUSTER_SIZE + 4096 : 2 * CLUSTER_SIZE + 8192] = bytes(4096)  # zero block
    return bytes(data)


def clusters(data: bytes):
    for off in range(0, len(data), CLUSTER_SIZE):
        yield off, data[off : off + CLUSTER_SIZE]


def walk_extents(buf: bytes) -> tuple[Header, list[ExtentHeader]]:
    """Parse an archive with vmafs.format only (independent of the reader)."""
    header = Header.parse(buf)
    pos, extents = header.header_size, []
    while pos < len(buf):
        ext = ExtentHeader.parse(buf[pos : pos + EXTENT_HEADER_SIZE], pos, header.uuid)
        extents.append(ext)
        pos += EXTENT_HEADER_SIZE + ext.block_count * 4096
    assert pos == len(buf)
    return header, extents


async def pack(out, devices, configs=(), items=(), **kw) -> Packer:
    async with Packer(out, devices, configs, uuid=UUID, ctime=CTIME, **kw) as p:
        for dev_id, off, data in items:
            await p.put(dev_id, off, data)
        await p.finish()
    return p


# --- byte-for-byte agreement with Proxmox's writer ------------------------------------


def _replay_items(buf: bytes):
    header, extents = walk_extents(buf)
    pos, items = header.header_size, []
    for ext in extents:
        d = pos + EXTENT_HEADER_SIZE
        for s in ext.slots:
            cluster = bytearray(CLUSTER_SIZE)
            for b in range(16):
                if s.mask >> b & 1:
                    cluster[b * 4096 : (b + 1) * 4096] = buf[d : d + 4096]
                    d += 4096
            size = header.devices[s.dev_id].size
            off = s.cluster * CLUSTER_SIZE
            items.append((s.dev_id, off, bytes(cluster[: min(CLUSTER_SIZE, size - off)])))
        pos = d
    return header, items


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_replaying_a_proxmox_archive_reproduces_it_byte_for_byte(archive):
    """Same uuid/ctime/configs/devices and the same cluster arrival order as
    Proxmox's vma writer saw -> identical bytes (header, extent filling, md5s)."""
    buf = archive.read_bytes()
    header, items = _replay_items(buf)
    devices = [(header.devices[i].name, header.devices[i].size) for i in sorted(header.devices)]
    assert sorted(header.devices) == list(range(1, len(devices) + 1))
    out = io.BytesIO()
    configs = [(c.name, c.data) for c in header.configs]

    async def main():
        async with Packer(out, devices, configs, uuid=header.uuid, ctime=header.ctime) as p:
            for item in items:
                await p.put(*item)
            await p.finish()

    trio.run(main)
    assert out.getvalue() == buf


# --- order, duplicates, conflicts -----------------------------------------------------


def test_shuffled_clusters_across_disks_read_back(tmp_path):
    disks = {
        "drive-scsi0": make_disk(3 * 1024 * 1024 + 4608, 1),
        "drive-efidisk0": make_disk(540672, 2),
    }
    items = [
        (dev_id, off, chunk)
        for dev_id, data in enumerate(disks.values(), start=1)
        for off, chunk in clusters(data)
    ]
    random.Random(7).shuffle(items)
    target = tmp_path / "a.vma"
    with ArchiveOutput(target) as out:
        p = trio.run(
            pack,
            out,
            [(n, len(d)) for n, d in disks.items()],
            [("/etc/pve/100.conf", b"cores: 2\n")],
            items,
        )
        out.commit()
    assert p.dev_ids == {"drive-scsi0": 1, "drive-efidisk0": 2}
    with Archive.open(target) as a:
        assert [(d.name, d.size) for d in a.devices] == [(n, len(d)) for n, d in disks.items()]
        assert [(c.name, c.data) for c in a.header.configs] == [("100.conf", b"cores: 2\n")]
        for dev in a.devices:
            got = a.read(dev.dev_id, 0, dev.size)
            assert hashlib.sha256(got).digest() == hashlib.sha256(disks[dev.name]).digest()
    # the archive really is in arrival order, not sorted
    _, extents = walk_extents(target.read_bytes())
    order = [(s.dev_id, s.cluster) for e in extents for s in e.slots]
    assert order == [(d, off // CLUSTER_SIZE) for d, off, _ in items]
    assert order != sorted(order)


def test_identical_resend_is_dropped(tmp_path):
    data = make_disk(8 * CLUSTER_SIZE, 3)
    items = list(clusters(data))
    resend = [(1, off, chunk) for off, chunk in items[2:5]]
    # re-sent both as the same WRITE and as zero-filled data / WRITE_ZEROES of a zero cluster
    out = io.BytesIO()

    async def main():
        async with Packer(out, [("d", len(data))], uuid=UUID, ctime=CTIME) as p:
            for off, chunk in items:
                await p.put(1, off, chunk)
            for item in resend:
                await p.put(*item)
            await p.put(1, CLUSTER_SIZE, None, CLUSTER_SIZE)  # cluster 1 is all zero
            await p.put(1, 0, data[: 4 * CLUSTER_SIZE])  # overlapping multi-cluster re-send
            await p.finish()
        return p

    p = trio.run(main)
    assert p.duplicates_dropped == 3 + 1 + 4
    assert p.clusters_stored == 8
    path = tmp_path / "x.vma"
    path.write_bytes(out.getvalue())
    with Archive.open(path) as a:  # a duplicated cluster would fail here
        assert a.read(1, 0, len(data)) == data


def test_conflicting_resend_is_an_error_and_stores_nothing():
    data = make_disk(4 * CLUSTER_SIZE, 4)
    out = io.BytesIO()

    async def main():
        async with Packer(out, [("d", len(data))], uuid=UUID, ctime=CTIME) as p:
            await p.put(1, 0, data[:CLUSTER_SIZE])
            changed = bytearray(data[: 2 * CLUSTER_SIZE])
            changed[100] ^= 1
            with pytest.raises(ConflictingClusterError) as ei:
                await p.put(1, 0, bytes(changed))  # cluster 0 conflicts, cluster 1 is new
            assert ei.value.cluster == 0 and ei.value.dev_id == 1
            assert p.missing() == {1: 3}  # cluster 1 of that request was not stored
            # the packer is failed from now on: nothing more, and no archive
            with pytest.raises(WriterError):
                await p.put(1, 2 * CLUSTER_SIZE, data[2 * CLUSTER_SIZE :])
            with pytest.raises(WriterError):
                await p.finish()

    trio.run(main)


class GatedOutput(ArchiveOutput):
    """A real archive file whose writes block until the test opens the gate."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.gate.set()

    def write(self, data) -> None:
        self.gate.wait()
        super().write(data)


RESEND_SIZE = 12 * CLUSTER_SIZE + 4608  # a short final cluster with a partial block


def _resend_output(kind: str, tmp_path: Path):
    """A gated output for each way a re-send is compared (gate open).

    file: read back from the archive file; zst and memory (no read_back):
    digests made by the writer thread."""
    if kind == "memory":
        sink = GatedSink()
        sink.gate.set()
        return sink
    out = GatedOutput(tmp_path / ("r.vma" if kind == "file" else "r.vma.zst"))
    assert (out.read_back is not None) == (kind == "file")
    return out


def _archive_bytes(out) -> bytes:
    if isinstance(out, GatedSink):
        return out.buf.getvalue()
    out.commit()
    raw = Path(out.path).read_bytes()
    if out.compress:
        dctx = zstandard.ZstdDecompressor()
        return dctx.stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    return raw


async def _written_queued_open(p: Packer, out, data: bytes) -> None:
    """Clusters 0-5 written, 12 (short), 6, 7 queued behind a closed gate, 8 in the
    open extent (3 slots per extent); 9-11 missing."""

    def chunk(c: int, n: int = 1) -> bytes:
        return data[c * CLUSTER_SIZE : min(len(data), (c + n) * CLUSTER_SIZE)]

    await p.put(1, 0, chunk(0, 6))
    await p.put(1, 12 * CLUSTER_SIZE, chunk(12))
    await p.flush()
    out.gate.clear()
    await p.put(1, 6 * CLUSTER_SIZE, chunk(6, 2))
    await p.put(1, 8 * CLUSTER_SIZE, chunk(8))
    assert p.missing() == {1: 3}


@pytest.mark.parametrize("kind", ["file", "zst", "memory"])
def test_identical_resends_of_written_queued_and_open_clusters(tmp_path, kind):
    data = make_disk(RESEND_SIZE, 21)
    out = _resend_output(kind, tmp_path)

    async def main():
        async with Packer(
            out, [("d", RESEND_SIZE)], uuid=UUID, ctime=CTIME, slots_per_extent=3
        ) as p:
            try:
                await _written_queued_open(p, out, data)
                await p.put(1, 0, data[: 9 * CLUSTER_SIZE])  # written, queued, open
                await p.put(1, 12 * CLUSTER_SIZE, data[12 * CLUSTER_SIZE :])  # queued, short
                await p.put(1, CLUSTER_SIZE, None, CLUSTER_SIZE)  # cluster 1 is all zero
                assert p.duplicates_dropped == 9 + 1 + 1
                assert p.missing() == {1: 3}
            finally:
                out.gate.set()
            await p.put(1, 9 * CLUSTER_SIZE, data[9 * CLUSTER_SIZE : 12 * CLUSTER_SIZE])
            await p.finish()
        return p

    p = trio.run(main)
    assert p.clusters_stored == 13
    path = tmp_path / "check.vma"
    path.write_bytes(_archive_bytes(out))
    with Archive.open(path) as a:  # a duplicated cluster would fail here
        assert a.read(1, 0, RESEND_SIZE) == data


@pytest.mark.parametrize("kind", ["file", "zst", "memory"])
@pytest.mark.parametrize("where", [5, 6, 8, 12], ids=["written", "queued", "open", "short"])
def test_conflicting_resends_of_written_queued_and_open_clusters(tmp_path, kind, where):
    """The request [where, 9] (12: alone) differs in one byte of cluster `where`:
    refused, and its new cluster 9 is not stored."""
    data = make_disk(RESEND_SIZE, 22)
    out = _resend_output(kind, tmp_path)
    end = RESEND_SIZE if where == 12 else 10 * CLUSTER_SIZE
    changed = bytearray(data[where * CLUSTER_SIZE : end])
    changed[3 * 4096 + 5 if where != 12 else 4100] ^= 0x40

    async def main():
        async with Packer(
            out, [("d", RESEND_SIZE)], uuid=UUID, ctime=CTIME, slots_per_extent=3
        ) as p:
            try:
                await _written_queued_open(p, out, data)
                with pytest.raises(ConflictingClusterError) as ei:
                    await p.put(1, where * CLUSTER_SIZE, bytes(changed))
                assert ei.value.cluster == where and ei.value.dev_id == 1
                assert p.missing() == {1: 3}
                assert p.duplicates_dropped == 0
            finally:
                out.gate.set()
            with pytest.raises(WriterError):
                await p.put(1, 9 * CLUSTER_SIZE, data[9 * CLUSTER_SIZE : 12 * CLUSTER_SIZE])
            with pytest.raises(WriterError):
                await p.finish()

    trio.run(main)
    if isinstance(out, ArchiveOutput):
        out.abort()
    assert not list(tmp_path.glob("*.vma*"))


def test_caller_buffers_are_copied_and_sinks_get_reused_buffers():
    """put() copies: the caller may reuse its buffer at once.  The packer reuses
    its extent buffers once written, so a sink must copy too (BytesIO does)."""
    data = make_disk(200 * CLUSTER_SIZE, 23)
    out = io.BytesIO()
    kept = []

    class Keeper:
        def write(self, chunk) -> None:
            kept.append(chunk)
            out.write(chunk)

    async def main():
        buf = bytearray(CLUSTER_SIZE)
        async with Packer(Keeper(), [("d", len(data))], max_pending_bytes=0) as p:
            for off, chunk in clusters(data):
                buf[:] = chunk
                await p.put(1, off, buf)
                buf[:] = b"\xee" * CLUSTER_SIZE  # scribble over it at once
            await p.finish()

    trio.run(main)
    _, extents = walk_extents(out.getvalue())
    assert sum(len(e.slots) for e in extents) == 200
    path_data = out.getvalue()
    header = Header.parse(path_data)
    got = bytearray()
    pos = header.header_size
    for e in extents:
        got += path_data[pos + EXTENT_HEADER_SIZE : pos + EXTENT_HEADER_SIZE + e.block_count * 4096]
        pos += EXTENT_HEADER_SIZE + e.block_count * 4096
    # every cluster's stored blocks are its data (the zero cluster and block are not stored)
    stored = b"".join(
        data[o + b * 4096 : o + (b + 1) * 4096]
        for o, _ in clusters(data)
        for b in range(16)
        if data[o + b * 4096 : o + (b + 1) * 4096] != bytes(4096)
    )
    assert bytes(got) == stored
    # and the sink really was handed reused buffers (views, not fresh bytes)
    assert any(isinstance(k, memoryview) for k in kept)


def test_zeros_via_none_conflict_with_data():
    async def main():
        async with Packer(io.BytesIO(), [("d", CLUSTER_SIZE)]) as p:
            await p.put(1, 0, None, CLUSTER_SIZE)
            with pytest.raises(ConflictingClusterError):
                await p.put(1, 0, b"\1" + bytes(CLUSTER_SIZE - 1))

    trio.run(main)


# --- ranges ---------------------------------------------------------------------------


def test_final_partial_cluster_and_bad_ranges(tmp_path):
    size = 3 * CLUSTER_SIZE + 4608
    data = make_disk(size, 5)

    async def main(out):
        async with Packer(out, [("d", size)], uuid=UUID, ctime=CTIME) as p:
            bad = [
                (100, CLUSTER_SIZE),  # unaligned offset
                (0, CLUSTER_SIZE + 512),  # not whole clusters, not at the end
                (3 * CLUSTER_SIZE, 4096),  # short final cluster, but not to the end
                (3 * CLUSTER_SIZE, 8192),  # past the end
                (4 * CLUSTER_SIZE, CLUSTER_SIZE),  # wholly past the end
                (-CLUSTER_SIZE, CLUSTER_SIZE),
            ]
            for off, length in bad:
                with pytest.raises(WriteRangeError):
                    await p.put(1, off, None, length)
            with pytest.raises(WriteRangeError):
                await p.put(2, 0, None, CLUSTER_SIZE)  # unknown device
            with pytest.raises(WriteRangeError):
                await p.put(1, 0, bytes(10), CLUSTER_SIZE)  # length disagrees with data
            assert p.missing() == {1: 4}
            await p.put(1, 3 * CLUSTER_SIZE, data[3 * CLUSTER_SIZE :])  # the 4608-byte tail
            await p.put(1, 0, data[: 3 * CLUSTER_SIZE])
            await p.finish()

    target = tmp_path / "p.vma"
    with ArchiveOutput(target) as out:
        trio.run(main, out)
        out.commit()
    with Archive.open(target) as a:
        assert a.devices[0].size == size
        assert a.read(1, 0, size) == data
    _, extents = walk_extents(target.read_bytes())
    tail = [s for e in extents for s in e.slots if s.cluster == 3]
    assert tail[0].mask == 0b11  # 4608 bytes = block 0 and half of block 1; rest not stored


def test_zero_detection_per_4k_block():
    one_block = bytearray(CLUSTER_SIZE)
    one_block[5 * 4096 + 17] = 0xFF
    items = [
        (1, 0, bytes(CLUSTER_SIZE)),  # all-zero data -> mask 0
        (1, CLUSTER_SIZE, bytes(one_block)),  # one block stored
        (1, 2 * CLUSTER_SIZE, None),  # WRITE_ZEROES
    ]
    out = io.BytesIO()

    async def main():
        async with Packer(out, [("d", 3 * CLUSTER_SIZE)], uuid=UUID, ctime=CTIME) as p:
            for dev, off, data in items:
                await p.put(dev, off, data, CLUSTER_SIZE)
            await p.finish()

    trio.run(main)
    _, (ext,) = walk_extents(out.getvalue())
    assert [(s.cluster, s.mask) for s in ext.slots] == [(0, 0), (1, 1 << 5), (2, 0)]
    assert ext.block_count == 1


@pytest.mark.parametrize("slots", [58, 59, 1])
def test_slots_per_extent(tmp_path, slots):
    data = make_disk(130 * CLUSTER_SIZE, 6)
    out = io.BytesIO()
    trio.run(
        lambda: pack(
            out,
            [("d", len(data))],
            (),
            [(1, o, c) for o, c in clusters(data)],
            slots_per_extent=slots,
        )
    )
    _, extents = walk_extents(out.getvalue())
    counts = [len(e.slots) for e in extents]
    assert counts[:-1] == [slots] * (len(counts) - 1) and 0 < counts[-1] <= slots
    assert max(counts) <= SLOTS_PER_EXTENT
    path = tmp_path / "s.vma"
    path.write_bytes(out.getvalue())
    with Archive.open(path) as a:
        assert a.read(1, 0, len(data)) == data


def test_finish_refuses_missing_clusters_then_completes():
    data = make_disk(5 * CLUSTER_SIZE, 8)
    out = io.BytesIO()

    async def main():
        async with Packer(
            out, [("a", len(data)), ("b", CLUSTER_SIZE)], uuid=UUID, ctime=CTIME
        ) as p:
            await p.put(1, 0, data[: 3 * CLUSTER_SIZE])
            assert p.missing() == {1: 2, 2: 1} and not p.complete
            with pytest.raises(IncompleteArchiveError, match="3 clusters never arrived"):
                await p.finish()
            await p.put(1, 3 * CLUSTER_SIZE, data[3 * CLUSTER_SIZE :])
            await p.put(2, 0, None, CLUSTER_SIZE)
            assert p.complete
            await p.finish()

    trio.run(main)
    header, extents = walk_extents(out.getvalue())
    assert sum(len(e.slots) for e in extents) == 6


def test_leaving_without_finish_fails_later_puts():
    async def main():
        async with Packer(io.BytesIO(), [("a", CLUSTER_SIZE)]) as p:
            pass
        with pytest.raises(WriterError):
            await p.put(1, 0, None, CLUSTER_SIZE)

    trio.run(main)


def test_vmstate_must_arrive_in_order():
    async def main():
        async with Packer(io.BytesIO(), [("vmstate", 3 * CLUSTER_SIZE)]) as p:
            with pytest.raises(WriteRangeError, match="in order"):
                await p.put(1, CLUSTER_SIZE, None, CLUSTER_SIZE)
            await p.put(1, 0, None, 2 * CLUSTER_SIZE)
            await p.put(1, 0, None, CLUSTER_SIZE)  # identical re-send of an earlier one: fine
            await p.put(1, 2 * CLUSTER_SIZE, None, CLUSTER_SIZE)
            await p.finish()

    trio.run(main)


def test_bad_device_and_config_lists():
    with pytest.raises(WriterError):
        Packer(io.BytesIO(), [("a", 1), ("a", 2)])
    with pytest.raises(WriterError):
        Packer(io.BytesIO(), [("a", 0)])
    with pytest.raises(WriterError):
        Packer(io.BytesIO(), [("a", 1)], [("x/qemu.conf", b""), ("y/qemu.conf", b"")])
    with pytest.raises(WriterError):
        Packer(io.BytesIO(), [(f"d{i}", 1) for i in range(255)])


# --- backpressure and output failures --------------------------------------------------


class GatedSink:
    """A real in-memory sink whose writes block until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.buf = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.gate.wait()
        self.buf.write(data)


def test_put_waits_while_too_much_is_queued():
    data = make_disk(300 * CLUSTER_SIZE, 9)
    sink = GatedSink()
    done = []

    async def producer(p):
        for off, chunk in clusters(data):
            await p.put(1, off, chunk)
            done.append(off)

    async def main():
        async with Packer(sink, [("d", len(data))], max_pending_bytes=8 * 1024 * 1024) as p:
            async with trio.open_nursery() as n:
                n.start_soon(producer, p)
                await trio.testing.wait_all_tasks_blocked()
                # the writer thread is stuck: the producer must be parked, not done
                assert 0 < len(done) < 300
                assert p.pending_bytes <= 8 * 1024 * 1024 + 60 * CLUSTER_SIZE
                sink.gate.set()
            await p.finish()

    trio.run(main)
    assert len(done) == 300
    path_buf = sink.buf.getvalue()
    _, extents = walk_extents(path_buf)
    assert sum(len(e.slots) for e in extents) == 300


def test_disk_full_is_a_clean_writer_error():
    """/dev/full: every write fails with ENOSPC, like a full filesystem."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    data = make_disk(200 * CLUSTER_SIZE, 10)

    async def main():
        with open("/dev/full", "wb", buffering=0) as f:
            async with Packer(f, [("d", len(data))]) as p:
                with pytest.raises(WriterError) as ei:
                    for off, chunk in clusters(data):
                        await p.put(1, off, chunk)
                    await p.finish()
                assert isinstance(ei.value.__cause__, WriterError | OSError)
                cause = ei.value
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC

    trio.run(main)


# --- ArchiveOutput -------------------------------------------------------------------


# --- O_DIRECT output ---------------------------------------------------------------------


@contextmanager
def _mounted(tmp_path: Path, fstype: str, sector: int = 512):
    """ext4 on a loop device with *sector*-byte logical blocks, or a tmpfs; yields the mount."""
    mnt = tmp_path / f"mnt-{fstype}-{sector}"
    mnt.mkdir()
    dev = None
    try:
        if fstype == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mnt], check=True)
        else:
            img = tmp_path / f"fs-{sector}.img"
            with open(img, "wb") as f:
                f.truncate(64 << 20)
            dev = subprocess.run(
                ["losetup", "-f", "--show", "--sector-size", str(sector), img],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", dev], check=True)
            subprocess.run(["mount", dev, mnt], check=True)
        yield mnt
    finally:
        unmount(mnt, fuse=False)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _pack_items(out, items, size, configs=()):
    async def main():
        async with Packer(out, [("d", size)], configs, uuid=UUID, ctime=CTIME) as p:
            for off, chunk in items:
                await p.put(1, off, chunk)
            await p.flush()
            # an identical re-send of a written cluster: read back through the
            # O_DIRECT file's own page-cache descriptor
            await p.put(1, *items[0])
            assert p.duplicates_dropped == 1
            await p.finish()

    trio.run(main)


# a config that makes the header 512- but not 4096-granular (for the 4 KiB-sector case)
ODD_CONFIG = [("qemu-server.conf", b"x" * 700)]


@pytest.mark.loop
@pytest.mark.parametrize(
    "fstype, sector, direct", [("ext4", 512, True), ("ext4", 4096, True), ("tmpfs", 0, False)]
)
def test_o_direct_where_it_works_and_the_same_bytes_everywhere(
    require_loop, tmp_path, monkeypatch, fstype, sector, direct
):
    """ext4 on a 512-byte or a 4 KiB-sector disk: written with O_DIRECT from start
    to end, every write whole 4 KiB blocks at block offsets although the header
    and the extents are only 512-byte granular; tmpfs: no O_DIRECT at all.
    Same archive bytes as an in-memory sink in every case."""
    writes = []
    pwrite = os.pwrite

    def spy(fd, data, offset):
        writes.append((offset, len(data)))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    data = make_disk(130 * CLUSTER_SIZE + 4608, 25)
    items = list(clusters(data))
    random.Random(26).shuffle(items)
    want = io.BytesIO()
    _pack_items(want, items, len(data), ODD_CONFIG)
    assert Header.parse(want.getvalue()).header_size % 4096  # really not 4 KiB granular
    with _mounted(tmp_path, fstype, sector) as mnt:
        target = mnt / "a.vma"
        out = ArchiveOutput(target)
        try:
            assert out.direct == (fstype == "ext4")  # auto: local block device only
            _pack_items(out, items, len(data), ODD_CONFIG)
            assert out.direct == direct
            out.commit()
        finally:
            out.abort()
        assert target.read_bytes() == want.getvalue()
    if direct:
        assert writes and all(o % 4096 == 0 and n % 4096 == 0 for o, n in writes)


def test_output_uses_a_hidden_temp_name_until_commit(tmp_path):
    target = tmp_path / "vzdump-qemu-100.vma"
    out = ArchiveOutput(target)
    temp = Path(out.temp_path)
    assert temp.parent == tmp_path and temp.name.startswith(".vzdump-qemu-100.vma.")
    assert temp.name.endswith(".tmp")
    trio.run(_pack_zero, out)
    assert not target.exists() and temp.exists()
    out.commit()
    assert target.exists() and not temp.exists()
    umask = os.umask(0o22)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    with Archive.open(target) as a:
        assert a.read(1, 0, CLUSTER_SIZE) == bytes(CLUSTER_SIZE)
    with pytest.raises(FileExistsError):
        ArchiveOutput(target)
    out2 = ArchiveOutput(target, overwrite=True)
    out2.abort()
    assert target.exists()


async def _pack_zero(out):
    async with Packer(out, [("d", CLUSTER_SIZE)], uuid=UUID, ctime=CTIME) as p:
        await p.put(1, 0, None, CLUSTER_SIZE)
        await p.finish()


def test_abort_removes_the_temp_file(tmp_path):
    target = tmp_path / "x.vma"

    async def main(out):
        async with Packer(out, [("d", 4 * CLUSTER_SIZE)]) as p:
            await p.put(1, 0, None, CLUSTER_SIZE)
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-backup

    with pytest.raises(KeyboardInterrupt), ArchiveOutput(target) as out:
        temp = Path(out.temp_path)
        trio.run(main, out)
    assert not temp.exists() and not target.exists()
    assert list(tmp_path.iterdir()) == []
    out.abort()  # idempotent


STREAM_SCRIPT = """
import sys, trio
from vmafs.writer.output import ArchiveOutput
from vmafs.writer.packer import Packer
data = bytes(range(256)) * 1024 + bytes(65536 * 2)
async def main(out):
    async with Packer(out, [("drive-scsi0", len(data))], [("qemu-server.conf", b"x")]) as p:
        for off in range(0, len(data), 65536)[::-1]:
            await p.put(1, off, data[off:off + 65536])
        await p.finish()
out = ArchiveOutput("-")
trio.run(main, out)
out.commit()
"""


def test_stdout_streaming(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT], cwd=REPO, capture_output=True, check=True
    )
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "s.vma"
    path.write_bytes(proc.stdout)
    data = bytes(range(256)) * 1024 + bytes(65536 * 2)
    with Archive.open(path) as a:
        assert a.read(1, 0, len(data)) == data
        assert a.header.configs[0].data == b"x"


def test_zst_target_is_seekable_with_frames_at_extent_boundaries(tmp_path):
    from vmafs.zstd_seekable import FRAME_LIMIT, SeekTable

    data = make_disk(100 * CLUSTER_SIZE, 11)
    items = [(1, o, c) for o, c in clusters(data)]
    plain = io.BytesIO()
    trio.run(lambda: pack(plain, [("d", len(data))], (), items))
    target = tmp_path / "a.vma.zst"
    with ArchiveOutput(target, frame_bytes=1024 * 1024) as out:
        trio.run(lambda: pack(out, [("d", len(data))], (), items))
        out.commit()
    raw = target.read_bytes()
    assert raw[:4] != b"VMA\0"
    dctx = zstandard.ZstdDecompressor()
    got = dctx.stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    assert got == plain.getvalue()  # what `zstd -d | vma extract` would see
    with Archive.open(target) as a:
        assert a.read(1, 0, len(data)) == data
    table = SeekTable.from_tail(lambda off, n: raw[off : off + n], len(raw))
    assert table is not None and len(table) > 1
    header, extents = walk_extents(got)
    spans, pos = [], header.header_size
    for e in extents:
        end = pos + EXTENT_HEADER_SIZE + e.block_count * 4096
        spans.append((pos, end))
        pos = end
    sizes = table.decompressed_sizes
    starts = {sum(sizes[:i]) for i in range(1, len(sizes))}
    # Frames start at extents; an extent over the frame limit starts one and
    # is cut between its 4 KiB blocks (a full one, 3.7 MiB, into two frames).
    assert any(b - a > FRAME_LIMIT for a, b in spans)
    cut = {header.header_size}
    for a, b in spans:
        cut.add(b)
        inner = {x for x in starts if a < x < b}
        if b - a > FRAME_LIMIT:
            assert a in starts and inner, (a, b)
            assert all((x - a - EXTENT_HEADER_SIZE) % 4096 == 0 for x in inner)
        cut |= inner
    assert starts <= cut
