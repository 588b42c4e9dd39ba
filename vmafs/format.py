"""The VMA v1 on-disk format: records that parse and serialize themselves.

This module is the only place that knows the byte layout; the reader
(``vmafs``) and the writer (``writer``) both go through it, so they cannot
drift apart.  Layout facts, including where Proxmox's tools differ from the
published spec, are in docs/format.md.

All integers are big-endian except the 2-byte length prefix of each blob in
the header's blob buffer, which is little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from .errors import (
    ChecksumError,
    ExtentError,
    HeaderError,
    HeaderTruncatedError,
    TruncatedError,
    UuidMismatchError,
)

# --- layout constants (names follow Proxmox's vma.h) ---------------------------

VMA_MAGIC = b"VMA\0"
VMA_EXTENT_MAGIC = b"VMAE"
VMA_VERSION = 1

BLOCK_SIZE = 4096
CLUSTER_SIZE = 65536
BLOCKS_PER_CLUSTER = CLUSTER_SIZE // BLOCK_SIZE  # 16: one mask bit per block
FULL_MASK = (1 << BLOCKS_PER_CLUSTER) - 1

HEADER_STRUCT_SIZE = 12288  # sizeof(VmaHeader); the blob buffer follows it
HEADER_ALIGN = 512
MAX_HEADER_SIZE = 16 * 1024 * 1024  # sanity bound: 256 configs of 64 KiB fit
MAX_CONFIGS = 256
MAX_CONFIG_SIZE = 65535
MAX_DEVICES = 256
MIN_DEV_ID = 1
MAX_DEV_ID = 254  # 0 marks an empty extent slot, 255 is reserved
MAX_DEVICE_SIZE = (1 << 32) * 65536  # cluster numbers are 32-bit: 256 TiB
DEV_INFO_OFFSET = 4096
DEV_INFO_SIZE = 32
CONFIG_NAMES_OFFSET = 2044
CONFIG_DATA_OFFSET = 3068

EXTENT_HEADER_SIZE = 512
SLOTS_PER_EXTENT = 59
PROXMOX_SLOTS_PER_EXTENT = 58  # Proxmox's writer leaves the last slot empty
BLOCKINFO_OFFSET = 40
MAX_EXTENT_SIZE = EXTENT_HEADER_SIZE + SLOTS_PER_EXTENT * CLUSTER_SIZE

# How a walk of the extent headers reads the file (vmafs.index, and the
# prefetch in vmafs.warmup, which must read the same places): a window while
# header-only extents (zero clusters) sit back to back, one page after an
# extent with data (not a MiB of the next extent's data).
HEADERS_READ_AHEAD = 1 << 20
HEADER_READ = 4096

VMSTATE_NAME = "vmstate"

_HEAD = struct.Struct(">4sI16sq16sIII")  # magic .. header_size, bytes 0-59
_EXTENT_HEAD = struct.Struct(">4sHH16s16s")  # bytes 0-39 of an extent header
_BLOCKINFO = struct.Struct(f">{SLOTS_PER_EXTENT}Q")
_MD5_SLICE = slice(32, 48)
_EXTENT_MD5_SLICE = slice(24, 40)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_WORDS_PER_BLOCK = BLOCK_SIZE // 8


def _md5_with_hole(buf: bytes | bytearray | memoryview, hole: slice) -> bytes:
    """md5 of *buf* with the bytes of *hole* (the md5 field itself) zeroed."""
    h = hashlib.md5(buf[: hole.start])
    h.update(bytes(hole.stop - hole.start))
    h.update(buf[hole.stop :])
    return h.digest()


def clusters_for(size: int) -> int:
    """Number of cluster slots a device of *size* bytes occupies."""
    return (size + CLUSTER_SIZE - 1) // CLUSTER_SIZE


# --- header records --------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One entry of the header's device table."""

    dev_id: int
    name: str
    size: int

    @property
    def clusters(self) -> int:
        return clusters_for(self.size)

    @property
    def is_vmstate(self) -> bool:
        return self.name == VMSTATE_NAME


@dataclass(frozen=True)
class Config:
    """One configuration file stored in the header (name as written, untrusted)."""

    name: str
    data: bytes


@dataclass
class Header:
    """The archive header: identity, configs and the device table.

    ``header_size`` is where the first extent starts.  ``parse`` validates
    everything a reader can check; ``pack`` produces the bytes Proxmox's
    writer would (blob buffer at 12288, used length as blob_buffer_size,
    header_size rounded up to 512).
    """

    uuid: bytes
    ctime: int
    configs: list[Config] = field(default_factory=list)
    devices: dict[int, Device] = field(default_factory=dict)
    header_size: int = 0

    # -- parsing --

    @staticmethod
    def peek_size(head: bytes) -> int:
        """Return header_size from the first 60+ bytes, after basic checks.

        Lets a reader validate the fixed part before reading the rest.
        """
        if len(head) < _HEAD.size:
            raise HeaderTruncatedError("archive is shorter than a VMA header", offset=0)
        magic, version, _, _, _, bb_off, bb_size, header_size = _HEAD.unpack_from(head)
        if magic != VMA_MAGIC:
            raise HeaderError(f"not a VMA archive: bad magic {magic!r}", offset=0)
        if version != VMA_VERSION:
            raise HeaderError(f"unsupported VMA version {version}", offset=4)
        if header_size % HEADER_ALIGN or not (HEADER_STRUCT_SIZE < header_size <= MAX_HEADER_SIZE):
            raise HeaderError(
                f"absurd header_size {header_size} (must be a multiple of 512 "
                f"in ({HEADER_STRUCT_SIZE}, {MAX_HEADER_SIZE}])",
                offset=56,
            )
        if bb_off < HEADER_STRUCT_SIZE or bb_off + bb_size > header_size:
            raise HeaderError(
                f"blob buffer [{bb_off}, {bb_off + bb_size}) lies outside the "
                f"header [{HEADER_STRUCT_SIZE}, {header_size})",
                offset=48,
            )
        return header_size

    @classmethod
    def parse(cls, buf: bytes) -> Header:
        """Parse and fully validate a header; *buf* holds at least header_size bytes."""
        header_size = cls.peek_size(buf)
        if len(buf) < header_size:
            raise HeaderTruncatedError(
                f"archive ends inside its {header_size}-byte header", offset=len(buf)
            )
        buf = bytes(buf[:header_size])
        _, _, uuid, ctime, md5, bb_off, bb_size, _ = _HEAD.unpack_from(buf)
        if _md5_with_hole(buf, _MD5_SLICE) != md5:
            raise ChecksumError("header md5 mismatch", offset=32)
        if any(buf[60:CONFIG_NAMES_OFFSET]) or any(buf[4092:4096]):
            raise HeaderError("reserved header bytes are not zero", offset=60)
        blobs = _BlobReader(buf, bb_off, bb_size)

        names = struct.unpack_from(f">{MAX_CONFIGS}I", buf, CONFIG_NAMES_OFFSET)
        datas = struct.unpack_from(f">{MAX_CONFIGS}I", buf, CONFIG_DATA_OFFSET)
        configs = []
        for i, (n_ptr, d_ptr) in enumerate(zip(names, datas, strict=True)):
            if not n_ptr and not d_ptr:
                continue
            where = CONFIG_NAMES_OFFSET + 4 * i
            if not n_ptr or not d_ptr:
                raise HeaderError(f"config slot {i} has a name or data but not both", offset=where)
            name = blobs.string(n_ptr, where)
            data = blobs.blob(d_ptr, CONFIG_DATA_OFFSET + 4 * i)
            configs.append(Config(name, data))

        devices = {}
        for dev_id in range(MAX_DEVICES):
            off = DEV_INFO_OFFSET + dev_id * DEV_INFO_SIZE
            name_ptr, reserved0, size = struct.unpack_from(">IIQ", buf, off)
            if reserved0 or any(buf[off + 16 : off + DEV_INFO_SIZE]):
                raise HeaderError(
                    "reserved bytes of a device entry are not zero", offset=off, dev_id=dev_id
                )
            if not name_ptr:
                if size:
                    raise HeaderError("device has a size but no name", offset=off, dev_id=dev_id)
                continue
            if not MIN_DEV_ID <= dev_id <= MAX_DEV_ID:
                raise HeaderError("device registered in a reserved slot", offset=off, dev_id=dev_id)
            name = blobs.string(name_ptr, off)
            if not name:
                raise HeaderError("device has an empty name", offset=off, dev_id=dev_id)
            if size == 0:
                raise HeaderError("device has size 0", offset=off + 8, dev_id=dev_id)
            if size > MAX_DEVICE_SIZE:
                raise HeaderError(
                    f"device size {size} is beyond what 32-bit cluster numbers address "
                    f"({MAX_DEVICE_SIZE} bytes)",
                    offset=off + 8,
                    dev_id=dev_id,
                )
            devices[dev_id] = Device(dev_id, name, size)
        vmstates = [d for d in devices.values() if d.is_vmstate]
        if len(vmstates) > 1:
            raise HeaderError("more than one vmstate device", dev_id=vmstates[1].dev_id)
        return cls(uuid, ctime, configs, devices, header_size)

    # -- serializing --

    def pack(self) -> bytes:
        """Serialize; sets ``header_size`` to the packed length."""
        if len(self.uuid) != 16:
            raise HeaderError("uuid must be 16 bytes")
        if len(self.configs) > MAX_CONFIGS:
            raise HeaderError(f"at most {MAX_CONFIGS} configs, got {len(self.configs)}")
        blobs = _BlobWriter()
        fixed = bytearray(HEADER_STRUCT_SIZE)
        for i, cfg in enumerate(self.configs):
            if len(cfg.data) > MAX_CONFIG_SIZE:
                raise HeaderError(f"config {cfg.name!r} is larger than {MAX_CONFIG_SIZE} bytes")
            struct.pack_into(">I", fixed, CONFIG_NAMES_OFFSET + 4 * i, blobs.add_string(cfg.name))
            struct.pack_into(">I", fixed, CONFIG_DATA_OFFSET + 4 * i, blobs.add(cfg.data))
        for dev_id, dev in sorted(self.devices.items()):
            if not MIN_DEV_ID <= dev_id <= MAX_DEV_ID or dev.dev_id != dev_id:
                raise HeaderError("bad device id", dev_id=dev_id)
            if not 0 < dev.size <= MAX_DEVICE_SIZE:
                raise HeaderError(f"device size must be in 1..{MAX_DEVICE_SIZE}", dev_id=dev_id)
            off = DEV_INFO_OFFSET + dev_id * DEV_INFO_SIZE
            struct.pack_into(">IIQ", fixed, off, blobs.add_string(dev.name), 0, dev.size)
        blob_buf = blobs.getvalue()
        size = HEADER_STRUCT_SIZE + len(blob_buf)
        size += -size % HEADER_ALIGN
        self.header_size = size
        _HEAD.pack_into(
            fixed,
            0,
            VMA_MAGIC,
            VMA_VERSION,
            self.uuid,
            self.ctime,
            bytes(16),
            HEADER_STRUCT_SIZE,
            len(blob_buf),
            size,
        )
        out = bytearray(size)
        out[:HEADER_STRUCT_SIZE] = fixed
        out[HEADER_STRUCT_SIZE : HEADER_STRUCT_SIZE + len(blob_buf)] = blob_buf
        out[_MD5_SLICE] = _md5_with_hole(out, _MD5_SLICE)
        return bytes(out)


class _BlobReader:
    """Bounds-checked access to the header's blob buffer."""

    def __init__(self, buf: bytes, start: int, size: int) -> None:
        self.buf, self.start, self.size = buf, start, size

    def blob(self, ptr: int, where: int) -> bytes:
        if not 1 <= ptr or ptr + 2 > self.size:
            raise HeaderError(f"blob offset {ptr} outside the blob buffer", offset=where)
        (length,) = struct.unpack_from("<H", self.buf, self.start + ptr)
        if ptr + 2 + length > self.size:
            raise HeaderError(
                f"blob at {ptr} of length {length} overruns the blob buffer ({self.size} bytes)",
                offset=where,
            )
        begin = self.start + ptr + 2
        return self.buf[begin : begin + length]

    def string(self, ptr: int, where: int) -> str:
        raw = self.blob(ptr, where)
        if not raw or raw[-1] != 0 or 0 in raw[:-1]:
            raise HeaderError("name blob is not a NUL-terminated string", offset=where)
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise HeaderError("name blob is not valid UTF-8", offset=where) from None


class _BlobWriter:
    def __init__(self) -> None:
        self.buf = bytearray(b"\0")  # offset 0 means "none"

    def add(self, data: bytes) -> int:
        if len(data) > 0xFFFF:
            raise HeaderError(f"blob of {len(data)} bytes does not fit a 16-bit length")
        ptr = len(self.buf)
        self.buf += struct.pack("<H", len(data)) + data
        return ptr

    def add_string(self, s: str) -> int:
        raw = s.encode("utf-8")
        if b"\0" in raw:
            raise HeaderError(f"name {s!r} contains NUL")
        return self.add(raw + b"\0")

    def getvalue(self) -> bytes:
        return bytes(self.buf)


# --- extents -----------------------------------------------------------------------


@dataclass(frozen=True)
class BlockInfo:
    """One slot of an extent header: which blocks of which cluster follow."""

    dev_id: int
    cluster: int
    mask: int

    def pack(self) -> int:
        return (self.mask << 48) | (self.dev_id << 32) | self.cluster

    @classmethod
    def unpack(cls, value: int) -> BlockInfo:
        return cls((value >> 32) & 0xFF, value & 0xFFFFFFFF, value >> 48)


@dataclass
class ExtentHeader:
    """A 512-byte extent header: uuid, block_count and up to 59 slots."""

    uuid: bytes
    block_count: int
    slots: list[BlockInfo]

    @classmethod
    def parse(cls, buf: bytes, offset: int, uuid: bytes | None = None) -> ExtentHeader:
        """Parse and validate the extent header at archive *offset*.

        Checks magic, reserved bits, md5, uuid (when given) and that
        block_count equals the blocks the masks announce.  It does not know
        the device table; :mod:`vmafs.index` checks dev_ids and clusters.
        """
        check_extent_header(buf, offset, uuid)
        _, _, block_count, ext_uuid, _ = _EXTENT_HEAD.unpack_from(buf)
        values = _BLOCKINFO.unpack_from(buf, BLOCKINFO_OFFSET)
        slots = [BlockInfo.unpack(v) for v in values if v]
        return cls(ext_uuid, block_count, slots)

    def pack(self) -> bytes:
        if len(self.slots) > SLOTS_PER_EXTENT:
            raise ExtentError(f"an extent holds at most {SLOTS_PER_EXTENT} slots")
        values = [s.pack() for s in self.slots] + [0] * (SLOTS_PER_EXTENT - len(self.slots))
        out = bytearray(EXTENT_HEADER_SIZE)
        _EXTENT_HEAD.pack_into(out, 0, VMA_EXTENT_MAGIC, 0, self.block_count, self.uuid, bytes(16))
        _BLOCKINFO.pack_into(out, BLOCKINFO_OFFSET, *values)
        out[_EXTENT_MD5_SLICE] = _md5_with_hole(out, _EXTENT_MD5_SLICE)
        return bytes(out)


def extent_block_count(buf: bytes, offset: int) -> int:
    """block_count of the extent header in *buf*, after checking its magic.

    The index builder walks extents with this alone and validates the
    headers it collected in bulk (:func:`check_extent_header`).
    """
    if len(buf) < EXTENT_HEADER_SIZE:
        raise TruncatedError("archive ends inside an extent header", offset=offset)
    if buf[:4] != VMA_EXTENT_MAGIC:
        raise ExtentError(f"bad extent magic {bytes(buf[:4])!r}", offset=offset)
    return int.from_bytes(buf[6:8], "big")


def check_extent_header(buf: bytes, offset: int, uuid: bytes | None) -> None:
    """Validate one 512-byte extent header (everything but the device table)."""
    block_count = extent_block_count(buf, offset)
    if buf[4:6] != b"\0\0":
        raise ExtentError("reserved field of extent header is not zero", offset=offset + 4)
    if _md5_with_hole(buf[:EXTENT_HEADER_SIZE], _EXTENT_MD5_SLICE) != bytes(buf[24:40]):
        raise ChecksumError("extent header md5 mismatch", offset=offset)
    if uuid is not None and bytes(buf[8:24]) != uuid:
        raise UuidMismatchError("extent uuid differs from the archive uuid", offset=offset + 8)
    values = _BLOCKINFO.unpack_from(buf, BLOCKINFO_OFFSET)
    stored = 0
    for i, v in enumerate(values):
        slot_off = offset + BLOCKINFO_OFFSET + 8 * i
        if v and not (v >> 32) & 0xFF:
            raise ExtentError("empty slot (dev_id 0) carries a mask or cluster", offset=slot_off)
        if (v >> 40) & 0xFF:
            raise ExtentError("reserved bits of a blockinfo are not zero", offset=slot_off)
        stored += (v >> 48).bit_count()
    if stored != block_count:
        raise ExtentError(
            f"block_count {block_count} differs from the {stored} blocks the masks announce",
            offset=offset + 6,
        )


# --- packing clusters into extents (zero detection shared by the writer and the tests) --


def block_masks(data, length: int) -> list[int]:
    """Per-cluster masks (bit i = block i is not all zero) of a cluster-aligned range.

    *data* is ``length`` bytes starting at a cluster boundary (the last
    cluster may be short; its missing bytes count as zeros), or None for
    zeros.  All-zero 4 KiB blocks are not stored, as Proxmox's writer does.
    Vectorized over a whole request: the first 8 bytes of each block decide
    for almost every block of real data; only blocks starting with zeros are
    scanned whole.
    """
    import numpy as np  # noqa: PLC0415 - keeps header-only commands light

    n = (length + CLUSTER_SIZE - 1) // CLUSTER_SIZE
    if data is None:
        return [0] * n
    full = length // BLOCK_SIZE
    nonzero = np.zeros(n * BLOCKS_PER_CLUSTER, dtype=bool)
    if full:
        words = np.frombuffer(data, dtype=np.uint64, count=full * _WORDS_PER_BLOCK)
        words = words.reshape(full, _WORDS_PER_BLOCK)
        head = words[:, 0] != 0
        maybe_zero = np.flatnonzero(~head)
        if len(maybe_zero):
            head[maybe_zero] = words[maybe_zero].any(axis=1)
        nonzero[:full] = head
    tail = length - full * BLOCK_SIZE
    if tail:
        nonzero[full] = bytes(data[full * BLOCK_SIZE : length]) != _ZERO_BLOCK[:tail]
    bits = np.packbits(nonzero.reshape(n, BLOCKS_PER_CLUSTER), axis=1, bitorder="little")
    return bits.view("<u2").ravel().tolist()


def encode_cluster(data: bytes | memoryview | None) -> tuple[int, bytes]:
    """Return (mask, stored blocks) for one cluster of disk data.

    *data* is at most 65536 bytes (a short final cluster is zero-padded);
    ``None`` means all zeros.  All-zero 4 KiB blocks are not stored, as
    Proxmox's writer does.
    """
    if data is None:
        return 0, b""
    if len(data) > CLUSTER_SIZE:
        raise ValueError(f"cluster data is {len(data)} bytes, more than {CLUSTER_SIZE}")
    (mask,) = block_masks(data, len(data)) if len(data) else (0,)
    if not mask:
        return 0, b""
    return mask, stored_blocks(data, mask)


def stored_blocks(data, mask: int, start: int = 0, length: int | None = None) -> bytes:
    """The blocks of one cluster that *mask* marks as stored, in block order.

    The cluster is *length* bytes of *data* from *start* (default: all of
    it, at most 65536); a short final block is zero-padded to 4096 bytes.
    """
    if length is None:
        length = len(data) - start
    if mask == FULL_MASK and length == CLUSTER_SIZE:
        return bytes(data[start : start + CLUSTER_SIZE])
    parts = []
    for b in range(BLOCKS_PER_CLUSTER):
        if mask >> b & 1:
            lo = b * BLOCK_SIZE
            chunk = bytes(data[start + lo : start + min(lo + BLOCK_SIZE, length)])
            parts.append(chunk + _ZERO_BLOCK[len(chunk) :])
    return b"".join(parts)


class ExtentPacker:
    """Collects encoded clusters and emits whole extents (header + data).

    ``add`` returns the bytes of a finished extent when the current one is
    full, else ``b""``; ``flush`` returns the last partial extent.  Slot
    order is arrival order: this is what lets a backup stream clusters as
    they come.
    """

    def __init__(self, uuid: bytes, slots_per_extent: int = PROXMOX_SLOTS_PER_EXTENT) -> None:
        if not 1 <= slots_per_extent <= SLOTS_PER_EXTENT:
            raise ValueError(f"slots_per_extent must be in 1..{SLOTS_PER_EXTENT}")
        self.uuid = uuid
        self.slots_per_extent = slots_per_extent
        self._slots: list[BlockInfo] = []
        self._data: list[bytes] = []
        self._blocks = 0

    @property
    def pending(self) -> int:
        """Clusters waiting in the current extent."""
        return len(self._slots)

    def add(self, dev_id: int, cluster: int, mask: int, stored: bytes) -> bytes:
        if len(stored) != mask.bit_count() * BLOCK_SIZE:
            raise ValueError("stored data does not match the mask")
        self._slots.append(BlockInfo(dev_id, cluster, mask))
        self._data.append(stored)
        self._blocks += mask.bit_count()
        if len(self._slots) == self.slots_per_extent:
            return self.flush()
        return b""

    def flush(self) -> bytes:
        if not self._slots:
            return b""
        head = ExtentHeader(self.uuid, self._blocks, self._slots).pack()
        out = b"".join([head, *self._data])
        self._slots, self._data, self._blocks = [], [], 0
        return out
