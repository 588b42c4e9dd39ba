"""An opened archive: header + offset map over a random-access source.

This is the reader's public face: the filesystem, ``extract`` and
``verify`` read device bytes through :meth:`Archive.readinto` and never
touch the layout themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import HeaderError, MissingClusterError, TruncatedError, naming_archive
from .format import (
    BLOCK_SIZE,
    BLOCKS_PER_CLUSTER,
    CLUSTER_SIZE,
    FULL_MASK,
    HEADER_STRUCT_SIZE,
    Device,
    Header,
)
from .index import MASK, MASK_BITS, OFFSET_SHIFT, ArchiveIndex, StreamIndexer, build_index
from .source import Reader, Source, open_source

ProgressFn = Callable[[int, int], None]

_CLUSTER_BITS = CLUSTER_SIZE.bit_length() - 1
_IN_CLUSTER = CLUSTER_SIZE - 1
_BLOCK_BITS = BLOCK_SIZE.bit_length() - 1
_IN_BLOCK = BLOCK_SIZE - 1
_NEXT_CLUSTER = (CLUSTER_SIZE >> OFFSET_SHIFT) << MASK_BITS  # entry step: next 64 KiB stored
_ZEROS = memoryview(bytes(1 << 20))  # holes are copied from here (calloc'ed: no RSS)
_NO_RUN = -1  # Archive._locate: the bytes are zeros, nothing to read
#: pread_into(offset, buffer) -> bytes read: the source's, or its page-cache-only twin
_PreadInto = Callable[[int, memoryview], int]
_RUNS_CHUNK = 1 << 20  # clusters per step of allocated_ranges (bounds its temporaries)


def _first(pair: tuple) -> int:
    return pair[0]


def read_header(source: Reader) -> Header:
    """Read and validate the archive header through *source* (errors name its path)."""
    with naming_archive(source.path):
        head = source.pread(0, HEADER_STRUCT_SIZE)
        size = Header.peek_size(head)
        while len(head) < size:  # a header reader may return less than asked
            more = source.pread(len(head), size - len(head))
            if not more:
                break
            head += more
        return Header.parse(head)


def index_by_scan(source: Source, allow_incomplete: bool, progress) -> tuple[Header, ArchiveIndex]:
    """Header and offset map of a source that is decompressed once (its scan).

    A compressed file cut short makes the archive incomplete (see
    :meth:`StreamIndexer.finish`).
    """
    indexer = StreamIndexer(allow_incomplete=allow_incomplete)
    source.scan(indexer.feed, progress)
    index = indexer.finish(source.size, source.truncation)
    return indexer.header, index


@dataclass(frozen=True)
class StoredClusters:
    """Clusters that store data, sorted by where their data lies in the archive.

    Four arrays of one entry per cluster: the archive offset of its first
    stored block, its block mask (bit i: block i stored; the stored blocks
    lie back to back from that offset), its device and its cluster number.
    """

    offset: np.ndarray  # uint64
    mask: np.ndarray  # uint32
    dev_id: np.ndarray  # uint16
    cluster: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.offset)


class Archive:
    """A VMA archive opened for random reads of its devices.

    ``open`` validates the whole archive structure (every extent header,
    every cluster exactly once), or takes the offset map from a side index
    that was made that way and still matches the archive (:mod:`.sidecar`);
    afterwards reads never fail on structure, only on I/O or, with
    ``allow_incomplete``, on clusters that are missing.
    """

    def __init__(
        self,
        path: str,
        source: Source,
        header: Header,
        index: ArchiveIndex,
        *,
        stream_checked: bool | None = None,
    ) -> None:
        self.path = path
        self.source = source
        self.header = header
        self.index = index
        #: True when opening decoded the whole compressed stream (every checksum of the
        #: container checked), or there is no container; default: the latter.
        self.stream_checked = not source.compressed if stream_checked is None else stream_checked
        self._pread_into = source.pread_into  # bound once: the read fast paths call it
        #: The archive file's descriptor when device bytes lie in it as stored
        #: (a plain archive: :meth:`segments`), else None.
        self.fd: int | None = None if source.compressed else source.fileno()
        #: :meth:`segments` trusts the file to be at least this long (see hold_size).
        self._size_held = 0

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        allow_incomplete: bool = False,
        progress: ProgressFn | None = None,
        use_sidecar: bool = True,
        index_beside: bool = False,
    ) -> Archive:
        """Open and index *path* (plain or compressed, chosen by magic).

        A compressed archive that must be read through once saves what that
        taught (:mod:`vmafs.sidecar`) in the cache directory, or beside the
        archive with *index_beside*.

        A VmaError raised here names *path* once (:meth:`VmaError.name_archive`).
        """
        path = os.fspath(path)
        with naming_archive(path):
            source = open_source(path)
            try:
                scanned = False
                if source.needs_scan:
                    header, index, scanned = _open_scanned(
                        source, allow_incomplete, progress, use_sidecar, index_beside
                    )
                else:
                    loaded = None
                    if use_sidecar and has_plain_side_index(source):
                        loaded = _load_side_index(source, allow_incomplete)
                    header, index = loaded or walk_headers(source, allow_incomplete, progress)
            except BaseException:
                source.close()
                raise
        return cls(path, source, header, index, stream_checked=scanned or not source.compressed)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what is in it --

    @property
    def compressed(self) -> bool:
        """True for a compressed stream: reading it out of archive order costs decoding."""
        return self.source.compressed

    @property
    def devices(self) -> list[Device]:
        return [self.header.devices[i] for i in sorted(self.header.devices)]

    def device(self, dev_id: int) -> Device:
        try:
            return self.header.devices[dev_id]
        except KeyError:
            raise HeaderError("no such device", dev_id=dev_id) from None

    def stored_bytes(self, dev_id: int) -> int:
        """Bytes of *dev_id* the archive actually stores (non-zero 4 KiB blocks)."""
        return self.index.maps[dev_id].stored_blocks * BLOCK_SIZE

    def missing_clusters(self, dev_id: int) -> int:
        return self.index.maps[dev_id].missing

    def allocated_ranges(self, dev_id: int) -> Iterator[tuple[int, int]]:
        """(offset, length) byte ranges holding stored data, clusters merged, clipped to size.

        Walks the map a million clusters at a time, so its temporaries stay
        a few MB whatever the disk size.
        """
        dm = self.index.maps[dev_id]
        size = dm.device.size
        masks = dm.masks
        run_at = -1  # first cluster of the run still open at a chunk's end, else -1
        for base in range(0, masks.size, _RUNS_CHUNK):
            data = (masks[base : base + _RUNS_CHUNK] != 0).view(np.int8)
            edge = np.diff(data, prepend=np.int8(run_at >= 0))  # +1: run starts, -1: ends
            starts = (np.flatnonzero(edge == 1) + base).tolist()
            stops = (np.flatnonzero(edge == -1) + base).tolist()
            if run_at >= 0:
                if not stops:
                    continue  # the whole chunk is inside the open run
                starts.insert(0, run_at)
            run_at = starts.pop() if len(starts) > len(stops) else -1
            for a, b in zip(starts, stops, strict=True):
                yield a * CLUSTER_SIZE, min(b * CLUSTER_SIZE, size) - a * CLUSTER_SIZE
        if run_at >= 0:
            yield run_at * CLUSTER_SIZE, size - run_at * CLUSTER_SIZE

    def next_data(self, dev_id: int, offset: int) -> int | None:
        """lseek(SEEK_DATA) on the device: the first data byte at or after *offset*.

        *offset* must lie inside the device.  Holes are whole clusters that
        store no block (cluster granularity: a cluster with one stored block
        is all data); a cluster an incomplete archive lacks counts as data.
        None if only holes follow.
        """
        dm = self.index.maps[dev_id]
        cluster = dm.next_cluster(offset >> _CLUSTER_BITS, hole=False)
        if cluster is None:
            return None
        return max(offset, cluster << _CLUSTER_BITS)

    def next_hole(self, dev_id: int, offset: int) -> int:
        """lseek(SEEK_HOLE) on the device: the first hole byte at or after *offset*.

        *offset* must lie inside the device; holes as in :meth:`next_data`.
        The device size (the implicit hole at the end) if none.
        """
        dm = self.index.maps[dev_id]
        cluster = dm.next_cluster(offset >> _CLUSTER_BITS, hole=True)
        if cluster is None:
            return dm.device.size
        return min(max(offset, cluster << _CLUSTER_BITS), dm.device.size)

    def is_hole(self, dev_id: int, offset: int) -> bool:
        """Whether the byte at *offset* (inside the device) lies in a hole, as
        :meth:`next_data`/:meth:`next_hole` see holes, without a search."""
        return self.index.maps[dev_id].is_hole(offset >> _CLUSTER_BITS)

    def stored_clusters(self, dev_ids: list[int]) -> StoredClusters:
        """Every cluster of the devices *dev_ids* that stores data, in archive order.

        For readers that go through the archive front to back (``extract`` of
        a compressed archive); :meth:`read_stream` fetches the data and
        :meth:`plan_partial` places the blocks of a partly stored cluster.
        """
        parts = [self.index.maps[dev_id].stored() for dev_id in dev_ids]
        if not parts:
            empty = np.zeros(0, dtype=np.uint64)
            return StoredClusters(empty, empty.astype(np.uint32), empty.astype(np.uint16), empty)
        offset = np.concatenate([p[1] for p in parts])
        order = np.argsort(offset, kind="stable")
        dev = np.concatenate(
            [np.full(len(p[0]), d, dtype=np.uint16) for d, p in zip(dev_ids, parts, strict=True)]
        )
        return StoredClusters(
            offset[order],
            np.concatenate([p[2] for p in parts])[order],
            dev[order],
            np.concatenate([p[0] for p in parts])[order],
        )

    # -- reading --

    def read_stream(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the VMA stream itself (not of a device).

        TruncatedError when the stream ends before.  Thread-safe.
        """
        data = self.source.pread(offset, size)
        if len(data) != size:
            raise TruncatedError(
                f"archive ends early: {size} bytes expected at {offset}",
                offset=offset + len(data),
            )
        return data

    def read(self, dev_id: int, offset: int, size: int) -> bytes:
        """Device bytes [offset, offset+size), clipped at the device end.

        A range stored in one piece comes straight from one pread, without
        an intermediate buffer (the common case for the filesystem).
        """
        dm = self.index.maps[dev_id]
        n = max(0, min(size, dm.device.size - offset))
        runs, zeros = self._plan(dm, offset, n)
        if len(runs) == 1 and not zeros and runs[0][1] == n:
            return self._pread(*runs[0][:2])
        if not runs:
            return bytes(n)
        buf = bytearray(n)
        self._fill(memoryview(buf), runs, (), self._pread_into)  # a fresh bytearray is zero
        return bytes(buf)

    def readinto(self, dev_id: int, offset: int, buf, *, cached_only: bool = False) -> int:
        """Fill *buf* with device bytes from *offset*; returns the count (short at the end).

        Zero clusters and unstored blocks are filled in memory; the stored
        blocks of neighbouring clusters that lie back to back in the archive
        are fetched with one pread.  Thread-safe.  *cached_only*: raise
        BlockingIOError instead of waiting for storage (see
        ``Source.pread_into_cached``; *buf* is then partly filled).
        """
        dm = self.index.maps[dev_id]
        read = self.source.pread_into_cached if cached_only else self._pread_into
        out = memoryview(buf).cast("B")
        n = len(out)
        if offset + n > dm.device.size:
            n = max(0, dm.device.size - offset)
        aoff, entries = self._locate(dm, offset, n)
        if aoff is not None:
            if aoff == _NO_RUN:
                out[:n] = _ZEROS[:n]
            else:
                self._read_run(out, aoff, n, 0, read)
            return n
        runs, zeros = self._plan(dm, offset, n, entries)
        self._fill(out, runs, zeros, read)
        return n

    def segments(
        self, dev_id: int, offset: int, size: int
    ) -> list[tuple[int, int, int] | memoryview]:
        """Device bytes [offset, offset+size), clipped at the device end, as
        pieces in order: ``(fd, archive offset, length)`` for stored bytes
        (read them from :attr:`fd`), zero memoryviews for the rest.

        For a plain archive only (:attr:`fd` is not None): the filesystem
        hands these to pyfuse3, whose libfuse reads or splices them from the
        archive itself, so no device byte passes through Python.  Raises
        MissingClusterError like :meth:`readinto`, and TruncatedError when a
        piece lies past the file's end now (asked of the kernel unless
        :meth:`hold_size` vouches for the length) (the file shrank after ``open``:
        read from, it would give a short reply, i.e. zeros or EOF, not EIO).
        """
        fd = self.fd
        if fd is None:
            raise ValueError(f"{self.source.kind} archive: device bytes are not in the file")
        dm = self.index.maps[dev_id]
        n = max(0, min(size, dm.device.size - offset))
        aoff, entries = self._locate(dm, offset, n)
        if aoff is not None:
            if aoff == _NO_RUN:
                return [_ZEROS[:n]]
            self._check_end(aoff + n)
            return [(fd, aoff, n)]
        runs, zeros = self._plan(dm, offset, n, entries)
        if runs:
            self._check_end(max(aoff + length for aoff, length, _ in runs))
        pieces: list[tuple[int, tuple[int, int, int] | memoryview]] = [
            (dest, (fd, aoff, length)) for aoff, length, dest in runs
        ]
        for dest, length in zeros:
            for at in range(dest, dest + length, len(_ZEROS)):
                pieces.append((at, _ZEROS[: min(len(_ZEROS), dest + length - at)]))
        pieces.sort(key=_first)
        return [piece for _, piece in pieces]

    def hold_size(self, size: int) -> None:
        """Promise that the archive file stays at least *size* bytes long until
        the next call (``hold_size(0)`` withdraws the promise).

        Only for a caller that can keep it: :func:`vmafs.lease.hold_archive_size`
        holds a read lease meanwhile.  Until then (and after), :meth:`segments`
        asks the kernel for the file's size on every call.
        """
        self._size_held = size

    def _check_end(self, end: int) -> None:
        if end <= self._size_held:
            return
        # lseek, not fstat: a block device's st_size is 0.  The file position
        # is nobody's (every read gives its offset).
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if end > size:
            raise TruncatedError("archive shrank while it was being read", offset=size)

    @staticmethod
    def _locate(dm, offset: int, n: int) -> tuple[int | None, list[int] | None]:
        """The read fast paths, in plain ints: ``(archive offset, None)`` when
        the *n* bytes at *offset* are one run in the archive (clusters stored
        whole and back to back: most of a sequential read; or one cluster's
        blocks: small reads), ``(_NO_RUN, None)`` when they are zeros within
        one cluster, else ``(None, entries)`` for :meth:`_plan` (entries may
        be None)."""
        if n <= 0 or offset < 0:
            return None, None
        first = offset >> _CLUSTER_BITS
        last = (offset + n - 1) >> _CLUSTER_BITS
        if first == last:
            entry = dm.packed.item(first)
            if entry:
                a = offset & _IN_CLUSTER
                blk = a >> _BLOCK_BITS
                want = (2 << ((a + n - 1) >> _BLOCK_BITS)) - (1 << blk)  # blocks touched
                have = entry & want  # of those, the stored ones (mask bits)
                if not have:
                    return _NO_RUN, None
                if have == want:
                    # Stored blocks of a cluster lie back to back: skip those before.
                    before = (entry & ((1 << blk) - 1)).bit_count()
                    aoff = ((entry >> MASK_BITS) << OFFSET_SHIFT) + (before << _BLOCK_BITS)
                    return aoff + (a & _IN_BLOCK), None
            return None, None
        entries = dm.packed[first : last + 1].tolist()
        entry = entries[0]
        if entry & MASK == FULL_MASK and entries == list(
            range(entry, entry + len(entries) * _NEXT_CLUSTER, _NEXT_CLUSTER)
        ):
            return ((entry >> MASK_BITS) << OFFSET_SHIFT) + (offset & _IN_CLUSTER), None
        return None, entries

    def _pread(self, aoff: int, length: int) -> bytes:
        data = self.source.pread(aoff, length)
        if len(data) != length:
            raise TruncatedError("archive shrank while it was being read", offset=aoff + len(data))
        return data

    @staticmethod
    def _read_run(out: memoryview, aoff: int, length: int, dest: int, read: _PreadInto) -> None:
        got = read(aoff, out[dest : dest + length])
        if got != length:
            raise TruncatedError("archive shrank while it was being read", offset=aoff + got)

    def _fill(self, out: memoryview, runs, zeros, read: _PreadInto) -> None:
        for dest, length in zeros:
            while length > 0:
                step = min(length, len(_ZEROS))
                out[dest : dest + step] = _ZEROS[:step]
                dest += step
                length -= step
        for aoff, length, dest in runs:
            self._read_run(out, aoff, length, dest, read)

    def _plan(
        self, dm, offset: int, n: int, entries: list[int] | None = None
    ) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Where the n bytes at device *offset* come from.

        Returns (runs, zeros): runs of [archive offset, length, dest offset],
        merged when contiguous in both, and (dest offset, length) ranges that
        are zero without any I/O.  *entries*: the map entries of the clusters
        concerned, when the caller has them already.
        """
        if offset < 0:  # numpy would index from the end: wrong bytes, silently
            raise ValueError(f"negative device offset {offset}")
        if n <= 0:
            return [], []
        first, last = offset >> _CLUSTER_BITS, (offset + n - 1) >> _CLUSTER_BITS
        if entries is not None:
            pass
        elif first == last:
            entries = [dm.packed.item(first)]
        else:
            entries = dm.packed[first : last + 1].tolist()
        if 0 in entries:
            raise MissingClusterError(
                "cluster was never written to the archive",
                dev_id=dm.device.dev_id,
                cluster=first + entries.index(0),
            )
        runs: list[list[int]] = []
        zeros: list[tuple[int, int]] = []
        pos = 0
        end = offset + n
        cstart = first << _CLUSTER_BITS
        for entry in entries:
            a = max(offset, cstart) - cstart
            b = min(end, cstart + CLUSTER_SIZE) - cstart
            mask = entry & MASK
            if mask == FULL_MASK:
                self._add_run(runs, ((entry >> MASK_BITS) << OFFSET_SHIFT) + a, b - a, pos)
            elif mask == 0:
                if zeros and zeros[-1][0] + zeros[-1][1] == pos:
                    zeros[-1] = (zeros[-1][0], zeros[-1][1] + b - a)
                else:
                    zeros.append((pos, b - a))
            else:
                aoff = (entry >> MASK_BITS) << OFFSET_SHIFT
                self.plan_partial(pos, aoff, mask, a, b, runs, zeros)
            pos += b - a
            cstart += CLUSTER_SIZE
        return runs, zeros

    @staticmethod
    def _add_run(runs: list[list[int]], aoff: int, length: int, dest: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == aoff and runs[-1][2] + runs[-1][1] == dest:
            runs[-1][1] += length
        else:
            runs.append([aoff, length, dest])

    @classmethod
    def plan_partial(cls, pos, aoff, mask, a, b, runs, zeros) -> None:
        """Plan bytes [a, b) of a cluster with some blocks stored, destined for pos.

        *aoff* is where the cluster's stored blocks start (in the archive, or
        in any buffer holding them back to back); appends to *runs* ([source
        offset, length, dest]) and *zeros* ((dest, length)).  Goes from one
        run of stored (or of unstored) blocks to the next, not block by block.
        """
        blk, last = a >> _BLOCK_BITS, (b - 1) >> _BLOCK_BITS
        stored = (mask & ((1 << blk) - 1)).bit_count()  # blocks stored before blk
        while blk <= last:
            x = mask >> blk
            if x & 1:
                k = (~x & (x + 1)).bit_length() - 1  # trailing ones: stored blocks in a row
            else:
                k = (x & -x).bit_length() - 1 if x else BLOCKS_PER_CLUSTER  # trailing zeros
            stop = min(blk + k, last + 1)
            lo = max(a, blk << _BLOCK_BITS)
            hi = min(b, stop << _BLOCK_BITS)
            dest = pos + lo - a
            if x & 1:
                start = aoff + (stored << _BLOCK_BITS) + lo - (blk << _BLOCK_BITS)
                cls._add_run(runs, start, hi - lo, dest)
                stored += stop - blk
            elif zeros and zeros[-1][0] + zeros[-1][1] == dest:
                zeros[-1] = (zeros[-1][0], zeros[-1][1] + hi - lo)
            else:
                zeros.append((dest, hi - lo))
            blk = stop


def has_plain_side_index(source: Source) -> bool:
    """True for a plain archive: its optional side index holds the offset map, which
    ``vmafs index`` (the vzdump hook) saves so that a mount on storage that seeks
    reads one file instead of every extent header (one seek per ~3.8 MB)."""
    return source.kind == "plain"


def walk_headers(source: Source, allow_incomplete: bool, progress) -> tuple[Header, ArchiveIndex]:
    """Header and offset map of a random-access *source* by walking its extent headers."""
    # A source may offer a cheaper reader for the header walk (seekable
    # zstd: decode each frame only as far as its extent headers).
    walker = source.header_reader()
    header = read_header(walker)
    return header, build_index(header, walker, allow_incomplete=allow_incomplete, progress=progress)


def _load_side_index(source: Source, allow_incomplete: bool):
    """(header, index) from a valid side index of a plain archive, or None.

    Only looked for, never written here: for a plain archive the walk is
    cheap where storage does not seek, so the side index is made on purpose
    (``vmafs index``), not beside every archive that is opened.
    """
    from . import sidecar  # noqa: PLC0415 - only opens that look for one import it

    return sidecar.load(source, allow_incomplete=allow_incomplete)


def _open_scanned(
    source: Source, allow_incomplete: bool, progress, use_sidecar: bool, index_beside: bool = False
) -> tuple[Header, ArchiveIndex, bool]:
    """Index a source that must be decompressed once, reusing a saved side index.

    A new side index goes into the cache directory, or beside the archive
    with *index_beside*.

    Returns (header, index, scanned): scanned is False when the side index served.
    """
    from . import sidecar  # noqa: PLC0415 - only compressed archives need it

    if use_sidecar:
        loaded = sidecar.load(source, allow_incomplete=allow_incomplete)
        if loaded is not None:
            return *loaded, False
    header, index = index_by_scan(source, allow_incomplete, progress)
    if use_sidecar:
        sidecar.save(source, header, index, beside=index_beside)
    return header, index, True
