"""Small helpers shared by the benchmark modules: processes, timing, mounts."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

#: how the bench runs the CLI: the same interpreter and this checkout of vmafs
VMAFS = [sys.executable, "-m", "vmafs"]
SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(SCRIPTS)


def use_this_checkout() -> None:
    """Let child processes (``python -m vmafs``, ``python -m bench.probe``) import
    the vmafs and the bench that this run comes from, byte-compiled.

    An installed vmafs has its ``.pyc`` files (pip and Debian's py3compile
    write them at install); a checkout gets them at its first run, unless
    PYTHONDONTWRITEBYTECODE is set, as on some CI and sandbox machines.
    Then every ``vmafs`` process the bench times would compile its ~40
    modules from source (0.15 s of a one-file ``vmafs get``), which no user
    pays: they are compiled here, once, into the checkout's ``__pycache__``.
    """
    import compileall

    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [REPO, SCRIPTS, *(p for p in parts if p not in (REPO, SCRIPTS))]
    )
    for package in ("vmafs", "writer", os.path.join("scripts", "bench")):
        compileall.compile_dir(os.path.join(REPO, package), quiet=1)


class Skip(Exception):
    """A figure cannot run here; the message goes into its table row."""


def run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """Run *cmd*, raising with its stderr tail on failure."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run(list(cmd), **kw)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip() if isinstance(p.stderr, bytes) else ""
        tail = err.splitlines()[-1] if err else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {tail}")
    return p


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) process *pid* has used so far:
    for a server that is not our child (a daemon), read before it stops."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: Sequence[str], **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of running *cmd* to completion."""
    c0, t0 = child_cpu(), time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - t0, child_cpu() - c0


def wait_for_path(path: str, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Wait until *path* exists (a socket a child creates); fail if *proc* exits first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before creating {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.01)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Skip(f"`{tool}` not found")
    return path


def drop_caches() -> None:
    """Cold page cache: write back, then drop clean pages, dentries and inodes."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise Skip(f"cannot drop caches ({e.strerror}; needs root)") from e


def warm(path: str, size: int | None = None) -> None:
    """Read *path* (up to *size* bytes) once so it sits in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        left = size if size is not None else 1 << 62
        while left > 0:
            n = f.readinto(buf)
            if not n:
                break
            left -= n


def fsync_path(path: str) -> None:
    """Write *path*'s data to storage (fsync of a fresh descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Drop *path*'s pages from the page cache (keeps memory free for the next figure)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str, bs: int = 1 << 20) -> int:
    """Read *path* sequentially with *bs*-sized reads (as ``dd bs=``); bytes read."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(bs)
        while True:
            n = os.readv(fd, [buf])
            if not n:
                return total
            total += n
    finally:
        os.close(fd)


def dd(path: str, bs: str = "1M", count: int | None = None) -> float:
    """Wall seconds of ``dd if=PATH of=/dev/null bs=BS``."""
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "status=none"]
    if count is not None:
        cmd.append(f"count={count}")
    return timed(cmd)[0]


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


#: pseudo mount option: after mounting, set the FUSE mount's readahead (root only)
READAHEAD = "bench_read_ahead_kb="


def set_read_ahead(mnt: str, kb: int) -> None:
    """Set /sys/class/bdi/<mount's device>/read_ahead_kb (the kernel's default for
    FUSE is 128, which makes buffered reads 128 KiB requests)."""
    st = os.stat(mnt)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        raise Skip(f"cannot set {path} ({e.strerror})") from e


@contextlib.contextmanager
def vmafs_mount(archive: str, mnt: str, options: Sequence[str] = ()) -> Iterator[float]:
    """``vmafs mount`` (returns when ready); yields the seconds it took."""
    os.makedirs(mnt, exist_ok=True)
    ra = [o for o in options if o.startswith(READAHEAD)]
    options = [o for o in options if not o.startswith(READAHEAD)]
    cmd = [*VMAFS, "mount", archive, mnt]
    if options:
        cmd += ["-o", ",".join(options)]
    t = timed(cmd)[0]
    try:
        if ra:
            set_read_ahead(mnt, int(ra[0][len(READAHEAD) :]))
        yield t
    finally:
        umount(mnt)


def umount(mnt: str) -> None:
    for _ in range(50):
        if not is_mountpoint(mnt):
            return
        p = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        if p.returncode == 0:
            return
        p = subprocess.run(["umount", mnt], capture_output=True)
        if p.returncode == 0:
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextlib.contextmanager
def loop_ro(path: str) -> Iterator[str]:
    """``losetup -r`` *path*; yields the loop device; detaches it afterwards."""
    need("losetup")
    dev = run(["losetup", "-r", "-f", "--show", path], stdout=subprocess.PIPE).stdout
    dev = dev.decode().strip()
    try:
        yield dev
    finally:
        for _ in range(50):
            if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def ext4_ro(dev: str, mnt: str) -> Iterator[str]:
    """``mount -o ro,noload`` the guest ext4 on *dev* at *mnt*."""
    os.makedirs(mnt, exist_ok=True)
    run(["mount", "-t", "ext4", "-o", "ro,noload", dev, mnt])
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@contextlib.contextmanager
def tempdir(parent: str, prefix: str) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(len(sorted_values) * q))
    return sorted_values[i]


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:.0f} MB/s"
