"""LVM2 physical volumes: the label, the metadata area and the volume group
they describe, turned into linear logical volumes.

On disk (LVM2's ``label.h``/``layout.h``): a label sector (one of the
first four) starting ``LABELONE``, pointing at the PV header (uuid, size,
data and metadata areas); each metadata area starts with an mda header
whose first raw location points at the current metadata text, kept in a
ring buffer after the header.  Every checksum is LVM's CRC32 variant
(:func:`lvm_crc`).  The text names the VG, its extent size, its PVs (by
uuid, with ``pe_start``) and its LVs as segments of extents on PVs.

Only ``striped`` segments with one stripe (plain linear pieces) are read;
striped, thin, raid, mirror, cache and snapshot-store LVs are listed with a
note saying so.  Nothing is activated and nothing on the host is touched.
"""

from __future__ import annotations

import itertools
import re
import struct
import zlib
from dataclasses import dataclass

from ..errors import LvmError
from .lvmtext import parse as parse_text
from .model import Segment

SECTOR = 512
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_HEADER = struct.Struct("<8sQII8s")  # id, sector_xl, crc_xl, offset_xl, type
UUID_LEN = 32
DISK_LOCN = struct.Struct("<QQ")
MDA_MAGIC = b"\x20\x4c\x56\x4d\x32\x20\x78\x5b\x35\x41\x25\x72\x30\x4e\x2a\x3e"
MDA_HEADER = struct.Struct("<I16sIQQ")  # checksum, magic, version, start, size
RAW_LOCN = struct.Struct("<QQII")  # offset, size, checksum, flags
RAW_LOCN_IGNORED = 0x1
INITIAL_CRC = 0xF597A6CF
#: Metadata text larger than this is refused (LVM's default area is 1 MiB).
MAX_TEXT = 16 << 20
MAX_SEGMENTS = 4096
#: LVM's rule for VG and LV names (lib/misc/lvm-string.c).
NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.\-]{0,126}\Z")


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM2's ``calc_crc``: the CRC32 polynomial without zlib's pre/post inversion."""
    return ~zlib.crc32(data, ~initial & 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass(frozen=True)
class PvLabel:
    uuid: str  # 32 characters, as in the metadata's ``id`` without dashes
    device_size: int
    metadata_areas: tuple[tuple[int, int], ...]  # (offset, size) from the PV start


def read_label(reader, where: str) -> PvLabel | None:
    """The PV label of the volume *reader* shows, None if it has none."""
    for sector in range(LABEL_SCAN_SECTORS):
        raw = reader.read(sector * SECTOR, SECTOR)
        if len(raw) < SECTOR or raw[:8] != LABEL_ID:
            continue
        _id, sector_xl, crc, offset_xl, ltype = LABEL_HEADER.unpack_from(raw)
        at = sector * SECTOR
        if ltype != LABEL_TYPE:
            raise LvmError(
                f"PV label of type {ltype!r}, not LVM2 001", volume=where, volume_offset=at
            )
        if sector_xl != sector:
            raise LvmError(
                f"PV label says it lies in sector {sector_xl}, found in {sector}",
                volume=where,
                volume_offset=at,
            )
        if lvm_crc(raw[20:]) != crc:
            raise LvmError("PV label checksum does not match", volume=where, volume_offset=at)
        if not 32 <= offset_xl <= SECTOR - UUID_LEN - 8:
            raise LvmError(
                f"PV header offset {offset_xl} outside the label sector",
                volume=where,
                volume_offset=at,
            )
        return _pv_header(raw, offset_xl, at, where)
    return None


def _pv_header(raw: bytes, pos: int, at: int, where: str) -> PvLabel:
    try:
        uuid = raw[pos : pos + UUID_LEN].decode("ascii")
    except UnicodeDecodeError:
        uuid = ""
    if not re.fullmatch(r"[A-Za-z0-9]{32}", uuid):
        raise LvmError(
            "PV header uuid is not 32 letters/digits", volume=where, volume_offset=at + pos
        )
    device_size = struct.unpack_from("<Q", raw, pos + UUID_LEN)[0]
    pos += UUID_LEN + 8
    lists: list[list[tuple[int, int]]] = [[], []]  # data areas, then metadata areas
    for areas in lists:
        while True:
            if pos + DISK_LOCN.size > SECTOR:
                raise LvmError(
                    "PV header area lists run past the label sector", volume=where, volume_offset=at
                )
            offset, size = DISK_LOCN.unpack_from(raw, pos)
            pos += DISK_LOCN.size
            if offset == 0:
                break
            areas.append((offset, size))
    return PvLabel(uuid, device_size, tuple(lists[1]))


def read_metadata(reader, label: PvLabel, where: str) -> str | None:
    """The current metadata text of the first usable metadata area; None if it has none."""
    for offset, size in label.metadata_areas:
        text = _mda_text(reader, offset, size, where)
        if text is not None:
            return text
    return None


def _mda_text(reader, start: int, size: int, where: str) -> str | None:
    if size < 2 * SECTOR or start + size > reader.size:
        raise LvmError(
            f"metadata area of {size} bytes at {start} does not fit the PV ({reader.size} bytes)",
            volume=where,
            volume_offset=start,
        )
    head = reader.read_exact(start, SECTOR, "metadata area header")
    checksum, magic, version, mda_start, mda_size = MDA_HEADER.unpack_from(head)
    if magic != MDA_MAGIC:
        raise LvmError("metadata area header has a wrong magic", volume=where, volume_offset=start)
    if lvm_crc(head[4:]) != checksum:
        raise LvmError(
            "metadata area header checksum does not match", volume=where, volume_offset=start
        )
    if version != 1 or mda_start != start or mda_size != size:
        raise LvmError(
            f"metadata area header (version {version}, at {mda_start}, {mda_size} bytes) "
            f"disagrees with the PV header",
            volume=where,
            volume_offset=start,
        )
    loc_off, loc_size, loc_crc, flags = RAW_LOCN.unpack_from(head, MDA_HEADER.size)
    if flags & RAW_LOCN_IGNORED or loc_off == 0:
        return None
    ring = size - SECTOR
    if not SECTOR <= loc_off < size or loc_size > min(ring, MAX_TEXT):
        raise LvmError(
            f"metadata text ({loc_size} bytes at {loc_off}) lies outside its area of {size} bytes",
            volume=where,
            volume_offset=start,
        )
    first = min(loc_size, size - loc_off)
    text = reader.read(start + loc_off, first)
    if first < loc_size:  # the ring buffer wraps around to just after the header
        text += reader.read(start + SECTOR, loc_size - first)
    if lvm_crc(text) != loc_crc:
        raise LvmError(
            "metadata text checksum does not match", volume=where, volume_offset=start + loc_off
        )
    return text.split(b"\0", 1)[0].decode("utf-8", "replace")


# --- the volume group ----------------------------------------------------------


@dataclass(frozen=True)
class PvPlace:
    """A PV found on the drive: its uuid and where its volume lies in the drive."""

    uuid: str
    name: str  # the volume holding it, for messages
    disk_offset: int
    size: int


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    size: int
    segments: tuple[Segment, ...]
    note: str | None


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    id: str
    seqno: int
    extent_size: int  # bytes
    lvs: tuple[LogicalVolume, ...]


def volume_group(text: str, places: dict[str, PvPlace], where: str) -> VolumeGroup:
    """The VG that metadata *text* describes, its LVs mapped onto *places* (PVs on this drive).

    *where* names the PV the text came from, for errors.
    """
    tree = parse_text(text, where)
    sections = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    if len(sections) != 1:
        raise LvmError(f"metadata holds {len(sections)} volume groups, expected 1", volume=where)
    vg_name, vg = sections[0]
    ctx = f"VG {vg_name!r}"

    def bad(message: str) -> LvmError:
        return LvmError(f"{ctx}: {message}", volume=where)

    if not NAME.match(vg_name) or vg_name in (".", ".."):
        raise bad("not a valid VG name")
    extent_sectors = _int(vg, "extent_size", bad, 1, 1 << 32)
    extent = extent_sectors * SECTOR
    seqno = _int(vg, "seqno", bad, 0, 1 << 63)
    pvs = _physical_volumes(vg, places, extent, bad)
    lv_sections = vg.get("logical_volumes", {})
    if not isinstance(lv_sections, dict):
        raise bad("'logical_volumes' is not a section")
    cow_stores = _snapshot_stores(lv_sections)
    lvs = []
    used: dict[str, list[tuple[int, int, str]]] = {}  # pv name -> (first, end extent, lv)
    for lv_name, lv in lv_sections.items():
        if not isinstance(lv, dict):
            raise bad(f"LV {lv_name!r} is not a section")
        if not NAME.match(lv_name):
            raise bad(f"LV name {lv_name!r} is not a valid LVM name")
        status = lv.get("status", [])
        lv_bad = _lv_error(ctx, lv_name, where)
        extents, segments, note = _segments(lv, pvs, extent, used, lv_name, lv_bad)
        if "VISIBLE" not in (status if isinstance(status, list) else []):
            continue  # internal LVs (thin pool data, raid images, snapshot records)
        if lv_name in cow_stores:
            note = f"snapshot of {cow_stores[lv_name]!r} (its copy-on-write store): not supported"
        lvs.append(
            LogicalVolume(vg_name, lv_name, extents * extent, () if note else segments, note)
        )
    _check_overlaps(used, bad)
    return VolumeGroup(vg_name, str(vg.get("id", "")), seqno, extent, tuple(lvs))


def _lv_error(ctx: str, lv: str, where: str):
    return lambda message: LvmError(f"{ctx} LV {lv!r}: {message}", volume=where)


def _int(section: dict, key: str, bad, low: int, high: int) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(f"{key!r} missing or not a whole number")
    if not low <= value <= high:
        raise bad(f"{key} = {value} outside [{low}, {high}]")
    return value


@dataclass(frozen=True)
class _Pv:
    place: PvPlace | None  # None: not on this drive
    pe_start: int  # bytes from the PV start
    pe_count: int


def _physical_volumes(vg: dict, places: dict[str, PvPlace], extent: int, bad) -> dict[str, _Pv]:
    section = vg.get("physical_volumes")
    if not isinstance(section, dict) or not section:
        raise bad("no 'physical_volumes' section")
    out = {}
    for pv_name, pv in section.items():
        if not isinstance(pv, dict):
            raise bad(f"PV {pv_name!r} is not a section")
        uuid = str(pv.get("id", "")).replace("-", "")
        pe_start = _int(pv, "pe_start", bad, 0, 1 << 50) * SECTOR
        pe_count = _int(pv, "pe_count", bad, 0, 1 << 40)
        place = places.get(uuid)
        if place is not None and pe_start + pe_count * extent > place.size:
            raise bad(
                f"PV {pv_name!r} claims {pe_count} extents of {extent} bytes from {pe_start}, "
                f"past the end of {place.name} ({place.size} bytes)"
            )
        out[pv_name] = _Pv(place, pe_start, pe_count)
    return out


def _snapshot_stores(lvs: dict) -> dict[str, str]:
    """cow store LV name -> origin LV name, from the hidden ``snapshot`` segments."""
    out = {}
    for lv in lvs.values():
        if not isinstance(lv, dict):
            continue
        for key, seg in lv.items():
            if (
                key.startswith("segment")
                and isinstance(seg, dict)
                and seg.get("type") == "snapshot"
            ):
                out[str(seg.get("cow_store"))] = str(seg.get("origin"))
    return out


def _segments(lv: dict, pvs: dict[str, _Pv], extent: int, used, lv_name: str, bad):
    """(extents, segments, note) of one LV; *used* collects each PV extent range it takes."""
    count = _int(lv, "segment_count", bad, 1, MAX_SEGMENTS)
    segs = []
    for i in range(1, count + 1):
        seg = lv.get(f"segment{i}")
        if not isinstance(seg, dict):
            raise bad(f"segment{i} missing (segment_count = {count})")
        segs.append((i, seg))
    segs.sort(
        key=lambda s: (
            s[1].get("start_extent", -1) if isinstance(s[1].get("start_extent"), int) else -1
        )
    )
    out = []
    note = None
    pos = 0
    for i, seg in segs:
        start = _int(seg, "start_extent", bad, 0, 1 << 40)
        n = _int(seg, "extent_count", bad, 1, 1 << 40)
        if start != pos:
            raise bad(f"segment{i} starts at extent {start}, expected {pos} (gap or overlap)")
        pos += n
        stype = seg.get("type")
        if stype != "striped":
            note = note or f"{stype} LV: not supported (only linear LVs are read)"
            continue
        stripes = _int(seg, "stripe_count", bad, 1, 1 << 16)
        if stripes != 1:
            note = note or f"striped over {stripes} stripes: not supported (only linear LVs)"
            continue
        ref = seg.get("stripes")
        if not (isinstance(ref, list) and len(ref) == 2 and isinstance(ref[0], str)
                and isinstance(ref[1], int) and not isinstance(ref[1], bool)):  # fmt: skip
            raise bad(f"segment{i}: 'stripes' is not [\"pvN\", extent]")
        pv_name, pe = ref
        pv = pvs.get(pv_name)
        if pv is None:
            raise bad(f"segment{i} names PV {pv_name!r}, which the VG does not have")
        if pe < 0 or pe + n > pv.pe_count:
            raise bad(
                f"segment{i}: extents {pe}-{pe + n - 1} lie past the {pv.pe_count} extents "
                f"of PV {pv_name!r}"
            )
        used.setdefault(pv_name, []).append((pe, pe + n, lv_name))
        if pv.place is None:
            note = note or f"lies on PV {pv_name!r}, which is not on this drive"
            continue
        out.append(
            Segment(start * extent, pv.place.disk_offset + pv.pe_start + pe * extent, n * extent)
        )
    return pos, tuple(out), note


def _check_overlaps(used: dict[str, list[tuple[int, int, str]]], bad) -> None:
    for pv_name, ranges in used.items():
        ranges.sort()
        for (a0, a1, lv_a), (b0, b1, lv_b) in itertools.pairwise(ranges):
            if b0 < a1:
                raise bad(
                    f"LVs {lv_a!r} (extents {a0}-{a1 - 1}) and {lv_b!r} (extents {b0}-{b1 - 1}) "
                    f"overlap on PV {pv_name!r}"
                )
