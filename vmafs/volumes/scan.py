"""Find every volume of a drive: partition table, LVM, whole-disk filesystem.

The order of the questions, per drive:

1. a GPT (``EFI PART`` at LBA 1): its partitions; a damaged GPT is an
   error, never a silent fall-back to the protective MBR;
2. a filesystem boot sector at offset 0 (FAT, NTFS: these carry 0x55AA
   like an MBR): the whole drive is one volume;
3. an MBR with partitions (extended/logical ones followed);
4. any other filesystem or an LVM PV on the whole drive;
5. otherwise the drive has no volume vmafs knows.

Then every volume whose type is ``lvm2`` is read as an LVM PV, and the
linear LVs of each volume group (one per VG id, the newest metadata) are
added as ``<drive>/<vg>/<lv>``.  Partitions that overlap or lie outside
the drive raise :class:`~vmafs.errors.PartitionTableError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from ..errors import LvmError, PartitionTableError, VolumeError, VolumeNotFoundError
from .fstype import probe as probe_fstype
from .fstype import probe_ntfs, probe_vfat
from .gpt import find_header as find_gpt_header
from .gpt import read_entries as read_gpt_entries
from .lvm import PvPlace, VolumeGroup, read_label, read_metadata, volume_group
from .mbr import SECTOR as MBR_SECTOR
from .mbr import entries as mbr_entries
from .mbr import is_protective
from .mbr import partitions as mbr_partitions
from .model import PartitionEntry, Segment, Volume
from .reader import VolumeReader, whole_drive

#: Sector 0 of these types is also a valid-looking MBR; a filesystem wins.
BOOT_SECTOR_FS = (probe_ntfs, probe_vfat)


def scan_volumes(archive, drive: str | None = None) -> list[Volume]:
    """Every volume of every disk of *archive* (or of the one *drive*), by drive then name order.

    *drive* is a device name (``drive-scsi0``, or ``scsi0`` for short).
    Raises VolumeError for a damaged or impossible layout, naming the drive.
    """
    disks = [d for d in archive.devices if not d.is_vmstate]
    if drive is not None:
        dev = find_drive(disks, drive)
        disks = [dev]
    out: list[Volume] = []
    for dev in disks:
        out += scan_drive(archive, dev.dev_id)
    return out


def find_volume(archive, name: str, scan: Callable[[int], list[Volume]] | None = None) -> Volume:
    """The volume called *name*; ``scsi0/p1`` means ``drive-scsi0/p1``.

    Only its drive is scanned, by *scan* (dev_id -> its volumes) when given
    (a caller that keeps what it scanned), else by :func:`scan_drive`.
    Raises VolumeNotFoundError listing the names there are.
    """
    disks = [d for d in archive.devices if not d.is_vmstate]
    dev = find_drive(disks, name.partition("/")[0])
    volumes = scan(dev.dev_id) if scan is not None else scan_drive(archive, dev.dev_id)
    rest = name.partition("/")[2]
    full = f"{dev.name}/{rest}" if rest else dev.name
    for v in volumes:
        if v.name == full:
            return v
    names = ", ".join(v.name for v in volumes) or "none"
    raise VolumeNotFoundError(f"no volume {name!r}; this drive has: {names}", volume=dev.name)


def find_drive(disks, name: str):
    """The device of *disks* named *name* (``scsi0``: ``drive-scsi0``); else VolumeNotFoundError."""
    for dev in disks:
        if name in (dev.name, f"drive-{dev.name}") or f"drive-{name}" == dev.name:
            return dev
    names = ", ".join(d.name for d in disks) or "none"
    raise VolumeNotFoundError(f"no drive {name!r} in the archive; drives: {names}")


def scan_drive(archive, dev_id: int) -> list[Volume]:
    """The volumes of one drive (partitions or the whole drive, then LVs)."""
    disk = whole_drive(archive, dev_id)
    if disk.size == 0:
        return []
    reader = VolumeReader(archive, disk)
    entries = _partition_entries(reader, disk.name)
    if entries is None:
        kind, label = probe_fstype(reader)
        if kind == "unknown":
            return []
        volumes = [
            Volume(disk.name, disk.name, dev_id, "disk", disk.size, disk.segments, kind, label)
        ]
    else:
        _check_overlaps(entries, disk.name)
        volumes = [_partition_volume(archive, disk, e) for e in entries]
    return volumes + _logical_volumes(archive, disk, volumes)


def _partition_entries(reader: VolumeReader, drive: str) -> list[PartitionEntry] | None:
    """The partitions of the drive's table, None when it has no table."""
    header = find_gpt_header(reader, drive)
    if header is not None:
        return read_gpt_entries(reader, header, drive)
    for probe in BOOT_SECTOR_FS:
        if probe(reader) is not None:
            return None
    table = mbr_entries(reader.read(0, MBR_SECTOR))
    if table is None or not table:
        return None
    if is_protective(table):
        raise VolumeError(
            "protective MBR (type 0xEE) but no GPT header at LBA 1: the GPT is lost",
            volume=drive,
            disk_offset=512,
        )
    return mbr_partitions(reader, table, drive)


def _check_overlaps(entries: list[PartitionEntry], drive: str) -> None:
    ordered = sorted(entries, key=lambda e: (e.start, e.number))
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise PartitionTableError(
                f"partitions p{a.number} (bytes {a.start}-{a.end - 1}) and p{b.number} "
                f"(bytes {b.start}-{b.end - 1}) overlap",
                volume=drive,
                disk_offset=b.start,
            )


def _partition_volume(archive, disk: Volume, e: PartitionEntry) -> Volume:
    segments = (Segment(0, e.start, e.size),)
    bare = Volume(f"{disk.name}/p{e.number}", disk.name, disk.dev_id, "partition", e.size,
                  segments, "unknown", None)  # fmt: skip
    kind, label = probe_fstype(VolumeReader(archive, bare))
    return Volume(bare.name, disk.name, disk.dev_id, "partition", e.size, segments, kind, label)


def _logical_volumes(archive, disk: Volume, volumes: list[Volume]) -> list[Volume]:
    places: dict[str, PvPlace] = {}
    texts: list[tuple[str, str]] = []  # (PV volume name, metadata text)
    for v in volumes:
        if v.fstype != "lvm2":
            continue
        reader = VolumeReader(archive, v)
        label = read_label(reader, v.name)
        if label is None:
            continue
        if label.uuid in places:
            raise LvmError(
                f"PV uuid {label.uuid} also on {places[label.uuid].name} (a cloned PV)",
                volume=v.name,
            )
        places[label.uuid] = PvPlace(label.uuid, v.name, v.segments[0].disk_offset, v.size)
        text = read_metadata(reader, label, v.name)
        if text is not None:
            texts.append((v.name, text))
    groups: dict[str, VolumeGroup] = {}
    for where, text in texts:
        vg = volume_group(text, places, where)
        key = vg.id or vg.name
        if key not in groups or vg.seqno > groups[key].seqno:
            groups[key] = vg
    out: list[Volume] = []
    taken = {v.name for v in volumes}
    for vg in groups.values():
        vg_name = vg.name
        n = 2
        while any(name.startswith(f"{disk.name}/{vg_name}/") for name in taken):
            vg_name = f"{vg.name}~{n}"  # two VGs of one name on one drive: '~' is not LVM's
            n += 1
        for lv in vg.lvs:
            name = f"{disk.name}/{vg_name}/{lv.name}"
            taken.add(name)
            if lv.note is not None:
                out.append(Volume(name, disk.name, disk.dev_id, "lv", lv.size, (), "unknown",
                                  None, lv.note))  # fmt: skip
                continue
            bare = Volume(name, disk.name, disk.dev_id, "lv", lv.size, lv.segments, "unknown", None)
            kind, label = probe_fstype(VolumeReader(archive, bare))
            out.append(
                Volume(name, disk.name, disk.dev_id, "lv", lv.size, lv.segments, kind, label)
            )
    return out
