"""Which process serves a mount point, and waiting until it is gone.

``fusermount3 -u`` returns as soon as the kernel has dropped the mount; the
filesystem process may still be finishing (writing a side index) and still
holds the archive open, so unmounting the filesystem the archive lives on
right after would fail with "target is busy".  The filesystem process
therefore holds an exclusive :func:`fcntl.flock` on a small file named
after its mount point for as long as it lives (the kernel releases it when
the process exits, however it exits); ``vmafs umount`` waits until it can
take the lock itself.  The file holds the process id, for messages.

The files live in ``/run/vmafs`` for root, ``$XDG_RUNTIME_DIR/vmafs`` for
other users (``/tmp/vmafs-UID`` without it): a tmpfs, emptied at boot.  The
waiter removes the file once the process is gone (every ``vmafs get`` mounts
on a new temporary directory: its files would pile up), under the exclusive
lock and only if the name still leads to the file it locked; a new holder
checks the same after taking the lock, and starts over on a removed file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time

from .errors import MountError

#: Seconds ``vmafs umount`` waits for the filesystem process to exit.
EXIT_TIMEOUT = 60.0


def lock_dir() -> str:
    """The directory of the lock files of this user's mounts."""
    if os.getuid() == 0:
        return "/run/vmafs"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "vmafs") if runtime else f"/tmp/vmafs-{os.getuid()}"


def lock_path(mountpoint: str) -> str:
    """The lock file of the process serving *mountpoint* (an absolute, resolved path)."""
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:32]
    return os.path.join(lock_dir(), key + ".lock")


def hold(mountpoint: str) -> int:
    """Take the lock of *mountpoint* for this process; returns its fd (keep it open).

    Raises :class:`MountError` if the lock file cannot be made: without it
    ``vmafs umount`` could not wait for this process.
    """
    path = lock_path(mountpoint)
    for _ in range(_HOLD_ATTEMPTS):
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise MountError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MountError(
                f"{mountpoint}: another vmafs process still serves it (lock {path}); "
                "wait for it to exit, or 'vmafs umount' it first"
            ) from None
        if _names(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # a waiter removed it between our open and flock: a new one
    raise MountError(f"cannot take the lock file {path}: it keeps being replaced")


#: Times :func:`hold` starts over on a lock file that a waiter removed meanwhile.
_HOLD_ATTEMPTS = 10


def _names(fd: int, path: str) -> bool:
    """Whether *path* still leads to the file open as *fd*."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def wait_released(mountpoint: str, timeout: float = EXIT_TIMEOUT) -> None:
    """Return once no process holds the lock of *mountpoint* (at once if none ever did),
    and remove its lock file.

    Raises :class:`MountError` naming the process if it still runs after
    *timeout* seconds.
    """
    path = lock_path(mountpoint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # no lock file: no vmafs process ever served it (or /run was emptied)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if _names(fd, path):
                    os.unlink(path)  # the process is gone; its holder would start over
                return
            if time.monotonic() >= deadline:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise MountError(
                    f"{mountpoint} is unmounted, but its filesystem process (pid {pid}) "
                    f"has not exited after {timeout:.0f} s and still holds the archive "
                    f"open; see its log, wait, or stop it with 'kill {pid}'"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    finally:
        os.close(fd)
