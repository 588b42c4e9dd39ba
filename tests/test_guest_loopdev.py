"""Read-only loop devices and mounts by system call (vmafs.guest.loopdev)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from vmafs.guest import loopdev


def _sys(device: str, name: str) -> str:
    with open(f"/sys/block/{os.path.basename(device)}/{name}") as f:
        return f.read().strip()


def _gone(device: str, timeout: float = 10.0) -> bool:
    """Whether *device* has no backing file (any more); autoclear is asynchronous."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/block/{os.path.basename(device)}/loop/backing_file"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_attach_is_read_only_autoclear_and_frees_itself(tmp_path, require_loop):
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    img = tmp_path / "img"
    img.write_bytes(b"vmafs loopdev\n".ljust(1 << 20, b"\0"))
    device, fd = loopdev.attach(str(img))
    try:
        assert _sys(device, "loop/backing_file") == str(img)
        assert _sys(device, "ro") == "1"
        assert _sys(device, "loop/autoclear") == "1"
        assert os.pread(fd, 14, 0) == b"vmafs loopdev\n"
        w = os.open(device, os.O_WRONLY)  # root may open it, but not write to it
        try:
            with pytest.raises(OSError):
                os.pwrite(w, b"x" * 512, 0)
        finally:
            os.close(w)
    finally:
        os.close(fd)
    assert _gone(device)  # the last user let go: detached with nothing else to do


def _image_and_mountpoint(tmp_path, *, ext4: bool):
    """An 8 MiB image (ext4, or zeros) and an empty directory; skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    if ext4:
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    where = tmp_path / "mnt"
    where.mkdir()
    return img, where


def test_mount_and_umount_by_system_call(tmp_path, require_loop):
    img, where = _image_and_mountpoint(tmp_path, ext4=True)
    device, fd = loopdev.attach(str(img))
    try:
        loopdev.mount(device, str(where), "ext4", "ro,nosuid,nodev,noexec,noload")
    finally:
        os.close(fd)
    try:
        assert os.path.isdir(where / "lost+found")
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if ln.split()[1] == str(where))
        assert line.split()[0] == device and "ro" in line.split()[3].split(",")
        assert "noexec" in line.split()[3].split(",")
        busy = os.open(where, os.O_RDONLY)  # busy while anything in it is open
        try:
            with pytest.raises(OSError):
                loopdev.umount(str(where))
        finally:
            os.close(busy)
    finally:
        if os.path.ismount(where):
            loopdev.umount(str(where))
    assert not os.path.ismount(where)
    assert _gone(device)  # the mount let go: autoclear freed the device


def test_mount_failure_is_an_oserror_and_leaks_no_device(tmp_path, require_loop):
    img, where = _image_and_mountpoint(tmp_path, ext4=False)
    device, fd = loopdev.attach(str(img))
    try:
        with pytest.raises(OSError):
            loopdev.mount(device, str(where), "ext4", "ro,noload")
    finally:
        os.close(fd)
    assert not os.path.ismount(where)
    assert _gone(device)
