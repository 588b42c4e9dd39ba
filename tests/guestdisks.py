"""Build guest disk images with the real tools, for the volume tests.

Partition tables come from ``sfdisk``, filesystems from ``mkfs.*`` on
image files of their own (nothing is mounted), which are then copied into
the disk at their partition's offset; LVM physical volumes are written by
``pvcreate --restorefile`` + ``vgcfgrestore`` on a loop device from a VG
description made here (no device-mapper is needed for that).  Every
builder returns what it put where, so a test can compare each volume read
back through vmafs with the bytes that went in.

    from guestdisks import Disk, mkfs, require_tools

    disk = Disk(tmp_path / "d.raw", 64 << 20)
    parts = disk.partition("gpt", [("8M", "linux"), ("16M", "lvm")])
    disk.put(parts[0], mkfs(tmp_path, "ext4", 8 << 20, "BOOT"))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _unavailable, loop_device

TIMEOUT = 120
SECTOR = 512

#: mkfs command per type: (tool, argv builder(image, label, rootdir)).
MKFS = {
    "ext2": "mkfs.ext2",
    "ext3": "mkfs.ext3",
    "ext4": "mkfs.ext4",
    "xfs": "mkfs.xfs",
    "btrfs": "mkfs.btrfs",
    "vfat": "mkfs.vfat",
    "ntfs": "mkfs.ntfs",
    "swap": "mkswap",
}


def require_tools(*tools: str) -> None:
    """Skip (locally) or fail (CI=true) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        _unavailable(f"tools missing: {', '.join(missing)} (scripts/setup installs them)")


def run(*argv, input: str | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        input=input,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr.strip()}"
    return proc.stdout


def mkfs(
    tmp: Path,
    kind: str,
    size: int,
    label: str | None,
    rootdir: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """A filesystem image of *kind* and *size* bytes; ext*/btrfs filled from *rootdir*;
    *extra* are more mkfs options (``("-F", "32")`` for FAT32)."""
    require_tools(MKFS[kind])
    img = tmp / f"{kind}-{uuidlib.uuid4().hex[:8]}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    tool = MKFS[kind]
    if kind.startswith("ext"):
        argv = [tool, "-q", "-F", *extra, *(["-L", label] if label else [])]
        argv += ["-d", rootdir] if rootdir else []
        run(*argv, img)
    elif kind == "xfs":
        # Below 300 MB only with --unsupported; fine for a test image.
        run(tool, "-q", "--unsupported", *(["-L", label] if label else []), img)
    elif kind == "btrfs":
        run(
            tool,
            "-q",
            *(["-L", label] if label else []),
            *(["-r", rootdir] if rootdir else []),
            img,
        )
    elif kind == "vfat":
        run(tool, *extra, *(["-n", label] if label else []), img)
    elif kind == "ntfs":
        run(tool, "-q", "-F", "-f", *(["-L", label] if label else []), img)
    elif kind == "swap":
        run(tool, *(["-L", label] if label else []), img)
    return img


@dataclass(frozen=True)
class Part:
    number: int
    start: int  # bytes
    size: int


class Disk:
    """A sparse raw disk image being put together."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        with open(path, "wb") as f:
            f.truncate(size)

    def partition(self, label: str, lines: list[str]) -> dict[int, Part]:
        """Write a partition table with sfdisk (``label`` gpt or dos; one sfdisk line per
        partition); returns the partitions sfdisk made, by number."""
        require_tools("sfdisk")
        script = f"label: {label}\n" + "".join(line + "\n" for line in lines)
        run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", self.path, input=script)

        table = json.loads(run("sfdisk", "--json", self.path))["partitiontable"]
        out = {}
        for p in table.get("partitions", []):
            number = int(p["node"].rsplit(str(self.path.name), 1)[1])
            out[number] = Part(number, p["start"] * SECTOR, p["size"] * SECTOR)
        return out

    def put(self, offset: int, image: Path | bytes, length: int | None = None) -> None:
        """Copy *image* (a file or bytes) into the disk at byte *offset*."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        if length is not None:
            data = data[:length]
        assert offset + len(data) <= self.size
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self) -> bytes:
        return self.path.read_bytes()


# --- LVM --------------------------------------------------------------------------


def lvm_uuid(n: int) -> str:
    """A 32-character LVM uuid in LVM's dashed form, from a number (stable in tests)."""
    raw = f"{n:032d}".replace("0", "A")
    return "-".join([raw[:6], raw[6:10], raw[10:14], raw[14:18], raw[18:22], raw[22:26], raw[26:]])


@dataclass(frozen=True)
class Seg:
    """A segment of an LV: *count* extents from LV extent *start*, on PV *pv* at PE *pe*.
    ``stripes`` > 1 makes a striped segment (then *pv*/*pe* name the first stripe and
    the others follow on the next PVs at the same PE)."""

    start: int
    count: int
    pv: str
    pe: int
    stripes: int = 1


def vg_text(
    vg: str, extent: int, pvs: dict[str, tuple[int, int, int]], lvs: dict[str, list[Seg]]
) -> str:
    """LVM2 metadata text: *pvs* name -> (uuid number, pe_start bytes, pe_count)."""
    out = [f"{vg} {{", f'id = "{lvm_uuid(1)}"', "seqno = 1", 'format = "lvm2"',
           'status = ["RESIZEABLE", "READ", "WRITE"]', "flags = []",
           f"extent_size = {extent // SECTOR}", "max_lv = 0", "max_pv = 0",
           "metadata_copies = 0", "physical_volumes {"]  # fmt: skip
    for name, (num, pe_start, pe_count) in pvs.items():
        out += [f"{name} {{", f'id = "{lvm_uuid(num)}"', 'device = "/dev/null"',
                'status = ["ALLOCATABLE"]', "flags = []", f"dev_size = {1 << 30}",
                f"pe_start = {pe_start // SECTOR}", f"pe_count = {pe_count}", "}"]  # fmt: skip
    out += ["}", "logical_volumes {"]
    names = list(pvs)
    for i, (lv, segs) in enumerate(lvs.items()):
        out += [f"{lv} {{", f'id = "{lvm_uuid(100 + i)}"', 'status = ["READ", "WRITE", "VISIBLE"]',
                "flags = []", f"segment_count = {len(segs)}"]  # fmt: skip
        for k, s in enumerate(segs, start=1):
            first = names.index(s.pv)
            stripes = ", ".join(f'"{names[first + j]}", {s.pe}' for j in range(s.stripes))
            out += [f"segment{k} {{", f"start_extent = {s.start}", f"extent_count = {s.count}",
                    'type = "striped"', f"stripe_count = {s.stripes}"]  # fmt: skip
            if s.stripes > 1:
                out.append("stripe_size = 128")
            out += [f"stripes = [{stripes}]", "}"]
        out.append("}")
    out += ["}", "}", 'contents = "Text Format Volume Group"', "version = 1",
            'description = ""', 'creation_host = "vmafs-test"',
            "creation_time = 1700000000"]  # fmt: skip
    return "\n".join(out) + "\n"


def lvm_pvs(tmp: Path, vg: str, text: str, pvs: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """Write PV images holding VG *vg* (*text* from :func:`vg_text`) with the real LVM
    tools: *pvs* name -> (uuid number, PV size in bytes).  Needs root and loop devices.
    """
    require_tools("pvcreate", "vgcfgrestore")
    backup = tmp / f"{vg}.vg"
    backup.write_text(text)
    # An lvm.conf of our own: no metadata backups or archives under the host's
    # /etc/lvm, only the devices named on the command line are looked at.
    conf = tmp / "lvm-etc"
    conf.mkdir(exist_ok=True)
    (conf / "lvm.conf").write_text(
        "backup {\n backup = 0\n archive = 0\n}\n"
        "devices {\n obtain_device_list_from_udev = 0\n use_devicesfile = 0\n}\n"
        "global {\n use_lvmetad = 0\n}\n"
    )
    env = {**os.environ, "LVM_SYSTEM_DIR": str(conf), "LVM_SUPPRESS_FD_WARNINGS": "1"}
    images = {}
    devices = []
    stack = []
    try:
        for name, (num, size) in pvs.items():
            img = tmp / f"{vg}-{name}.pv"
            with open(img, "wb") as f:
                f.truncate(size)
            cm = loop_device(img, read_only=False)
            dev = cm.__enter__()
            stack.append(cm)
            devices.append(dev)
            run("pvcreate", "-q", "-ff", "-y", "--uuid", lvm_uuid(num), "--restorefile", backup,
                "--devices", dev, dev, env=env)  # fmt: skip
            images[name] = img
        # vgcfgrestore writes the metadata into every PV's area; it warns that it cannot
        # ask device-mapper about active LVs (there is none here), which is harmless.
        argv = ["vgcfgrestore", "-q", "-f", backup, vg]
        for dev in devices:
            argv += ["--devices", dev]
        run(*argv, env=env)
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
    return images


@pytest.fixture(scope="session")
def require_lvm_tools(require_loop) -> None:
    require_tools("pvcreate", "vgcfgrestore")
