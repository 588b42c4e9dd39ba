"""``vmafs mount --guest`` and ``vmafs umount``: every guest filesystem of the fixtures
mounted read-only under one directory, every file exact, and all of it taken down
again, also after the archive's FUSE daemon (and the appliance) was killed.

The kernel engine runs every case; the appliance engine (one libguestfs launch
per tree, ~15 s without KVM) runs each fixture once and the kill case once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import is_mounted, unmount, vmafs_cmd
from guesttree import copy_archive, expected, tree_of_dir, volumes

from vmafs.guest import tree as guest_tree
from vmafs.guest.appliance import tagged_processes
from vmafs.mount import loop_devices_on, mount_table

KERNEL = ("--engine", "kernel")


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("mount --guest needs root")


def _run(*args, check=True):
    proc = subprocess.run(vmafs_cmd(*args), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _leftovers(top: str) -> list[str]:
    return [p for p in mount_table() if p == top or p.startswith(top + "/")]


@pytest.fixture
def guest_dir(tmp_path, require_fuse, require_loop, root_only):
    top = tmp_path / "guest"
    top.mkdir()
    yield top
    # Safety net only: the tests unmount themselves and check that they did.
    if guest_tree.load(str(top)) is not None:
        _run("umount", top, check=False)
    for p in sorted(_leftovers(str(top)), reverse=True):
        unmount(p, fuse=True)


def _daemon_pid(archive) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"vmafs mount --guest .*{archive}"], capture_output=True, text=True
    ).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def _check_tree(guest_dir, archive: str, stderr: str, mount_type: str | None = None) -> None:
    """Every file of *archive*'s manifest exact under DIR/<volume>, each volume a mount
    (of *mount_type* when given), read-only, the LVM PV left out with a note."""
    drive = volumes(archive)[0]["name"].split("/")[0]
    assert os.path.isfile(guest_dir / "archive" / f"disk-{drive}.raw")
    for v in volumes(archive):
        assert tree_of_dir(guest_dir / v["name"]) == expected(v), v["name"]
        fstype = mount_table()[str(guest_dir / v["name"])]
        assert mount_type in (None, fstype), (v["name"], fstype)
    with pytest.raises(OSError):  # read-only all the way
        (guest_dir / volumes(archive)[0]["name"] / "new").write_bytes(b"x")
    if archive.startswith("pve"):
        assert "drive-scsi0/p2: not mounted: an LVM physical volume" in stderr


@pytest.mark.parametrize("archive", ["pve-gpt.vma.zst", "ntfs-mbr.vma"])
def test_mount_guest_shows_every_file_and_umount_takes_all_down(guest_dir, tmp_path, archive):
    path = copy_archive(archive, tmp_path / "a")
    proc = _run("mount", "--guest", *KERNEL, path, guest_dir)
    top = str(guest_dir)
    try:
        _check_tree(guest_dir, archive, proc.stderr)
    finally:
        _run("umount", guest_dir)
    assert _leftovers(top) == []
    assert loop_devices_on(top) == []
    assert guest_tree.load(top) is None
    assert os.listdir(guest_dir) == []


def test_umount_after_the_daemon_died(guest_dir, tmp_path):
    path = copy_archive("ntfs-mbr.vma", tmp_path / "a")
    _run("mount", "--guest", *KERNEL, path, guest_dir)
    os.kill(_daemon_pid(path), signal.SIGKILL)
    _wait_dead(guest_dir / "archive")
    _run("umount", guest_dir)
    assert _leftovers(str(guest_dir)) == []
    assert loop_devices_on(str(guest_dir)) == []
    assert not is_mounted(guest_dir)


def test_umount_finishes_what_was_undone_by_hand(guest_dir, tmp_path):
    path = copy_archive("pve-gpt.vma.zst", tmp_path / "a")
    _run("mount", "--guest", *KERNEL, path, guest_dir)
    subprocess.run(["umount", guest_dir / "drive-scsi0" / "pve" / "root"], check=True)
    _run("umount", guest_dir)
    assert _leftovers(str(guest_dir)) == []


def test_mount_guest_refuses_a_non_empty_directory(guest_dir, tmp_path):
    path = copy_archive("ntfs-mbr.vma", tmp_path / "a")
    (guest_dir / "x").write_text("mine")
    proc = _run("mount", "--guest", *KERNEL, path, guest_dir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("vmafs: error: ") and "not empty" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert _leftovers(str(guest_dir)) == []


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["kernel", "appliance"])
def test_a_failed_mount_guest_takes_down_what_it_made(guest_dir, tmp_path, request, engine):
    """A volume that fails to mount (a damaged filesystem) leaves nothing behind:
    no mount, no loop device, no appliance process, no state."""
    if engine == "appliance":
        request.getfixturevalue("require_guestfs")
    path = copy_archive("pve-gpt.vma.zst", tmp_path / "a")
    # LV root's XFS superblock keeps its fields (so it is still typed xfs) but
    # gets a wrong CRC, which the kernel refuses; then a new archive of that disk.
    raw = tmp_path / "disk.raw"
    _run("extract", path, tmp_path / "x")
    os.rename(tmp_path / "x" / "disk-drive-scsi0.raw", raw)
    with open(raw, "r+b") as f:
        f.seek(270532608)  # LV root's first byte (vmafs volumes --json: disk_offset)
        assert f.read(4) == b"XFSB"
        f.seek(270532608 + 224)  # sb_crc
        f.write(b"\xff" * 4)
    broken = tmp_path / "broken.vma"
    _run("create", broken, f"drive-scsi0={raw}:raw")
    proc = _run("mount", "--guest", "--engine", engine, broken, guest_dir, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("vmafs: error: drive-scsi0/pve/root: "), proc.stderr
    assert proc.stderr.count("\n") == 1
    assert _leftovers(str(guest_dir)) == []
    assert loop_devices_on(str(guest_dir)) == []
    assert guest_tree.load(str(guest_dir)) is None
    assert not os.path.exists(guest_tree.appliance_dir(str(guest_dir)))
    assert _processes_naming(str(guest_dir)) == []


def _processes_naming(text: str) -> list[int]:
    """Pids whose command line holds *text* (the appliance's worker names its disks)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


def _wait_dead(path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.listdir(path)
        except OSError:
            return  # ENOTCONN: the mount is dead
        time.sleep(0.05)
    pytest.fail(f"{path} still answers after its process was killed")


def test_without_libguestfs_the_default_engine_says_what_to_do(tmp_path):
    env = dict(os.environ, VMAFS_GUESTFS_PYTHON="/nonexistent/python3")
    proc = subprocess.run(
        vmafs_cmd("mount", "--guest", "x.vma", tmp_path), capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("vmafs: error: ") and proc.stderr.count("\n") == 1
    assert "libguestfs-tools python3-guestfs" in proc.stderr
    assert "--engine kernel" in proc.stderr
    assert os.listdir(tmp_path) == []


# -- the appliance engine: one launch per tree ----------------------------------------


def _appliance_pieces(top: str) -> tuple[str, str]:
    """(the appliance's private mount, its processes' tag) from the state file."""
    tree = guest_tree.load(top)
    assert tree is not None and tree.engine == "appliance" and tree.appliance
    return tree.appliance["mount"], tree.appliance["tag"]


def _all_gone(top: str, private: str, tag: str) -> None:
    assert _leftovers(top) == []
    assert private not in mount_table() and not os.path.exists(private)
    assert tagged_processes(tag) == []
    assert guest_tree.load(top) is None
    assert os.listdir(top) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("archive", "engine"),
    [("pve-gpt.vma.zst", ("--engine", "appliance")), ("ntfs-mbr.vma", ())],
    ids=["pve-gpt", "ntfs-mbr-default-engine"],
)
def test_appliance_mount_guest_shows_every_file(
    guest_dir, tmp_path, require_guestfs, archive, engine
):
    path = copy_archive(archive, tmp_path / "a")
    proc = _run("mount", "--guest", *engine, path, guest_dir)
    top = str(guest_dir)
    private, tag = _appliance_pieces(top)  # also: no --engine chose the appliance
    try:
        assert len([p for p in tagged_processes(tag) if os.getsid(p) == p]) == 1  # one worker
        # each volume is the appliance's FUSE mount: the host kernel parses no guest fs
        _check_tree(guest_dir, archive, proc.stderr, mount_type="fuse.vmafs-appliance")
    finally:
        _run("umount", guest_dir)
    _all_gone(top, private, tag)


@pytest.mark.slow
def test_appliance_tree_umount_after_its_processes_were_killed(
    guest_dir, tmp_path, require_guestfs
):
    """SIGKILL to the archive's FUSE daemon and to the appliance's worker: umount
    still takes every mount down, ends what is left of the appliance (its QEMU)
    and removes the private directory."""
    path = copy_archive("ntfs-mbr.vma", tmp_path / "a")
    _run("mount", "--guest", "--engine", "appliance", path, guest_dir)
    top = str(guest_dir)
    private, tag = _appliance_pieces(top)
    (worker,) = [p for p in tagged_processes(tag) if os.getsid(p) == p]
    os.kill(worker, signal.SIGKILL)
    os.kill(_daemon_pid(path), signal.SIGKILL)
    _wait_dead(guest_dir / "drive-sata0" / "p1")
    _wait_dead(guest_dir / "archive")
    _run("umount", guest_dir)
    _all_gone(top, private, tag)
