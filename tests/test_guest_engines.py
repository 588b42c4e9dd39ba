"""Every file of every guest-disk fixture comes back exact through both engines.

The fixtures (tests/fixtures/guests/) were built by real tools: GPT with ext4,
an LVM VG ``pve`` with XFS and btrfs (a subvolume, a symlink, a name with
spaces); MBR with NTFS (a Unicode name).  Each engine gets one session per
archive (module scope: the appliance launches once per archive, ~15 s without
KVM), reads every volume, and copies each volume's root with ``get``'s copy;
both must match the manifest exactly (paths, types, sizes, sha256, symlink
targets).
"""

from __future__ import annotations

import os

import pytest
from guesttree import ARCHIVES, copy_archive, expected, tree_of_dir, tree_of_fs, volumes

from vmafs.guest.copy import copy_tree
from vmafs.guest.paths import resolve
from vmafs.guest.session import GuestSession

CASES = [(a, v["name"]) for a in ARCHIVES for v in volumes(a)]


def _session(tmp_path_factory, archive: str, engine: str):
    path = copy_archive(archive, tmp_path_factory.mktemp(f"{engine}-archive"))
    return GuestSession(str(path), engine)


def _sessions(tmp_path_factory, engine: str):
    """One open session per fixture archive, closed at the end of the module."""
    sessions = {}
    try:
        for archive in ARCHIVES:
            sessions[archive] = _session(tmp_path_factory, archive, engine).__enter__()
        yield sessions
    finally:
        for s in sessions.values():
            s.close()


@pytest.fixture(scope="module")
def kernel_sessions(tmp_path_factory, require_fuse, require_loop):
    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    yield from _sessions(tmp_path_factory, "kernel")


@pytest.fixture(scope="module")
def appliance_sessions(tmp_path_factory, require_fuse, require_guestfs):
    yield from _sessions(tmp_path_factory, "appliance")


def _check_volume(session, archive: str, name: str, tmp_path) -> None:
    want = expected(next(v for v in volumes(archive) if v["name"] == name))
    fs = session.open(session.find(name))
    assert tree_of_fs(fs) == want
    dest = tmp_path / "copy"
    dest.mkdir()
    copy_tree(fs, resolve(fs, "/", follow_last=False), str(dest))
    assert tree_of_dir(dest) == want


@pytest.mark.parametrize(("archive", "volume"), CASES)
def test_kernel_engine_reads_every_file(kernel_sessions, archive, volume, tmp_path):
    _check_volume(kernel_sessions[archive], archive, volume, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("archive", "volume"), CASES)
def test_appliance_engine_reads_every_file(appliance_sessions, archive, volume, tmp_path):
    _check_volume(appliance_sessions[archive], archive, volume, tmp_path)


def test_kernel_engine_leaves_nothing_mounted(tmp_path, require_fuse, require_loop):
    """After the session: no FUSE mount, no guest mount, no loop device, no directory."""
    from vmafs.mount import loop_devices_on, mount_table

    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    path = copy_archive("pve-gpt.vma.zst", tmp_path)
    with GuestSession(str(path), "kernel") as s:
        for v in ("scsi0/p1", "scsi0/pve/root", "scsi0/pve/data"):
            s.open(s.find(v))
        workdir = s.workdir
        assert sum(p.startswith(workdir) for p in mount_table()) == 4
    assert not any(p.startswith(workdir) for p in mount_table())
    assert not loop_devices_on(workdir)
    assert not os.path.exists(workdir)


def _side_index_found(path) -> bool:
    from vmafs import sidecar
    from vmafs.source import open_source

    source = open_source(str(path))
    try:
        return sidecar.find(source) is not None
    finally:
        source.close()


def test_session_serves_the_archive_it_opened(tmp_path, require_fuse, require_loop):
    """One open: the mount comes up at the first open() and serves the session's own
    Archive; the one-frame .zst's side index is written by the filesystem process
    after the mount is ready, so it exists once the session is closed."""
    if os.geteuid() != 0:
        pytest.skip("the kernel engine needs root")
    path = copy_archive("pve-gpt.vma.zst", tmp_path)
    assert not _side_index_found(path)
    with GuestSession(str(path), "kernel") as s:
        assert s.mountpoint is None  # nothing mounted before a volume is opened
        volume = s.find("scsi0/pve/root")
        assert [v.name for v in s.volumes if v.drive == "drive-scsi0"][0] == "drive-scsi0/p1"
        fs = s.open(volume)
        assert s.mountpoint is not None
        want = expected(next(v for v in volumes("pve-gpt.vma.zst") if v["name"] == volume.name))
        assert tree_of_fs(fs) == want
    assert _side_index_found(path)


def test_session_never_mounted_still_saves_the_side_index(tmp_path):
    """A session that fails before mounting (no such volume) writes the side index
    its open made when it closes, and leaves no directory behind."""
    from vmafs.errors import VolumeNotFoundError

    path = copy_archive("pve-gpt.vma.zst", tmp_path)
    s = GuestSession(str(path), "kernel")
    s._start()  # the set-up without the root check: this test mounts nothing
    try:
        with pytest.raises(VolumeNotFoundError, match="drive-scsi0/p1"):
            s.find("scsi0/p9")
    finally:
        s.close()
    assert s.workdir is None and s.mountpoint is None
    assert _side_index_found(path)
