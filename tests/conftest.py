"""Shared test infrastructure: real-part probes, fixture archives, CLI helpers.

Real parts only (docs/dev/CONVENTIONS.md): tests that need the kernel's FUSE, loop
devices or QEMU ask for them through the session fixtures below.  Each probe
really exercises the part once per session (a FUSE round trip, a loop device
attach/detach, the QEMU binaries running) and

- SKIPS the tests that need it when it is missing on a developer's machine,
- FAILS them when the environment variable CI is true, so CI can never go
  green by skipping what it was meant to test.

Tests that use a probe fixture are given the matching marker (fuse, loop,
qemu) automatically, so ``pytest -m "not fuse"`` works even when a test
forgets ``@pytest.mark.fuse``.

Helpers importable from test modules (pytest puts tests/ on sys.path):

    from conftest import FIXTURES_DIR, fixture_archives, load_manifest, vmafs_cmd
    from conftest import is_mounted, loop_device, unmount
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
COMPRESSED_SUFFIXES = (".zst", ".gz", ".lzo")
PROBE_TIMEOUT = 60  # seconds; a probe that hangs is a broken part, not a slow one


def in_ci() -> bool:
    """True when the environment variable CI says we run in CI (CI=true)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _unavailable(what: str) -> None:
    """Skip (locally) or fail (CI=true) the requesting test because *what* is missing."""
    if in_ci():
        pytest.fail(f"{what} [CI=true: a missing part fails the run]", pytrace=False)
    pytest.skip(what)


# --- the CLI --------------------------------------------------------------------------


def vmafs_cmd(*args: str | os.PathLike) -> list[str]:
    """argv that runs this checkout's CLI with the test interpreter, plus *args*.

    ``subprocess.run(vmafs_cmd("list", archive), ...)``
    """
    return [sys.executable, "-m", "vmafs", *map(str, args)]


# --- fixture archives -------------------------------------------------------------------


def fixture_archives(*, compressed: bool = True) -> list[Path]:
    """Every Proxmox-written archive in tests/fixtures, sorted by name.

    For ``@pytest.mark.parametrize`` (fixtures cannot parametrize at collection
    time). ``compressed=False`` gives only the plain ``.vma`` files.
    """
    out = []
    for p in sorted(FIXTURES_DIR.iterdir()):
        if p.name.endswith(".vma"):
            out.append(p)
        elif compressed and p.name.endswith(tuple(".vma" + s for s in COMPRESSED_SUFFIXES)):
            out.append(p)
    return out


def load_manifest(name: str | os.PathLike) -> dict:
    """The JSON manifest for a fixture archive.

    *name* may be ``"ext4-guest"``, ``"ext4-guest.vma"``, ``"ext4-guest.vma.zst"``
    or a path to any of those: compressed copies share the plain archive's
    manifest (same VMA stream inside).
    """
    base = Path(name).name
    for suffix in COMPRESSED_SUFFIXES:
        base = base.removesuffix(".vma" + suffix + ".json").removesuffix(".vma" + suffix)
    base = base.removesuffix(".json").removesuffix(".vma")
    path = FIXTURES_DIR / f"{base}.vma.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path} for fixture {name!r}")
    with path.open() as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """tests/fixtures: Proxmox-written archives and their manifests (see its README)."""
    return FIXTURES_DIR


@pytest.fixture(scope="session", autouse=True)
def side_index_cache(tmp_path_factory) -> Path:
    """The side-index cache of the whole run (``VMAFS_CACHE_DIR``, inherited by the
    commands tests start): never the machine's /var/cache/vmafs or ~/.cache/vmafs."""
    path = tmp_path_factory.mktemp("vmafs-cache")
    os.environ["VMAFS_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def manifest():
    """``manifest(name) -> dict``: load a fixture's manifest (see ``load_manifest``)."""
    return load_manifest


# --- cleanup helpers --------------------------------------------------------------------


def is_mounted(path: str | os.PathLike) -> bool:
    """True if *path* is a mount point, per /proc/self/mountinfo.

    Unlike ``os.path.ismount`` this also sees a FUSE mount whose process died
    (stat fails with ENOTCONN there, and ismount says False).
    """
    target = os.path.realpath(path)  # non-strict: a dead mount's ENOTCONN is ignored
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4]
            # mountinfo escapes space, tab, newline and backslash as \ooo
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt)
            if mnt == target:
                return True
    return False


def unmount(path: str | os.PathLike, *, fuse: bool = True) -> None:
    """Unmount *path* if it is mounted (dead FUSE mounts included), lazily as a
    last resort. Never raises.

    For finally blocks and fixture teardown: a FUSE mount that still has a loop
    device attached cannot be unmounted, so detach loop devices first.
    """
    path = os.fspath(path)
    attempts = [["fusermount3", "-u", path]] if fuse else []
    attempts += [["umount", path], ["umount", "-l", path]]
    if fuse:
        attempts.append(["fusermount3", "-u", "-z", path])
    for argv in attempts:
        if not is_mounted(path):
            return
        if shutil.which(argv[0]) is None:
            continue
        try:
            subprocess.run(argv, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pass


@contextlib.contextmanager
def loop_device(path: str | os.PathLike, *, read_only: bool = True) -> Iterator[str]:
    """Attach *path* to a free loop device, yield its name, always detach.

    Needs ``require_loop``. ``losetup -r`` by default: vmafs mounts are read-only.
    """
    argv = ["losetup", "-f", "--show", os.fspath(path)]
    if read_only:
        argv.insert(1, "-r")
    dev = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=PROBE_TIMEOUT
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


# --- real-part probes --------------------------------------------------------------------

# Runs in a child process: mounts a one-file pyfuse3 filesystem, reads the file
# back through the kernel from a worker thread, unmounts. Prints "ok" on success.
_FUSE_PROBE = r"""
import errno, os, stat, sys
import pyfuse3, trio

DATA = b"vmafs fuse probe\n"
FILE_INODE = pyfuse3.ROOT_INODE + 1

class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size = stat.S_IFDIR | 0o555, 0
        elif inode == FILE_INODE:
            a.st_mode, a.st_size = stat.S_IFREG | 0o444, len(DATA)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = inode
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        return a

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"probe":
            return await self.getattr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return DATA[off:off + size]

mnt = sys.argv[1]
pyfuse3.init(Ops(), mnt, {"fsname=vmafs-probe", "ro"})
try:
    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            def check():
                with open(os.path.join(mnt, "probe"), "rb") as f:
                    return f.read()
            got = await trio.to_thread.run_sync(check)
            pyfuse3.terminate()
        return got
    got = trio.run(main)
finally:
    pyfuse3.close(unmount=True)
print("ok" if got == DATA else f"bad data {got!r}")
"""


@pytest.fixture(scope="session")
def require_fuse() -> str:
    """A working FUSE: /dev/fuse, fusermount3, and a real mount + read round trip.

    Returns the path of fusermount3.
    """
    if not os.path.exists("/dev/fuse"):
        _unavailable("FUSE: /dev/fuse does not exist")
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        _unavailable("FUSE: fusermount3 is not on PATH (Debian package fuse3)")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        _unavailable(f"FUSE: pyfuse3 does not import: {e}")
    with tempfile.TemporaryDirectory(prefix="vmafs-fuse-probe-") as mnt:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _FUSE_PROBE, mnt],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            proc = None
        finally:
            unmount(mnt)
        if proc is None:
            _unavailable(f"FUSE: a probe mount did not answer within {PROBE_TIMEOUT}s")
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            detail = (proc.stderr.strip().splitlines() or [proc.stdout.strip()])[-1:]
            _unavailable(f"FUSE: a probe mount failed (exit {proc.returncode}): {detail}")
    return fusermount


@pytest.fixture(scope="session")
def require_compressors() -> SimpleNamespace:
    """The compressors vzdump uses, as commands: zstd, gzip and lzop (paths)."""
    found = {name: shutil.which(name) for name in ("zstd", "gzip", "lzop")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        _unavailable(f"compressors not on PATH: {', '.join(missing)} (Debian packages zstd, lzop)")
    return SimpleNamespace(**found)


@pytest.fixture(scope="session")
def require_loop() -> str:
    """Working loop devices: losetup and mount(8) present, a file can be attached.

    Returns the path of losetup.
    """
    losetup = shutil.which("losetup")
    if losetup is None:
        _unavailable("loop: losetup is not on PATH (Debian package mount)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _unavailable("loop: mount/umount are not on PATH (Debian package mount)")
    if not os.path.exists("/dev/loop-control"):
        _unavailable("loop: /dev/loop-control does not exist (modprobe loop?)")
    with tempfile.TemporaryDirectory(prefix="vmafs-loop-probe-") as tmp:
        img = Path(tmp, "probe.img")
        img.write_bytes(b"vmafs loop probe\n".ljust(1 << 20, b"\0"))
        try:
            with loop_device(img) as dev:
                with open(dev, "rb") as f:
                    head = f.read(16)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            err = getattr(e, "stderr", None) or e
            _unavailable(f"loop: cannot attach a loop device: {str(err).strip()}")
        if head != b"vmafs loop probe":
            _unavailable(f"loop: the attached device reads back {head!r}")
    return losetup


@pytest.fixture(scope="session")
def require_qemu() -> SimpleNamespace:
    """QEMU: qemu-img, qemu-system-x86_64 and qemu-storage-daemon, each runnable.

    Returns a namespace with their paths: ``.qemu_img``, ``.qemu_system``,
    ``.qemu_storage_daemon``.
    """
    return _runnable(
        "QEMU",
        "Debian qemu-utils/qemu-system-x86",
        {
            "qemu_img": "qemu-img",
            "qemu_system": "qemu-system-x86_64",
            "qemu_storage_daemon": "qemu-storage-daemon",
        },
    )


@pytest.fixture(scope="session")
def require_nbd_tools() -> SimpleNamespace:
    """libnbd's clients: nbdinfo and nbdcopy (Debian libnbd-bin), each runnable.

    Returns a namespace with their paths: ``.nbdinfo``, ``.nbdcopy``.
    """
    return _runnable(
        "NBD clients", "Debian package libnbd-bin", {"nbdinfo": "nbdinfo", "nbdcopy": "nbdcopy"}
    )


def _runnable(what: str, package: str, tools: dict[str, str]) -> SimpleNamespace:
    """{attribute: command} found on PATH and answering ``--version``, else unavailable."""
    found = {}
    for attr, name in tools.items():
        path = shutil.which(name)
        if path is None:
            _unavailable(f"{what}: {name} is not on PATH ({package})")
        try:
            proc = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            _unavailable(f"{what}: {name} --version failed: {e}")
        if proc.returncode != 0:
            _unavailable(
                f"{what}: {name} --version exited {proc.returncode}: {proc.stderr.strip()}"
            )
        found[attr] = path
    return SimpleNamespace(**found)


@pytest.fixture(scope="session")
def require_openssl() -> str:
    """openssl(1), to make the x509 certificates of TLS tests. Returns its path."""
    path = shutil.which("openssl")
    if path is None:
        _unavailable("TLS: openssl is not on PATH (Debian package openssl)")
    proc = subprocess.run([path, "version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    if proc.returncode != 0:
        _unavailable(f"TLS: openssl version exited {proc.returncode}")
    return path


@pytest.fixture(scope="session")
def require_guestfs() -> str:
    """libguestfs for the appliance engine: python3-guestfs for /usr/bin/python3 and a
    kernel under /boot (test set-up: scripts/setup's test dependencies).

    Cheap on purpose: the tests' module-scoped sessions launch the appliance
    themselves (one launch each, ~15 s without KVM), and a launch that fails
    there fails those tests.  Returns the system Python's path.
    """
    from vmafs.guest.appliance import system_python, unavailable_reason

    reason = unavailable_reason()
    if reason:
        _unavailable(f"libguestfs: {reason}")
    return system_python()


# --- hooks ------------------------------------------------------------------------------

_PROBE_MARKERS = {
    "require_fuse": "fuse",
    "require_loop": "loop",
    "require_qemu": "qemu",
    "require_nbd_tools": "nbd",
    "require_guestfs": "guestfs",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, marker in _PROBE_MARKERS.items():
            if fixture in item.fixturenames and marker not in item.keywords:
                item.add_marker(marker)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """With CI=true, say loudly how many tests were skipped and why."""
    if not in_ci():
        return
    skipped = terminalreporter.stats.get("skipped", [])
    passed = terminalreporter.stats.get("passed", [])
    tr = terminalreporter
    if skipped:
        tr.write_sep("!", f"CI: {len(skipped)} TEST(S) SKIPPED", red=True, bold=True)
        for rep in skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr
            tr.write_line(f"SKIPPED {rep.nodeid}: {reason}", red=True)
    else:
        tr.write_sep("=", "CI: 0 tests skipped", green=True)
    if not passed:
        tr.write_sep("!", "CI: NO TEST PASSED: failing the run", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    """With CI=true, a run in which no test passed is a failure (exit 5 stays 5)."""
    if not in_ci() or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not reporter.stats.get("passed"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
