"""Hostile partition tables and LVM metadata: a clear error naming the drive or
volume, never a crash, a hang or a read outside the disk.

Every image here is crafted byte by byte (checksums made valid where the
damage is elsewhere, so the reader meets exactly the one problem), packed
into a VMA with vmafactory, and scanned through an archive that records
every read (:class:`Recording`): each must lie inside the drive.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
import zlib

import pytest
from conftest import vmafs_cmd
from test_mount_support import GUARD
from vmafactory import build_archive

from vmafs.archive import Archive
from vmafs.errors import LvmError, PartitionTableError, VolumeError
from vmafs.volumes import Segment, Volume, VolumeReader, lvmtext, scan_volumes
from vmafs.volumes.lvm import MDA_MAGIC, lvm_crc

MiB = 1 << 20
SECTOR = 512
DRIVE = "drive-scsi0"
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
LVM_TYPE = uuid.UUID("e6d6d379-f507-44c2-a23c-238f2a3df928")


class Recording:
    """An Archive that notes every device range read, to prove none leaves the drive."""

    def __init__(self, archive: Archive) -> None:
        self._a = archive
        self.reads: list[tuple[int, int, int]] = []

    def __getattr__(self, name):
        return getattr(self._a, name)

    def readinto(self, dev_id, offset, buf):
        self.reads.append((dev_id, offset, len(memoryview(buf).cast("B"))))
        return self._a.readinto(dev_id, offset, buf)

    def check(self) -> None:
        for dev_id, offset, n in self.reads:
            size = self._a.header.devices[dev_id].size
            assert 0 <= offset and offset + n <= size, (dev_id, offset, n, size)


def scan(tmp_path, disk: bytes | dict[str, bytes]):
    disks = {DRIVE: disk} if isinstance(disk, bytes) else disk
    path = build_archive(disks).write(tmp_path / "h.vma")
    with Archive.open(path) as a:
        rec = Recording(a)
        try:
            return scan_volumes(rec)
        finally:
            rec.check()


def expect_error(tmp_path, disk, error, match):
    with pytest.raises(error, match=match) as e:
        scan(tmp_path, disk)
    assert isinstance(e.value, VolumeError) and e.value.volume is not None
    assert "\n" not in str(e.value)
    return e.value


# --- crafting ----------------------------------------------------------------------


def put(buf: bytearray, offset: int, data: bytes) -> None:
    buf[offset : offset + len(data)] = data


def mbr(entries, size: int = 8 * MiB, disk: bytearray | None = None) -> bytearray:
    """*entries*: (type, lba, sectors[, boot]) in slots 0-3."""
    d = disk if disk is not None else bytearray(size)
    for i, e in enumerate(entries):
        ptype, lba, sectors, *boot = e
        put(
            d,
            446 + 16 * i,
            struct.pack("<B3sB3sII", boot[0] if boot else 0, b"", ptype, b"", lba, sectors),
        )
    put(d, 510, b"\x55\xaa")
    return d


def ebr(d: bytearray, lba: int, logical: tuple[int, int] | None, nxt: tuple[int, int] | None):
    """An EBR at *lba*: logical (rel start, sectors) and next (rel to extended start, sectors)."""
    at = lba * SECTOR
    if logical:
        put(d, at + 446, struct.pack("<B3sB3sII", 0, b"", 0x83, b"", *logical))
    if nxt:
        put(d, at + 462, struct.pack("<B3sB3sII", 0, b"", 0x05, b"", *nxt))
    put(d, at + 510, b"\x55\xaa")


def gpt(
    parts,
    size: int = 8 * MiB,
    *,
    count: int = 128,
    esize: int = 128,
    elba: int = 2,
    first: int = 34,
    last: int | None = None,
    damage_header: bool = False,
    damage_entries: bool = False,
    sector: int = SECTOR,
) -> bytearray:
    """A GPT with *parts* = [(first LBA, last LBA, type uuid)], CRCs valid unless damaged,
    for *sector*-byte sectors."""
    sectors = size // sector
    d = mbr([(0xEE, 1, sectors - 1)], size)
    last = sectors - 34 if last is None else last
    table = bytearray(count * esize if count * esize <= 1 << 20 else 0)
    for i, (a, b, t) in enumerate(parts):
        put(table, i * esize, t.bytes_le + uuid.uuid4().bytes_le + struct.pack("<QQQ", a, b, 0))
    ecrc = zlib.crc32(table) ^ (1 if damage_entries else 0)
    hdr = struct.pack(
        "<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, sectors - 1, first, last,
        uuid.uuid4().bytes_le, elba, count, esize, ecrc,
    )  # fmt: skip
    crc = zlib.crc32(hdr) ^ (1 if damage_header else 0)
    hdr = hdr[:16] + struct.pack("<I", crc) + hdr[20:]
    put(d, sector, hdr)
    if elba * sector + len(table) <= size:
        put(d, elba * sector, table)
    return d


def pv(text: str, size: int, pv_uuid: str = "A" * 32, *, text_crc_delta: int = 0,
       mda_crc_delta: int = 0, text_size: int | None = None) -> bytearray:  # fmt: skip
    """An LVM2 PV of *size* bytes: label in sector 1, one metadata area at 4 KiB holding
    *text* (checksums valid unless told otherwise)."""
    d = bytearray(size)
    mda_start, mda_size = 4096, MiB - 4096
    pvh = pv_uuid.encode() + struct.pack("<Q", size)
    pvh += struct.pack("<QQQQ", MiB, 0, 0, 0)  # one data area from 1 MiB, end of list
    pvh += struct.pack("<QQQQ", mda_start, mda_size, 0, 0)  # one metadata area, end
    label = bytearray(SECTOR)
    put(
        label,
        0,
        b"LABELONE" + struct.pack("<Q", 1) + b"\0" * 4 + struct.pack("<I", 32) + b"LVM2 001",
    )
    put(label, 32, pvh)
    put(label, 16, struct.pack("<I", lvm_crc(bytes(label[20:]))))
    put(d, SECTOR, label)
    raw = text.encode() + b"\0"
    loc = struct.pack(
        "<QQII", SECTOR, text_size or len(raw), (lvm_crc(raw) + text_crc_delta) & 0xFFFFFFFF, 0
    )
    mda = bytearray(SECTOR)
    put(mda, 4, MDA_MAGIC + struct.pack("<IQQ", 1, mda_start, mda_size) + loc)
    put(mda, 0, struct.pack("<I", (lvm_crc(bytes(mda[4:])) + mda_crc_delta) & 0xFFFFFFFF))
    put(d, mda_start, mda)
    put(d, mda_start + SECTOR, raw)
    return d


def dashed(u: str) -> str:
    return "-".join([u[:6], u[6:10], u[10:14], u[14:18], u[18:22], u[22:26], u[26:]])


def vg(lvs: str, *, pe_count: int = 14, extent_sectors: int = 2048, pv_uuid: str = "A" * 32) -> str:
    return f"""vg0 {{
id = "{dashed("V" * 32)}"
seqno = 1
extent_size = {extent_sectors}
physical_volumes {{
pv0 {{
id = "{dashed(pv_uuid)}"
pe_start = 2048
pe_count = {pe_count}
}}
}}
logical_volumes {{
{lvs}
}}
}}
contents = "Text Format Volume Group"
"""


def lv(name: str, *segs: tuple[int, int, int], seg_type: str = "striped", extra: str = "") -> str:
    body = [
        f"{name} {{",
        'status = ["READ", "WRITE", "VISIBLE"]',
        f"segment_count = {len(segs)}",
        extra,
    ]
    for i, (start, count, pe) in enumerate(segs, 1):
        body += [f"segment{i} {{", f"start_extent = {start}", f"extent_count = {count}",
                 f'type = "{seg_type}"', "stripe_count = 1", f'stripes = ["pv0", {pe}]', "}"]  # fmt: skip  # noqa: E501
    return "\n".join(body + ["}"])


def lvm_disk(text: str, **kw) -> bytearray:
    """A 16 MiB disk: MBR, p1 = a 15 MiB PV from LBA 2048 holding *text*."""
    d = mbr([(0x8E, 2048, 30720)], 16 * MiB)
    put(d, MiB, pv(text, 15 * MiB, **kw))
    return d


# --- sanity: the crafted good cases are read -------------------------------------------


def test_crafted_good_layouts_are_read(tmp_path):
    g = gpt([(2048, 4095, LINUX), (4096, 8191, LINUX)])
    assert [(v.name, v.size) for v in scan(tmp_path, bytes(g))] == [
        ("drive-scsi0/p1", MiB),
        ("drive-scsi0/p2", 2 * MiB),
    ]
    d = mbr([(0x83, 2048, 2048), (0x05, 4096, 8192)])
    ebr(d, 4096, (2048, 2048), (4096, 4096))
    ebr(d, 8192, (2048, 2048), None)
    assert [(v.name, v.segments[0].disk_offset) for v in scan(tmp_path, bytes(d))] == [
        ("drive-scsi0/p1", MiB),
        ("drive-scsi0/p5", 3 * MiB),
        ("drive-scsi0/p6", 5 * MiB),
    ]
    vols = scan(tmp_path, bytes(lvm_disk(vg(lv("a", (0, 2, 5), (2, 1, 0))))))
    a = vols[-1]
    assert (a.name, a.size) == ("drive-scsi0/vg0/a", 3 * MiB)
    pe0 = MiB + MiB  # partition start + pe_start
    assert a.segments == (Segment(0, pe0 + 5 * MiB, 2 * MiB), Segment(2 * MiB, pe0, MiB))


def test_gpt_with_4096_byte_sectors(tmp_path):
    g = gpt([(256, 511, LINUX)], sector=4096, first=6, last=2040)
    (v,) = scan(tmp_path, bytes(g))
    assert (v.name, v.segments[0].disk_offset, v.size) == ("drive-scsi0/p1", MiB, MiB)


# --- partition tables ---------------------------------------------------------------


GPT_CASES = {
    "header CRC": (dict(parts=[(2048, 4095, LINUX)], damage_header=True), "header CRC32"),
    "entries CRC": (dict(parts=[(2048, 4095, LINUX)], damage_entries=True), "entry array CRC32"),
    "past the disk": (dict(parts=[(2048, 16383 + 100, LINUX)], last=99999), "p1: LBAs 2048-16483 end past the disk"),  # noqa: E501
    "last before first": (dict(parts=[(4095, 2048, LINUX)]), "p1: last LBA 2048 before first"),
    "overlap": (dict(parts=[(2048, 6143, LINUX), (4096, 8191, LINUX)]), "p1 .* and p2 .* overlap"),
    "absurd count": (dict(parts=[], count=0xFFFFFFFF), "4294967295 entries"),
    "entries past disk": (dict(parts=[], elba=10**9, count=4), "entry array .* ends past the disk"),
    "tiny entries": (dict(parts=[], esize=16), "entry size 16"),
    "outside usable": (dict(parts=[(10, 2047, LINUX)]), "outside the usable"),
}  # fmt: skip


@pytest.mark.parametrize("case", GPT_CASES, ids=str)
def test_hostile_gpt(tmp_path, case):
    kw, match = GPT_CASES[case]
    e = expect_error(tmp_path, bytes(gpt(**kw)), PartitionTableError, match)
    assert str(e).startswith("drive-scsi0: ")


def test_protective_mbr_without_gpt(tmp_path):
    d = mbr([(0xEE, 1, 16383)])
    expect_error(tmp_path, bytes(d), VolumeError, "protective MBR .* the GPT is lost")


def chain(n: int) -> bytearray:
    """An extended partition with *n* EBRs, each followed by a 1-sector logical partition."""
    d = mbr([(0x05, 2048, 2 * n + 2)], 8 * MiB)
    for i in range(n):
        ebr(d, 2048 + 2 * i, (1, 1), (2 * (i + 1), 2) if i + 1 < n else None)
    return d


def test_hostile_mbr_cases(tmp_path):
    cases = []
    cases.append((mbr([(0x83, 2048, 10**9)]), "p1: LBA 2048-.* ends past the disk"))
    cases.append((mbr([(0x83, 2048, 4096), (0x83, 4096, 4096)]), "p1 .* and p2 .* overlap"))
    cases.append((mbr([(0x83, 0, 4096)]), "starts at LBA 0"))
    cases.append((mbr([(0x05, 2048, 4096), (0x0F, 8192, 100)]), "2 extended partitions"))
    d = mbr([(0x05, 2048, 8192)])
    ebr(d, 2048, (2048, 100), (0, 8192))  # the next EBR is this one again
    cases.append((d, "loops back to the EBR at LBA 2048"))
    d = mbr([(0x05, 2048, 8192)])
    ebr(d, 2048, (2048, 100), (4096, 100))
    ebr(d, 6144, (1, 100), (4096, 100))  # ... and back to itself
    cases.append((d, "loops back to the EBR at LBA 6144"))
    d = mbr([(0x05, 2048, 8192)])
    ebr(d, 2048, (2048, 100), (9000, 100))
    cases.append((d, "EBR at LBA 11048 lies outside the extended partition"))
    d = mbr([(0x05, 2048, 4096)])
    ebr(d, 2048, (2048, 4096), None)
    cases.append((d, "p5 .* not inside its extended partition"))
    d = mbr([(0x05, 2048, 4096)])
    cases.append((d, "EBR at LBA 2048 has no 0x55AA"))
    cases.append((chain(300), "more than 256 logical partitions"))
    for disk, match in cases:
        expect_error(tmp_path, bytes(disk), PartitionTableError, match)


def test_long_but_legal_chain(tmp_path):
    vols = scan(tmp_path, bytes(chain(200)))
    assert len(vols) == 200 and vols[-1].name == "drive-scsi0/p204"


# --- LVM ------------------------------------------------------------------------------


LVM_CASES = {
    "beyond pe_count": (vg(lv("a", (0, 4, 12))), "extents 12-15 lie past the 14 extents"),
    "overlap": (vg(lv("a", (0, 4, 0)) + lv("b", (0, 4, 2))), "LVs 'a' .* and 'b' .* overlap"),
    "gap": (vg(lv("a", (0, 2, 0), (3, 1, 5))), "segment2 starts at extent 3, expected 2"),
    "pe area past PV": (vg(lv("a", (0, 1, 0)), pe_count=10**6), "claims 1000000 extents"),
    "unknown pv": (vg(lv("a", (0, 1, 0)).replace('"pv0"', '"pv9"')), "names PV 'pv9'"),
    "absurd segment_count": (vg(lv("a", (0, 1, 0)).replace("segment_count = 1", "segment_count = 999999999")), "segment_count = 999999999 outside"),  # noqa: E501
    "bad lv name": (vg(lv("a", (0, 1, 0)).replace("a {", '"../x" {')), "unexpected|expected a name"),  # noqa: E501
    "huge number": (vg(lv("a", (0, 1, 10**30))), "longer than 20 digits"),
    "unterminated": (vg(lv("a", (0, 1, 0))).replace('"Text Format Volume Group"', '"Text'), "unterminated string"),  # noqa: E501
    "deep nesting": ("x {" * 100 + "}" * 100, "nested deeper than 16"),
    "two vgs": (vg(lv("a", (0, 1, 0))) + "vg1 { }\n", "2 volume groups"),
    "zero extent size": (vg(lv("a", (0, 1, 0)), extent_sectors=0), "extent_size = 0 outside"),
    "stripes not a list": (vg(lv("a", (0, 1, 0)).replace('stripes = ["pv0", 0]', 'stripes = "pv0"')), "'stripes' is not"),  # noqa: E501
    "garbage": ("\x01binary", "unexpected character"),
}  # fmt: skip


@pytest.mark.parametrize("case", LVM_CASES, ids=str)
def test_hostile_lvm_metadata(tmp_path, case):
    text, match = LVM_CASES[case]
    e = expect_error(tmp_path, bytes(lvm_disk(text)), LvmError, match)
    assert str(e).startswith("drive-scsi0/p1: ")


def test_hostile_lvm_areas(tmp_path):
    good = vg(lv("a", (0, 1, 0)))
    cases = [
        (lvm_disk(good, text_crc_delta=1), "metadata text checksum"),
        (lvm_disk(good, mda_crc_delta=1), "metadata area header checksum"),
        (lvm_disk(good, text_size=1 << 40), "lies outside its area"),
    ]
    d = lvm_disk(good)
    put(d, MiB + SECTOR + 16, b"\xff\xff\xff\xff")  # the label's CRC
    cases.append((d, "PV label checksum"))
    for disk, match in cases:
        expect_error(tmp_path, bytes(disk), LvmError, match)


def test_unsupported_lvs_are_listed_with_a_note(tmp_path):
    lvs = (
        lv("thin", (0, 2, 0), seg_type="thin-pool")
        + lv("mirror", (0, 2, 2), seg_type="raid1")
        + lv("ok", (0, 2, 4))
        + lv("snap", (0, 1, 6))
        + """snapshot0 {
status = ["READ"]
segment_count = 1
segment1 {
start_extent = 0
extent_count = 1
type = "snapshot"
chunk_size = 8
origin = "ok"
cow_store = "snap"
}
}"""
    )
    vols = {v.name.rsplit("/", 1)[1]: v for v in scan(tmp_path, bytes(lvm_disk(vg(lvs))))}
    assert vols["thin"].note.startswith("thin-pool LV: not supported")
    assert vols["mirror"].note.startswith("raid1 LV: not supported")
    assert vols["snap"].note.startswith("snapshot of 'ok'")
    assert vols["ok"].note is None and "snapshot0" not in vols  # hidden LVs are not listed


def test_text_parser_limits():
    tree = lvmtext.parse('a { b = [1, "x\\"y", 2.5,] c = -3 }  # comment\n', "v")
    assert tree == {"a": {"b": [1, 'x"y', 2.5], "c": -3}}
    for text, match in [
        ("a = [[1]]", "expected a value"),
        ("a = 1 a = 2", "given twice"),
        ("a {", "not closed"),
        ("}", "without"),
        ("a = [" + "1," * 70000 + "]", "list longer"),
    ]:
        with pytest.raises(LvmError, match=match):
            lvmtext.parse(text, "v")


# --- the reader's own guard ------------------------------------------------------------


def test_reader_refuses_segments_outside_the_drive(tmp_path):
    path = build_archive({DRIVE: bytes(MiB)}).write(tmp_path / "r.vma")
    with Archive.open(path) as a:
        outside = Volume("x", DRIVE, 1, "lv", MiB, (Segment(0, MiB // 2, MiB),), "unknown", None)
        with pytest.raises(VolumeError, match="segment ends past the drive"):
            VolumeReader(a, outside)
        gap = Volume("x", DRIVE, 1, "lv", 2, (Segment(0, 0, 1), Segment(2, 5, 1)), "unknown", None)
        with pytest.raises(VolumeError, match="back to back"):
            VolumeReader(a, gap)


# --- what the user sees ---------------------------------------------------------------


def test_volumes_command_reports_a_bad_drive_and_lists_the_good(tmp_path):
    good = gpt([(2048, 4095, LINUX)])
    bad = gpt([(2048, 4095, LINUX)], damage_entries=True)
    path = build_archive({"drive-scsi0": bytes(good), "drive-scsi1": bytes(bad)}).write(
        tmp_path / "two.vma"
    )
    proc = subprocess.run(vmafs_cmd("volumes", path), capture_output=True, text=True, timeout=GUARD)
    assert proc.returncode == 1
    assert "drive-scsi0/p1" in proc.stdout
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("vmafs: error: drive-scsi1: GPT entry array CRC32 does not match")
    assert "Traceback" not in proc.stderr


@pytest.mark.fuse
def test_mount_shows_a_bad_drive_empty_and_logs_why(tmp_path, require_fuse):
    from test_mount_support import mounted

    good = gpt([(2048, 4095, LINUX)])
    bad = mbr([(0x05, 2048, 8192)])
    ebr(bad, 2048, (2048, 100), (0, 8192))  # a chain that loops
    path = build_archive({"drive-scsi0": bytes(good), "drive-scsi1": bytes(bad)}).write(
        tmp_path / "two.vma"
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    logfile = tmp_path / "mount.log"
    with mounted(path, mnt, f"logfile={logfile}"):
        assert (mnt / "volumes" / "drive-scsi1").is_dir()
        assert list((mnt / "volumes" / "drive-scsi1").iterdir()) == []
        assert [p.name for p in (mnt / "volumes" / "drive-scsi0").iterdir()] == ["p1"]
        assert (mnt / "volumes" / "drive-scsi0" / "p1").read_bytes() == bytes(good[MiB : 2 * MiB])
    log = logfile.read_text()
    assert "volumes of drive-scsi1 not shown: drive-scsi1: extended partition chain loops" in log
    assert log.count("not shown") == 1


def mutations(seed: int, base: bytes, spots: list[tuple[int, int]], n: int):
    """*n* copies of *base*, each with 1-8 random bytes overwritten inside *spots*."""
    import random

    rng = random.Random(seed)
    for _ in range(n):
        d = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            a, b = rng.choice(spots)
            d[rng.randrange(a, b)] = rng.randrange(256)
        yield bytes(d)


@pytest.mark.slow
def test_random_damage_gives_volume_errors_only(tmp_path):
    """Bytes overwritten at random in the tables and metadata: every scan ends, reads
    only inside the drive, and either succeeds or raises a VolumeError (never anything
    else, which the CLI would report as an internal error)."""
    text = vg(lv("a", (0, 2, 5), (2, 1, 0)) + lv("b", (0, 1, 3)))
    lvm_base = bytes(lvm_disk(text))
    d = mbr([(0x83, 2048, 2048), (0x05, 4096, 8192)])
    ebr(d, 4096, (2048, 2048), (4096, 4096))
    ebr(d, 8192, (2048, 2048), None)
    cases = [
        (bytes(gpt([(2048, 4095, LINUX), (4096, 8191, LVM_TYPE)])), [(0, 1024), (1024, 1536)]),
        (
            bytes(d),
            [
                (446, 512),
                (4096 * SECTOR + 446, 4096 * SECTOR + 512),
                (8192 * SECTOR + 446, 8192 * SECTOR + 512),
            ],
        ),  # fmt: skip
        (lvm_base, [(446, 512), (MiB + 512, MiB + 1024), (MiB + 4096, MiB + 4096 + 1500)]),
    ]
    outcomes = {"ok": 0, "error": 0}
    for k, (base, spots) in enumerate(cases):
        for disk in mutations(k, base[: 16 * MiB], spots, 40):
            try:
                scan(tmp_path, disk)
                outcomes["ok"] += 1
            except VolumeError as e:
                assert "\n" not in str(e) and e.volume
                outcomes["error"] += 1
    # The metadata text itself, its checksum made valid: the parser and the VG checks.
    import random

    rng = random.Random(7)
    for _ in range(60):
        t = list(text)
        for _ in range(rng.randint(1, 4)):
            t[rng.randrange(len(t))] = rng.choice('{}[]=",#\\\n 0123456789-x')
        try:
            scan(tmp_path, bytes(lvm_disk("".join(t))))
            outcomes["ok"] += 1
        except VolumeError as e:
            assert "\n" not in str(e) and e.volume
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]


@pytest.mark.slow
def test_random_damage_in_filesystem_superblocks(tmp_path):
    """Type and label probes on damaged NTFS, FAT, ext4 and xfs superblocks: a result
    or 'unknown', never an exception."""
    from guestdisks import mkfs, require_tools

    require_tools("mkfs.ntfs", "mkfs.vfat", "mkfs.ext4")
    images = {
        "ntfs": (mkfs(tmp_path, "ntfs", 2 * MiB, "N"), [(0, 512), (4 * 4096, 8 * 4096)]),
        "vfat": (mkfs(tmp_path, "vfat", 2 * MiB, "F"), [(0, 512)]),
        "ext4": (mkfs(tmp_path, "ext4", 2 * MiB, "E"), [(1024, 2048)]),
    }
    for k, (img, spots) in enumerate(images.values()):
        base = img.read_bytes()
        # NTFS keeps its MFT wherever mkfs put it: damage record 3 ($Volume) too.
        for disk in mutations(10 + k, base, spots, 40):
            for v in scan(tmp_path, disk):
                assert v.name == DRIVE and v.kind == "disk"


def test_ntfs_label_attribute_cut_short(tmp_path):
    """A $VOLUME_NAME attribute too short for its own header, at the end of MFT record 3:
    the label is None, nothing is read past the record."""
    d = bytearray(MiB)
    put(d, 0, b"\xeb\x52\x90NTFS    " + struct.pack("<HB", 512, 1))
    put(d, 0x30, struct.pack("<Q", 8))  # MFT at cluster 8
    put(d, 0x40, struct.pack("<b", -10))  # records of 2**10 bytes
    put(d, 510, b"\x55\xaa")
    rec = 8 * 512 + 3 * 1024
    put(d, rec, b"FILE" + struct.pack("<HH", 48, 3))
    put(d, rec + 0x14, struct.pack("<H", 56))
    put(d, rec + 56, struct.pack("<II", 0x10, 1008 - 56))  # a filler attribute
    put(d, rec + 1008, struct.pack("<II", 0x60, 16))  # $VOLUME_NAME, 16 bytes only
    (v,) = scan(tmp_path, bytes(d))
    assert (v.name, v.fstype, v.label) == (DRIVE, "ntfs", None)
