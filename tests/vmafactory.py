"""Build VMA archives in memory for tests, and damage them on purpose.

Archives are made with the shared format code (``vmafs.format.Header``,
``ExtentPacker``, ``encode_cluster``), the code the writer uses, so a
:class:`Built` archive is byte-exact VMA.  It remembers where every extent
starts and which (dev_id, cluster, mask) each slot holds, so a corruption
helper can hit exactly the byte it means to and say which error, at which
archive offset, dev and cluster, a reader must report::

    from vmafactory import build_archive, hostile_cases

    b = build_archive({"drive-scsi0": disk}, vmstate=ram, order="shuffled", slots=59)
    path = b.write(tmp_path / "a.vma")
    for case in hostile_cases():      # Damaged(name, data, error, offset, dev_id, cluster)
        ...

Corruption helpers take a :class:`Built` and return a :class:`Damaged`: the
modified archive bytes plus the expected error class and location.  Where a
structure must stay valid around the damage (a duplicated cluster, a slot
beyond its device, a wrong block_count) the extent is rebuilt with a valid
md5, so the reader meets exactly one problem.

Config names that are hostile to a filesystem (``../../x``, ``a/b``, ``..``,
empty, control characters, duplicates) parse fine: keeping them harmless is
the filesystem's and extract's job.  :func:`hostile_names_archive` provides
an archive holding them.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmafs.errors import (
    ChecksumError,
    ClusterRangeError,
    DuplicateClusterError,
    ExtentError,
    HeaderError,
    HeaderTruncatedError,
    IncompleteArchiveError,
    SourceError,
    TrailingDataError,
    TruncatedError,
    UnknownDeviceError,
    UuidMismatchError,
    VmaError,
    VmstateOrderError,
)
from vmafs.format import (
    BLOCK_SIZE,
    BLOCKINFO_OFFSET,
    CLUSTER_SIZE,
    DEV_INFO_OFFSET,
    DEV_INFO_SIZE,
    EXTENT_HEADER_SIZE,
    HEADER_STRUCT_SIZE,
    PROXMOX_SLOTS_PER_EXTENT,
    VMSTATE_NAME,
    BlockInfo,
    Config,
    Device,
    ExtentHeader,
    ExtentPacker,
    Header,
    encode_cluster,
)

UUID = bytes.fromhex("5f1ce0a2c3d94b7e8a61f0e2d4b6a897")
CTIME = 1_700_000_000
DEFAULT_CONFIGS = [("qemu-server.conf", b"boot: order=scsi0\nmemory: 512\nscsi0: x:vm-1-disk-0\n")]

#: (dev_id, cluster, mask, stored bytes): one raw slot, for ``extra``.
RawSlot = tuple[int, int, int, bytes]


# --- building ------------------------------------------------------------------------


@dataclass
class Built:
    """An archive made by :func:`build_archive`, with the map a test needs to damage it."""

    data: bytes
    header: Header
    disks: dict[int, bytes]  # dev_id -> full content (vmstate included)
    extents: list[int] = field(default_factory=list)  # archive offset of each extent
    slots: list[list[tuple[int, int, int]]] = field(default_factory=list)  # (dev, cluster, mask)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header_size(self) -> int:
        return self.header.header_size

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path

    def dev_id(self, name: str) -> int:
        return next(i for i, d in self.header.devices.items() if d.name == name)

    @property
    def vmstate_id(self) -> int | None:
        return next((i for i, d in self.header.devices.items() if d.is_vmstate), None)

    def extent_end(self, k: int) -> int:
        """Offset just past extent *k*."""
        return self.extents[k + 1] if k + 1 < len(self.extents) else self.size

    def locate(self, dev_id: int, cluster: int) -> tuple[int, int]:
        """(extent index, slot index) of the first slot holding (dev_id, cluster)."""
        for k, slots in enumerate(self.slots):
            for j, (d, c, _) in enumerate(slots):
                if (d, c) == (dev_id, cluster):
                    return k, j
        raise KeyError((dev_id, cluster))

    def slot_offset(self, k: int, j: int) -> int:
        """Archive offset of the blockinfo of slot *j* of extent *k*."""
        return self.extents[k] + BLOCKINFO_OFFSET + 8 * j

    def data_extent(self, nth: int = 0) -> int:
        """Index of the *nth* extent (counting from 0, negative from the end) that has data."""
        ks = [k for k, s in enumerate(self.slots) if any(m for _, _, m in s)]
        return ks[nth]


def cluster_order(
    devices: dict[int, Device], order: str | Sequence[tuple[int, int]], seed: int = 0
) -> list[tuple[int, int]]:
    """Every (dev_id, cluster) once, in the named order.

    ``in-order``: device by device, clusters ascending (what ``vma create`` writes).
    ``interleaved``: round robin over the devices, cluster i of each in turn.
    ``shuffled``: a seeded random permutation of all disk clusters; vmstate
    clusters stay in order (the format demands it) at random points in between.
    ``reversed``: every disk backwards (vmstate still in order), devices interleaved.
    A sequence of (dev_id, cluster) is taken as is.
    """
    if not isinstance(order, str):
        return list(order)
    per_dev = {i: [(i, c) for c in range(d.clusters)] for i, d in sorted(devices.items())}
    vm_ids = [i for i, d in devices.items() if d.is_vmstate]
    vm = per_dev[vm_ids[0]] if vm_ids else []
    disks = {i: s for i, s in per_dev.items() if i not in vm_ids}
    if order == "in-order":
        return [s for _, slots in sorted(per_dev.items()) for s in slots]
    if order in ("interleaved", "reversed"):
        lists = list(per_dev.values()) if order == "interleaved" else [*disks.values(), vm]
        if order == "reversed":
            lists = [lst[::-1] for lst in lists[:-1]] + [lists[-1]]
        out = []
        for i in range(max((len(x) for x in lists), default=0)):
            out += [lst[i] for lst in lists if i < len(lst)]
        return out
    if order == "shuffled":
        rng = random.Random(seed)
        other = [s for slots in disks.values() for s in slots]
        rng.shuffle(other)
        cuts = sorted(rng.randint(0, len(other)) for _ in vm)
        out, prev = [], 0
        for cut, v in zip(cuts, vm, strict=True):
            out += other[prev:cut]
            out.append(v)
            prev = cut
        return out + other[prev:]
    raise ValueError(f"unknown cluster order {order!r}")


def build_archive(
    disks: dict[str, bytes] | Sequence[tuple[str, bytes]],
    *,
    vmstate: bytes | None = None,
    configs: Sequence[tuple[str, bytes]] | None = None,
    order: str | Sequence[tuple[int, int]] = "in-order",
    seed: int = 0,
    slots: int = PROXMOX_SLOTS_PER_EXTENT,
    uuid: bytes = UUID,
    ctime: int = CTIME,
    skip: Iterable[tuple[int, int]] = (),
    extra: Sequence[RawSlot] = (),
    extent_uuid: bytes | None = None,
) -> Built:
    """Pack *disks* (name -> content; dev_ids 1, 2, ... in that order) into VMA bytes.

    *vmstate* adds a ``vmstate`` device after the disks.  *slots* is the
    number of slots filled per extent (Proxmox: 58; the format allows 59).
    *skip* leaves clusters out (an interrupted backup); *extra* appends raw
    slots after the real ones (for duplicates and bad dev_ids).
    """
    items = list(disks.items()) if isinstance(disks, dict) else list(disks)
    if vmstate is not None:
        items.append((VMSTATE_NAME, vmstate))
    devices = {i: Device(i, name, len(data)) for i, (name, data) in enumerate(items, start=1)}
    content = {i: data for i, (_, data) in enumerate(items, start=1)}
    cfgs = [Config(n, d) for n, d in (DEFAULT_CONFIGS if configs is None else configs)]
    header = Header(uuid, ctime, cfgs, devices)
    head = header.pack()

    skip = set(skip)
    todo: list[RawSlot] = []
    for dev_id, c in cluster_order(devices, order, seed):
        if (dev_id, c) in skip:
            continue
        mask, stored = encode_cluster(content[dev_id][c * CLUSTER_SIZE : (c + 1) * CLUSTER_SIZE])
        todo.append((dev_id, c, mask, stored))
    todo += list(extra)

    built = Built(b"", header, content)
    packer = ExtentPacker(extent_uuid or uuid, slots_per_extent=slots)
    chunks, pos, current = [head], len(head), []

    def emit(blob: bytes) -> None:
        nonlocal pos, current
        if blob:
            built.extents.append(pos)
            built.slots.append(current)
            chunks.append(blob)
            pos += len(blob)
            current = []

    for dev_id, c, mask, stored in todo:
        current.append((dev_id, c, mask))
        emit(packer.add(dev_id, c, mask, stored))
    emit(packer.flush())
    built.data = b"".join(chunks)
    return built


def sparse_disk(size: int, seed: int, *, zero_clusters: float = 0.3, zero_blocks: float = 0.3):
    """Random content with all-zero clusters, zero 4 KiB blocks and a ragged tail."""
    rng = random.Random(seed)
    out = bytearray(size)
    for c in range((size + CLUSTER_SIZE - 1) // CLUSTER_SIZE):
        if rng.random() < zero_clusters:
            continue
        for b in range(CLUSTER_SIZE // BLOCK_SIZE):
            lo = c * CLUSTER_SIZE + b * BLOCK_SIZE
            hi = min(lo + BLOCK_SIZE, size)
            if lo >= hi or rng.random() < zero_blocks:
                continue
            if rng.random() < 0.2:  # a block with a few bytes set, the rest zero
                out[lo + rng.randrange(hi - lo)] = rng.randrange(1, 256)
            else:
                out[lo:hi] = rng.randbytes(hi - lo)
    return bytes(out)


# --- byte-level editing ------------------------------------------------------------


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def put(data: bytes, offset: int, new: bytes) -> bytes:
    """*data* with *new* written at *offset*."""
    return data[:offset] + new + data[offset + len(new) :]


def fix_header_md5(data: bytes) -> bytes:
    """Recompute the header md5 after a deliberate edit (to get past the checksum)."""
    (size,) = struct.unpack_from(">I", data, 56)
    buf = bytearray(data[:size])
    buf[32:48] = bytes(16)
    return put(data, 32, hashlib.md5(buf).digest())


def fix_extent_md5(data: bytes, ext_off: int) -> bytes:
    head = bytearray(data[ext_off : ext_off + EXTENT_HEADER_SIZE])
    head[24:40] = bytes(16)
    return put(data, ext_off + 24, hashlib.md5(head).digest())


def fix_all_md5(data: bytes) -> bytes:
    """Recompute the header md5 and that of every extent header reachable by block_count.

    For fuzzing behind the checksums: the damage then has to be found by the
    structural checks.  Stops at the first record without the extent magic.
    """
    out = bytearray(data)
    if len(out) < 60:
        return data
    (size,) = struct.unpack_from(">I", out, 56)
    if not HEADER_STRUCT_SIZE < size <= len(out):
        return data
    out[32:48] = bytes(16)
    out[32:48] = hashlib.md5(out[:size]).digest()
    pos = size
    while pos + EXTENT_HEADER_SIZE <= len(out) and out[pos : pos + 4] == b"VMAE":
        out[pos + 24 : pos + 40] = bytes(16)
        out[pos + 24 : pos + 40] = hashlib.md5(out[pos : pos + EXTENT_HEADER_SIZE]).digest()
        pos += EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(out[pos + 6 : pos + 8], "big")
    return bytes(out)


def edit_header(data: bytes, offset: int, new: bytes) -> bytes:
    """Write *new* into the header at *offset* and keep the header md5 valid."""
    return fix_header_md5(put(data, offset, new))


def edit_extent_header(data: bytes, ext_off: int, rel: int, new: bytes) -> bytes:
    """Write *new* at *rel* inside the extent header at *ext_off*, md5 kept valid."""
    return fix_extent_md5(put(data, ext_off + rel, new), ext_off)


def rewrite_extent(
    data: bytes, ext_off: int, edit: Callable[[list[list]], None], *, uuid: bytes | None = None
) -> bytes:
    """Rebuild the extent at *ext_off* after *edit* changed its slots in place.

    *edit* gets a list of ``[dev_id, cluster, mask, stored]`` (stored = the
    slot's data blocks) and may change, drop, add or reorder them; the
    extent is re-packed with a correct block_count and md5.
    """
    eh = ExtentHeader.parse(data[ext_off : ext_off + EXTENT_HEADER_SIZE], ext_off)
    pos = ext_off + EXTENT_HEADER_SIZE
    slots = []
    for s in eh.slots:
        n = s.mask.bit_count() * BLOCK_SIZE
        slots.append([s.dev_id, s.cluster, s.mask, data[pos : pos + n]])
        pos += n
    edit(slots)
    blocks = sum(m.bit_count() for _, _, m, _ in slots)
    head = ExtentHeader(uuid or eh.uuid, blocks, [BlockInfo(d, c, m) for d, c, m, _ in slots])
    return data[:ext_off] + head.pack() + b"".join(s[3] for s in slots) + data[pos:]


# --- corruptions -----------------------------------------------------------------------


@dataclass
class Damaged:
    """A damaged archive and what a reader must say about it."""

    name: str
    data: bytes
    error: type[VmaError]  # what Archive.open raises
    offset: int | None = None  # "archive offset N" in the message
    dev_id: int | None = None  # "dev N"
    cluster: int | None = None  # "cluster N"
    match: str | None = None  # a substring of the message
    #: What a reader that parses the header itself (StreamIndexer) raises, when it differs.
    stream_error: type[VmaError] | None = None

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.data)
        return path

    def location(self) -> list[str]:
        """The pieces of the message that say where: ``archive offset N``, ``dev N``, ..."""
        out = []
        if self.offset is not None:
            out.append(f"archive offset {self.offset}")
        if self.dev_id is not None:
            out.append(f"dev {self.dev_id}")
        if self.cluster is not None:
            out.append(f"cluster {self.cluster}")
        return out


def _dev_entry(dev_id: int) -> int:
    return DEV_INFO_OFFSET + dev_id * DEV_INFO_SIZE


def header_bitflip(b: Built) -> Damaged:
    # The size of dev 1 in the device table: only the md5 can notice.
    data = flip_bit(b.data, _dev_entry(1) + 15)
    return Damaged("header-bitflip", data, ChecksumError, 32, match="header md5")


def header_md5_field(b: Built) -> Damaged:
    return Damaged("header-md5-field", flip_bit(b.data, 40, 3), ChecksumError, 32)


def header_magic(b: Built) -> Damaged:
    # open_source picks the container by magic: a damaged VMA magic is "not a VMA archive";
    # a reader that parses the header itself says bad magic.
    return Damaged(
        "header-magic",
        flip_bit(b.data, 1),
        SourceError,
        match="not a VMA archive",
        stream_error=HeaderError,
    )


def header_version(b: Built) -> Damaged:
    return Damaged("header-version", put(b.data, 4, struct.pack(">I", 2)), HeaderError, 4)


def header_truncated(b: Built, size: int = HEADER_STRUCT_SIZE + 100) -> Damaged:
    size = min(size, b.header_size - 1)
    at = size if size >= 60 else 0  # shorter than the fixed fields: "at offset 0"
    return Damaged(f"header-truncated-{size}", b.data[:size], HeaderTruncatedError, at)


def header_reserved(b: Built) -> Damaged:
    return Damaged(
        "header-reserved", edit_header(b.data, 1000, b"\x01"), HeaderError, 60, match="reserved"
    )


def device_reserved(b: Built, dev_id: int = 1) -> Damaged:
    off = _dev_entry(dev_id)
    data = edit_header(b.data, off + 20, b"\x80")
    return Damaged("device-reserved", data, HeaderError, off, dev_id, match="reserved")


def absurd_header_size(b: Built, value: int = 0xFFFFFE00) -> Damaged:
    # peek_size refuses it before the md5 is even computed.
    data = put(b.data, 56, struct.pack(">I", value))
    return Damaged(
        f"header-size-{value}", data, HeaderError, 56, match=f"absurd header_size {value}"
    )


def blob_buffer_outside(b: Built) -> Damaged:
    data = put(b.data, 52, struct.pack(">I", 0x7FFFFFF0))  # blob_buffer_size
    return Damaged("blob-buffer-size", data, HeaderError, 48, match="blob buffer")


def absurd_blob_length(b: Built) -> Damaged:
    (ptr,) = struct.unpack_from(">I", b.data, 2044)  # first config's name blob
    data = edit_header(b.data, HEADER_STRUCT_SIZE + ptr, struct.pack("<H", 0xFFFF))
    return Damaged("blob-length", data, HeaderError, 2044, match="length 65535 overruns")


def absurd_blob_offset(b: Built) -> Damaged:
    data = edit_header(b.data, 3068, struct.pack(">I", 0xFFFFFF00))  # first config's data
    return Damaged("blob-offset", data, HeaderError, 3068, match=f"blob offset {0xFFFFFF00}")


def absurd_devname_offset(b: Built, dev_id: int = 1) -> Damaged:
    off = _dev_entry(dev_id)
    data = edit_header(b.data, off, struct.pack(">I", 0x00FFFFFF))
    return Damaged("devname-offset", data, HeaderError, off, match="outside the blob buffer")


def device_size(b: Built, size: int, dev_id: int = 1) -> Damaged:
    """dev_id's size field set to *size*: 0 or beyond 2^48 (32-bit cluster numbers) is refused."""
    off = _dev_entry(dev_id) + 8
    data = edit_header(b.data, off, struct.pack(">Q", size))
    match = "size 0" if size == 0 else "beyond what 32-bit cluster numbers address"
    return Damaged(f"device-size-{size}", data, HeaderError, off, dev_id, match=match)


def device_in_reserved_slot(b: Built, slot: int = 255) -> Damaged:
    """A device registered as dev 255 (or 0): the header itself is refused.

    ``Header.pack`` will not write it, so the entry of dev 1 is copied there.
    """
    entry = b.data[_dev_entry(1) : _dev_entry(1) + DEV_INFO_SIZE]
    data = edit_header(b.data, _dev_entry(slot), entry)
    return Damaged(
        f"device-registered-as-{slot}",
        data,
        HeaderError,
        _dev_entry(slot),
        slot,
        match="reserved slot",
    )


def extent_bitflip(b: Built, k: int = 1) -> Damaged:
    off = b.slot_offset(k, 0) + 7  # low byte of the first slot's cluster number
    return Damaged("extent-bitflip", flip_bit(b.data, off), ChecksumError, b.extents[k])


def extent_md5_field(b: Built, k: int = 0) -> Damaged:
    return Damaged(
        "extent-md5-field", flip_bit(b.data, b.extents[k] + 30, 6), ChecksumError, b.extents[k]
    )


def extent_magic(b: Built, k: int = 1) -> Damaged:
    off = b.extents[k]
    return Damaged("extent-magic", flip_bit(b.data, off + 3), ExtentError, off, match="magic")


def extent_reserved(b: Built, k: int = 0) -> Damaged:
    off = b.extents[k]
    data = edit_extent_header(b.data, off, 4, b"\x00\x01")
    return Damaged("extent-reserved", data, ExtentError, off + 4, match="reserved")


def blockinfo_reserved(b: Built, k: int = 0, j: int = 0) -> Damaged:
    off = b.slot_offset(k, j)
    data = edit_extent_header(b.data, b.extents[k], off + 2 - b.extents[k], b"\x04")
    return Damaged("blockinfo-reserved", data, ExtentError, off, match="reserved bits")


def empty_slot_used(b: Built, k: int = 0) -> Damaged:
    """The unused last slot (dev_id 0) carries a cluster number."""
    off = b.slot_offset(k, 58)
    data = edit_extent_header(b.data, b.extents[k], off - b.extents[k], struct.pack(">Q", 3))
    return Damaged("empty-slot-used", data, ExtentError, off, match="empty slot")


def extent_uuid(b: Built, k: int = 1) -> Damaged:
    off = b.extents[k]
    data = edit_extent_header(b.data, off, 8, bytes(16))
    return Damaged("extent-uuid", data, UuidMismatchError, off + 8, match="uuid")


def block_count_mismatch(b: Built, delta: int = 1, k: int | None = None) -> Damaged:
    """block_count off by *delta* (md5 valid): the extent would be mis-sized."""
    k = b.data_extent(0) if k is None else k
    off = b.extents[k]
    (count,) = struct.unpack_from(">H", b.data, off + 6)
    data = edit_extent_header(b.data, off, 6, struct.pack(">H", (count + delta) & 0xFFFF))
    return Damaged(f"block-count{delta:+d}", data, ExtentError, off + 6, match="differs from the")


def truncated_in_extent_header(b: Built, k: int = -1, cut: int = 100) -> Damaged:
    off = b.extents[k]
    return Damaged(
        f"truncated-in-extent-header-{k}+{cut}", b.data[: off + cut], TruncatedError, off,
        match="extent header",
    )  # fmt: skip


def truncated_in_extent_data(b: Built, k: int | None = None) -> Damaged:
    k = b.data_extent(-1) if k is None else k
    off = b.extents[k]
    size = min(off + EXTENT_HEADER_SIZE + BLOCK_SIZE + 17, b.extent_end(k) - 1)
    return Damaged(
        f"truncated-in-extent-data-{k}", b.data[:size], TruncatedError, off, match="extent's data"
    )


def first_missing(b: Built, present: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """(dev_id, cluster) a reader names first when only *present* clusters are stored."""
    have = set(present)
    for dev_id, dev in sorted(b.header.devices.items()):
        for c in range(dev.clusters):
            if (dev_id, c) not in have:
                return dev_id, c
    raise ValueError("nothing is missing")


def truncated_at_extent_boundary(b: Built, k: int = -1) -> Damaged:
    """The file ends cleanly after extent k-1: what Proxmox's verify misses."""
    k = k % len(b.extents)
    kept = [(d, c) for slots in b.slots[:k] for d, c, _ in slots]
    dev_id, cluster = first_missing(b, kept)
    return Damaged(
        f"truncated-at-extent-boundary-{k}",
        b.data[: b.extents[k]],
        IncompleteArchiveError,
        None,
        dev_id,
        cluster,
        match="incomplete",
    )


def missing_cluster(b: Built, dev_id: int = 1, cluster: int = 2) -> Damaged:
    """One slot dropped from its extent (the extent rebuilt, the rest intact)."""
    k, j = b.locate(dev_id, cluster)
    data = rewrite_extent(b.data, b.extents[k], lambda s: s.pop(j))
    return Damaged(
        "missing-cluster", data, IncompleteArchiveError, None, dev_id, cluster, match="1 of"
    )


def _disk_slot(b: Built, k: int, start: int = 0) -> int:
    """Index of the first slot of extent *k* (from *start*) holding a disk, not vmstate."""
    return next(j for j, (d, _, _) in enumerate(b.slots[k]) if j >= start and d != b.vmstate_id)


def _retarget(b: Built, name: str, k: int, dev_id: int, cluster: int, error, match) -> Damaged:
    """Slot of extent *k* (its first disk slot) renamed to (dev_id, cluster), md5 valid."""
    j = _disk_slot(b, k)
    if k == 0 and (dev_id, cluster) == b.slots[0][j][:2]:
        j = _disk_slot(b, 0, j + 1)

    def edit(slots):
        slots[j][0], slots[j][1] = dev_id, cluster

    data = rewrite_extent(b.data, b.extents[k], edit)
    return Damaged(name, data, error, b.slot_offset(k, j), dev_id, cluster, match=match)


def duplicate_cluster(b: Built, k: int = 1) -> Damaged:
    """A disk slot of extent *k* names the cluster of the first disk slot of extent 0."""
    dev_id, cluster, _ = b.slots[0][_disk_slot(b, 0)]
    name = f"duplicate-cluster-ext{k}"
    return _retarget(b, name, k, dev_id, cluster, DuplicateClusterError, "twice")


def cluster_beyond_device(b: Built, dev_id: int = 1, k: int = 1) -> Damaged:
    c = b.header.devices[dev_id].clusters
    return _retarget(b, "cluster-beyond-device", k, dev_id, c, ClusterRangeError, "beyond")


def dev_id_255(b: Built, k: int = 1) -> Damaged:
    return _retarget(b, "dev-id-255", k, 255, 0, UnknownDeviceError, "dev_id 255")


def dev_id_unregistered(b: Built, k: int = 1) -> Damaged:
    dev_id = max(b.header.devices) + 1
    return _retarget(b, "dev-id-unregistered", k, dev_id, 0, UnknownDeviceError, "register")


def vmstate_out_of_order(b: Built) -> Damaged:
    """vmstate clusters 0 and 1 swap places (each still stored once)."""
    vm = b.vmstate_id
    k0, j0 = b.locate(vm, 0)
    k1, j1 = b.locate(vm, 1)
    data = b.data
    for k, j, c in ((k0, j0, 1), (k1, j1, 0)):

        def edit(slots, j=j, c=c):
            slots[j][1] = c

        data = rewrite_extent(data, b.extents[k], edit)
    return Damaged(
        "vmstate-out-of-order",
        data,
        VmstateOrderError,
        b.slot_offset(k0, j0),
        vm,
        1,
        match="expected cluster 0",
    )


def trailing_garbage(b: Built, junk: bytes = b"garbage!" * 100) -> Damaged:
    return Damaged(
        f"trailing-{len(junk)}-bytes", b.data + junk, TrailingDataError, b.size, match="after"
    )


# --- the standard table --------------------------------------------------------------


def hostile_base() -> Built:
    """The archive the standard corruptions damage: 2 disks + vmstate, shuffled, 5 slots.

    Small extents (5 slots) so there are many of them; disk 2 ends 1536 bytes
    into its last cluster.
    """
    return build_archive(
        {
            "drive-scsi0": sparse_disk(12 * CLUSTER_SIZE, 1),
            "drive-scsi1": sparse_disk(5 * CLUSTER_SIZE + 1536, 2),
        },
        vmstate=sparse_disk(4 * CLUSTER_SIZE + 4096, 3, zero_clusters=0),
        configs=[*DEFAULT_CONFIGS, ("qemu-server.fw", b"[OPTIONS]\nenable: 1\n")],
        order="shuffled",
        seed=7,
        slots=5,
    )


def hostile_cases(base: Built | None = None) -> list[Damaged]:
    """The whole corruption table over *base* (default :func:`hostile_base`)."""
    b = base or hostile_base()
    return [
        header_bitflip(b),
        header_md5_field(b),
        header_magic(b),
        header_version(b),
        header_truncated(b),
        header_truncated(b, 5000),
        header_truncated(b, 30),
        header_reserved(b),
        device_reserved(b),
        absurd_header_size(b),
        absurd_header_size(b, HEADER_STRUCT_SIZE),
        absurd_header_size(b, HEADER_STRUCT_SIZE + 512 + 1),
        blob_buffer_outside(b),
        absurd_blob_length(b),
        absurd_blob_offset(b),
        absurd_devname_offset(b),
        device_size(b, 0),
        device_size(b, (1 << 48) + 1),
        device_size(b, (1 << 64) - 1),
        device_in_reserved_slot(b, 255),
        device_in_reserved_slot(b, 0),
        extent_bitflip(b),
        extent_md5_field(b),
        extent_magic(b),
        extent_reserved(b),
        blockinfo_reserved(b),
        empty_slot_used(b),
        extent_uuid(b),
        block_count_mismatch(b, +1),
        block_count_mismatch(b, -1),
        truncated_in_extent_header(b),
        truncated_in_extent_header(b, k=2, cut=4),
        truncated_in_extent_data(b),
        truncated_in_extent_data(b, b.data_extent(0)),
        truncated_at_extent_boundary(b),
        truncated_at_extent_boundary(b, 3),
        missing_cluster(b),
        duplicate_cluster(b),
        duplicate_cluster(b, 0),
        cluster_beyond_device(b),
        dev_id_255(b),
        dev_id_unregistered(b),
        vmstate_out_of_order(b),
        trailing_garbage(b),
        trailing_garbage(b, b"junk"),
        trailing_garbage(b, bytes(4096)),
    ]


#: Config names that parse fine but a filesystem must not follow.
HOSTILE_CONFIG_NAMES = [
    "../../x",
    "a/b",
    "..",
    ".",
    "",
    "evil\nname",
    "\x1b[31mred",
    "tab\there",
    "qemu-server.conf",
    "qemu-server.conf",  # two identical names
    "/etc/passwd",
]


def hostile_names_archive(names: Sequence[str] = HOSTILE_CONFIG_NAMES) -> Built:
    """A valid archive whose configs carry *names* (data: ``config <i>``) plus one disk."""
    configs = [(n, f"config {i}\n".encode()) for i, n in enumerate(names)]
    return build_archive({"drive-scsi0": sparse_disk(2 * CLUSTER_SIZE, 5)}, configs=configs)


# --- big sparse archives, fast ---------------------------------------------------------------


def zero_extent_headers(
    clusters, dev_id: int, *, uuid: bytes = UUID, slots: int = PROXMOX_SLOTS_PER_EXTENT
) -> bytes:
    """Back-to-back data-less extent headers storing *clusters* of *dev_id* as all-zero.

    Built with numpy (one md5 per header is the only Python loop), so the
    ~290,000 extents of a 1 TiB zero disk take about a second.
    """
    import numpy as np  # only the big-archive tests need it

    cl = np.asarray(clusters, dtype=np.uint64)
    n = -(-len(cl) // slots)
    flat = np.zeros(n * slots, dtype=np.uint64)
    flat[: len(cl)] = (np.uint64(dev_id) << np.uint64(32)) | cl
    info = np.zeros((n, 59), dtype=">u8")
    info[:, :slots] = flat.reshape(n, slots)
    heads = np.zeros((n, EXTENT_HEADER_SIZE), dtype=np.uint8)
    heads[:, 0:4] = np.frombuffer(b"VMAE", dtype=np.uint8)
    heads[:, 8:24] = np.frombuffer(uuid, dtype=np.uint8)
    heads[:, BLOCKINFO_OFFSET:] = info.view(np.uint8).reshape(n, -1)
    raw = memoryview(heads.tobytes())
    md5 = hashlib.md5
    step = EXTENT_HEADER_SIZE
    digests = b"".join([md5(raw[i : i + step]).digest() for i in range(0, len(raw), step)])
    heads[:, 24:40] = np.frombuffer(digests, dtype=np.uint8).reshape(n, 16)
    return heads.tobytes()
