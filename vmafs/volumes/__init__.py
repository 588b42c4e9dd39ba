"""The volumes inside a VM's disks, read by vmafs itself.

Partition tables (GPT, MBR with logical partitions), LVM2 physical volumes
and their linear logical volumes, and filesystems on whole disks, found
without the kernel's partition scanning, device-mapper or LVM activation:
nothing on the host changes, and a guest VG named like the host's own
(``pve``) cannot clash with it.

    from vmafs.volumes import scan_volumes, find_volume, VolumeReader

    for v in scan_volumes(archive):      # Volume(name, drive, dev_id, kind, size, ...)
        print(v.name, v.fstype, v.label, v.size)
    r = VolumeReader(archive, find_volume(archive, "scsi0/pve/root"))
    head = r.read(0, 4096)

Modules: model (records), reader (VolumeReader), gpt, mbr, lvm (label,
metadata area, VG), lvmtext (the metadata text parser), fstype (type and
label probes), scan (the order of the questions).
"""

from .model import Segment, Volume
from .reader import VolumeReader
from .scan import find_drive, find_volume, scan_drive, scan_volumes

__all__ = [
    "Segment",
    "Volume",
    "VolumeReader",
    "find_drive",
    "find_volume",
    "scan_drive",
    "scan_volumes",
]
