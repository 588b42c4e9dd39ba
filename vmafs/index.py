"""The offset map: for every cluster of every device, where its data lives.

Building it reads only the 512-byte extent headers (seeking over the data
between them) and does the per-cluster work in numpy, a batch of extents
at a time, so a 1 TiB disk (16.8 M clusters) indexes in about a second.
Each device costs 10 bytes per cluster: a uint64 archive offset of the
cluster's first stored block (0 = never written) and a uint16 block mask.

Two walkers feed the same checks: :func:`build_index` for sources with
random access (it preads headers and skips data) and :class:`StreamIndexer`
for compressed streams that are decompressed once, front to back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import (
    ChecksumError,
    ClusterRangeError,
    DuplicateClusterError,
    ExtentError,
    HeaderError,
    IncompleteArchiveError,
    TrailingDataError,
    TruncatedError,
    UnknownDeviceError,
    VmaError,
    VmstateOrderError,
)
from .format import (
    BLOCK_SIZE,
    BLOCKINFO_OFFSET,
    DEV_INFO_OFFSET,
    DEV_INFO_SIZE,
    EXTENT_HEADER_SIZE,
    HEADER_STRUCT_SIZE,
    SLOTS_PER_EXTENT,
    VMA_EXTENT_MAGIC,
    Device,
    Header,
    check_extent_header,
)

ProgressFn = Callable[[int, int], None]

_BATCH = 1024  # extents validated and scattered per numpy pass
_READ_AHEAD = 1 << 20  # header-only reads: zero-cluster extents sit back to back
_HEADER_READ = 4096  # after an extent with data: one page, not a MiB of the next extent's data
_ZERO16 = bytes(16)
_MAGIC_U32 = int.from_bytes(VMA_EXTENT_MAGIC, "little")


@dataclass
class DeviceMap:
    """Where each cluster of one device is stored."""

    device: Device
    offsets: np.ndarray  # uint64, archive offset of the first stored block; 0 = missing
    masks: np.ndarray  # uint16, bit i = block i stored

    @property
    def missing(self) -> int:
        return self.offsets.size - int(np.count_nonzero(self.offsets))

    @property
    def stored_blocks(self) -> int:
        return int(np.bitwise_count(self.masks).sum(dtype=np.int64))

    def first_missing(self) -> int | None:
        # argmin finds the first 0 without a temporary per-cluster array
        # (flatnonzero needed 8 bytes per missing cluster: 13 GB for 100 TiB).
        if not self.offsets.size:
            return None
        i = int(np.argmin(self.offsets))
        return i if self.offsets[i] == 0 else None


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
            out[f"offsets_{dev_id}"] = m.offsets
            out[f"masks_{dev_id}"] = m.masks
        return out

    @classmethod
    def from_arrays(cls, header: Header, arrays: dict[str, np.ndarray]) -> ArchiveIndex:
        """Rebuild an index saved by :meth:`to_arrays`; checks shapes against *header*."""
        extents, end, trunc = (int(x) for x in arrays["meta"])
        maps = {}
        for dev_id, dev in header.devices.items():
            offsets = np.asarray(arrays[f"offsets_{dev_id}"], dtype=np.uint64)
            masks = np.asarray(arrays[f"masks_{dev_id}"], dtype=np.uint16)
            if offsets.shape != (dev.clusters,) or masks.shape != (dev.clusters,):
                raise ValueError(f"saved index does not fit dev {dev_id}")
            maps[dev_id] = DeviceMap(dev, offsets, masks)
        return cls(header, maps, extents, end, None if trunc < 0 else trunc)


class _IndexCore:
    """Validates batches of extent headers and scatters them into the maps."""

    def __init__(self, header: Header, allow_incomplete: bool) -> None:
        self.header = header
        self.allow_incomplete = allow_incomplete
        self.maps = {}
        for dev_id, dev in header.devices.items():
            try:
                offsets = np.zeros(dev.clusters, dtype=np.uint64)
                masks = np.zeros(dev.clusters, dtype=np.uint16)
            except MemoryError:
                # A 13 KiB header can declare 254 devices of 256 TiB each.
                raise HeaderError(
                    f"not enough memory to index device {dev.name!r} of {dev.size} bytes "
                    f"({10 * dev.clusters} bytes of offset map)",
                    offset=DEV_INFO_OFFSET + DEV_INFO_SIZE * dev_id + 8,
                    dev_id=dev_id,
                ) from None
            self.maps[dev_id] = DeviceMap(dev, offsets, masks)
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
        self._offsets: list[int] = []
        self._headers = bytearray()

    def add(self, offsets: Sequence[int], raw: bytes | memoryview) -> None:
        """Queue extent headers (back-to-back 512-byte records, extent magic already checked)."""
        self._offsets.extend(offsets)
        self._headers += raw
        if len(self._offsets) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._offsets:
            return
        offsets = np.array(self._offsets, dtype=np.uint64)
        raw = bytes(self._headers)
        self._offsets, self._headers = [], bytearray()
        self._process(offsets, raw)

    def _fail_header(self, row: int, offsets: np.ndarray, raw: bytes) -> None:
        off = int(offsets[row])
        check_extent_header(
            raw[row * EXTENT_HEADER_SIZE : (row + 1) * EXTENT_HEADER_SIZE], off, self.header.uuid
        )
        raise AssertionError("vectorized and scalar extent checks disagree")  # pragma: no cover

    def _process(self, ext_off: np.ndarray, raw: bytes) -> None:
        n = len(ext_off)
        u8 = np.frombuffer(raw, dtype=np.uint8).reshape(n, EXTENT_HEADER_SIZE)
        md5_bad = self._md5_mismatches(u8)
        # Each blockinfo as two 32-bit words: hi = mask<<16 | reserved<<8 | dev_id, lo = cluster.
        words = u8[:, BLOCKINFO_OFFSET:].copy().view(">u4").astype(np.uint32)
        hi, lo = words[:, 0::2], words[:, 1::2]
        dev = hi & 0xFF
        used = dev != 0
        counts = np.bitwise_count(hi >> 16)
        block_count = (u8[:, 6].astype(np.int64) << 8) | u8[:, 7]
        bad = (
            (u8[:, 4] != 0)
            | (u8[:, 5] != 0)
            | np.any(u8[:, 8:24] != self._uuid, axis=1)
            | (counts.sum(axis=1, dtype=np.int64) != block_count)
            | np.any(~used & ((hi | lo) != 0), axis=1)
            | np.any(hi & 0xFF00, axis=1)
        )
        if md5_bad is not None:
            bad |= md5_bad
        if bad.any():
            # Errors come in archive order: the slots of the extents before the
            # bad header are checked first, then the header itself fails.
            row = int(np.argmax(bad))
            if row:
                self._process(ext_off[:row], raw[: row * EXTENT_HEADER_SIZE])
            self._fail_header(row, ext_off, raw)

        # Data of slot i starts after the blocks of slots 0..i-1.
        before = np.cumsum(counts, axis=1, dtype=np.uint32) - counts
        k = int(used[0].sum())
        if used[:, :k].all() and not used[:, k:].any():
            # Every extent uses the same first k slots (how writers fill them).
            def slot(i: int) -> int:
                return (i // k) * SLOTS_PER_EXTENT + i % k

            d, c = dev[:, :k].ravel(), lo[:, :k].ravel()
            m, before = (hi[:, :k] >> 16).ravel(), before[:, :k]
            start = ext_off[:, None]
        else:
            flat = np.flatnonzero(used)  # used slots in archive order (row-major)

            def slot(i: int) -> int:
                return int(flat[i])

            d, c = dev.ravel()[flat], lo.ravel()[flat]
            m, before = (hi.ravel()[flat] >> 16), before.ravel()[flat]
            start = ext_off[flat // SLOTS_PER_EXTENT]
        d = d.astype(np.intp)
        c = c.astype(np.intp)
        m = m.astype(np.uint16)
        o = (start + before.astype(np.uint64) * np.uint64(BLOCK_SIZE)).ravel()
        o += np.uint64(EXTENT_HEADER_SIZE)

        def where(i: int) -> dict:
            row, col = divmod(slot(i), SLOTS_PER_EXTENT)
            return {
                "offset": int(ext_off[row]) + BLOCKINFO_OFFSET + 8 * col,
                "dev_id": int(d[i]),
                "cluster": int(c[i]),
            }

        # Every problem found is (index in archive order, tie-break, error); the first one wins.
        problems: list[tuple[int, int, VmaError]] = []
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
                    f"cluster lies beyond the end of the device ({dev_size} bytes)", **where(i)
                )
            problems.append((i, 0, err))
            d, c, o, m = d[:i], c[:i], o[:i], m[:i]  # the slots before it are checked still
        per_dev = np.flatnonzero(np.bincount(d, minlength=256))
        for dev_id in per_dev.tolist():
            sel = None if len(per_dev) == 1 else np.flatnonzero(d == dev_id)
            cs = c if sel is None else c[sel]
            found = self._scatter(
                dev_id,
                cs,
                o if sel is None else o[sel],
                m if sel is None else m[sel],
                lambda j, sel=sel: where(j if sel is None else int(sel[j])),
            )
            if found is not None:
                j, tie, err = found
                problems.append((j if sel is None else int(sel[j]), tie, err))
        if problems:
            raise min(problems, key=lambda p: p[:2])[2]
        self.extents += n

    def _md5_mismatches(self, u8: np.ndarray) -> np.ndarray | None:
        """Rows whose md5 is wrong (None: all right); the one check numpy cannot do."""
        stored = u8[:, 24:40].tobytes()
        zeroed = u8.copy()
        zeroed[:, 24:40] = 0
        z = memoryview(zeroed.tobytes())
        md5 = hashlib.md5
        step = EXTENT_HEADER_SIZE
        digests = b"".join([md5(z[i : i + step]).digest() for i in range(0, len(z), step)])
        if digests == stored:
            return None
        got = np.frombuffer(digests, np.uint8).reshape(-1, 16)
        return np.any(got != u8[:, 24:40], axis=1)

    def _scatter(self, dev_id: int, cs: np.ndarray, o: np.ndarray, m: np.ndarray, where):
        """Record clusters *cs* of one device, refusing any cluster seen before.

        Returns the first problem as (index into cs, tie-break, error), else None.
        """
        dm = self.maps[dev_id]
        lo, hi = int(cs[0]), int(cs[-1]) + 1
        if hi - lo == len(cs) and (len(cs) < 2 or bool(np.all(cs[1:] > cs[:-1]))):
            # A contiguous ascending run (in-order archives): slices, no gathers.
            target = slice(lo, hi)
            dup = dm.offsets[target] != 0
        else:
            target = cs
            dup = dm.offsets[cs] != 0
            order = np.argsort(cs, kind="stable")
            again = cs[order[1:]] == cs[order[:-1]]  # a second copy within the batch
            dup[order[1:]] |= again
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
        dm.offsets[target] = o
        dm.masks[target] = m
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


def _truncated(core: _IndexCore, pos: int, end: int, what: str) -> int:
    """Report an extent cut short; with allow_incomplete the partial extent is dropped."""
    core.flush()  # errors in earlier extents come first
    if not core.allow_incomplete:
        raise TruncatedError(f"archive ends inside {what} (file is {end} bytes)", offset=pos)
    return pos


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
    want = _READ_AHEAD  # shrinks to _HEADER_READ while extents carry data
    truncated_at = None
    last_report = 0
    while pos < end:
        rel = pos - buf_at
        if rel < 0 or rel + EXTENT_HEADER_SIZE > len(buf):
            buf, buf_at, rel = source.pread(pos, want), pos, 0
        run = _zero_extent_run(buf, rel)
        if run:
            # Extents without data sit back to back: take them in one go.
            core.add(
                range(pos, pos + run * EXTENT_HEADER_SIZE, EXTENT_HEADER_SIZE),
                memoryview(buf)[rel : rel + run * EXTENT_HEADER_SIZE],
            )
            pos += run * EXTENT_HEADER_SIZE
            want = _READ_AHEAD
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
        core.add((pos,), head)
        if nxt > pos + EXTENT_HEADER_SIZE:
            want = _HEADER_READ  # the next header lies past this extent's data
        pos = nxt
        if progress is not None and pos - last_report >= 64 << 20:
            progress(pos, end)
            last_report = pos
    index = core.finish(pos if truncated_at is None else truncated_at, truncated_at)
    if progress is not None:
        progress(end, end)
    return index


def _zero_extent_run(buf: bytes, rel: int) -> int:
    """How many records from buf[rel:] are data-less extent headers in a row."""
    avail = (len(buf) - rel) // EXTENT_HEADER_SIZE
    if avail < 2:
        return 0
    words = np.frombuffer(buf, "<u4", avail * EXTENT_HEADER_SIZE // 4, rel).reshape(avail, -1)
    # Word 0 is the magic, word 1 holds reserved + block_count: both must match.
    ok = (words[:, 0] == _MAGIC_U32) & (words[:, 1] == 0)
    return avail if ok.all() else int(np.argmin(ok))


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
                self._core.add((self._held[0],), self._held[1])
                self._held = None
            if data[:4] != VMA_EXTENT_MAGIC:
                _bad_magic(self._core, data, pos, None)
            self._held = (pos, data)
            self._next = pos + EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(data[6:8], "big")
        self._pending = bytearray()

    def finish(self, end: int) -> ArchiveIndex:
        """Close the stream of *end* bytes and return the index (raises like build_index)."""
        if end != self._pos:
            raise ValueError(f"stream closed at {end} but {self._pos} bytes were fed")
        if self.header is None:
            raise TruncatedError("stream ends inside the VMA header", offset=end)
        core = self._core
        truncated_at = None
        if self._held is not None:
            pos, head = self._held
            if pos + EXTENT_HEADER_SIZE + BLOCK_SIZE * int.from_bytes(head[6:8], "big") <= end:
                core.add((pos,), head)
            else:
                core.flush()
                check_extent_header(head, pos, self.header.uuid)
                truncated_at = _truncated(core, pos, end, "an extent's data")
        if self._pending and truncated_at is None:
            if bytes(self._pending[:4]) != VMA_EXTENT_MAGIC[: len(self._pending[:4])]:
                _bad_magic(core, bytes(self._pending), self._next, end)
            truncated_at = _truncated(core, self._next, end, "an extent header")
        return core.finish(end if truncated_at is None else truncated_at, truncated_at)
