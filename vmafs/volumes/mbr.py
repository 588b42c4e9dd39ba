"""DOS (MBR) partition tables: four primary entries and the chain of
extended boot records (EBRs) that holds the logical partitions.

Primary partitions are ``p1``-``p4`` by slot; logical ones are ``p5``,
``p6``... in chain order, as Linux numbers them.  The chain is untrusted:
each EBR may be visited once (a loop is an error), there are at most
:data:`MAX_LOGICAL` of them, and every EBR and logical partition must lie
inside the extended partition.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import PartitionTableError
from .model import PartitionEntry

SECTOR = 512
SIGNATURE = b"\x55\xaa"
TABLE_OFFSET = 446
ENTRY = struct.Struct("<B3sB3sII")  # boot flag, CHS first, type, CHS last, LBA start, sectors
PROTECTIVE = 0xEE
EXTENDED = frozenset({0x05, 0x0F, 0x85})
LINUX_LVM = 0x8E
#: Logical partitions followed at most; Linux itself stops far lower in practice.
MAX_LOGICAL = 256


@dataclass(frozen=True)
class MbrEntry:
    slot: int  # 0-3
    boot: int
    type: int
    lba: int
    sectors: int


def entries(sector0: bytes) -> list[MbrEntry] | None:
    """The used primary entries of *sector0*, None when it is not a partition table.

    Not a table: no 0x55AA signature, or a boot flag other than 0x00/0x80
    (boot code or a filesystem's boot sector, not partition entries).
    """
    if len(sector0) < SECTOR or sector0[510:512] != SIGNATURE:
        return None
    out = []
    for slot in range(4):
        boot, _c1, ptype, _c2, lba, sectors = ENTRY.unpack_from(sector0, TABLE_OFFSET + 16 * slot)
        if boot not in (0x00, 0x80):
            return None
        if ptype and sectors:
            out.append(MbrEntry(slot, boot, ptype, lba, sectors))
    return out


def is_protective(table: list[MbrEntry]) -> bool:
    """True for the protective MBR in front of a GPT (a type 0xEE entry)."""
    return any(e.type == PROTECTIVE for e in table)


def partitions(reader, table: list[MbrEntry], drive: str) -> list[PartitionEntry]:
    """Primary partitions (extended ones left out) and the logical ones of the chain."""
    out: list[PartitionEntry] = []
    extended = [e for e in table if e.type in EXTENDED]
    if len(extended) > 1:
        raise PartitionTableError(
            f"MBR has {len(extended)} extended partitions (at most 1 is allowed)",
            volume=drive,
            disk_offset=TABLE_OFFSET,
        )
    for e in table:
        where = TABLE_OFFSET + 16 * e.slot
        _check_inside(reader.size, e.lba, e.sectors, f"MBR entry p{e.slot + 1}", drive, where)
        if e.type not in EXTENDED:
            out.append(PartitionEntry(e.slot + 1, e.lba * SECTOR, e.sectors * SECTOR, _hex(e.type)))
    if extended:
        out += _logical(reader, extended[0], drive)
    return out


def _logical(reader, ext: MbrEntry, drive: str) -> list[PartitionEntry]:
    out = []
    seen: set[int] = set()
    visits = 0
    ebr = 0  # offset of the next EBR from the extended partition's start, in sectors
    number = 5
    while True:
        lba = ext.lba + ebr
        where = lba * SECTOR
        if ebr in seen:
            raise PartitionTableError(
                f"extended partition chain loops back to the EBR at LBA {lba}",
                volume=drive,
                disk_offset=where,
            )
        visits += 1  # counted apart from *seen*: the bound must hold on its own
        if visits > MAX_LOGICAL:
            raise PartitionTableError(
                f"extended partition chain has more than {MAX_LOGICAL} logical partitions",
                volume=drive,
                disk_offset=where,
            )
        seen.add(ebr)
        if ebr >= ext.sectors:
            raise PartitionTableError(
                f"EBR at LBA {lba} lies outside the extended partition "
                f"(LBA {ext.lba}-{ext.lba + ext.sectors - 1})",
                volume=drive,
                disk_offset=where,
            )
        raw = reader.read_exact(where, SECTOR, "EBR")
        if raw[510:512] != SIGNATURE:
            raise PartitionTableError(
                f"EBR at LBA {lba} has no 0x55AA signature", volume=drive, disk_offset=where
            )
        _b, _c, ptype, _c2, rel, sectors = ENTRY.unpack_from(raw, TABLE_OFFSET)
        _b, _c, ntype, _c2, nrel, nsectors = ENTRY.unpack_from(raw, TABLE_OFFSET + 16)
        if ptype and sectors:
            start = lba + rel
            what = f"logical partition p{number} (EBR at LBA {lba})"
            _check_inside(reader.size, start, sectors, what, drive, where + TABLE_OFFSET)
            if rel == 0 or start + sectors > ext.lba + ext.sectors:
                raise PartitionTableError(
                    f"{what}: LBA {start}-{start + sectors - 1} is not inside its extended "
                    f"partition after its EBR",
                    volume=drive,
                    disk_offset=where + TABLE_OFFSET,
                )
            out.append(PartitionEntry(number, start * SECTOR, sectors * SECTOR, _hex(ptype)))
            number += 1
        if not (ntype and nsectors):
            return out
        ebr = nrel


def _check_inside(
    disk_size: int, lba: int, sectors: int, what: str, drive: str, where: int
) -> None:
    if lba == 0:
        raise PartitionTableError(
            f"{what} starts at LBA 0 (over the partition table)", volume=drive, disk_offset=where
        )
    if (lba + sectors) * SECTOR > disk_size:
        raise PartitionTableError(
            f"{what}: LBA {lba}-{lba + sectors - 1} ends past the disk "
            f"({disk_size // SECTOR} sectors)",
            volume=drive,
            disk_offset=where,
        )


def _hex(ptype: int) -> str:
    return f"0x{ptype:02x}"
