"""What a volume holds: filesystem type and label from its superblock.

Each probe reads a few fixed places of the volume (a VolumeReader or
anything with ``size`` and ``read(offset, size)``), checks magic numbers
and the fields that tell variants apart, and returns ``(fstype, label)``
or None.  Labels are decoded leniently (they are untrusted guest data);
empty labels are None.  Nothing here follows pointers beyond one bounded
read, except NTFS, whose label lives in MFT record 3 (one record read,
bounds checked).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Probe = Callable[[object], "tuple[str, str | None] | None"]

# ext2/3/4 (superblock at 1024; fields as in the kernel's ext4.h)
EXT_SB = 1024
EXT_MAGIC = 0xEF53
EXT3_COMPAT_HAS_JOURNAL = 0x0004
EXT_INCOMPAT_JOURNAL_DEV = 0x0008
#: ext3 understands these incompat/ro_compat features; anything else is ext4.
EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # FILETYPE, RECOVER, META_BG
EXT3_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # SPARSE_SUPER, LARGE_FILE, BTREE_DIR

XFS_MAGIC = b"XFSB"
BTRFS_SB = 0x10000
BTRFS_MAGIC = b"_BHRfS_M"
NTFS_OEM = b"NTFS    "
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")
SWAP_PAGE_SIZES = (4096, 8192, 16384, 65536)
LVM_LABEL = b"LABELONE"
LVM_TYPE = b"LVM2 001"


def _text(raw: bytes, encoding: str = "utf-8") -> str | None:
    label = raw.split(b"\0", 1)[0] if encoding == "utf-8" else raw
    text = label.decode(encoding, "replace").split("\0", 1)[0].rstrip(" ")
    return text or None


def probe_ext(r) -> tuple[str, str | None] | None:
    sb = r.read(EXT_SB, 1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT_MAGIC:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    if incompat & EXT_INCOMPAT_JOURNAL_DEV:
        return None  # an external journal, not a filesystem
    if incompat & ~EXT3_INCOMPAT or ro_compat & ~EXT3_RO_COMPAT:
        kind = "ext4"
    elif compat & EXT3_COMPAT_HAS_JOURNAL:
        kind = "ext3"
    else:
        kind = "ext2"
    return kind, _text(sb[0x78:0x88])


def probe_xfs(r) -> tuple[str, str | None] | None:
    sb = r.read(0, 512)
    if len(sb) < 512 or sb[:4] != XFS_MAGIC:
        return None
    blocksize = struct.unpack_from(">I", sb, 4)[0]
    if blocksize < 512 or blocksize > 65536 or blocksize & (blocksize - 1):
        return None
    return "xfs", _text(sb[108:120])


def probe_btrfs(r) -> tuple[str, str | None] | None:
    sb = r.read(BTRFS_SB, 4096)
    if len(sb) < 4096 or sb[0x40:0x48] != BTRFS_MAGIC:
        return None
    return "btrfs", _text(sb[0x12B : 0x12B + 256])


def probe_swap(r) -> tuple[str, str | None] | None:
    for page in SWAP_PAGE_SIZES:
        if r.size < page:
            break
        if r.read(page - 10, 10) in SWAP_MAGICS:
            return "swap", _text(r.read(1024 + 28, 16))
    return None


def probe_lvm2(r) -> tuple[str, str | None] | None:
    for sector in range(4):
        raw = r.read(sector * 512, 32)
        if raw[:8] == LVM_LABEL and raw[24:32] == LVM_TYPE:
            return "lvm2", None
    return None


def probe_ntfs(r) -> tuple[str, str | None] | None:
    bs = r.read(0, 512)
    if len(bs) < 512 or bs[3:11] != NTFS_OEM or bs[510:512] != b"\x55\xaa":
        return None
    bps = struct.unpack_from("<H", bs, 0x0B)[0]
    spc = bs[0x0D]
    if bps not in (512, 1024, 2048, 4096) or spc == 0:
        return None
    # sectors per cluster above 128 are stored as a negative power of two
    cluster = bps * (spc if spc <= 0x80 else 1 << (256 - spc))
    return "ntfs", _ntfs_label(r, bs, cluster)


def _ntfs_label(r, bs: bytes, cluster: int) -> str | None:
    """The $VOLUME_NAME of MFT record 3 ($Volume); None if it is not where it should be."""
    mft_lcn = struct.unpack_from("<Q", bs, 0x30)[0]
    per = struct.unpack_from("<b", bs, 0x40)[0]
    rec_size = per * cluster if per > 0 else 1 << -per
    if not 256 <= rec_size <= 65536:
        return None
    rec_off = mft_lcn * cluster + 3 * rec_size
    if rec_off + rec_size > r.size:
        return None
    rec = bytearray(r.read(rec_off, rec_size))
    if rec[:4] != b"FILE":
        return None
    usa_ofs, usa_count = struct.unpack_from("<HH", rec, 4)
    # Update sequence: the last two bytes of each 512-byte stride are stored in the array.
    if usa_count < 1 or usa_ofs + 2 * usa_count > rec_size or (usa_count - 1) * 512 > rec_size:
        return None
    for i in range(1, usa_count):
        end = i * 512
        rec[end - 2 : end] = rec[usa_ofs + 2 * i : usa_ofs + 2 * i + 2]
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    while pos + 16 <= rec_size:
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == 0xFFFFFFFF or alen < 16 or pos + alen > rec_size:
            return None
        if atype == 0x60 and rec[pos + 8] == 0 and alen >= 0x18:  # $VOLUME_NAME, resident
            vlen, voff = struct.unpack_from("<IH", rec, pos + 0x10)
            if voff + vlen > alen:
                return None
            return _text(bytes(rec[pos + voff : pos + voff + vlen]), "utf-16-le")
        pos += alen
    return None


def probe_vfat(r) -> tuple[str, str | None] | None:
    bs = r.read(0, 512)
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa" or bs[0] not in (0xEB, 0xE9):
        return None
    bps, spc, reserved, nfats, root_entries, total16, media, fat16 = struct.unpack_from(
        "<HBHBHHBH", bs, 0x0B
    )
    total32 = struct.unpack_from("<I", bs, 0x20)[0]
    fat32 = struct.unpack_from("<I", bs, 0x24)[0]
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
        return None
    if reserved == 0 or nfats not in (1, 2) or not (media == 0xF0 or media >= 0xF8):
        return None
    fat_size = fat16 or fat32
    total = total16 or total32
    if fat_size == 0 or total == 0:
        return None
    if fat16:
        label = bs[0x2B:0x36] if bs[0x26] == 0x29 else b""
    else:
        label = bs[0x47:0x52] if bs[0x42] == 0x29 else b""
    text = _text(label, "cp437")
    return "vfat", None if text == "NO NAME" else text


#: In the order tried: those whose magic sits at offset 0 (and could be
#: hidden by another's data further in) before those further in.
PROBES: tuple[Probe, ...] = (
    probe_xfs,
    probe_ntfs,
    probe_vfat,
    probe_lvm2,
    probe_swap,
    probe_ext,
    probe_btrfs,
)


def probe(reader) -> tuple[str, str | None]:
    """``(fstype, label)`` of the volume *reader* shows; ``("unknown", None)`` if none matches."""
    for p in PROBES:
        found = p(reader)
        if found is not None:
            return found
    return "unknown", None
