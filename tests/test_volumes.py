"""Volumes inside disks (vmafs.volumes, ``vmafs volumes``, volume files in the mount).

Disks are built with the real tools (sfdisk, mkfs.*, LVM's pvcreate and
vgcfgrestore; see guestdisks.py), written into a VMA with the project's
own writer code (vmafactory.build_archive) and read back: every volume's
name, type, label and size, and its bytes equal to the filesystem image
that went in.  The guest fixtures (tests/fixtures/guests, built by
libguestfs, archived by Proxmox's vma) must come out as their manifests say.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES_DIR, unmount, vmafs_cmd
from guestdisks import Disk, Seg, lvm_pvs, mkfs, require_tools, vg_text
from test_mount_seek import _model, _seek, require_lseek  # noqa: F401 (a fixture)
from test_mount_support import GUARD, mounted
from vmafactory import build_archive

from vmafs.archive import Archive
from vmafs.errors import UnsupportedVolumeError, VolumeNotFoundError
from vmafs.format import BLOCK_SIZE, CLUSTER_SIZE
from vmafs.volumes import VolumeReader, find_volume, scan_volumes

MiB = 1 << 20
GUESTS = FIXTURES_DIR / "guests"


def guest_archives() -> list[Path]:
    return sorted(p for p in GUESTS.iterdir() if ".vma" in p.name)


def manifest_of(archive: Path) -> dict:
    return json.loads((GUESTS / (archive.name.split(".vma")[0] + ".json")).read_text())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def volume_bytes(archive: Archive, name: str) -> bytes:
    v = find_volume(archive, name)
    return VolumeReader(archive, v).read(0, v.size)


def summary(volumes) -> dict[str, tuple]:
    return {v.name: (v.kind, v.fstype, v.label, v.size, v.note is not None) for v in volumes}


# --- the guest fixtures -----------------------------------------------------------------


@pytest.mark.parametrize("path", guest_archives(), ids=lambda p: p.name)
def test_guest_fixture_volumes_match_manifest(path, tmp_path):
    archive = Path(shutil.copy(path, tmp_path))  # a compressed one gets a side index
    m = manifest_of(path)
    with Archive.open(archive) as a:
        found = {v.name: v for v in scan_volumes(a)}
        for want in m["volumes"]:
            v = found[want["name"]]
            assert (v.fstype, v.label, v.size) == (want["fstype"], want["label"], want["size"])
            assert v.readable
        for drive, d in m["disks"].items():
            dev = next(x for x in a.devices if x.name == drive)
            assert dev.size == d["size"]
        if path.name.startswith("pve-gpt"):
            # The PV partition is listed as such; the LVs sit in the VG named like Proxmox's.
            assert found["drive-scsi0/p2"].fstype == "lvm2"
            assert found["drive-scsi0/pve/root"].kind == "lv"


def test_volumes_command_on_a_guest_fixture(tmp_path):
    archive = shutil.copy(GUESTS / "ntfs-mbr.vma", tmp_path)
    proc = subprocess.run(
        vmafs_cmd("volumes", archive), capture_output=True, text=True, timeout=GUARD
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "drive-sata0/p1" in ln)
    assert line.split()[:4] == ["drive-sata0/p1", "partition", "ntfs", "WINDATA"]
    proc = subprocess.run(
        vmafs_cmd("volumes", "--json", "-d", "sata0", archive),
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    assert proc.returncode == 0, proc.stderr
    drives = json.loads(proc.stdout)["drives"]
    assert [d["name"] for d in drives] == ["drive-sata0"]
    (vol,) = drives[0]["volumes"]
    assert vol["name"] == "drive-sata0/p1" and vol["label"] == "WINDATA"
    assert vol["segments"] == [{"start": 0, "disk_offset": 65536, "length": vol["size"]}]


def test_volume_and_drive_names_short_and_wrong(tmp_path):
    with Archive.open(shutil.copy(GUESTS / "ntfs-mbr.vma", tmp_path)) as a:
        assert find_volume(a, "sata0/p1") == find_volume(a, "drive-sata0/p1")
        assert [v.name for v in scan_volumes(a, "sata0")] == ["drive-sata0/p1"]
        with pytest.raises(VolumeNotFoundError, match=r"no volume 'sata0/p9'.*drive-sata0/p1"):
            find_volume(a, "sata0/p9")
        with pytest.raises(VolumeNotFoundError, match=r"no drive 'scsi0'.*drive-sata0"):
            find_volume(a, "scsi0/p1")
    proc = subprocess.run(
        vmafs_cmd("volumes", "-d", "ide2", tmp_path / "ntfs-mbr.vma"),
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("vmafs: error: no drive 'ide2'") and proc.stderr.count("\n") == 1


# --- disks built with the real tools ----------------------------------------------------


def rootdir(tmp: Path, name: str) -> Path:
    """A small tree of files for ext4/btrfs images (names, sizes, a symlink)."""
    root = tmp / f"tree-{name}"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text(f"{name}\n")
    (root / "big.bin").write_bytes(os.urandom(300_000))
    (root / "name with spaces.txt").write_text("spaces\n")
    (root / "link").symlink_to("etc/hostname")
    return root


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = sha256(p.read_bytes())
    return out


@pytest.fixture(scope="module")
def gpt_lvm(tmp_path_factory, require_loop):
    """A GPT disk with ext4, vfat, swap, a blank partition and two LVM PVs of VG 'pve'
    holding a two-segment ext4 LV (out of order), an LV across both PVs and a striped LV."""
    require_tools("sfdisk", "mkfs.ext4", "mkfs.vfat", "mkswap", "pvcreate", "vgcfgrestore")
    tmp = tmp_path_factory.mktemp("gpt-lvm")
    disk = Disk(tmp / "disk.raw", 96 * MiB)
    parts = disk.partition(
        "gpt",
        [
            "size=16MiB, type=linux",
            "size=8MiB, type=uefi",
            "size=24MiB, type=lvm",
            "size=24MiB, type=lvm",
            "size=8MiB, type=swap",
            "type=linux",
        ],
    )
    boot_tree = rootdir(tmp, "boot")
    images = {
        "p1": mkfs(tmp, "ext4", parts[1].size, "BOOT", boot_tree),
        "p2": mkfs(tmp, "vfat", parts[2].size, "ESP", extra=("-F", "16", "-s", "1")),
        "p5": mkfs(tmp, "swap", parts[5].size, "SWAP1"),
    }
    for name, img in images.items():
        disk.put(parts[int(name[1:])].start, img)
    extent = MiB
    pvs = {"pv0": (2, MiB, 23), "pv1": (3, MiB, 23)}
    lvs = {
        "root": [Seg(0, 6, "pv0", 10), Seg(6, 6, "pv0", 0)],
        "data": [Seg(0, 2, "pv0", 20), Seg(2, 2, "pv1", 0)],
        "stripe": [Seg(0, 4, "pv0", 16, stripes=2)],
    }
    pv_images = lvm_pvs(
        tmp, "pve", vg_text("pve", extent, pvs, lvs), {"pv0": (2, 24 * MiB), "pv1": (3, 24 * MiB)}
    )
    disk.put(parts[3].start, pv_images["pv0"])
    disk.put(parts[4].start, pv_images["pv1"])
    root_tree = rootdir(tmp, "root")
    lv_images = {
        "root": mkfs(tmp, "ext4", 12 * MiB, "ROOT", root_tree),
        "data": mkfs(tmp, "ext2", 4 * MiB, "DATA"),
    }
    pv_start = {"pv0": parts[3].start, "pv1": parts[4].start}
    for lv, segs in lvs.items():
        if lv not in lv_images:
            continue
        data = lv_images[lv].read_bytes()
        for s in segs:
            disk.put(
                pv_start[s.pv] + MiB + s.pe * extent,
                data[s.start * extent : (s.start + s.count) * extent],
            )
    content = disk.read()
    # A second disk that is one PV as a whole (no partition table), VG 'vg1'.
    whole = lvm_pvs(
        tmp,
        "vg1",
        vg_text("vg1", extent, {"pv0": (4, MiB, 15)}, {"lv": [Seg(0, 8, "pv0", 3)]}),
        {"pv0": (4, 16 * MiB)},
    )["pv0"]
    lv_ext4 = mkfs(tmp, "ext4", 8 * MiB, "ONPV")
    pv_disk = Disk(tmp / "pv-disk.raw", 16 * MiB)
    pv_disk.put(0, whole)
    pv_disk.put(MiB + 3 * extent, lv_ext4)
    archive = build_archive({"drive-scsi0": content, "drive-scsi1": pv_disk.read()}).write(
        tmp / "gpt-lvm.vma"
    )
    expect_bytes = {f"drive-scsi0/{k}": v.read_bytes() for k, v in images.items()}
    expect_bytes |= {f"drive-scsi0/pve/{k}": v.read_bytes() for k, v in lv_images.items()}
    expect_bytes["drive-scsi1/vg1/lv"] = lv_ext4.read_bytes()
    return archive, parts, content, expect_bytes, tree_digests(root_tree)


def test_gpt_with_lvm_built_by_real_tools(gpt_lvm):
    archive, parts, content, expect_bytes, _ = gpt_lvm
    with Archive.open(archive) as a:
        volumes = scan_volumes(a)
        assert summary(volumes) == {
            "drive-scsi0/p1": ("partition", "ext4", "BOOT", 16 * MiB, False),
            "drive-scsi0/p2": ("partition", "vfat", "ESP", 8 * MiB, False),
            "drive-scsi0/p3": ("partition", "lvm2", None, 24 * MiB, False),
            "drive-scsi0/p4": ("partition", "lvm2", None, 24 * MiB, False),
            "drive-scsi0/p5": ("partition", "swap", "SWAP1", 8 * MiB, False),
            "drive-scsi0/p6": ("partition", "unknown", None, parts[6].size, False),
            "drive-scsi0/pve/root": ("lv", "ext4", "ROOT", 12 * MiB, False),
            "drive-scsi0/pve/data": ("lv", "ext2", "DATA", 4 * MiB, False),
            "drive-scsi0/pve/stripe": ("lv", "unknown", None, 4 * MiB, True),
            "drive-scsi1": ("disk", "lvm2", None, 16 * MiB, False),
            "drive-scsi1/vg1/lv": ("lv", "ext4", "ONPV", 8 * MiB, False),
        }
        for name, data in expect_bytes.items():
            assert sha256(volume_bytes(a, name)) == sha256(data), name
        p3 = find_volume(a, "scsi0/p3")
        assert sha256(VolumeReader(a, p3).read(0, p3.size)) == sha256(
            content[parts[3].start : parts[3].start + parts[3].size]
        )
        root = find_volume(a, "scsi0/pve/root")
        assert (
            len(root.segments) == 2 and root.segments[0].disk_offset > root.segments[1].disk_offset
        )
        stripe = find_volume(a, "scsi0/pve/stripe")
        assert "striped" in stripe.note and stripe.segments == ()
        with pytest.raises(UnsupportedVolumeError, match="pve/stripe: cannot be read: striped"):
            VolumeReader(a, stripe)


def test_reads_across_segment_edges(gpt_lvm):
    archive, _, _, expect_bytes, _ = gpt_lvm
    want = expect_bytes["drive-scsi0/pve/root"]
    with Archive.open(archive) as a:
        r = VolumeReader(a, find_volume(a, "scsi0/pve/root"))
        edge = 6 * MiB
        for off, n in [(edge - 1, 2), (edge - 4096, 8192), (0, 12 * MiB), (12 * MiB - 5, 100)]:
            assert r.read(off, n) == want[off : off + n], (off, n)
        assert r.read(12 * MiB, 10) == b"" and r.read(-1, 10) == b""


def test_volume_stored_bytes(gpt_lvm):
    """A volume's stored bytes (its file's st_blocks): the non-zero 4 KiB blocks of its
    drive under its segments (cluster-aligned here, so the count is exact)."""
    archive, _, content, _, _ = gpt_lvm
    with Archive.open(archive) as a:
        for name in ("drive-scsi0/pve/root", "drive-scsi0/p1"):
            v = find_volume(a, name)
            blocks = [
                d
                for seg in v.segments
                for d in range(seg.disk_offset, seg.disk_offset + seg.length, BLOCK_SIZE)
                if any(content[d : d + BLOCK_SIZE])
            ]
            assert 0 < len(blocks) * BLOCK_SIZE < v.size
            assert VolumeReader(a, v).stored_bytes() == len(blocks) * BLOCK_SIZE, name


def volume_holes(content: bytes, volume) -> list[bool]:
    """Per 64 KiB cluster of the volume: a hole iff its drive cluster is all zeros
    (the archive stores nothing for it).  Segments here start on cluster boundaries."""
    holes = []
    for seg in volume.segments:
        assert seg.disk_offset % CLUSTER_SIZE == 0 and seg.start % CLUSTER_SIZE == 0
        for off in range(0, seg.length, CLUSTER_SIZE):
            d = seg.disk_offset + off
            holes.append(not any(content[d : d + CLUSTER_SIZE]))
    return holes


@pytest.mark.fuse
@pytest.mark.loop
@pytest.mark.usefixtures("require_lseek")
def test_volume_files_in_the_mount(gpt_lvm, tmp_path, require_loop):
    """Volume files: sizes, bytes, SEEK_DATA/SEEK_HOLE, and `mount -o loop,ro` of an ext4 LV."""
    archive, _, content, expect_bytes, root_files = gpt_lvm
    mnt = tmp_path / "mnt"
    guest = tmp_path / "guest"
    mnt.mkdir()
    guest.mkdir()
    with Archive.open(archive) as a:
        volumes = {v.name: v for v in scan_volumes(a)}
    with mounted(archive, mnt):
        base = mnt / "volumes" / "drive-scsi0"
        assert sorted(os.listdir(base)) == ["p1", "p2", "p3", "p4", "p5", "p6", "pve"]
        assert sorted(os.listdir(base / "pve")) == ["data", "root"]  # not the striped LV
        assert sorted(os.listdir(mnt / "volumes")) == ["drive-scsi0", "drive-scsi1"]
        assert sorted(os.listdir(mnt / "volumes" / "drive-scsi1")) == ["disk", "vg1"]
        for name, data in expect_bytes.items():
            path = mnt / "volumes" / name  # a volume's path is volumes/ + its name
            assert os.stat(path).st_size == len(data)
            assert sha256(path.read_bytes()) == sha256(data), name
        for name in ("drive-scsi0/pve/root", "drive-scsi0/p1"):
            v = volumes[name]
            holes = volume_holes(content, v)
            assert any(holes) and not all(holes)
            fd = os.open(mnt / "volumes" / name, os.O_RDONLY)
            try:
                for c in range(len(holes) + 1):
                    for off in (c * CLUSTER_SIZE - 1, c * CLUSTER_SIZE, c * CLUSTER_SIZE + 1):
                        if off < 0:
                            continue
                        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                            want = _model(holes, v.size, off, whence)
                            assert _seek(fd, off, whence) == want, (name, off, whence)
            finally:
                os.close(fd)
        try:
            subprocess.run(
                ["mount", "-o", "loop,ro,noload", base / "pve" / "root", guest],
                check=True,
                capture_output=True,
                timeout=GUARD,
            )
            assert tree_digests(guest) == root_files
            assert os.readlink(guest / "link") == "etc/hostname"
        finally:
            unmount(guest, fuse=False)


@pytest.fixture(scope="module")
def mbr_logical(tmp_path_factory):
    """An MBR disk: NTFS and FAT32 primaries, an extended partition with xfs, btrfs,
    ext3, FAT16 and FAT12 logical partitions."""
    require_tools("sfdisk", "mkfs.ntfs", "mkfs.vfat", "mkfs.xfs", "mkfs.btrfs", "mkfs.ext3")
    tmp = tmp_path_factory.mktemp("mbr")
    disk = Disk(tmp / "disk.raw", 256 * MiB)
    parts = disk.partition(
        "dos",
        [
            "size=16MiB, type=7",
            "size=40MiB, type=c",
            "type=5",
            "size=32MiB, type=83",
            "size=112MiB, type=83",
            "size=8MiB, type=83",
            "size=8MiB, type=6",
            "size=4MiB, type=1",
        ],
    )
    specs = {
        1: ("ntfs", "WIN", ()),
        2: ("vfat", "FAT32VOL", ("-F", "32", "-s", "1")),
        5: ("xfs", "XL", ()),
        6: ("btrfs", "BT", ()),
        7: ("ext3", "E3", ()),
        8: ("vfat", "F16", ("-F", "16", "-s", "1")),
        9: ("vfat", "F12", ("-F", "12")),
    }
    images = {}
    for n, (kind, label, extra) in specs.items():
        images[n] = mkfs(tmp, kind, parts[n].size, label, extra=extra)
        disk.put(parts[n].start, images[n])
    archive = build_archive({"drive-sata1": disk.read()}).write(tmp / "mbr.vma")
    return archive, parts, specs, images


@pytest.mark.slow
def test_mbr_logical_partitions_built_by_real_tools(mbr_logical):
    archive, parts, specs, images = mbr_logical
    with Archive.open(archive) as a:
        got = summary(scan_volumes(a))
        assert got == {
            f"drive-sata1/p{n}": ("partition", kind, label, parts[n].size, False)
            for n, (kind, label, _) in specs.items()
        }
        for n, img in images.items():
            assert sha256(volume_bytes(a, f"sata1/p{n}")) == sha256(img.read_bytes()), n


def test_whole_disk_filesystems_and_empty_disk(tmp_path):
    require_tools("mkfs.ext4", "mkfs.vfat")
    ext4 = mkfs(tmp_path, "ext4", 8 * MiB, "WHOLE")
    fat = mkfs(tmp_path, "vfat", 8 * MiB, "WHOLEFAT")
    disks = {
        "drive-scsi0": ext4.read_bytes(),
        "drive-scsi1": fat.read_bytes(),  # a FAT boot sector carries 0x55AA like an MBR
        "drive-scsi2": bytes(4 * MiB),
    }
    archive = build_archive(disks).write(tmp_path / "whole.vma")
    with Archive.open(archive) as a:
        assert summary(scan_volumes(a)) == {
            "drive-scsi0": ("disk", "ext4", "WHOLE", 8 * MiB, False),
            "drive-scsi1": ("disk", "vfat", "WHOLEFAT", 8 * MiB, False),
        }
        assert volume_bytes(a, "scsi0") == disks["drive-scsi0"]
    proc = subprocess.run(
        vmafs_cmd("volumes", archive), capture_output=True, text=True, timeout=GUARD
    )
    assert proc.returncode == 0, proc.stderr
    assert "drive-scsi2" in proc.stdout and "no partition table, LVM or filesystem" in proc.stdout


@pytest.mark.fuse
def test_whole_disk_file_and_reserved_config_name(tmp_path, require_fuse):
    """A whole-disk filesystem is volumes/<drive>/disk; a config called 'volumes' cannot
    shadow the directory (it is renamed, and extract names it the same way)."""
    require_tools("mkfs.ext4")
    ext4 = mkfs(tmp_path, "ext4", 4 * MiB, "W").read_bytes()
    configs = [("volumes", b"a config posing as the volumes directory\n")]
    archive = build_archive({"drive-scsi0": ext4}, configs=configs).write(tmp_path / "w.vma")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(archive, mnt):
        assert sorted(os.listdir(mnt)) == ["config-0.conf", "disk-drive-scsi0.raw", "volumes"]
        assert (mnt / "config-0.conf").read_bytes() == configs[0][1]
        assert os.listdir(mnt / "volumes" / "drive-scsi0") == ["disk"]
        assert (mnt / "volumes" / "drive-scsi0" / "disk").read_bytes() == ext4


def test_volume_paths_in_the_mount_never_collide():
    """p<N> files, <vg>/<lv> directories, 'disk' for a whole disk; a VG named like a
    partition file moves aside; unreadable volumes have no path."""
    from vmafs.names import volume_paths
    from vmafs.volumes import Segment, Volume

    def vol(name, kind, note=None):
        drive = name.split("/")[0]
        return Volume(name, drive, 1, kind, 1, (Segment(0, 0, 1),), "ext4", None, note)

    volumes = [
        vol("d/p1", "partition"),
        vol("d/p2", "partition"),
        vol("d/p1/root", "lv"),
        vol("d/pve/root", "lv"),
        vol("d/pve/thin", "lv", note="thin LV: not supported"),
        vol("e", "disk"),
        vol("e/disk/x", "lv"),
    ]
    assert volume_paths(volumes) == {
        "d/p1": ("p1",),
        "d/p2": ("p2",),
        "d/p1/root": ("p1~2", "root"),
        "d/pve/root": ("pve", "root"),
        "e": ("disk",),
        "e/disk/x": ("disk~2", "x"),
    }
