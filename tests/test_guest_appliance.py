"""The appliance engine's pure parts: vmafs volume -> libguestfs device, and the
backend environment.  (Reading through a launched appliance is in
test_guest_engines.py and test_guest_cli.py.)"""

from __future__ import annotations

import pytest

from vmafs.errors import GuestError
from vmafs.guest.accel import kvm_runs, libguestfs_env
from vmafs.guest.appliance import LaunchInfo, device_for
from vmafs.volumes import Segment, Volume

INFO = LaunchInfo(
    devices=["/dev/sda"],
    partitions=["/dev/sda1", "/dev/sda2", "/dev/sda5"],
    lvs=["/dev/pve/data", "/dev/pve/root"],
)


def _volume(name: str, kind: str) -> Volume:
    drive = "drive-scsi0"
    return Volume(name, drive, 1, kind, 4096, (Segment(0, 0, 4096),), "ext4", None)


@pytest.mark.parametrize(
    ("name", "kind", "device"),
    [
        ("drive-scsi0/p1", "partition", "/dev/sda1"),
        ("drive-scsi0/p5", "partition", "/dev/sda5"),  # first logical: libguestfs counts alike
        ("drive-scsi0/pve/root", "lv", "/dev/pve/root"),
        ("drive-scsi0", "disk", "/dev/sda"),
    ],
)
def test_device_for(name, kind, device):
    assert device_for(INFO, 0, _volume(name, kind)) == device


def test_a_volume_the_appliance_does_not_see_is_refused():
    with pytest.raises(GuestError, match=r"sees no /dev/sda3 .*/dev/sda1, /dev/sda2, /dev/sda5"):
        device_for(INFO, 0, _volume("drive-scsi0/p3", "partition"))
    with pytest.raises(GuestError, match="sees no /dev/pve/swap"):
        device_for(INFO, 0, _volume("drive-scsi0/pve/swap", "lv"))


def test_backend_environment():
    env = libguestfs_env({})
    assert env["LIBGUESTFS_BACKEND"] == "direct"
    assert ("LIBGUESTFS_BACKEND_SETTINGS" in env) == (not kvm_runs())
    mine = {"LIBGUESTFS_BACKEND": "libvirt", "LIBGUESTFS_BACKEND_SETTINGS": "force_kvm"}
    assert libguestfs_env(mine) == mine  # the user's settings win


def test_mount_guest_leaves_out_lvs_of_a_vg_name_on_two_drives():
    """One appliance sees every drive of a mount --guest tree: a VG name on two of
    them could not be told apart there, so those LVs are left out with a note."""
    from vmafs.guest.tree import _shared_vg_names

    def lv(drive: str, name: str) -> Volume:
        return Volume(f"{drive}/{name}", drive, 1, "lv", 4096, (Segment(0, 0, 4096),), "xfs", None)

    vols = [
        lv("drive-scsi0", "pve/root"),
        lv("drive-scsi1", "pve/root"),
        lv("drive-scsi1", "vg1/a"),
    ]
    shared = _shared_vg_names(vols)
    assert sorted(shared) == ["drive-scsi0/pve/root", "drive-scsi1/pve/root"]
    assert "VG 'pve' is also on another drive" in shared["drive-scsi0/pve/root"]
    assert _shared_vg_names(vols[1:]) == {}
