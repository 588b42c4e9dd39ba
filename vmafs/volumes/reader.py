"""Read one volume of a drive through an archive, never outside its segments."""

from __future__ import annotations

import bisect

import numpy as np

from ..errors import UnsupportedVolumeError, VolumeError
from ..format import BLOCK_SIZE, CLUSTER_SIZE
from .model import Segment, Volume


def whole_drive(archive, dev_id: int) -> Volume:
    """The whole drive *dev_id* as a volume (kind ``disk``, type not probed)."""
    dev = archive.header.devices[dev_id]
    segments = (Segment(0, 0, dev.size),) if dev.size else ()
    return Volume(dev.name, dev.name, dev_id, "disk", dev.size, segments, "unknown", None)


class VolumeReader:
    """A read-only, random-access view of *volume* over ``Archive.readinto``.

    Volume offset ``o`` is read from the drive at the segment that holds
    it; nothing outside the segments is ever read.  The segments are
    checked once here (back to back from 0, inside the drive), so a
    Volume built by hand cannot make a read stray either.  Thread-safe as
    the archive is.
    """

    def __init__(self, archive, volume: Volume) -> None:
        if not volume.readable:
            raise UnsupportedVolumeError(f"cannot be read: {volume.note}", volume=volume.name)
        self.archive = archive
        self.volume = volume
        self.dev_id = volume.dev_id
        self.size = volume.size
        drive_size = archive.header.devices[volume.dev_id].size
        pos = 0
        for seg in volume.segments:
            if seg.start != pos or seg.length <= 0:
                raise VolumeError(
                    "segments do not cover the volume back to back",
                    volume=volume.name,
                    volume_offset=pos,
                )
            if seg.disk_offset < 0 or seg.disk_offset + seg.length > drive_size:
                raise VolumeError(
                    f"segment ends past the drive ({drive_size} bytes)",
                    volume=volume.name,
                    disk_offset=seg.disk_offset + seg.length,
                )
            pos = seg.end
        if pos != volume.size:
            raise VolumeError(f"segments cover {pos} of {volume.size} bytes", volume=volume.name)
        self._segments = volume.segments
        self._starts = [s.start for s in volume.segments]

    def _segment_at(self, offset: int) -> int:
        """Index of the segment holding volume byte *offset* (0 <= offset < size)."""
        return bisect.bisect_right(self._starts, offset) - 1

    def readinto(self, offset: int, buf) -> int:
        """Fill *buf* from volume *offset*; returns the count (short at the volume end)."""
        out = memoryview(buf).cast("B")
        n = max(0, min(len(out), self.size - offset))
        if offset < 0 or n == 0:
            return 0
        done = 0
        i = self._segment_at(offset)
        while done < n:
            seg = self._segments[i]
            inside = offset + done - seg.start
            take = min(n - done, seg.length - inside)
            got = self.archive.readinto(
                self.dev_id, seg.disk_offset + inside, out[done : done + take]
            )
            if got != take:  # the drive is shorter than checked: cannot happen
                raise VolumeError(
                    "short read", volume=self.volume.name, disk_offset=seg.disk_offset + inside
                )
            done += take
            i += 1
        return n

    def read(self, offset: int, size: int) -> bytes:
        """Volume bytes ``[offset, offset+size)``, clipped at the volume end."""
        buf = bytearray(max(0, min(size, self.size - offset)))
        n = self.readinto(offset, buf)
        return bytes(buf[:n])

    def read_exact(self, offset: int, size: int, what: str = "data") -> bytes:
        """Exactly *size* bytes at *offset*, or a VolumeError saying *what* lies past the end."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise VolumeError(
                f"{what} at [{offset}, +{size}) lies outside the volume ({self.size} bytes)",
                volume=self.volume.name,
                volume_offset=offset,
            )
        return self.read(offset, size)

    def next_data(self, offset: int) -> int | None:
        """lseek(SEEK_DATA): the first data byte at or after *offset*, None if only holes follow."""
        if not 0 <= offset < self.size:
            return None
        i = self._segment_at(offset)
        while i < len(self._segments):
            seg = self._segments[i]
            inside = max(offset, seg.start) - seg.start
            found = self.archive.next_data(self.dev_id, seg.disk_offset + inside)
            if found is not None and found < seg.disk_offset + seg.length:
                return seg.start + found - seg.disk_offset
            i += 1
        return None

    def next_hole(self, offset: int) -> int:
        """lseek(SEEK_HOLE): the first hole byte at or after *offset*; the size if none."""
        if not 0 <= offset < self.size:
            return self.size
        i = self._segment_at(offset)
        while i < len(self._segments):
            seg = self._segments[i]
            inside = max(offset, seg.start) - seg.start
            found = self.archive.next_hole(self.dev_id, seg.disk_offset + inside)
            if found < seg.disk_offset + seg.length:
                return seg.start + found - seg.disk_offset
            i += 1
        return self.size

    def stored_bytes(self) -> int:
        """Bytes of the volume the archive stores (4 KiB blocks with data), for ``du``.

        Counted per 64 KiB cluster of the drive; a cluster a segment shares
        with its neighbour at an unaligned edge counts whole, so the sum
        may exceed the exact figure by up to two clusters per segment.
        """
        masks = self.archive.index.maps[self.dev_id].masks
        total = 0
        for seg in self._segments:
            first = seg.disk_offset // CLUSTER_SIZE
            last = (seg.disk_offset + seg.length + CLUSTER_SIZE - 1) // CLUSTER_SIZE
            # one set bit per stored 4 KiB block, as the index counts them
            total += int(np.bitwise_count(masks[first:last]).sum(dtype=np.int64))
        return min(total * BLOCK_SIZE, self.size)
