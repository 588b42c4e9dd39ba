"""The records a volume scan produces: :class:`Volume` and its :class:`Segment` s.

A volume is a byte range of one drive that holds one thing: a partition,
an LVM logical volume (made of one or more linear segments, possibly out
of order on the disk) or the whole drive.  Everything is in bytes; a
volume covers ``[0, size)`` with its segments back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The ``kind`` values of a :class:`Volume`.
KINDS = ("partition", "lv", "disk")

#: The ``fstype`` values :mod:`vmafs.volumes.fstype` reports.
FSTYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs", "vfat", "swap", "lvm2", "unknown")


@dataclass(frozen=True)
class Segment:
    """A linear piece of a volume: volume bytes ``[start, start+length)`` are
    drive bytes ``[disk_offset, disk_offset+length)``."""

    start: int
    disk_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Volume:
    """One volume of one drive.

    ``name`` is ``<drive>/p<N>`` for a partition (``p5`` is the first
    logical one of an MBR), ``<drive>/<vg>/<lv>`` for an LVM logical
    volume and ``<drive>`` for a filesystem on the whole drive.  ``note``
    says why a volume cannot be read (an LV that is striped, thin, raid or
    a snapshot's store): it is listed but has no segments.
    """

    name: str
    drive: str
    dev_id: int
    kind: str
    size: int
    segments: tuple[Segment, ...]
    fstype: str
    label: str | None
    note: str | None = None

    @property
    def readable(self) -> bool:
        return self.note is None

    @property
    def local_name(self) -> str:
        """The name without the drive: ``p1``, ``pve/root``, ``""`` for the whole drive."""
        return self.name[len(self.drive) + 1 :] if self.name != self.drive else ""


@dataclass(frozen=True)
class PartitionEntry:
    """One partition as its table states it, in bytes from the drive start.

    ``type`` is the GPT type GUID (lower case, dashed) or the MBR type byte
    as ``0x83``; ``name`` the GPT partition name (None for MBR).
    """

    number: int
    start: int
    size: int
    type: str
    name: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.size
