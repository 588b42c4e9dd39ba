"""Guest paths and ``vmafs get``'s copy, over a real directory tree standing in for a
mounted guest filesystem (KernelFS reads any directory: no root, no archive needed).

What these pin down: a guest's symlinks resolve inside the guest root, never on
the host; a copy never writes outside DEST, never follows a symlink there,
never overwrites without being told, and keeps contents, modes, times and
symlinks but not setuid bits.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

from vmafs.errors import GuestError
from vmafs.guest.copy import check_name, copy_tree
from vmafs.guest.kernel import KernelFS
from vmafs.guest.paths import parse_guest_path, resolve

MTIME = 1_600_000_000_123_456_789


@pytest.fixture
def guest(tmp_path):
    """A small 'guest root' with the awkward cases, and its host-side decoy."""
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").write_bytes(b"guest fstab\n")
    (root / "home" / "alice").mkdir(parents=True)
    (root / "home" / "alice" / "notes.txt").write_bytes(b"alice's notes\n")
    (root / "root").mkdir()
    os.symlink("/home/alice/notes.txt", root / "root" / "notes-link")  # absolute: guest's /
    os.symlink("../../../../../../etc", root / "root" / "up")  # climbs past the root
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    suid = root / "bin-suid"
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    os.utime(root / "etc" / "fstab", ns=(MTIME, MTIME))
    os.mkfifo(root / "fifo")
    return KernelFS(str(root), "drive-test/p1")


def test_parse_guest_path():
    p = parse_guest_path("scsi0/pve/root:/etc//./fstab")
    assert (p.volume, p.path) == ("scsi0/pve/root", "/etc/fstab")
    assert parse_guest_path("scsi0/p1:").path == "/"
    for bad in ("scsi0/p1", ":/etc", "scsi0/p1:etc", "scsi0/p1:/a\0b"):
        with pytest.raises(GuestError):
            parse_guest_path(bad)


def test_absolute_symlink_resolves_in_the_guest_root(guest):
    entry = resolve(guest, "/root/notes-link")
    assert entry.path == "/home/alice/notes.txt"
    assert b"".join(guest.read(entry.path, 4)) == b"alice's notes\n"
    link = resolve(guest, "/root/notes-link", follow_last=False)
    assert (link.kind, link.target) == ("symlink", "/home/alice/notes.txt")


def test_dotdot_stops_at_the_guest_root(guest):
    assert resolve(guest, "/root/up/fstab").path == "/etc/fstab"  # the guest's, not the host's
    assert resolve(guest, "/../../etc/fstab").path == "/etc/fstab"


def test_resolve_errors(guest):
    with pytest.raises(GuestError) as e:
        resolve(guest, "/loop-a")
    assert e.value.errno == errno.ELOOP
    with pytest.raises(GuestError) as e:
        resolve(guest, "/etc/fstab/x")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(GuestError) as e:
        resolve(guest, "/nope")
    assert e.value.errno == errno.ENOENT and "drive-test/p1:/nope" in str(e.value)


def test_copy_a_tree_keeps_contents_modes_times_symlinks(guest, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    result = copy_tree(guest, resolve(guest, "/", follow_last=False), str(dest))
    assert (dest / "etc" / "fstab").read_bytes() == b"guest fstab\n"
    assert os.lstat(dest / "etc" / "fstab").st_mtime_ns == MTIME
    assert os.readlink(dest / "root" / "notes-link") == "/home/alice/notes.txt"
    assert stat.S_IMODE(os.lstat(dest / "bin-suid").st_mode) == 0o755  # setuid dropped
    assert not (dest / "fifo").exists()
    assert result.skipped == ["drive-test/p1:/fifo: skipped (a FIFO)"]
    assert (result.files, result.symlinks, result.dirs) == (3, 4, 4)


def test_copy_a_file_into_a_directory_or_as_a_name(guest, tmp_path):
    src = resolve(guest, "/etc/fstab")
    copy_tree(guest, src, str(tmp_path))
    assert (tmp_path / "fstab").read_bytes() == b"guest fstab\n"
    copy_tree(guest, src, str(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_bytes() == b"guest fstab\n"
    with pytest.raises(GuestError, match="does not exist"):
        copy_tree(guest, src, str(tmp_path / "no" / "such" / "dir"))


def test_copy_refuses_to_overwrite_unless_forced(guest, tmp_path):
    (tmp_path / "fstab").write_bytes(b"mine\n")
    src = resolve(guest, "/etc/fstab")
    with pytest.raises(GuestError, match="exists; use --force"):
        copy_tree(guest, src, str(tmp_path))
    assert (tmp_path / "fstab").read_bytes() == b"mine\n"
    copy_tree(guest, src, str(tmp_path), overwrite=True)
    assert (tmp_path / "fstab").read_bytes() == b"guest fstab\n"


def test_copy_never_follows_a_symlink_in_dest(guest, tmp_path):
    """A symlink waiting in DEST under the copied name is replaced, never written through."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"must stay\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "fstab")
    src = resolve(guest, "/etc/fstab")
    with pytest.raises(GuestError, match="exists"):
        copy_tree(guest, src, str(dest))
    copy_tree(guest, src, str(dest), overwrite=True)
    assert outside.read_bytes() == b"must stay\n"
    assert not os.path.islink(dest / "fstab")
    assert (dest / "fstab").read_bytes() == b"guest fstab\n"


def test_a_directory_symlink_in_dest_is_not_merged_into(guest, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "etc")
    copy_tree(guest, resolve(guest, "/etc"), str(dest), overwrite=True)
    assert os.listdir(outside) == []
    assert (dest / "etc" / "fstab").read_bytes() == b"guest fstab\n"


def test_the_volume_root_into_a_non_empty_dest_checks_every_name_first(guest, tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(GuestError, match="root exists"):
        copy_tree(guest, resolve(guest, "/"), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["guest", "root"]  # nothing written


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\0b"])
def test_hostile_entry_names_are_refused(name):
    with pytest.raises(GuestError, match="not a plain name"):
        check_name(name, "drive-test/p1:/")


def test_check_name_accepts_plain_names():
    assert check_name("Ünïcödé name.txt", "x") == "Ünïcödé name.txt"
    assert check_name("...", "x") == "..."
