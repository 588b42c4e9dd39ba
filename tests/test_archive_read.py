"""Archive.read/readinto return the device bytes, whatever order the clusters were stored in.

Archives are built with the shared format code (tests/vmafactory.py): shuffled
and interleaved clusters across several disks, 58- and 59-slot extents,
partial-zero clusters, disk sizes that are not multiples of 64 KiB or of
4 KiB, and a vmstate stream; plus a hypothesis property test over random
disks, orders and slot counts.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import FIXTURES_DIR, fixture_archives, load_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmafactory import Built, build_archive, sparse_disk

import vmafs.source
from vmafs.archive import Archive
from vmafs.format import BLOCK_SIZE, CLUSTER_SIZE
from vmafs.index import StreamIndexer

DISKS = {
    "drive-scsi0": sparse_disk(40 * CLUSTER_SIZE + 3 * BLOCK_SIZE + 512, 11),  # not 4 KiB aligned
    "drive-virtio1": sparse_disk(30 * CLUSTER_SIZE + 5 * BLOCK_SIZE, 12),  # 4 KiB, not 64 KiB
    "drive-sata2": sparse_disk(50 * CLUSTER_SIZE, 13, zero_clusters=0.5),
}
VMSTATE = sparse_disk(10 * CLUSTER_SIZE + 1000, 14, zero_clusters=0)


def expected_stored(content: bytes) -> int:
    """Bytes a writer stores for *content*: every 4 KiB block that is not all zero."""
    return BLOCK_SIZE * sum(
        1 for i in range(0, len(content), BLOCK_SIZE) if any(content[i : i + BLOCK_SIZE])
    )


def expected_ranges(content: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in range(0, len(content), CLUSTER_SIZE):
        if any(content[c : c + CLUSTER_SIZE]):
            end = min(c + CLUSTER_SIZE, len(content))
            if out and out[-1][0] + out[-1][1] == c:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((c, end - c))
    return out


def probe_points(size: int) -> list[tuple[int, int]]:
    """(offset, length) pairs around every boundary that matters for *size*."""
    offs = {0, 1, 511, 512, BLOCK_SIZE - 1, BLOCK_SIZE, CLUSTER_SIZE - 1, CLUSTER_SIZE}
    offs |= {CLUSTER_SIZE + 3 * BLOCK_SIZE + 7, 2 * CLUSTER_SIZE - BLOCK_SIZE}
    offs |= {size - 1, size - 512, size - BLOCK_SIZE, size - CLUSTER_SIZE, size, size + 100}
    lengths = [0, 1, 100, 512, BLOCK_SIZE, BLOCK_SIZE + 1, CLUSTER_SIZE, CLUSTER_SIZE + 1]
    lengths += [3 * CLUSTER_SIZE + 12345, size]
    return [(o, n) for o in sorted(offs) if o >= 0 for n in lengths]


def check_reads(archive: Archive, built: Built, points=None) -> int:
    """Every probe read equals the source; returns how many reads were made."""
    count = 0
    for dev_id, content in built.disks.items():
        dev = archive.header.devices[dev_id]
        assert dev.size == len(content)
        assert archive.read(dev_id, 0, dev.size) == content
        for off, n in points or probe_points(dev.size):
            want = content[off : off + n]
            assert archive.read(dev_id, off, n) == want, (dev_id, off, n)
            buf = bytearray(b"\xee" * n)
            got = archive.readinto(dev_id, off, buf)
            assert got == len(want) and bytes(buf[:got]) == want, (dev_id, off, n)
            assert buf[got:] == b"\xee" * (n - got)  # nothing past the device end is touched
            count += 2
    return count


@pytest.mark.parametrize("slots", [58, 59])
@pytest.mark.parametrize("order", ["in-order", "interleaved", "shuffled", "reversed"])
def test_out_of_order_archives_read_back(tmp_path, order, slots):
    b = build_archive(DISKS, vmstate=VMSTATE, order=order, slots=slots, seed=3)
    if order != "in-order":  # the order really is mixed
        firsts = [s[0][0] for s in b.slots] + [d for s in b.slots for d, _, _ in s[:3]]
        assert len(set(firsts)) > 1
    assert max(len(s) for s in b.slots) == slots
    with Archive.open(b.write(tmp_path / "a.vma")) as a:
        assert [d.name for d in a.devices] == [*DISKS, "vmstate"]
        assert a.devices[-1].is_vmstate
        check_reads(a, b)
        for dev_id, content in b.disks.items():
            assert a.stored_bytes(dev_id) == expected_stored(content)
            assert list(a.allocated_ranges(dev_id)) == expected_ranges(content)
            assert a.missing_clusters(dev_id) == 0


def test_shuffled_many_seeds_one_slot_extents(tmp_path):
    # One cluster per extent and many seeds: every cluster is its own extent, in any order.
    for seed in range(5):
        b = build_archive(DISKS, vmstate=VMSTATE, order="shuffled", slots=1 + seed * 7, seed=seed)
        with Archive.open(b.write(tmp_path / f"a{seed}.vma")) as a:
            check_reads(a, b, points=[(o, 70000) for o in range(0, 3_000_000, 54321)])


def test_reads_are_zero_without_io_for_holes(tmp_path):
    # An all-zero disk stores no blocks: reads never touch the data area.
    b = build_archive({"zero": bytes(20 * CLUSTER_SIZE + 512)}, order="shuffled", slots=59)
    path = b.write(tmp_path / "z.vma")
    with Archive.open(path) as a:
        assert a.stored_bytes(1) == 0 and list(a.allocated_ranges(1)) == []
        os.truncate(path, b.header_size)  # the data area is gone; holes still read
        assert a.read(1, 0, 20 * CLUSTER_SIZE + 512) == bytes(20 * CLUSTER_SIZE + 512)


def test_partial_zero_cluster_block_layout(tmp_path):
    # Stored blocks of a cluster are packed: block 9 follows block 2 directly in the archive.
    disk = bytearray(2 * CLUSTER_SIZE)
    disk[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] = b"\x02" * BLOCK_SIZE
    disk[9 * BLOCK_SIZE + 100] = 9
    disk[CLUSTER_SIZE + 15 * BLOCK_SIZE + 4095] = 15
    b = build_archive({"d": bytes(disk)}, order=[(1, 1), (1, 0)])
    with Archive.open(b.write(tmp_path / "p.vma")) as a:
        dm = a.index.maps[1]
        ext = b.extents[0]
        assert int(dm.masks[0]) == (1 << 2) | (1 << 9) and int(dm.masks[1]) == 1 << 15
        assert int(dm.offsets[1]) == ext + 512  # stored first
        assert int(dm.offsets[0]) == ext + 512 + BLOCK_SIZE
        assert a.read(1, 2 * BLOCK_SIZE - 10, 7 * BLOCK_SIZE + 200) == bytes(
            disk[2 * BLOCK_SIZE - 10 : 9 * BLOCK_SIZE + 190]
        )
        check_reads(a, b)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_allocated_ranges_across_scan_chunks(tmp_path, monkeypatch, chunk):
    # allocated_ranges walks the map in chunks; runs that cross a chunk border stay merged.
    monkeypatch.setattr("vmafs.archive._RUNS_CHUNK", chunk)
    b = build_archive(DISKS, order="shuffled", seed=3)
    with Archive.open(b.write(tmp_path / "a.vma")) as a:
        for dev_id, content in b.disks.items():
            assert list(a.allocated_ranges(dev_id)) == expected_ranges(content), dev_id
    full = build_archive({"d": b"\x01" * (5 * CLUSTER_SIZE + 100)})
    with Archive.open(full.write(tmp_path / "f.vma")) as a:
        assert list(a.allocated_ranges(1)) == [(0, 5 * CLUSTER_SIZE + 100)]


def test_read_clips_at_device_end(tmp_path):
    b = build_archive(DISKS)
    with Archive.open(b.write(tmp_path / "a.vma")) as a:
        size = a.header.devices[1].size
        assert a.read(1, size, 10) == b""
        assert a.read(1, size + CLUSTER_SIZE * 100, 10) == b""
        assert a.read(1, size - 3, 10) == DISKS["drive-scsi0"][-3:]
        assert a.read(1, 0, 0) == b""
        assert a.readinto(1, size, bytearray(10)) == 0
        # A negative offset is a caller's bug, not a read from the end of the device.
        with pytest.raises(ValueError):
            a.read(1, -10, 20)
        with pytest.raises(ValueError):
            a.readinto(1, -CLUSTER_SIZE, bytearray(10))


@pytest.mark.parametrize("archive", fixture_archives(compressed=False), ids=lambda p: p.name)
def test_proxmox_fixture_devices_match_manifest(archive):
    manifest = load_manifest(archive)
    with Archive.open(archive, use_sidecar=False) as a:
        assert a.header.configs and [c.name for c in a.header.configs] == [
            c["name"] for c in manifest["configs"]
        ]
        for cfg, want in zip(a.header.configs, manifest["configs"], strict=True):
            assert hashlib.sha256(cfg.data).hexdigest() == want["sha256"]
        assert [(d.dev_id, d.name, d.size) for d in a.devices] == [
            (d["dev_id"], d["name"], d["size"]) for d in manifest["devices"]
        ]
        for dev in manifest["devices"]:
            h = hashlib.sha256()
            buf = bytearray(3 * CLUSTER_SIZE + 512)  # odd chunk: reads straddle clusters
            off = 0
            while off < dev["size"]:
                n = a.readinto(dev["dev_id"], off, buf)
                h.update(memoryview(buf)[:n])
                off += n
            assert h.hexdigest() == dev["sha256"], dev["name"]


# --- property: random disks, random order -> every read equals the source --------------------

_sizes = st.one_of(
    st.integers(1, 6 * CLUSTER_SIZE),  # any size
    st.integers(1, 6 * 128).map(lambda n: n * 512),  # what disks really have
    st.integers(1, 6).map(lambda n: n * CLUSTER_SIZE),
)


@st.composite
def archives(draw) -> Built:
    disks = []
    for i in range(draw(st.integers(1, 3))):
        size = draw(_sizes)
        seed = draw(st.integers(0, 2**32 - 1))
        zc = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
        zb = draw(st.sampled_from([0.0, 0.5, 0.9]))
        disks.append((f"drive-scsi{i}", sparse_disk(size, seed, zero_clusters=zc, zero_blocks=zb)))
    vmstate = None
    if draw(st.booleans()):
        vmstate = sparse_disk(draw(_sizes), draw(st.integers(0, 2**32 - 1)), zero_clusters=0.2)
    return build_archive(
        disks,
        vmstate=vmstate,
        order=draw(st.sampled_from(["in-order", "interleaved", "shuffled", "reversed"])),
        seed=draw(st.integers(0, 2**32 - 1)),
        slots=draw(st.one_of(st.sampled_from([1, 58, 59]), st.integers(1, 59))),
    )


_PROPERTY = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


@settings(max_examples=40, **_PROPERTY)
@given(built=archives(), data=st.data())
def test_property_random_reads_equal_source(built, data):
    """A sample of the property, for the quick suite (about 1/8 of the thorough run)."""
    random_reads_equal_source(built, data)


@pytest.mark.slow
@settings(max_examples=300, **_PROPERTY)
@given(built=archives(), data=st.data())
def test_property_random_reads_equal_source_thorough(built, data):
    random_reads_equal_source(built, data)


def random_reads_equal_source(built: Built, data) -> None:
    """Every read of every device of *built*, opened and stream-indexed, equals its disks."""
    with tempfile.TemporaryDirectory() as tmp:
        path = built.write(os.path.join(tmp, "p.vma"))
        with Archive.open(path) as a:
            for dev_id, content in built.disks.items():
                assert a.read(dev_id, 0, len(content) + 1) == content
                assert a.stored_bytes(dev_id) == expected_stored(content)
                assert list(a.allocated_ranges(dev_id)) == expected_ranges(content)
            reads = data.draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(sorted(built.disks)),
                        st.one_of(  # anywhere, or block-aligned as filesystems read
                            st.integers(0, 7 * CLUSTER_SIZE),
                            st.integers(0, 7 * 16).map(lambda b: b * BLOCK_SIZE),
                        ),
                        st.one_of(  # up to 3 clusters, or small reads inside one
                            st.integers(0, 3 * CLUSTER_SIZE),
                            st.integers(0, 2 * BLOCK_SIZE),
                            st.sampled_from([BLOCK_SIZE, 2 * BLOCK_SIZE, CLUSTER_SIZE]),
                        ),
                    ),
                    min_size=1,
                    max_size=25,
                )
            )
            for dev_id, off, n in reads:
                want = built.disks[dev_id][off : off + n]
                assert a.read(dev_id, off, n) == want
                buf = bytearray(b"\xee" * n)  # not zero: holes must be written as zeros
                assert a.readinto(dev_id, off, buf) == len(want)
                assert bytes(buf[: len(want)]) == want
                assert buf[len(want) :] == b"\xee" * (n - len(want))
                assert joined(a, a.segments(dev_id, off, n)) == want
            # The stream walker (compressed archives), fed in random chunks, maps the same.
            chunks = data.draw(st.lists(st.integers(1, 200_000), min_size=1, max_size=8))
            si, pos, i = StreamIndexer(), 0, 0
            while pos < built.size:
                n = chunks[i % len(chunks)]
                si.feed(pos, built.data[pos : pos + n])
                pos, i = min(pos + n, built.size), i + 1
            streamed = si.finish(built.size).to_arrays()
            for key, arr in a.index.to_arrays().items():
                assert np.array_equal(arr, streamed[key]), key


def joined(a: Archive, pieces) -> bytes:
    """The bytes :meth:`Archive.segments` describes, read as libfuse would."""
    out = []
    for piece in pieces:
        if type(piece) is tuple:
            fd, aoff, length = piece
            assert fd == a.fd and length > 0
            out.append(os.pread(fd, length, aoff))
        else:
            assert not any(piece)  # only zeros are served from memory
            out.append(bytes(piece))
    return b"".join(out)


def test_segments_pieces_are_few_and_in_order(tmp_path):
    """Neighbouring stored clusters come as one piece; holes as zero memory, in place."""
    content = bytes(CLUSTER_SIZE) + os.urandom(3 * CLUSTER_SIZE) + bytes(2 * CLUSTER_SIZE)
    content += os.urandom(BLOCK_SIZE) + bytes(CLUSTER_SIZE - BLOCK_SIZE)
    path = build_archive({"drive-scsi0": content}).write(tmp_path / "a.vma")
    with Archive.open(path) as a:
        pieces = a.segments(1, 0, len(content))
        assert [type(p).__name__ for p in pieces] == [
            "memoryview",
            "tuple",
            "memoryview",
            "tuple",
            "memoryview",
        ]
        assert [p[2] if type(p) is tuple else len(p) for p in pieces] == [
            CLUSTER_SIZE,
            3 * CLUSTER_SIZE,
            2 * CLUSTER_SIZE,
            BLOCK_SIZE,
            CLUSTER_SIZE - BLOCK_SIZE,
        ]
        assert joined(a, pieces) == content
        assert a.segments(1, len(content), 10) == []  # at the end: nothing
        assert joined(a, a.segments(1, len(content) - 5, 10)) == bytes(5)  # clipped


def test_segments_of_a_shrunk_archive_raise(tmp_path):
    """Pieces past the end would be a short reply (zeros, EOF) instead of EIO."""
    from vmafs.errors import TruncatedError

    content = os.urandom(4 * CLUSTER_SIZE)
    path = build_archive({"drive-scsi0": content}).write(tmp_path / "a.vma")
    with Archive.open(path) as a:
        assert joined(a, a.segments(1, 0, len(content))) == content
        os.truncate(path, os.path.getsize(path) - CLUSTER_SIZE)
        for off, n in [(0, len(content)), (3 * CLUSTER_SIZE, BLOCK_SIZE)]:
            with pytest.raises(TruncatedError):
                a.segments(1, off, n)
        assert joined(a, a.segments(1, 0, BLOCK_SIZE)) == content[:BLOCK_SIZE]  # before the cut


def test_segments_refused_for_compressed_archives(tmp_path):
    plain = build_archive({"drive-scsi0": sparse_disk(4 * CLUSTER_SIZE, 5)}).write(
        tmp_path / "a.vma"
    )
    subprocess.run(["gzip", "-k", str(plain)], check=True)
    with Archive.open(str(plain) + ".gz", use_sidecar=False) as a:
        assert a.fd is None
        with pytest.raises(ValueError, match="gzip archive"):
            a.segments(1, 0, CLUSTER_SIZE)


# --- container modules are imported when the magic asks for them -------------------------

_CONTAINER_MODULES = ("zstandard", "indexed_gzip", "lzo", "vmafs.source.")


@pytest.mark.parametrize(
    "suffix, modules, libraries",
    [
        ("", set(), set()),
        (".zst", {"zstd"}, {"zstandard"}),
        (".gz", {"gzip"}, {"indexed_gzip", "zstandard"}),  # zstd packs its saved windows
        (".lzo", {"lzo"}, {"lzo"}),
    ],
)
def test_open_imports_only_the_container_it_needs(suffix, modules, libraries):
    """A fresh interpreter opening a plain archive imports no compression library."""
    code = (
        "import sys\n"
        "from vmafs.archive import Archive\n"
        "Archive.open(sys.argv[1], use_sidecar=False).close()\n"
        f"print(' '.join(m for m in sys.modules if m.startswith({_CONTAINER_MODULES!r})))\n"
    )
    path = FIXTURES_DIR / f"two-disks.vma{suffix}"
    r = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    ours = {m.split(".")[2] for m in loaded if m.startswith("vmafs.source.")}
    assert ours - {"plain", "base"} == modules  # the package's own, always there
    assert {m.split(".")[0] for m in loaded if not m.startswith("vmafs.")} == libraries


def test_lazy_magic_table_matches_what_the_modules_register():
    for module in {m for _, m in vmafs.source.CONTAINERS}:
        importlib.import_module(f"vmafs.source.{module}")
    registered = {
        (magic, factory.__module__.split(".")[2])  # vmafs.source.<container>[.module]
        for magic, factory in vmafs.source._MAGICS
        if factory is not vmafs.source.PlainSource
    }
    assert registered == set(vmafs.source.CONTAINERS)
