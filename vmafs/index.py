"""The offset map: for every cluster of every device, where its data lives.

Building it reads only the 512-byte extent headers (seeking over the data
between them) and does the per-cluster work in numpy, a batch of extents
at a time, so a 1 TiB disk (16.8 M clusters) indexes in about a second.
Each device costs 8 bytes per cluster: one uint64 that packs the archive
offset of the cluster's first stored block, in 512-byte units, above its
16-bit block mask (0 = never written).  Every offset is a multiple of 512
(the header size is, and every extent is 512 + n * 4096 bytes), so nothing
is lost, and 48 bits of 512-byte units reach 128 PiB.

Two walkers feed the same checks: :func:`build_index` for sources with
random access (it preads headers and skips data) and :class:`StreamIndexer`
for compressed streams that are decompressed once, front to back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import (
    ChecksumError,
    ClusterRangeError,
    DuplicateClusterError,
    ExtentError,
    HeaderError,
    HeaderTruncatedError,
    IncompleteArchiveError,
    StreamTruncatedError,
    TrailingDataError,
    TruncatedError,
    UnknownDeviceError,
    VmaError,
    VmstateOrderError,
)
from .format import (
    BLOCK_SIZE,
    BLOCKINFO_OFFSET,
    CLUSTER_SIZE,
    DEV_INFO_OFFSET,
    DEV_INFO_SIZE,
    EXTENT_HEADER_SIZE,
    HEADER_READ,
    HEADER_STRUCT_SIZE,
    HEADERS_READ_AHEAD,
    SLOTS_PER_EXTENT,
    VMA_EXTENT_MAGIC,
    Device,
    Header,
    check_extent_header,
)

try:  # CPython's own md5: ~1.5x faster than OpenSSL's for a 512-byte header
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import md5 as _md5

ProgressFn = Callable[[int, int], None]

_BATCH = 1024  # extents validated and scattered per numpy pass
_ZERO16 = bytes(16)
_MAGIC_U32 = int.from_bytes(VMA_EXTENT_MAGIC, "little")

#: A map entry: (archive offset >> OFFSET_SHIFT) << MASK_BITS | block mask; 0 = never written.
OFFSET_SHIFT = 9
MASK_BITS = 16
MASK = (1 << MASK_BITS) - 1
MAX_OFFSET = 1 << (64 - MASK_BITS + OFFSET_SHIFT)  # 128 PiB
_MASK_WORD = 0 if sys.byteorder == "little" else 3  # the uint16 of a uint64 holding the mask
#: An extent starting here could hold data past MAX_OFFSET (none does below 128 PiB).
_LAST_EXTENT = MAX_OFFSET - EXTENT_HEADER_SIZE - 0xFFFF * BLOCK_SIZE
_CHUNK = 1 << 20  # clusters per step of whole-map scans (bounds their temporaries)

#: The packing above in the terms of ``pyfuse3.set_read_map``: a cluster whose
#: mask has every bit set lies whole, its blocks back to back, at
#: ``(entry >> MASK_BITS) << OFFSET_SHIFT`` (vmafs.fs hands maps to pyfuse3).
PACKED_LAYOUT = {
    "block_bits": CLUSTER_SIZE.bit_length() - 1,
    "flag_bits": MASK_BITS,
    "unit_bits": OFFSET_SHIFT,
}


def pack(offset: int, mask: int) -> int:
    """The map entry of a cluster stored at archive *offset* (a multiple of 512) with *mask*."""
    return (offset >> OFFSET_SHIFT) << MASK_BITS | mask


def unpack(entry: int) -> tuple[int, int]:
    """(archive offset, mask) of a map entry; offset 0 = never written."""
    return (entry >> MASK_BITS) << OFFSET_SHIFT, entry & MASK


@dataclass
class DeviceMap:
    """Where each cluster of one device is stored: one packed uint64 per cluster."""

    device: Device
    #: uint64 per cluster: (archive offset >> 9) << 16 | block mask (bit i = block i
    #: stored); 0 = never written.  See :func:`pack` / :func:`unpack`.
    packed: np.ndarray
    _missing: int | None = field(default=None, repr=False)
    _stored_blocks: int | None = field(default=None, repr=False)

    def lookup(self, cluster: int) -> tuple[int, int]:
        """(archive offset, mask) of *cluster*; offset 0 = never written."""
        return unpack(self.packed.item(cluster))

    @property
    def masks(self) -> np.ndarray:
        """uint16 block masks: a read-only strided view of ``packed`` (no copy)."""
        v = self.packed.view(np.uint16)[_MASK_WORD::4]
        v.flags.writeable = False
        return v

    @property
    def offsets(self) -> np.ndarray:
        """Archive offsets as a NEW uint64 array (8 bytes/cluster): for tests and tools."""
        return (self.packed >> np.uint64(MASK_BITS)) << np.uint64(OFFSET_SHIFT)

    def stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cluster numbers, archive offsets, block masks) of the clusters that store data.

        uint64, uint64 and uint32 arrays, in cluster order; the offsets are
        those of each cluster's first stored block.
        """
        packed = self.packed
        clusters = np.flatnonzero(packed & np.uint64(MASK))
        entries = packed[clusters]
        offsets = (entries >> np.uint64(MASK_BITS)) << np.uint64(OFFSET_SHIFT)
        masks = (entries & np.uint64(MASK)).astype(np.uint32)
        return clusters.astype(np.uint64), offsets, masks

    @property
    def missing(self) -> int:
        if self._missing is None:
            self._missing = self.packed.size - int(np.count_nonzero(self.packed))
        return self._missing

    @property
    def stored_blocks(self) -> int:
        if self._stored_blocks is None:
            masks = self.masks
            self._stored_blocks = sum(
                int(np.bitwise_count(masks[i : i + _CHUNK]).sum(dtype=np.int64))
                for i in range(0, masks.size, _CHUNK)
            )
        return self._stored_blocks

    @property
    def data_clusters(self) -> int:
        """Clusters with at least one stored block."""
        masks = self.masks
        return sum(
            int(np.count_nonzero(masks[i : i + _CHUNK])) for i in range(0, masks.size, _CHUNK)
        )

    def next_cluster(self, cluster: int, *, hole: bool) -> int | None:
        """The first cluster at or after *cluster* that is a hole (*hole*) or holds data.

        A hole is a cluster written with no stored block (it reads as zeros);
        every other cluster counts as data, including one an incomplete
        archive never wrote (reading it fails, so it must not be skipped as
        zeros).  None if there is no such cluster.  The search steps forward
        in growing chunks: its cost follows the distance to the answer, and
        its temporaries stay small on any disk size.
        """
        packed, masks = self.packed, self.masks
        step = 256
        while cluster < packed.size:
            end = min(cluster + step, packed.size)
            is_hole = masks[cluster:end] == 0
            is_hole &= packed[cluster:end] != 0
            if not hole:
                np.logical_not(is_hole, out=is_hole)
            i = int(is_hole.argmax())
            if is_hole[i]:
                return cluster + i
            cluster, step = end, min(step * 4, _CHUNK)
        return None

    def is_hole(self, cluster: int) -> bool:
        """Whether *cluster* is a hole, by the rule of :meth:`next_cluster`, in O(1)."""
        entry = self.packed.item(cluster)
        return entry != 0 and entry & MASK == 0

    def first_missing(self) -> int | None:
        # argmin finds the first 0 without a temporary per-cluster array
        # (flatnonzero needed 8 bytes per missing cluster: 13 GB for 100 TiB).
        if not self.packed.size or self.missing == 0:
            return None
        i = int(np.argmin(self.packed))
        return i if self.packed[i] == 0 else None


@dataclass
class ArchiveIndex:
    """The offset maps of all devices plus facts about the extent stream."""

    header: Header
    maps: dict[int, DeviceMap]
    extents: int
    end: int  # offset just past the last complete extent
    #: Offset of an incomplete final extent that was dropped (allow_incomplete), else None.
    truncated_at: int | None = None

    @property
    def complete(self) -> bool:
        return self.truncated_at is None and all(m.missing == 0 for m in self.maps.values())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for persistence (see :meth:`from_arrays`)."""
        out = {
            "meta": np.array(
                [self.extents, self.end, -1 if self.truncated_at is None else self.truncated_at],
                dtype=np.int64,
            )
        }
        for dev_id, m in self.maps.items():
            out[f"packed_{dev_id}"] = m.packed
        return out

    @classmethod
    def from_arrays(cls, header: Header, arrays: dict[str, np.ndarray]) -> ArchiveIndex:
        """Rebuild an index saved by :meth:`to_arrays`; checks shapes against *header*."""
        extents, end, trunc = (int(x) for x in arrays["meta"])
        maps = {}
        for dev_id, dev in header.devices.items():
            packed = np.asarray(arrays[f"packed_{dev_id}"], dtype=np.uint64)
            if packed.shape != (dev.clusters,):
                raise ValueError(f"saved index does not fit dev {dev_id}")
            maps[dev_id] = DeviceMap(dev, packed)
        return cls(header, maps, extents, end, None if trunc < 0 else trunc)


class _Scratch:
    """Work arrays for one batch, allocated once per build and reused.

    Fresh numpy temporaries of ~0.5 MB per batch were returned to the kernel
    by malloc between batches and faulted in again by the next one: on a VM
    that made the page faults half of the build's CPU time (300k faults for
    the 1 TiB test archive).  The hot path therefore writes into these.
    """

    def __init__(self, rows: int) -> None:
        shape = (rows, SLOTS_PER_EXTENT)
        slots = rows * SLOTS_PER_EXTENT
        self.queue = bytearray(rows * EXTENT_HEADER_SIZE)  # headers waiting for a batch
        self.zeroed = np.empty((rows, EXTENT_HEADER_SIZE), np.uint8)  # md5 field zeroed
        self.info = np.empty(shape, np.uint64)  # blockinfo, native order
        self.dev = np.empty(shape, np.uint64)
        self.high = np.empty(shape, np.uint64)
        self.masks = np.empty(shape, np.uint64)  # of the extents that store data
        self.before = np.empty(shape, np.uint64)
        self.entry = np.empty(shape, np.uint64)  # the map entry each slot would get
        self.slot_bad = np.empty(shape, np.uint64)
        self.counts = np.empty(shape, np.uint8)  # of the extents that store data
        self.used = np.empty(shape, bool)
        self.unused = np.empty(shape, bool)
        self.d = np.empty(slots, np.intp)  # per used slot, archive order
        self.c = np.empty(slots, np.intp)
        self.v = np.empty(slots, np.uint64)
        self.g = np.empty(slots, np.uint64)  # gathered entries, then sorted clusters
        self.flags = np.empty(slots, bool)
        self.flags2 = np.empty(slots, bool)


class _IndexCore:
    """Validates batches of extent headers and scatters them into the maps."""

    def __init__(self, header: Header, allow_incomplete: bool) -> None:
        self.header = header
        self.allow_incomplete = allow_incomplete
        self.maps = {}
        for dev_id, dev in header.devices.items():
            try:
                packed = np.zeros(dev.clusters, dtype=np.uint64)
            except MemoryError:
                # A 13 KiB header can declare 254 devices of 256 TiB each.
                raise HeaderError(
                    f"not enough memory to index device {dev.name!r} of {dev.size} bytes "
                    f"({8 * dev.clusters} bytes of offset map)",
                    offset=DEV_INFO_OFFSET + DEV_INFO_SIZE * dev_id + 8,
                    dev_id=dev_id,
                ) from None
            self.maps[dev_id] = DeviceMap(dev, packed)
        self._written = dict.fromkeys(header.devices, 0)  # clusters recorded, per device
        self._stored = dict.fromkeys(header.devices, 0)  # blocks recorded, per device
        self._nclusters = np.zeros(256, dtype=np.int64)
        self._known = np.zeros(256, dtype=bool)
        for dev_id, dev in header.devices.items():
            self._nclusters[dev_id] = dev.clusters
            self._known[dev_id] = True
        vm = [d for d in header.devices.values() if d.is_vmstate]
        self._vmstate_id = vm[0].dev_id if vm else None
        self._vmstate_next = 0
        self._uuid = np.frombuffer(header.uuid, dtype=np.uint8)
        self.extents = 0
        self._s: _Scratch | None = None  # made on the first batch, dropped by finish()
        self._starts: list[int] = []  # archive offset of each queued header

    @property
    def _scratch(self) -> _Scratch:
        if self._s is None:
            self._s = _Scratch(_BATCH)
        return self._s

    def add(self, pos: int, raw: bytes | bytearray | memoryview) -> None:
        """Queue extent headers: 512-byte records back to back from archive offset *pos*.

        The extent magic is already checked.  Whole batches of a long run
        (extents without data sit back to back) are checked in place.
        """
        size = EXTENT_HEADER_SIZE
        n = len(raw) // size
        i = 0
        if n >= _BATCH:
            self.flush()  # errors in earlier extents come first
            step = _BATCH * size
            for i in range(0, (n - n % _BATCH) * size, step):
                at = pos + i
                self._process(np.arange(at, at + step, size, dtype=np.uint64), raw[i : i + step])
            i = (n - n % _BATCH) * size
        queue = self._scratch.queue
        while i < n * size:
            q = len(self._starts) * size
            take = min(n * size - i, len(queue) - q)
            queue[q : q + take] = raw[i : i + take]
            self._starts.extend(range(pos + i, pos + i + take, size))
            i += take
            if len(self._starts) == _BATCH:
                self.flush()

    def flush(self) -> None:
        if not self._starts:
            return
        starts = np.array(self._starts, dtype=np.uint64)
        self._starts = []
        self._process(starts, memoryview(self._scratch.queue)[: len(starts) * EXTENT_HEADER_SIZE])

    def _fail_header(self, row: int, offsets: np.ndarray, raw) -> None:
        off = int(offsets[row])
        check_extent_header(
            bytes(raw[row * EXTENT_HEADER_SIZE : (row + 1) * EXTENT_HEADER_SIZE]),
            off,
            self.header.uuid,
        )
        raise AssertionError("vectorized and scalar extent checks disagree")  # pragma: no cover

    def _process(self, ext_off: np.ndarray, raw) -> None:
        """Check and record up to _BATCH extent headers (*raw*) at archive offsets *ext_off*."""
        n = len(ext_off)
        if int(ext_off[-1]) >= _LAST_EXTENT:
            raise ExtentError(
                "extent lies beyond 128 PiB into the archive", offset=int(ext_off[-1])
            )
        s = self._scratch
        u8 = np.frombuffer(raw, np.uint8, n * EXTENT_HEADER_SIZE).reshape(n, EXTENT_HEADER_SIZE)
        md5_bad = self._md5_mismatches(u8, s.zeroed[:n])
        # blockinfo[59], native: mask << 48 | reserved << 40 | dev_id << 32 | cluster.
        info = s.info[:n]
        np.copyto(
            info, np.frombuffer(raw, ">u8", n * 64).reshape(n, 64)[:, BLOCKINFO_OFFSET // 8 :]
        )
        dev = np.right_shift(info, 32, out=s.dev[:n])
        dev &= 0xFF
        used = np.not_equal(dev, 0, out=s.used[:n])
        block_count = (u8[:, 6].astype(np.int64) << 8) | u8[:, 7]
        # An empty slot must be all zero; a used one must have zero reserved bits.
        slot_bad = np.bitwise_and(info, 0xFF << 40, out=s.slot_bad[:n])
        np.copyto(slot_bad, info, where=np.logical_not(used, out=s.unused[:n]))
        # Only the extents that store data (few, on a sparse disk) need their masks
        # counted; all others must have no mask bit at all.
        high = np.right_shift(info, 40, out=s.high[:n])  # mask << 8 | reserved
        rows = np.flatnonzero(block_count)
        masks = np.take(high, rows, axis=0, out=s.masks[: len(rows)])
        masks >>= 8
        counts = np.bitwise_count(masks, out=s.counts[: len(rows)])
        blocks = block_count[rows]
        dataless_marked = len(rows) < n and bool((high.any(axis=1) & (block_count == 0)).any())
        if (
            md5_bad is not None
            or u8[:, 4:6].any()
            or (u8[:, 8:24] != self._uuid).any()
            or slot_bad.any()
            or dataless_marked
            or (counts.sum(axis=1, dtype=np.int64) != blocks).any()
        ):
            bad = (
                (u8[:, 4] != 0)
                | (u8[:, 5] != 0)
                | np.any(u8[:, 8:24] != self._uuid, axis=1)
                | slot_bad.any(axis=1)
                | (high.any(axis=1) & (block_count == 0))
            )
            bad[rows] |= counts.sum(axis=1, dtype=np.int64) != blocks
            if md5_bad is not None:
                bad |= md5_bad
            # Errors come in archive order: the slots of the extents before the
            # bad header are checked first, then the header itself fails.
            row = int(np.argmax(bad))
            if row:
                self._process(ext_off[:row], raw[: row * EXTENT_HEADER_SIZE])
            self._fail_header(row, ext_off, raw)

        # The entry of each slot: its data starts after the header and the blocks
        # of slots 0..i-1, in 512-byte units (a block is 8 of them), mask below.
        entry = s.entry[:n]
        first = ((ext_off >> OFFSET_SHIFT) + 1) << MASK_BITS
        entry[:] = first[:, None]  # right after the header, mask 0: extents without data
        if len(rows):
            before = np.cumsum(counts, axis=1, dtype=np.uint64, out=s.before[: len(rows)])
            before -= counts
            before <<= 3 + MASK_BITS
            before += first[rows, None]
            before |= masks
            entry[rows] = before
        k = int(used[0].sum())
        if used[:, :k].all() and not used[:, k:].any():
            # Every extent uses the same first k slots (how writers fill them).
            def slot(i: int) -> int:
                return (i // k) * SLOTS_PER_EXTENT + i % k

            m = n * k
            d, c, v = s.d[:m], s.c[:m], s.v[:m]
            np.copyto(d.reshape(n, k), dev[:, :k])
            np.bitwise_and(info[:, :k], 0xFFFFFFFF, out=c.reshape(n, k))
            np.copyto(v.reshape(n, k), entry[:, :k])
        else:
            flat = np.flatnonzero(used)  # used slots in archive order (row-major)

            def slot(i: int) -> int:
                return int(flat[i])

            d = dev.ravel()[flat].astype(np.intp)
            c = (info.ravel()[flat] & 0xFFFFFFFF).astype(np.intp)
            v = entry.ravel()[flat]

        def where(i: int) -> dict:
            row, col = divmod(slot(i), SLOTS_PER_EXTENT)
            return {
                "offset": int(ext_off[row]) + BLOCKINFO_OFFSET + 8 * col,
                "dev_id": int(d[i]),
                "cluster": int(c[i]),
            }

        # Every problem found is (index in archive order, tie-break, error); the first one wins.
        problems: list[tuple[int, int, VmaError]] = []
        one = int(d[0]) if len(d) and int(d.min()) == int(d.max()) else None
        if one is None or not self._known[one] or int(c.max()) >= self._nclusters[one]:
            unknown = ~self._known[d]
            beyond = c >= self._nclusters[d]  # unknown devices have 0 clusters: also beyond
            if unknown.any() or beyond.any():
                i = int(np.argmax(unknown | beyond))
                if unknown[i]:
                    err: VmaError = UnknownDeviceError(
                        f"extent names dev_id {int(d[i])}, which the header does not register",
                        **where(i),
                    )
                else:
                    dev_size = self.header.devices[int(d[i])].size
                    err = ClusterRangeError(
                        f"cluster lies beyond the end of the device ({dev_size} bytes)",
                        **where(i),
                    )
                problems.append((i, 0, err))
                d, c, v = d[:i], c[:i], v[:i]  # the slots before it are checked still
        if one is not None and not problems:
            found = self._scatter(one, c, v, int(block_count.sum()), where)
            if found is not None:
                problems.append(found)
        elif len(d):
            for dev_id in np.flatnonzero(np.bincount(d, minlength=256)).tolist():
                sel = np.flatnonzero(d == dev_id)
                vs = v[sel]
                blocks = int(np.bitwise_count(vs & MASK).sum(dtype=np.int64))
                found = self._scatter(
                    dev_id, c[sel], vs, blocks, lambda j, sel=sel: where(int(sel[j]))
                )
                if found is not None:
                    j, tie, err = found
                    problems.append((int(sel[j]), tie, err))
        if problems:
            raise min(problems, key=lambda p: p[:2])[2]
        self.extents += n

    def _md5_mismatches(self, u8: np.ndarray, zeroed: np.ndarray) -> np.ndarray | None:
        """Rows whose md5 is wrong (None: all right); the one check numpy cannot do."""
        np.copyto(zeroed, u8)
        zeroed[:, 24:40] = 0
        z = memoryview(zeroed).cast("B")
        md5, step = _md5, EXTENT_HEADER_SIZE
        digests = b"".join([md5(z[i : i + step]).digest() for i in range(0, len(z), step)])
        if digests == u8[:, 24:40].tobytes():
            return None
        got = np.frombuffer(digests, np.uint8).reshape(-1, 16)
        return np.any(got != u8[:, 24:40], axis=1)

    def _scatter(self, dev_id: int, cs: np.ndarray, v: np.ndarray, blocks: int, where):
        """Record entries *v* for clusters *cs* of one device, refusing any cluster seen before.

        *blocks* is the number of blocks they store.  Returns the first problem
        as (index into cs, tie-break, error), else None.
        """
        packed = self.maps[dev_id].packed
        s = self._scratch
        m = len(cs)
        lo, hi = int(cs[0]), int(cs[-1]) + 1
        if hi - lo == m and (
            m < 2 or bool(np.greater(cs[1:], cs[:-1], out=s.flags[: m - 1]).all())
        ):
            # A contiguous ascending run (in-order archives): slices, no gathers.
            target = slice(lo, hi)
            dup = np.not_equal(packed[target], 0, out=s.flags[:m])
        else:
            target = cs
            dup = np.not_equal(np.take(packed, cs, out=s.g[:m], mode="clip"), 0, out=s.flags[:m])
            # A second copy within the batch: a plain sort tells whether there is
            # one; only then the (slower) stable argsort says which slot it is.
            srt = s.g.view(np.uint32)[:m]  # clusters are 32-bit: half the data to sort
            np.copyto(srt, cs, casting="unsafe")
            srt.sort()
            if bool(np.equal(srt[1:], srt[:-1], out=s.flags2[: m - 1]).any()):
                order = np.argsort(cs, kind="stable")
                dup[order[1:]] |= cs[order[1:]] == cs[order[:-1]]
        found = []
        if dup.any():
            j = int(np.argmax(dup))
            found.append((j, 1, DuplicateClusterError("cluster is stored twice", **where(j))))
        if dev_id == self._vmstate_id:
            wrong = self._check_vmstate(cs, where)
            if wrong is not None:
                found.append(wrong)
        if found:
            return min(found, key=lambda p: p[:2])
        packed[target] = v
        self._written[dev_id] += m
        self._stored[dev_id] += blocks
        return None

    def _check_vmstate(self, cs: np.ndarray, where):
        """(index into cs, tie-break, error) of the first vmstate cluster out of order, or None."""
        expected = np.arange(self._vmstate_next, self._vmstate_next + len(cs))
        wrong = cs != expected
        if wrong.any():
            j = int(np.argmax(wrong))
            return (
                j,
                2,
                VmstateOrderError(
                    f"vmstate cluster out of order (expected cluster {int(expected[j])})",
                    **where(j),
                ),
            )
        self._vmstate_next += len(cs)
        return None

    def finish(self, end: int, truncated_at: int | None) -> ArchiveIndex:
        self.flush()
        self._s = None
        for dev_id, dm in self.maps.items():
            # Duplicates are refused, so every cluster recorded is a distinct one.
            dm._missing = dm.device.clusters - self._written[dev_id]
            dm._stored_blocks = self._stored[dev_id]
        index = ArchiveIndex(self.header, self.maps, self.extents, end, truncated_at)
        if not self.allow_incomplete:
            for dev_id, dm in sorted(self.maps.items()):
                first = dm.first_missing()
                if first is not None:
                    raise IncompleteArchiveError(
                        f"archive is incomplete: {dm.missing} of {dm.device.clusters} clusters "
                        f"of {dm.device.name!r} were never written (interrupted backup?)",
                        dev_id=dev_id,
                        cluster=first,
                    )
        return index


def _truncated(
    core: _IndexCore, pos: int, end: int, what: str, cut: StreamTruncatedError | None = None
) -> int:
    """Report an extent cut short; with allow_incomplete the partial extent is dropped.

    *cut*: the stream ends there because its compressed file is cut short,
    which is what is reported then (where in the compressed file, and that
    what is there can be read).
    """
    core.flush()  # errors in earlier extents come first
    if not core.allow_incomplete:
        if cut is not None:
            raise cut
        raise TruncatedError(f"archive ends inside {what} (file is {end} bytes)", offset=pos)
    return pos


def header_truncated(end: int, cut: StreamTruncatedError | None) -> HeaderTruncatedError:
    """The error of a stream of *end* bytes that ends inside the VMA header.

    *cut*: because its compressed file is cut short there (the message says where).
    """
    if cut is None:
        return HeaderTruncatedError("stream ends inside the VMA header", offset=end)
    return HeaderTruncatedError(
        f"stream ends inside the VMA header: {cut.message}; nothing can be read", offset=end
    )


def _bad_magic(core: _IndexCore, head: bytes, pos: int, end: int | None) -> None:
    """Tell a damaged extent magic apart from junk appended after the last extent."""
    core.flush()  # errors in earlier extents come first
    if len(head) >= EXTENT_HEADER_SIZE:
        fixed = VMA_EXTENT_MAGIC + bytes(head[4:EXTENT_HEADER_SIZE])
        try:
            check_extent_header(fixed, pos, core.header.uuid)
        except (ExtentError, ChecksumError):
            pass  # not a damaged extent header: junk (zero padding has a zero reserved field)
        else:
            raise ExtentError(f"bad extent magic {bytes(head[:4])!r}", offset=pos)
    what = "the bytes" if end is None else f"{end - pos} bytes"
    raise TrailingDataError(f"{what} after the last extent are not an extent", offset=pos)


def build_index(
    header: Header,
    source,
    *,
    allow_incomplete: bool = False,
    progress: ProgressFn | None = None,
) -> ArchiveIndex:
    """Walk the extents of a random-access *source* and return its index.

    Reads only extent headers.  Raises the specific :class:`~vmafs.errors.VmaError`
    for the first problem found, in archive order.
    """
    end = source.size
    core = _IndexCore(header, allow_incomplete)
    pos = header.header_size
    buf, buf_at = b"", pos  # read-ahead window [buf_at, buf_at + len(buf))
    want = HEADERS_READ_AHEAD  # shrinks to HEADER_READ while extents carry data
    truncated_at = None
    last_report = 0
    stops = _no_stops
    # One buffer for every read (a fresh MiB per read costs page faults too);
    # whatever the core keeps of a window it copies before the next read.
    pread_into = source.pread_into
    window = memoryview(bytearray(HEADERS_READ_AHEAD))
    while pos < end:
        rel = pos - buf_at
        if rel < 0 or rel + EXTENT_HEADER_SIZE > len(buf):
            buf = window[: pread_into(pos, window[:want])]
            buf_at, rel = pos, 0
            stops = _zero_extent_stops(buf)
        # How many records from here are data-less extent headers in a row.
        r = rel // EXTENT_HEADER_SIZE
        run = int(stops[np.searchsorted(stops, r)]) - r
        if run:
            # Extents without data sit back to back: take them in one go.
            core.add(pos, memoryview(buf)[rel : rel + run * EXTENT_HEADER_SIZE])
            pos += run * EXTENT_HEADER_SIZE
            want = HEADERS_READ_AHEAD
            continue
        head = memoryview(buf)[rel : rel + EXTENT_HEADER_SIZE]
        if len(head) < EXTENT_HEADER_SIZE or head[:4] != VMA_EXTENT_MAGIC:
            if (
                len(head) < EXTENT_HEADER_SIZE
                and bytes(head[:4]) == VMA_EXTENT_MAGIC[: len(head[:4])]
            ):
                truncated_at = _truncated(core, pos, end, "an extent header")
                break
            _bad_magic(core, head, pos, end)
        nxt = pos + EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(head[6:8], "big")
        if nxt > end:
            # Check the header before blaming the length: a flipped
            # block_count shows up as an md5 mismatch, not as truncation.
            core.flush()
            check_extent_header(bytes(head), pos, header.uuid)
            truncated_at = _truncated(core, pos, end, "an extent's data")
            break
        core.add(pos, head)
        if nxt > pos + EXTENT_HEADER_SIZE:
            want = HEADER_READ  # the next header lies past this extent's data
        pos = nxt
        if progress is not None and pos - last_report >= 64 << 20:
            progress(pos, end)
            last_report = pos
    index = core.finish(pos if truncated_at is None else truncated_at, truncated_at)
    if progress is not None:
        progress(end, end)
    return index


_no_stops = np.zeros(1, dtype=np.intp)


def _zero_extent_stops(buf: bytes) -> np.ndarray:
    """Ascending numbers of the 512-byte records of *buf* that are not data-less
    extent headers, ending with the number of whole records (one pass per read)."""
    avail = len(buf) // EXTENT_HEADER_SIZE
    words = np.frombuffer(buf, "<u4", avail * EXTENT_HEADER_SIZE // 4).reshape(avail, 128)
    # Word 0 is the magic, word 1 holds reserved + block_count: both must match.
    ok = (words[:, 0] == _MAGIC_U32) & (words[:, 1] == 0)
    return np.append(np.flatnonzero(~ok), avail)


class StreamIndexer:
    """Builds the header and the index from the VMA stream fed front to back.

    For compressed sources that are decompressed once: feed every chunk in
    order with :meth:`feed`, then call :meth:`finish` with the stream length.
    The archive header is parsed from the stream itself (``header``).  An
    extent reaches the index only once its data has streamed past, so a cut
    final extent can be dropped (allow_incomplete) or reported.
    """

    def __init__(self, *, allow_incomplete: bool = False) -> None:
        self.allow_incomplete = allow_incomplete
        self.header: Header | None = None
        self._core: _IndexCore | None = None
        self._pending = bytearray()  # the structure at self._next, being assembled
        self._next = 0  # stream offset of the next structure (header or extent header)
        self._pos = 0  # stream offset just past the bytes fed so far
        self._held: tuple[int, bytes] | None = None  # last extent header, data not yet past

    def feed(self, offset: int, chunk: bytes | memoryview) -> None:
        """Take the next *chunk* of the stream, which starts at stream *offset*."""
        if offset != self._pos:
            raise ValueError(f"stream chunk at {offset}, expected {self._pos}")
        mv = memoryview(chunk)
        chunk_end = offset + len(mv)
        self._pos = chunk_end
        while self._next + len(self._pending) < chunk_end:
            start = self._next + len(self._pending) - offset
            need = self._want() - len(self._pending)
            piece = mv[start : start + need]
            self._pending += piece
            if len(piece) < need:
                return
            self._complete()

    def _want(self) -> int:
        if self.header is not None:
            return EXTENT_HEADER_SIZE
        if len(self._pending) < HEADER_STRUCT_SIZE:
            return HEADER_STRUCT_SIZE
        return Header.peek_size(bytes(self._pending))

    def _complete(self) -> None:
        data = bytes(self._pending)
        if self.header is None:
            if len(data) < Header.peek_size(data):
                return  # the fixed part is in; keep collecting the blob buffer
            self.header = Header.parse(data)
            self._core = _IndexCore(self.header, self.allow_incomplete)
            self._next = self.header.header_size
        else:
            pos = self._next
            if self._held is not None:
                # Its data has streamed past; it goes to the checks before the next
                # magic is judged, so its own errors come first (as in build_index).
                self._core.add(*self._held)
                self._held = None
            if data[:4] != VMA_EXTENT_MAGIC:
                _bad_magic(self._core, data, pos, None)
            self._held = (pos, data)
            self._next = pos + EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(data[6:8], "big")
        self._pending = bytearray()

    def finish(self, end: int, cut: StreamTruncatedError | None = None) -> ArchiveIndex:
        """Close the stream of *end* bytes and return the index (raises like build_index).

        *cut* (the source's ``truncation``): the stream ends at *end* only
        because its compressed file is cut short.  The archive is then
        incomplete wherever the cut falls, on an extent boundary too: *cut*
        is raised, or with allow_incomplete the extents before it are kept
        and ``truncated_at`` is set.
        """
        if end != self._pos:
            raise ValueError(f"stream closed at {end} but {self._pos} bytes were fed")
        if self.header is None:
            raise header_truncated(end, cut)
        core = self._core
        truncated_at = None
        if self._held is not None:
            pos, head = self._held
            if pos + EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(head[6:8], "big") <= end:
                core.add(pos, head)
            else:
                core.flush()
                check_extent_header(head, pos, self.header.uuid)
                truncated_at = _truncated(core, pos, end, "an extent's data", cut)
        if self._pending and truncated_at is None:
            if bytes(self._pending[:4]) != VMA_EXTENT_MAGIC[: len(self._pending[:4])]:
                _bad_magic(core, bytes(self._pending), self._next, end)
            truncated_at = _truncated(core, self._next, end, "an extent header", cut)
        if cut is not None and truncated_at is None:  # cut on an extent boundary
            truncated_at = _truncated(core, end, end, "", cut)
        return core.finish(end if truncated_at is None else truncated_at, truncated_at)
