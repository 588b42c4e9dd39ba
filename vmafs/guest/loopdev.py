"""Read-only loop devices and mounts by system call, for the kernel engine.

``losetup``, ``mount`` and ``umount`` are each a process to start (and,
after a cold start, a binary and libraries to read from disk): four of
them cost a one-file ``vmafs get`` ~0.1 s.  The same steps are a few
ioctls and two system calls:

- :func:`attach` takes a free device from ``/dev/loop-control`` and binds
  the file to it read-only with ``LOOP_CONFIGURE`` (Linux 5.8), with
  ``LO_FLAGS_AUTOCLEAR`` set from the start: the device detaches itself
  when its last user lets go (the mount, or the caller's fd if the mount
  never happens), so no step of a teardown can leak it;
- :func:`mount` and :func:`umount` are mount(2) and umount2(2).

Errors are :class:`OSError` with the errno; the caller words them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4

# struct loop_config { u32 fd; u32 block_size; struct loop_info64 info; u64 reserved[8]; }
# struct loop_info64 { u64 device, inode, rdevice, offset, sizelimit; u32 number,
#   encrypt_type, encrypt_key_size, flags; u8 file_name[64], crypt_name[64],
#   encrypt_key[32]; u64 init[2]; }
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s QQ 8Q")

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MNT_DETACH = 2

#: mount(8) option names -> mount(2) flags; the rest goes to the filesystem as data.
FLAG_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

#: How often a free device is asked for when another process takes it first.
_ATTEMPTS = 20

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def attach(path: str) -> tuple[str, int]:
    """(``/dev/loopN``, an open fd of it) with *path* bound read-only and autoclear.

    Close the fd once the device is mounted (or not needed): the device then
    lives exactly as long as its mount.  OSError if no device can be had.
    """
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_ATTEMPTS):
                number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
                config = _LOOP_CONFIG.pack(
                    backing, 0,
                    0, 0, 0, 0, 0,
                    0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                    os.fsencode(path)[:63], b"", b"",
                    0, 0,
                    *([0] * 8),
                )  # fmt: skip
                try:
                    fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                except OSError as e:
                    os.close(fd)
                    if e.errno == errno.EBUSY:  # another process took it meanwhile
                        continue
                    raise
                return device, fd
            raise OSError(errno.EBUSY, "every free loop device was taken by another process")
        finally:
            os.close(control)
    finally:
        os.close(backing)  # the device holds its own reference to the file


def mount(device: str, mountpoint: str, fstype: str, options: str) -> None:
    """mount(2) *device* on *mountpoint*; *options* as for mount(8) (``ro,nodev,noload``)."""
    flags, data = 0, []
    for opt in filter(None, options.split(",")):
        if opt in FLAG_OPTIONS:
            flags |= FLAG_OPTIONS[opt]
        else:
            data.append(opt)
    c = _c()
    if c.mount(
        os.fsencode(device),
        os.fsencode(mountpoint),
        fstype.encode(),
        ctypes.c_ulong(flags),
        ",".join(data).encode() or None,
    ):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), mountpoint)


def umount(mountpoint: str, *, lazy: bool = False) -> None:
    """umount2(2) *mountpoint* (``MNT_DETACH`` with *lazy*)."""
    if _c().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), mountpoint)
