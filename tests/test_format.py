"""vmafs.format: records parse what they pack, and pack what Proxmox wrote."""

from __future__ import annotations

import random
import struct

import pytest
from conftest import fixture_archives
from vmafactory import UUID, build_archive, fix_header_md5, put

from vmafs.errors import ChecksumError, ExtentError, HeaderError, TruncatedError
from vmafs.format import (
    BLOCK_SIZE,
    CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
    FULL_MASK,
    SLOTS_PER_EXTENT,
    BlockInfo,
    Config,
    Device,
    ExtentHeader,
    ExtentPacker,
    Header,
    block_masks,
    encode_cluster,
    stored_blocks,
)

PLAIN_FIXTURES = fixture_archives(compressed=False)


def _header(**kw) -> Header:
    args = {
        "uuid": UUID,
        "ctime": 1_700_000_123,
        "configs": [Config("qemu-server.conf", b"memory: 512\n"), Config("qemu-server.fw", b"")],
        "devices": {
            1: Device(1, "drive-scsi0", 5 * CLUSTER_SIZE + 512),
            7: Device(7, "drive-virtio3", 1 << 40),
            254: Device(254, "vmstate", 12345),
        },
    }
    args.update(kw)
    return Header(**args)


# --- header ------------------------------------------------------------------------------


def test_header_round_trip():
    h = _header()
    raw = h.pack()
    assert len(raw) == h.header_size and h.header_size % 512 == 0
    back = Header.parse(raw)
    assert (back.uuid, back.ctime, back.configs, back.devices) == (
        h.uuid,
        h.ctime,
        h.configs,
        h.devices,
    )
    assert back.header_size == h.header_size
    assert back.pack() == raw
    assert Header.peek_size(raw[:64]) == h.header_size
    assert back.devices[254].is_vmstate and not back.devices[1].is_vmstate
    assert back.devices[1].clusters == 6
    assert back.devices[7].clusters == 1 << 24


def test_header_negative_ctime_and_many_configs():
    configs = [Config(f"c{i}", bytes([i]) * i) for i in range(256)]
    h = _header(ctime=-5, configs=configs, devices={})
    back = Header.parse(h.pack())
    assert back.ctime == -5 and back.configs == configs and back.devices == {}


def test_header_pack_refuses_what_parse_would_refuse():
    with pytest.raises(HeaderError):
        _header(devices={255: Device(255, "x", 1)}).pack()
    with pytest.raises(HeaderError):
        _header(devices={0: Device(0, "x", 1)}).pack()
    with pytest.raises(HeaderError):
        _header(devices={1: Device(2, "x", 1)}).pack()  # key and dev_id disagree
    with pytest.raises(HeaderError):
        _header(devices={1: Device(1, "x", 0)}).pack()
    with pytest.raises(HeaderError):
        _header(uuid=b"short").pack()
    with pytest.raises(HeaderError):
        _header(configs=[Config("big", bytes(65536))]).pack()
    with pytest.raises(HeaderError):
        _header(configs=[Config("nul\0name", b"")]).pack()
    with pytest.raises(HeaderError):
        _header(configs=[Config(str(i), b"") for i in range(257)]).pack()


def test_header_parse_refuses_short_buffers():
    raw = _header().pack()
    with pytest.raises(TruncatedError):
        Header.parse(raw[:40])
    with pytest.raises(TruncatedError):
        Header.parse(raw[:-1])


def test_header_rejects_name_without_nul_and_bad_utf8():
    raw = _header(configs=[Config("abc", b"x")], devices={}).pack()
    # Blob buffer at 12288: byte 0 unused, then "<len>abc\0". Drop the NUL from the length.
    assert raw[12289:12295] == struct.pack("<H", 4) + b"abc\0"
    with pytest.raises(HeaderError, match="NUL-terminated"):
        Header.parse(fix_header_md5(put(raw, 12289, struct.pack("<H", 3))))
    with pytest.raises(HeaderError, match="UTF-8"):
        Header.parse(fix_header_md5(put(raw, 12291, b"\xff")))


def test_header_ignores_nothing_the_md5_covers():
    raw = _header().pack()
    for off in (8, 24, 4096 + 32 + 15, 12288 + 5, len(raw) - 1):
        bad = bytearray(raw)
        bad[off] ^= 0x10
        with pytest.raises(ChecksumError):
            Header.parse(bytes(bad))


@pytest.mark.parametrize("archive", PLAIN_FIXTURES, ids=lambda p: p.name)
def test_proxmox_header_repacks_identically(archive):
    raw = archive.read_bytes()
    h = Header.parse(raw)
    again = Header(h.uuid, h.ctime, list(h.configs), dict(h.devices))
    assert again.pack() == raw[: h.header_size]


@pytest.mark.parametrize("archive", PLAIN_FIXTURES, ids=lambda p: p.name)
def test_proxmox_extent_headers_repack_identically(archive):
    raw = archive.read_bytes()
    h = Header.parse(raw)
    pos, n = h.header_size, 0
    while pos < len(raw):
        head = raw[pos : pos + EXTENT_HEADER_SIZE]
        e = ExtentHeader.parse(head, pos, h.uuid)
        assert len(e.slots) <= 58  # Proxmox leaves the last slot empty
        assert ExtentHeader(e.uuid, e.block_count, e.slots).pack() == head
        pos += EXTENT_HEADER_SIZE + e.block_count * BLOCK_SIZE
        n += 1
    assert pos == len(raw) and n >= 1


# --- extent header --------------------------------------------------------------------------


def test_extent_header_round_trip_59_slots():
    slots = [
        BlockInfo(1 + i % 254, 0xFFFFFFFF - i, (i * 2654435761) & FULL_MASK) for i in range(59)
    ]
    blocks = sum(s.mask.bit_count() for s in slots)
    raw = ExtentHeader(UUID, blocks, slots).pack()
    assert len(raw) == EXTENT_HEADER_SIZE and raw[:4] == b"VMAE"
    e = ExtentHeader.parse(raw, 4096, UUID)
    assert (e.uuid, e.block_count, e.slots) == (UUID, blocks, slots)
    with pytest.raises(ExtentError):
        ExtentHeader(UUID, 0, slots + [BlockInfo(1, 0, 0)]).pack()


def test_blockinfo_bits():
    b = BlockInfo(dev_id=0xAB, cluster=0x12345678, mask=0x8001)
    assert b.pack() == 0x8001_00AB_12345678
    assert BlockInfo.unpack(b.pack()) == b


def test_extent_header_checks():
    slots = [BlockInfo(1, 3, 0b101)]
    raw = ExtentHeader(UUID, 2, slots).pack()
    with pytest.raises(ExtentError, match="block_count"):
        ExtentHeader.parse(ExtentHeader(UUID, 3, slots).pack(), 0)
    with pytest.raises(ChecksumError, match=r"archive offset 777\)"):
        ExtentHeader.parse(raw[:100] + b"\1" + raw[101:], 777)
    with pytest.raises(ExtentError, match="magic"):
        ExtentHeader.parse(b"XMAE" + raw[4:], 0)
    with pytest.raises(TruncatedError):
        ExtentHeader.parse(raw[:511], 0)
    assert ExtentHeader.parse(raw, 0, None).slots == slots  # uuid not checked without one


# --- encode_cluster and ExtentPacker ------------------------------------------------------------


def _naive(cluster: bytes) -> tuple[int, bytes]:
    """Proxmox's rule spelled out: a 4 KiB block is stored unless it is all zero."""
    cluster += bytes(-len(cluster) % BLOCK_SIZE)
    blocks = [cluster[i : i + BLOCK_SIZE] for i in range(0, len(cluster), BLOCK_SIZE)]
    mask = sum(1 << b for b, blk in enumerate(blocks) if blk != bytes(BLOCK_SIZE))
    return mask, b"".join(blk for blk in blocks if blk != bytes(BLOCK_SIZE))


def test_whole_request_zero_detection_follows_the_block_rule():
    """block_masks (the writer's, over a request) and encode_cluster = the naive rule."""
    rnd = random.Random(24)
    for length in [CLUSTER_SIZE, 3 * CLUSTER_SIZE, 2 * CLUSTER_SIZE + 4608, 512, 4096, 12800]:
        for _ in range(20):
            buf = bytearray(length)
            for b in range(0, length, BLOCK_SIZE):
                kind = rnd.randrange(4)
                hi = min(b + BLOCK_SIZE, length)
                if kind == 1:  # random data
                    buf[b:hi] = rnd.randbytes(hi - b)
                elif kind == 2:  # one byte set, anywhere (also the first and last)
                    buf[rnd.choice([b, hi - 1, rnd.randrange(b, hi)])] = rnd.randrange(1, 256)
                elif kind == 3:  # zero first word, data later
                    buf[min(b + 8, hi - 1)] = 1
            starts = range(0, length, CLUSTER_SIZE)
            want = [_naive(bytes(buf[o : o + CLUSTER_SIZE])) for o in starts]
            masks = [m for m, _ in want]
            assert block_masks(memoryview(buf), length) == masks
            assert block_masks(bytes(buf), length) == masks
            for k, o in enumerate(starts):
                clen = min(CLUSTER_SIZE, length - o)
                assert encode_cluster(bytes(buf[o : o + clen])) == want[k]
                assert stored_blocks(buf, masks[k], o, clen) == want[k][1]
    assert block_masks(None, 3 * CLUSTER_SIZE) == [0, 0, 0]


def test_encode_cluster_zero_and_full():
    assert encode_cluster(None) == (0, b"")
    assert encode_cluster(bytes(CLUSTER_SIZE)) == (0, b"")
    assert encode_cluster(b"") == (0, b"")
    data = bytes(range(256)) * 256
    assert encode_cluster(data) == (FULL_MASK, data)
    assert encode_cluster(memoryview(data)) == (FULL_MASK, data)
    with pytest.raises(ValueError):
        encode_cluster(bytes(CLUSTER_SIZE + 1))


def test_encode_cluster_partial_zero():
    data = bytearray(CLUSTER_SIZE)
    data[0] = 1  # block 0
    data[5 * BLOCK_SIZE + 4095] = 2  # last byte of block 5
    data[15 * BLOCK_SIZE] = 3  # block 15
    mask, stored = encode_cluster(bytes(data))
    assert mask == (1 << 0) | (1 << 5) | (1 << 15)
    assert stored == data[:BLOCK_SIZE] + data[5 * BLOCK_SIZE : 6 * BLOCK_SIZE] + data[-BLOCK_SIZE:]


@pytest.mark.parametrize(
    "length",
    [1, 511, 512, BLOCK_SIZE, BLOCK_SIZE + 512, 70144 - CLUSTER_SIZE, CLUSTER_SIZE - 512],
)
def test_encode_final_partial_cluster(length):
    # The last cluster of a disk that is not a multiple of 64 KiB: the tail is
    # padded with zeros, blocks past the end are never stored.
    data = bytes((i % 251) + 1 for i in range(length))
    mask, stored = encode_cluster(data)
    nblocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
    assert mask == (1 << nblocks) - 1
    assert stored == data + bytes(nblocks * BLOCK_SIZE - length)
    # only the tail block has data, the earlier ones are zero
    data2 = bytes(length - 1) + b"\x07"
    mask2, stored2 = encode_cluster(data2)
    assert mask2 == 1 << (nblocks - 1)
    assert stored2[(length - 1) % BLOCK_SIZE] == 7 and len(stored2) == BLOCK_SIZE
    assert encode_cluster(bytes(length)) == (0, b"")


def test_extent_packer_fills_slots_and_flushes():
    p = ExtentPacker(UUID, slots_per_extent=SLOTS_PER_EXTENT)
    out = []
    for c in range(SLOTS_PER_EXTENT + 3):
        mask, stored = encode_cluster(bytes([c + 1]) * 100 if c % 2 else None)
        out.append(p.add(1, c, mask, stored))
        if c < SLOTS_PER_EXTENT - 1:
            assert out[-1] == b"" and p.pending == c + 1
    full = out[SLOTS_PER_EXTENT - 1]
    e = ExtentHeader.parse(full[:EXTENT_HEADER_SIZE], 0, UUID)
    assert len(e.slots) == 59 and [s.cluster for s in e.slots] == list(range(59))
    assert len(full) == EXTENT_HEADER_SIZE + e.block_count * BLOCK_SIZE
    assert e.block_count == 29 and p.pending == 3
    last = p.flush()
    assert [s.cluster for s in ExtentHeader.parse(last[:512], 0, UUID).slots] == [59, 60, 61]
    assert p.flush() == b"" and p.pending == 0
    with pytest.raises(ValueError):
        p.add(1, 0, 1, b"")  # mask announces a block that is not there
    for bad in (0, 60):
        with pytest.raises(ValueError):
            ExtentPacker(UUID, slots_per_extent=bad)


def test_factory_default_is_proxmox_layout():
    # The factory's default slot count is Proxmox's 58, with the last slot empty.
    b = build_archive({"d": bytes(range(256)) * 256 * 60})
    assert [len(s) for s in b.slots] == [58, 2]
    head = b.data[b.extents[0] : b.extents[0] + EXTENT_HEADER_SIZE]
    assert head[-8:] == bytes(8)
