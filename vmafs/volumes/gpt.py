"""GUID partition tables: the primary header at LBA 1 and its entry array.

Both CRC32s are checked (header and entries).  The backup header at the
end of the disk is not needed and not read: a damaged primary is an
error, not a silent fall-back, because it says the disk is not what it
seems.  Sector size 512 is tried first, then 4096 (4Kn disks).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from ..errors import PartitionTableError
from .model import PartitionEntry

SIGNATURE = b"EFI PART"
SECTOR_SIZES = (512, 4096)
HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # up to and including the entries' CRC
MIN_ENTRY_SIZE = 128
#: Entry arrays larger than this are refused (the spec's usual one is 16 KiB).
MAX_ENTRIES_BYTES = 4 << 20

#: Type GUIDs worth a word in listings (everything else shows as its GUID).
LINUX_LVM = "e6d6d379-f507-44c2-a23c-238f2a3df928"
EMPTY = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class GptHeader:
    sector_size: int
    revision: int
    header_size: int
    my_lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def find_header(reader, drive: str) -> GptHeader | None:
    """The primary GPT header, None when LBA 1 has no ``EFI PART`` signature.

    *reader* is a VolumeReader of the whole drive.  A header that carries
    the signature but is damaged raises PartitionTableError.
    """
    for sector in SECTOR_SIZES:
        if reader.size < 2 * sector:
            continue
        raw = reader.read(sector, sector)
        if raw[:8] == SIGNATURE:
            return _parse_header(raw, sector, drive)
    return None


def _parse_header(raw: bytes, sector: int, drive: str) -> GptHeader:
    def bad(what: str) -> PartitionTableError:
        return PartitionTableError(f"GPT header: {what}", volume=drive, disk_offset=sector)

    (_sig, revision, hsize, hcrc, _res, my_lba, _alt, first, last, _guid, elba, count, esize,
     ecrc) = HEADER.unpack_from(raw)  # fmt: skip
    if not HEADER.size <= hsize <= sector:
        raise bad(f"header size {hsize} outside [{HEADER.size}, {sector}]")
    check = bytearray(raw[:hsize])
    check[16:20] = b"\0\0\0\0"
    if zlib.crc32(check) != hcrc:
        raise bad("header CRC32 does not match (damaged table)")
    if my_lba != 1:
        raise bad(f"header says it lies at LBA {my_lba}, not 1")
    if esize < MIN_ENTRY_SIZE or esize % 8:
        raise bad(f"entry size {esize} is not a multiple of 8 of at least {MIN_ENTRY_SIZE}")
    if count * esize > MAX_ENTRIES_BYTES:
        raise bad(f"{count} entries of {esize} bytes exceed {MAX_ENTRIES_BYTES} bytes")
    if elba < 2:
        raise bad(f"entry array at LBA {elba} overlaps the header")
    if first > last + 1:
        raise bad(f"first usable LBA {first} lies after the last usable LBA {last}")
    return GptHeader(sector, revision, hsize, my_lba, first, last, elba, count, esize, ecrc)


def read_entries(reader, header: GptHeader, drive: str) -> list[PartitionEntry]:
    """The used entries (type GUID not zero), numbered from 1 by slot."""
    sector = header.sector_size
    start = header.entries_lba * sector
    length = header.entry_count * header.entry_size
    if start + length > reader.size:
        raise PartitionTableError(
            f"GPT entry array ({header.entry_count} x {header.entry_size} bytes) "
            f"ends past the disk ({reader.size} bytes)",
            volume=drive,
            disk_offset=start,
        )
    raw = reader.read(start, length)
    if zlib.crc32(raw) != header.entries_crc:
        raise PartitionTableError(
            "GPT entry array CRC32 does not match (damaged table)", volume=drive, disk_offset=start
        )
    out = []
    disk_sectors = reader.size // sector
    for i in range(header.entry_count):
        off = i * header.entry_size
        rec = raw[off : off + 128]
        type_guid = str(uuid.UUID(bytes_le=rec[:16]))
        if type_guid == EMPTY:
            continue
        first, last = struct.unpack_from("<QQ", rec, 32)
        where = start + off
        if last < first:
            raise PartitionTableError(
                f"GPT entry p{i + 1}: last LBA {last} before first LBA {first}",
                volume=drive,
                disk_offset=where,
            )
        if last >= disk_sectors:
            raise PartitionTableError(
                f"GPT entry p{i + 1}: LBAs {first}-{last} end past the disk "
                f"({disk_sectors} sectors of {sector} bytes)",
                volume=drive,
                disk_offset=where,
            )
        if first < header.first_usable or last > header.last_usable:
            raise PartitionTableError(
                f"GPT entry p{i + 1}: LBAs {first}-{last} outside the usable "
                f"{header.first_usable}-{header.last_usable}",
                volume=drive,
                disk_offset=where,
            )
        name = rec[56:128].decode("utf-16-le", "replace").split("\0", 1)[0] or None
        out.append(
            PartitionEntry(i + 1, first * sector, (last - first + 1) * sector, type_guid, name)
        )
    return out
